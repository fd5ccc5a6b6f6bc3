"""The history's commands: ``history-worker`` fills it, ``history`` queries and exports it,
``feedback`` marks a frame good or defective."""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from lineguard.stream.cli.common import (
    console,
    err_console,
    external_client,
    friendly_errors,
    load_settings,
)
from lineguard.stream.cli.options import (
    BurstOpt,
    ConsumerOpt,
    FormatOpt,
    HistoryDirOpt,
    HistoryUrlOpt,
    LineOpt,
    MetricsPortOpt,
)

if TYPE_CHECKING:
    from lineguard.stream.history.store import HistoryStore

app = typer.Typer()

_FRAME_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/[A-Za-z0-9][A-Za-z0-9_.-]{0,63}/\d+$")
_AGO_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(text: str | None, now: float | None = None) -> float | None:
    """``2h``/``30m``/``7d`` ago, an ISO time (local when it has no zone) or unix seconds."""
    if text is None:
        return None
    now = time.time() if now is None else now
    value = text.strip()
    m = _AGO_RE.match(value)
    if m:
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise typer.BadParameter(
            f"{text!r} is not a time: use 2h / 30m / 7d (ago), 2026-12-03T06:00 or unix seconds"
        ) from None


def open_history(url: str | None, directory: Path | None) -> HistoryStore:
    """The configured history, with these flags applied; an SQLite file that is not there
    is refused rather than created (a mistyped folder would otherwise hide the real one)."""
    from lineguard.engines.errors import ConfigError
    from lineguard.stream.history.store import HistoryStore, history_configured

    settings = load_settings({"history.url": url, "history.dir": directory}, quiet=True)
    if not history_configured(settings):
        raise ConfigError(
            f"no history in {settings.history.dir} (no history.sqlite there): run "
            "'lineguard history-worker' first, or point LINEGUARD_HISTORY__DIR / "
            "LINEGUARD_HISTORY__URL at the line's history"
        )
    return HistoryStore.from_settings(settings.history)


@app.command("history-worker")
@friendly_errors
def history_worker(
    consumer: ConsumerOpt = None,
    burst: BurstOpt = False,
    history_url: HistoryUrlOpt = None,
    history_dir: HistoryDirOpt = None,
    line: LineOpt = None,
    metrics_port: MetricsPortOpt = None,
) -> None:
    """Write every verdict of the events stream to the history, exactly once.

    Consumer group 'history'; acknowledges an event only after its row is committed, so a
    restart or a database outage loses and doubles nothing (the backlog waits in Redis).
    """
    from lineguard.stream.bus import Bus
    from lineguard.stream.history.worker import HistoryStage
    from lineguard.stream.metrics import serve_metrics
    from lineguard.stream.worker import run_worker

    settings = load_settings(
        {
            "line.id": line,
            "history.url": history_url,
            "history.dir": history_dir,
            "metrics.port": metrics_port,
        }
    )
    client = external_client(settings, "history")
    stop_metrics = serve_metrics(
        settings.metrics.port, settings.metrics.addr, settings.metrics.token_value
    )
    try:
        bus = Bus.from_settings(client, settings)
        stage = HistoryStage(bus, settings, consumer=consumer)
        err_console.print(f"history: {stage.store.where}", highlight=False)
        run_worker(stage, bus, burst=burst)
    finally:
        stop_metrics()
        client.close()


@app.command("history")
@friendly_errors
def history(
    since: Annotated[
        str | None, typer.Option(metavar="WHEN", help="From: 8h (ago), an ISO time, unix s.")
    ] = None,
    until: Annotated[str | None, typer.Option(metavar="WHEN", help="Up to (excluded).")] = None,
    camera: Annotated[str | None, typer.Option(metavar="ID", help="Camera id.")] = None,
    verdict: Annotated[
        str | None, typer.Option(metavar="V", help="pass, fail, error or uninspected.")
    ] = None,
    model: Annotated[str | None, typer.Option(metavar="VERSION", help="Model version.")] = None,
    mark: Annotated[str | None, typer.Option(metavar="M", help="good or defect.")] = None,
    limit: Annotated[
        int | None, typer.Option(metavar="N", help="At most N rows (default 50 on screen).")
    ] = None,
    export: Annotated[
        Path | None,
        typer.Option(metavar="PATH", help="Write the rows to PATH: .csv, .parquet or .jsonl."),
    ] = None,
    output: FormatOpt = "text",
    history_url: HistoryUrlOpt = None,
    history_dir: HistoryDirOpt = None,
) -> None:
    """Query the verdict history: rows and counts, or an export of every matching row."""
    from lineguard.stream.history.export import export_format, export_rows
    from lineguard.stream.protocol import VERDICTS

    if verdict is not None and verdict not in VERDICTS:
        raise typer.BadParameter(f"use one of {', '.join(VERDICTS)}", param_hint="--verdict")
    if mark is not None and mark not in ("good", "defect"):
        raise typer.BadParameter("use good or defect", param_hint="--mark")
    if export is not None:
        export_format(export)
    t0, t1 = parse_when(since), parse_when(until)
    store = open_history(history_url, history_dir)
    filters: dict[str, Any] = {
        "since": t0, "until": t1, "camera": camera, "verdict": verdict, "model": model
    }  # fmt: skip
    with store:
        if export is not None:
            rows_iter = store.iter_rows(**filters, mark=mark, limit=limit)
            n = export_rows(rows_iter, export)
            err_console.print(f"wrote {n} rows to {export}", highlight=False)
            return
        counts = store.counts(since=t0, until=t1, camera=camera)
        rows = store.query(
            **filters, mark=mark, limit=50 if limit is None else limit, newest_first=True
        )
    total = sum(counts.values())
    fails = counts.get("fail", 0)
    if output == "json":
        typer.echo(
            json.dumps(
                {
                    "counts": {**{v: counts.get(v, 0) for v in VERDICTS}, "total": total},
                    "reject_rate": fails / total if total else None,
                    "rows": [r.to_json() for r in rows],
                }
            )
        )
        return
    table = Table(title="lineguard history (newest first)")
    for col in ("frame key", "captured", "verdict", "score", "model", "ms", "mark", "reason"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.frame_key,
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.t_capture)),
            r.verdict,
            "-" if r.score is None else f"{r.score:.3f}",
            r.model,
            "-" if r.latency_ms is None else f"{r.latency_ms:.1f}",
            r.mark or "",
            r.reason[:60],
        )
    console.print(table)
    rate = f"{100 * fails / total:.2f} %" if total else "-"
    shown = ", ".join(f"{v} {counts.get(v, 0)}" for v in VERDICTS)
    console.print(f"{total} verdicts in range: {shown}; reject rate {rate}", highlight=False)


@app.command("feedback")
@friendly_errors
def feedback(
    frame_key: Annotated[
        str, typer.Argument(metavar="FRAME_KEY", help="line/camera/seq, as events show it.")
    ],
    good: Annotated[bool, typer.Option("--good", help="A good part (false reject).")] = False,
    defect: Annotated[
        bool, typer.Option("--defect", help="A defect (confirmed, or missed and found later).")
    ] = False,
    note: Annotated[str, typer.Option(metavar="TEXT", help="Why, for the record.")] = "",
    epoch: Annotated[
        str | None,
        typer.Option(
            metavar="EPOCH",
            help="The verdict of this line epoch ('lineguard history --format json' shows "
            "it); default: the newest verdict of FRAME_KEY. A frame key repeats after Redis "
            "lost its data.",
        ),
    ] = None,
    history_url: HistoryUrlOpt = None,
    history_dir: HistoryDirOpt = None,
) -> None:
    """Mark a frame as a good part or a defect; the mark goes into the history.

    'lineguard refit BUNDLE DATA --feedback' then learns the good ones.
    """
    if good == defect:
        raise typer.BadParameter("give exactly one of --good and --defect")
    if not _FRAME_KEY_RE.match(frame_key):
        raise typer.BadParameter(
            f"{frame_key!r} is not a frame key (line/camera/seq, e.g. line1/cam0/000000042)",
            param_hint="FRAME_KEY",
        )
    line_id, camera, seq = frame_key.split("/")
    from lineguard.stream.protocol import frame_key as make_key

    key = make_key(line_id, camera, int(seq))  # the stored, zero-padded spelling
    store = open_history(history_url, history_dir)
    with store:
        if epoch is not None and store.get(key, epoch) is None:
            raise typer.BadParameter(
                f"the history has no verdict of {key} in epoch {epoch!r}; leave out --epoch "
                "to mark its newest verdict",
                param_hint="--epoch",
            )
        store.mark(key, "good" if good else "defect", epoch=epoch, source="cli", note=note)
        found = store.get(key, epoch)
    what = "good part" if good else "defect"
    tail = "" if found else " (no verdict row for it yet: the mark waits for it)"
    console.print(f"{key} marked {what}{tail}", highlight=False)
