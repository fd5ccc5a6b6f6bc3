"""``lineguard bench e2e``: throughput and capture→event latency through Redis, per stage.

Where ``lineguard bench model`` times the forward pass alone, this times what a line sees:
ingest (resize + encode + XADD), the wait in the frames stream, infer (decode, batch, forward,
publish), the hand-off through the scores stream, and decide (calibrate, fuse, dedup, event).
The difference between the two is the transport and batching overhead.

Method: infer and decide run on this box (threads by default); a warm-up of a few frames is
sent and awaited first, then ``frames`` frames at ``rate`` (``None`` = as fast as the sender
can go). Each event carries its own per-stage timings (``decide.latency_of``), so the
breakdown needs no extra instrumentation. Throughput is frames / (last event − first capture).
The images are smooth synthetic scenes (not noise), so JPEG sizes are realistic. With no
``LINEGUARD_REDIS__URL`` an embedded Valkey is started; on an external server the benchmark
uses its own key prefix and deletes its keys afterwards.

``dashboard=True`` measures the cost of the operator page: infer attaches anomaly maps (as
``run --dashboard`` does), the dashboard is served from this process and a simulated viewer
keeps its live stream open and loads every new reject's thumbnail, as an open browser tab would.
"""

from __future__ import annotations

import http.client
import json
import os
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from rich.table import Table

from lineguard.engines.errors import LineguardError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.decide import STAGES
from lineguard.stream.feed import EventCollector, events_cursor, send_source
from lineguard.stream.ingest import bundle_frame_codec, bundle_input_size
from lineguard.stream.run import LocalPipeline, Mode, without_deadline_at_max_rate
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings, redacted_url
from lineguard.stream.sources import ArraySource
from lineguard.stream.tools.harness import (
    bundle_or_untrained,
    delete_prefix,
    run_prefix,
    scores_by_seq,
    with_sections,
)

BENCH_CAMERA = "bench"


def synthetic_images(n: int, size: int | tuple[int, int], seed: int = 0) -> list[np.ndarray]:
    """``n`` smooth RGB scenes (``size`` = (height, width) or a side): a blurred colour field
    with a few filled shapes on it."""
    rng = np.random.default_rng(seed)
    h, w = (size, size) if isinstance(size, int) else size
    side = min(h, w)
    out = []
    for _ in range(n):
        field = rng.integers(40, 200, (8, 8, 3), dtype=np.uint8)
        img = cv2.resize(field, (w, h), interpolation=cv2.INTER_CUBIC)
        for _ in range(4):
            centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
            radius = int(rng.integers(side // 16, side // 5))
            colour = tuple(int(c) for c in rng.integers(0, 256, 3))
            cv2.circle(img, centre, radius, colour, thickness=-1, lineType=cv2.LINE_AA)
        out.append(img)
    return out


def _stats(values_s: list[float]) -> dict[str, float]:
    if not values_s:
        return {}
    arr = np.asarray(values_s) * 1000
    return {
        "p50": round(float(np.percentile(arr, 50)), 2),
        "p99": round(float(np.percentile(arr, 99)), 2),
        "mean": round(float(arr.mean()), 2),
    }


def bench_e2e(
    settings: Settings,
    *,
    frames: int = 300,
    rate: float | None = None,
    bundle: str | Path | None = None,
    runtime: str = "auto",
    device: str = "cpu",
    mode: Mode = "threads",
    warmup: int = 16,
    timeout_s: float | None = None,
    progress: Callable[[str], None] | None = None,
    dashboard: bool = False,
) -> dict[str, Any]:
    """Run the benchmark; returns a JSON-ready dict (see ``result_table`` for the view)."""
    if frames < 1:
        raise LineguardError(f"--frames must be at least 1, got {frames}")
    say = progress or (lambda _msg: None)
    load_before = os.getloadavg()
    external = settings.redis.url is not None
    prefix = run_prefix(settings, "bench")
    cfg = with_sections(
        settings,
        line={"camera": BENCH_CAMERA},
        redis={"key_prefix": prefix},
        ingest={"max_len": max(settings.ingest.max_len, frames + warmup + 100)},
    )
    cfg = without_deadline_at_max_rate(cfg, rate)
    with tempfile.TemporaryDirectory(prefix="lineguard-bench-e2e-") as tmp:
        bundle_path = bundle_or_untrained(bundle, Path(tmp), say)
        size = bundle_input_size(bundle_path)
        codec = bundle_frame_codec(bundle_path)
        runtime_kind = _runtime_used(runtime, device, bundle_path)
        images = synthetic_images(32, size)
        with redis_url_for(cfg) as url:
            say(f"starting infer and decide ({mode}) on {redacted_url(url)}")
            pipeline = LocalPipeline(
                cfg, url, bundle_path, mode=mode, runtime=runtime, device=device, maps=dashboard
            )
            client = connect(cfg, url, client_name="lineguard-bench")
            page: _PageViewer | None = None
            try:
                with pipeline:
                    if dashboard:
                        page = _PageViewer.open(cfg, url)
                        say(f"dashboard open at {page.server.url} (a simulated viewer reads it)")
                    bus = Bus.from_settings(client, cfg)
                    with EventCollector(cfg, url, BENCH_CAMERA, since=events_cursor(bus)) as col:
                        if warmup > 0:
                            say(f"warm-up: {warmup} frames")
                            sent = send_source(
                                bus, cfg, ArraySource(images, count=warmup), size=size,
                                codec=codec,
                            )  # fmt: skip
                            col.wait_for(sent.seqs, 120.0, check=pipeline.check)
                        say(f"timing {frames} frames at {'max rate' if rate is None else rate}")
                        sent = send_source(
                            bus, cfg, ArraySource(images, count=frames), size=size, fps=rate,
                            codec=codec,
                        )  # fmt: skip
                        limit = timeout_s or max(120.0, frames / 2.0)
                        complete = col.wait_for(sent.seqs, limit, check=pipeline.check)
                        events, counts = col.snapshot()
                    scored = scores_by_seq(bus, BENCH_CAMERA, set(sent.seqs)).values()
                    batches = [s.timings["batch"] for s in scored if "batch" in s.timings]
            finally:
                if page is not None:
                    page.close()
                if external:
                    delete_prefix(client, prefix)
                client.close()
    timed = [events[s] for s in sent.seqs if s in events]
    if not complete:
        raise LineguardError(
            f"only {len(timed)} of {frames} frames got an event in time; the pipeline is "
            "slower than expected or stuck (see the log)"
        )
    t_first = min(e.t_capture for e in timed)
    t_last = max(e.t_event for e in timed)
    latency = {
        stage: _stats([e.latency[stage] for e in timed if stage in e.latency]) for stage in STAGES
    }
    from lineguard.engines.bench.machine import machine_info

    return {
        "frames": frames,
        "rate": "max" if rate is None else rate,
        "mode": mode,
        "runtime": runtime_kind,
        "device": device,
        "max_batch": cfg.infer.max_batch,
        "max_delay_ms": cfg.infer.max_delay_ms,
        "encoding": cfg.ingest.encoding,
        "input_size": list(size),  # [height, width]
        "bundle": "synthetic efficientnet_lite0 lite (untrained)"
        if bundle is None
        else str(bundle),
        "frames_per_s": round(len(timed) / max(t_last - t_first, 1e-9), 2),
        "mean_batch": round(float(np.mean(batches)), 2) if batches else None,
        "latency_ms": latency,
        "verdicts": {
            v: sum(1 for e in timed if e.verdict == v)
            for v in ("pass", "fail", "error", "uninspected")
        },
        "duplicates": sum(n - 1 for n in counts.values() if n > 1),
        "dashboard": None if page is None else page.stats(),
        "load_avg_before": [round(x, 2) for x in load_before],
        "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "machine": machine_info(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


class _PageViewer:
    """The dashboard served beside the pipeline, and one simulated browser tab reading it.

    The tab keeps ``/api/stream`` open and fetches the thumbnail of every reject it has not
    seen yet, which is what the page's script does; it counts what it received so the result
    shows the page really was live during the run.
    """

    def __init__(self, server: Any) -> None:
        self.server = server
        self.updates = 0
        self.thumbs = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._conn: http.client.HTTPConnection | None = None
        self._thread = threading.Thread(target=self._read, name="bench-page", daemon=True)

    @classmethod
    def open(cls, settings: Settings, url: str) -> _PageViewer:
        from lineguard.stream.dashboard import DashboardServer

        server = DashboardServer(
            settings,
            url=url,
            port=0,
            prefix=settings.redis.key_prefix,
            line=settings.line.id,
        ).start()
        viewer = cls(server)
        viewer._thread.start()
        return viewer

    def _read(self) -> None:
        seen: set[str] = set()
        host, port = self.server.host, self.server.port
        try:
            self._conn = http.client.HTTPConnection(host, port, timeout=30)
            self._conn.request("GET", "/api/stream")
            resp = self._conn.getresponse()
            images = http.client.HTTPConnection(host, port, timeout=30)
            while not self._stop.is_set():
                line = resp.readline()
                if not line:
                    break
                if not line.startswith(b"data: "):
                    continue
                self.updates += 1
                for reject in json.loads(line[6:]).get("rejects", []):
                    thumb = reject.get("images", {}).get("thumb")
                    if thumb and thumb not in seen:
                        seen.add(thumb)
                        images.request("GET", thumb)
                        images.getresponse().read()
                        self.thumbs += 1
            images.close()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if not self._stop.is_set():
                self.errors.append(repr(exc))

    def close(self) -> None:
        self._stop.set()
        self.server.stop()  # ends the event stream, which ends the reader
        if self._conn is not None:
            self._conn.close()
        self._thread.join(timeout=10)

    def stats(self) -> dict[str, Any]:
        return {"updates": self.updates, "thumbnails": self.thumbs, "errors": self.errors}


def _runtime_used(runtime: str, device: str, bundle: Path) -> str:
    """What ``auto`` resolves to for this bundle (mirrors ``infer.resolve_runtime``)."""
    if runtime != "auto":
        return runtime
    has_onnx = (bundle / "model.onnx").is_file()
    return "onnxruntime" if device == "cpu" and has_onnx else "torch"


STAGE_LABELS = {
    "ingest": "ingest (resize, encode, XADD)",
    "queue": "ingest → infer queue wait",
    "infer": "infer (decode, batch, forward, publish)",
    "handoff": "infer → decide wait",
    "decide": "decide (calibrate, dedup, event)",
    "total": "capture → event",
}


def result_table(result: dict[str, Any]) -> Table:
    table = Table(
        title=(
            f"lineguard bench e2e: {result['frames']} frames at {result['rate']}, "
            f"{result['frames_per_s']:.1f} frames/s"
        ),
        caption=(
            f"runtime {result['runtime']} on {result['device']}, max_batch {result['max_batch']}, "
            f"max_delay {result['max_delay_ms']} ms, mean batch {result['mean_batch']}, "
            f"{result['encoding']} {'×'.join(map(str, result['input_size']))} px, "
            f"workers as {result['mode']}"
            f"{_dashboard_note(result.get('dashboard'))}; "
            f"load avg {result['load_avg_before'][0]} → {result['load_avg_after'][0]}"
        ),
    )
    for col in ("stage", "p50 ms", "p99 ms", "mean ms"):
        table.add_column(col, justify="left" if col == "stage" else "right")
    for stage in STAGES:
        st = result["latency_ms"].get(stage) or {}
        table.add_row(
            STAGE_LABELS[stage],
            *(f"{st[k]:.2f}" if k in st else "-" for k in ("p50", "p99", "mean")),
        )
    return table


def _dashboard_note(stats: dict[str, Any] | None) -> str:
    if stats is None:
        return ""
    return f", dashboard open ({stats['updates']} updates, {stats['thumbnails']} thumbnails)"
