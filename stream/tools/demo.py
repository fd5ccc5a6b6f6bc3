"""``lineguard demo``: the whole product on a fresh machine, in a few minutes, on a CPU.

1. makes a synthetic product line in the MVTec LOCO layout (``offline.synth.make_line``), or
   reuses the cached one;
2. trains a small bundle with ``offline.train.train_bundle(preset="demo")``, or reuses the
   cached one (``--fresh`` redoes both);
3. starts an embedded Valkey (unless ``LINEGUARD_REDIS__URL`` is set), the infer and decide
   workers, and streams the line's test images through them with a live dashboard: frames/s,
   queue depths, verdict counts, capture→event latency;
4. ends with a summary — verdict counts, accuracy against the folder labels (good parts should
   pass, logical and structural anomalies should fail), latency — and writes a report:
   ``report.json``, ``report.html`` and ``rejects.png`` (each rejected part next to its
   anomaly map).

``offline`` (training code) is imported only inside the functions that build the line and the
bundle; the workers never import it.
"""

from __future__ import annotations

import base64
import html
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.console import Console
from rich.live import Live
from rich.panel import Panel
from rich.table import Table

from lineguard.engines.errors import LineguardError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.feed import EventCollector, events_cursor, send_source
from lineguard.stream.ingest import bundle_frame_codec, bundle_input_size
from lineguard.stream.protocol import Event, LowResMap
from lineguard.stream.run import LocalPipeline, Mode, without_deadline_at_max_rate
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings
from lineguard.stream.sources import ArraySource, read_image
from lineguard.stream.tools.events import VERDICT_STYLE
from lineguard.stream.tools.harness import delete_prefix, run_prefix, scores_by_seq

Trainer = Callable[[Path, Path], Any]

DEMO_SIZE = 256
DEMO_COUNTS: dict[str, int] = {
    "n_train": 120,
    "n_val": 40,
    "n_test_good": 40,
    "n_test_logical": 30,
    "n_test_structural": 30,
}
LABEL_OF_FOLDER = {
    "good": "good",
    "logical_anomalies": "logical",
    "structural_anomalies": "structural",
}
DEMO_LINE = "demo"
DEMO_CAMERA = "demo-cam"
MAX_SHEET_TILES = 24


def default_demo_dir() -> Path:
    """``$XDG_CACHE_HOME/lineguard/demo`` (``~/.cache/lineguard/demo`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lineguard" / "demo"


def offline_trainer() -> Trainer:
    """The real trainer, ``lineguard.offline.train.train_bundle`` with the demo preset.

    Imported here, when the demo starts, so that a missing training package is reported
    before minutes are spent making the line.
    """
    try:
        from lineguard.offline.train import train_bundle
    except ImportError as exc:
        raise LineguardError(
            f"the demo needs lineguard.offline.train, which this installation lacks ({exc}); "
            "reinstall lineguard with its offline package"
        ) from None

    def train(data_dir: Path, out: Path) -> Any:
        return train_bundle(data_dir, out, preset="demo", progress=True)

    return train


# ------------------------------------------------------------------------------ the line


def ensure_line(
    directory: Path, *, size: int, counts: dict[str, int], seed: int, fresh: bool
) -> Path:
    """The synthetic line under ``directory``, made unless a complete one with the same
    settings is already there."""
    meta_path = directory / "meta.json"
    if not fresh and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
        wanted = {
            "train": counts["n_train"],
            "validation": counts["n_val"],
            "test_good": counts["n_test_good"],
            "test_logical": counts["n_test_logical"],
            "test_structural": counts["n_test_structural"],
        }
        if (
            meta.get("complete")
            and meta.get("size") == [size, size]
            and meta.get("seed") == seed
            and meta.get("counts") == wanted
        ):
            return directory
    from lineguard.offline.synth import make_line

    make_line(
        directory,
        seed=seed,
        size=size,
        n_train=counts["n_train"],
        n_val=counts["n_val"],
        n_test_good=counts["n_test_good"],
        n_test_logical=counts["n_test_logical"],
        n_test_structural=counts["n_test_structural"],
    )
    return directory


def ensure_bundle(line_dir: Path, bundle_dir: Path, trainer: Trainer, *, fresh: bool) -> Path:
    """The cached bundle if it loads and is newer than the line, else a freshly trained one."""
    from lineguard.engines.bundle import load_bundle

    manifest = bundle_dir / "manifest.json"
    line_meta = line_dir / "meta.json"
    if not fresh and manifest.is_file():
        try:
            load_bundle(bundle_dir)
            if manifest.stat().st_mtime >= line_meta.stat().st_mtime:
                return bundle_dir
        except LineguardError:
            pass
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    trainer(line_dir, bundle_dir)
    load_bundle(bundle_dir)  # the trainer must leave a valid bundle behind
    return bundle_dir


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    name: str
    label: str  # good | logical | structural

    @property
    def bad(self) -> bool:
        return self.label != "good"


def labelled_images(line_dir: Path, seed: int = 0) -> list[LabelledImage]:
    """The line's test split with labels from the folder names, in a fixed shuffled order
    (a real line mixes good and bad parts)."""
    out: list[LabelledImage] = []
    for folder, label in LABEL_OF_FOLDER.items():
        for p in sorted((line_dir / "test" / folder).glob("*.png")):
            out.append(LabelledImage(p, f"{folder}/{p.name}", label))
    if not out:
        raise LineguardError(f"{line_dir} has no test images under test/<good|…_anomalies>")
    random.Random(seed).shuffle(out)
    return out


# ------------------------------------------------------------------------------ dashboard


@dataclass
class _Live:
    total: int
    sent: int = 0
    t0: float = field(default_factory=time.time)
    queues: dict[str, tuple[int, int]] = field(default_factory=dict)
    last_queue_poll: float = 0.0


def _dashboard(state: _Live, collector: EventCollector, bus: Bus, settings: Settings) -> Panel:
    events, _counts = collector.snapshot()
    now = time.time()
    if now - state.last_queue_poll > 0.25:
        state.last_queue_poll = now
        for stream, group in (("frames", settings.infer.group), ("scores", settings.decide.group)):
            st = bus.group_stats(stream, group)  # type: ignore[arg-type]
            state.queues[stream] = (0, 0) if st is None else (st.lag or 0, st.pending)
    elapsed = max(now - state.t0, 1e-6)
    counts = {v: 0 for v in VERDICT_STYLE}
    for e in events.values():
        counts[e.verdict] += 1
    totals = [e.latency["total"] * 1000 for e in events.values() if "total" in e.latency]
    table = Table.grid(padding=(0, 2))
    table.add_column(justify="right", style="bold")
    table.add_column()
    table.add_row("sent", f"{state.sent} / {state.total}")
    table.add_row("events", f"{len(events)}  ({len(events) / elapsed:.1f} frames/s)")
    for stream, (lag, pending) in state.queues.items():
        table.add_row(f"{stream} queue", f"{lag} waiting, {pending} in progress")
    table.add_row(
        "verdicts",
        "  ".join(f"[{VERDICT_STYLE[v]}]{v} {n}[/]" for v, n in counts.items()),
    )
    if totals:
        p50, p99 = np.percentile(totals, 50), np.percentile(totals, 99)
        table.add_row("latency", f"p50 {p50:.0f} ms   p99 {p99:.0f} ms  (capture → event)")
    return Panel(table, title="lineguard demo: live", border_style="cyan")


# ------------------------------------------------------------------------------ report


@dataclass
class DemoResult:
    ok: bool
    summary: dict[str, Any]
    report_dir: Path


def _confusion(images: dict[int, LabelledImage], events: dict[int, Event]) -> dict[str, Any]:
    judged = [(images[s], e) for s, e in events.items() if e.verdict in ("pass", "fail")]
    tp = sum(1 for im, e in judged if im.bad and e.verdict == "fail")
    tn = sum(1 for im, e in judged if not im.bad and e.verdict == "pass")
    fp = sum(1 for im, e in judged if not im.bad and e.verdict == "fail")
    fn = sum(1 for im, e in judged if im.bad and e.verdict == "pass")
    per_label: dict[str, dict[str, int]] = {}
    for im, e in judged:
        row = per_label.setdefault(im.label, {"n": 0, "rejected": 0})
        row["n"] += 1
        row["rejected"] += int(e.verdict == "fail")
    n = len(judged)
    return {
        "judged": n,
        "accuracy": round((tp + tn) / n, 4) if n else None,
        "true_rejects": tp,
        "true_passes": tn,
        "false_rejects": fp,
        "missed_defects": fn,
        "by_label": per_label,
    }


def contact_sheet(
    tiles: list[tuple[np.ndarray, np.ndarray | None, str]], tile: int = 160, cols: int = 4
) -> np.ndarray:
    """RGB grid: each cell is the image and, beside it, the image under its anomaly map."""
    cell_w, cell_h = 2 * tile, tile + 18
    rows = max(1, (len(tiles) + cols - 1) // cols)
    sheet = np.full((rows * cell_h, cols * cell_w, 3), 24, np.uint8)
    for i, (image, amap, caption) in enumerate(tiles):
        r, c = divmod(i, cols)
        y, x = r * cell_h, c * cell_w
        img = cv2.resize(image, (tile, tile), interpolation=cv2.INTER_AREA)
        sheet[y : y + tile, x : x + tile] = img
        if amap is not None:
            a = amap.astype(np.float32)
            span = float(a.max() - a.min())
            a = (a - a.min()) / span if span > 0 else np.zeros_like(a)
            heat = cv2.applyColorMap(
                cv2.resize((a * 255).astype(np.uint8), (tile, tile)), cv2.COLORMAP_JET
            )
            overlay = cv2.addWeighted(img, 0.5, cv2.cvtColor(heat, cv2.COLOR_BGR2RGB), 0.5, 0)
            sheet[y : y + tile, x + tile : x + 2 * tile] = overlay
        cv2.putText(
            sheet, caption[:40], (x + 4, y + tile + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
            (235, 235, 235), 1, cv2.LINE_AA,
        )  # fmt: skip
    return sheet


def write_report(
    out_dir: Path,
    summary: dict[str, Any],
    images: dict[int, LabelledImage],
    events: dict[int, Event],
    maps: dict[int, LowResMap],
) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    rejects = sorted(
        (s for s, e in events.items() if e.verdict == "fail"),
        key=lambda s: -(events[s].score or 0.0),
    )
    tiles = []
    for s in rejects[:MAX_SHEET_TILES]:
        im = images[s]
        amap = maps.get(s)
        caption = f"{im.label} {im.path.stem} score {events[s].score:.2f}"
        tiles.append((read_image(im.path), None if amap is None else amap.to_float(), caption))
    sheet_path = out_dir / "rejects.png"
    sheet = contact_sheet(tiles) if tiles else np.full((40, 320, 3), 24, np.uint8)
    cv2.imwrite(str(sheet_path), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    json_path = out_dir / "report.json"
    rows: list[dict[str, Any]] = [
        {
            "seq": s,
            "image": images[s].name,
            "label": images[s].label,
            "verdict": e.verdict,
            "score": e.score,
            "threshold": e.threshold,
            "contributions": e.contributions,
            "latency_ms": round(e.latency.get("total", 0.0) * 1000, 2),
            "reason": e.reason,
        }
        for s, e in sorted(events.items())
    ]
    json_path.write_text(json.dumps({"summary": summary, "frames": rows}, indent=2))
    html_path = out_dir / "report.html"
    sheet_b64 = base64.b64encode(sheet_path.read_bytes()).decode()
    cells = []
    for r in rows:
        score = "" if r["score"] is None else f"{r['score']:.3f}"
        cells.append(
            f"<tr class='{html.escape(r['verdict'])}'><td>{r['seq']}</td>"
            f"<td>{html.escape(r['image'])}</td><td>{r['label']}</td><td>{r['verdict']}</td>"
            f"<td>{score}</td><td>{r['latency_ms']:.1f}</td>"
            f"<td>{html.escape(r['reason'])}</td></tr>"
        )
    body = "".join(cells)
    conf = summary["accuracy"]
    html_path.write_text(
        "<!doctype html><meta charset='utf-8'><title>lineguard demo report</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:2px 8px}"
        ".fail{color:#b00}.error{color:#909}.uninspected{color:#a60}</style>"
        "<h1>lineguard demo report</h1>"
        f"<p>model <code>{html.escape(str(summary['model']))}</code>, "
        f"{summary['frames']} frames, accuracy {conf['accuracy']}, "
        f"{summary['frames_per_s']} frames/s, latency p50 {summary['latency_ms'].get('p50')} ms "
        f"/ p99 {summary['latency_ms'].get('p99')} ms</p>"
        f"<pre>{html.escape(json.dumps(summary, indent=2))}</pre>"
        "<h2>Rejected parts (image | anomaly map)</h2>"
        f"<img src='data:image/png;base64,{sheet_b64}' alt='rejects'>"
        "<h2>Every frame</h2><table><tr><th>seq</th><th>image</th><th>label</th>"
        f"<th>verdict</th><th>score</th><th>ms</th><th>reason</th></tr>{body}</table>"
    )
    return {"json": json_path, "html": html_path, "sheet": sheet_path}


def _summary_table(summary: dict[str, Any]) -> Table:
    conf = summary["accuracy"]
    table = Table(title="lineguard demo: summary", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column()
    v = summary["verdicts"]
    table.add_row("frames", str(summary["frames"]))
    table.add_row("verdicts", ", ".join(f"{k} {n}" for k, n in v.items()))
    table.add_row("accuracy", f"{conf['accuracy']} on {conf['judged']} judged frames")
    table.add_row(
        "errors",
        f"{conf['false_rejects']} good parts rejected, {conf['missed_defects']} defects missed",
    )
    for label, row in sorted(conf["by_label"].items()):
        table.add_row(f"  {label}", f"{row['rejected']} of {row['n']} rejected")
    lat = summary["latency_ms"]
    table.add_row("throughput", f"{summary['frames_per_s']} frames/s")
    if lat:
        table.add_row("latency", f"p50 {lat['p50']} ms, p99 {lat['p99']} ms (capture → event)")
    table.add_row("times", ", ".join(f"{k} {v:.1f} s" for k, v in summary["seconds"].items()))
    return table


# ------------------------------------------------------------------------------ the demo


def run_demo(
    directory: Path,
    *,
    settings: Settings | None = None,
    rate: float | None = None,
    fresh: bool = False,
    live: bool = True,
    console: Console | None = None,
    trainer: Trainer | None = None,
    counts: dict[str, int] | None = None,
    size: int = DEMO_SIZE,
    seed: int = 0,
    mode: Mode = "threads",
) -> DemoResult:
    """Run the demo in ``directory`` (see the module docstring). ``trainer`` replaces the
    real training (tests use an untrained bundle)."""
    con = console or Console()
    base = settings or Settings.load()
    train = trainer or offline_trainer()
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    con.print(f"[bold]1/4[/bold] synthetic line in {directory / 'line'}")
    line_dir = ensure_line(
        directory / "line", size=size, counts=counts or DEMO_COUNTS, seed=seed, fresh=fresh
    )
    seconds["line"] = time.perf_counter() - t

    t = time.perf_counter()
    con.print(f"[bold]2/4[/bold] bundle in {directory / 'bundle'} (trained once, then cached)")
    bundle_dir = ensure_bundle(line_dir, directory / "bundle", train, fresh=fresh)
    seconds["bundle"] = time.perf_counter() - t
    input_size = bundle_input_size(bundle_dir)

    items = labelled_images(line_dir, seed)
    pictures = [read_image(it.path) for it in items]
    external = base.redis.url is not None
    cfg = base.model_copy(
        update={
            "line": base.line.model_copy(update={"id": DEMO_LINE, "camera": DEMO_CAMERA}),
            "redis": base.redis.model_copy(update={"key_prefix": run_prefix(base, "demo")}),
            "ingest": base.ingest.model_copy(
                update={"max_len": max(base.ingest.max_len, 2 * len(items))}
            ),
        }
    )
    cfg = without_deadline_at_max_rate(cfg, rate)
    t = time.perf_counter()
    con.print("[bold]3/4[/bold] embedded Valkey, infer and decide workers")
    with redis_url_for(cfg) as url:
        client = connect(cfg, url, client_name="lineguard-demo")
        try:
            with LocalPipeline(cfg, url, bundle_dir, mode=mode, maps=True):
                seconds["start"] = time.perf_counter() - t
                bus = Bus.from_settings(client, cfg)
                t = time.perf_counter()
                con.print(f"[bold]4/4[/bold] streaming {len(items)} test images")
                state = _Live(total=len(items))
                with EventCollector(cfg, url, DEMO_CAMERA, since=events_cursor(bus)) as col:
                    monitor = connect(cfg, url, client_name="lineguard-demo-live")
                    mbus = Bus.from_settings(monitor, cfg)

                    def bump(_s: Any) -> None:
                        state.sent += 1

                    try:
                        with Live(
                            get_renderable=lambda: _dashboard(state, col, mbus, cfg),
                            console=con,
                            refresh_per_second=4,
                            transient=False,
                        ) if live else nullcontext():  # fmt: skip
                            names = [it.name for it in items]
                            source = ArraySource(pictures, names=names)
                            sent = send_source(
                                bus, cfg, source, size=input_size, fps=rate, on_sent=bump,
                                codec=bundle_frame_codec(bundle_dir),
                            )  # fmt: skip
                            done = col.wait_for(sent.seqs, max(60.0, 2.0 * len(items)))
                    finally:
                        monitor.close()
                    con.print()
                    events, dup_counts = col.snapshot()
                seconds["stream"] = time.perf_counter() - t
                by_seq = {s: items[i] for i, s in enumerate(sent.seqs)}
                rejected = {s for s, e in events.items() if e.verdict == "fail"}
                scored = scores_by_seq(bus, DEMO_CAMERA, rejected)
                maps = {s: sc.amap for s, sc in scored.items() if sc.amap is not None}
        finally:
            if external:
                delete_prefix(client, cfg.redis.key_prefix)
            client.close()

    totals = [e.latency["total"] for e in events.values() if "total" in e.latency]
    t_first = sent.t_first
    t_last = max((e.t_event for e in events.values()), default=t_first)
    models = sorted({e.model for e in events.values()})
    summary: dict[str, Any] = {
        "frames": sent.count,
        "events": len(events),
        "missing": sent.count - len(events),
        "duplicates": sum(n - 1 for n in dup_counts.values() if n > 1),
        "verdicts": {v: sum(1 for e in events.values() if e.verdict == v) for v in VERDICT_STYLE},
        "accuracy": _confusion(by_seq, events),
        "frames_per_s": round(len(events) / max(t_last - t_first, 1e-9), 2),
        "latency_ms": {
            "p50": round(float(np.percentile(totals, 50)) * 1000, 1),
            "p99": round(float(np.percentile(totals, 99)) * 1000, 1),
        }
        if totals
        else {},
        "model": models[0] if len(models) == 1 else models,
        "input_size": input_size,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    paths = write_report(directory / "report", summary, by_seq, events, maps)
    con.print(_summary_table(summary))
    con.print(f"report: {paths['html']}  (also {paths['json'].name}, {paths['sheet'].name})")
    ok = done and summary["missing"] == 0 and summary["duplicates"] == 0
    return DemoResult(ok=ok, summary=summary, report_dir=directory / "report")
