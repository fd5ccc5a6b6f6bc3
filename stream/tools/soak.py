"""``lineguard bench soak``: the whole line as processes, at a fixed rate, for a long time.

A line runs for months, so the questions are ones a short benchmark cannot answer: does any
worker's memory creep, do the queues stay bounded, does latency drift, and does every frame
still get exactly one verdict after hours? The soak runs ``lineguard ingest`` (a folder of
synthetic scenes, looped, paced at ``rate``), ``lineguard infer`` and ``lineguard decide`` as
child processes against one server (an embedded Valkey unless ``LINEGUARD_REDIS__URL`` is
set; then under its own key prefix, deleted afterwards), and watches from the outside:

* every ``sample_s``: each worker's resident memory (``/proc/<pid>/status``, the pids come
  from the workers' own heartbeats), the stream lengths and group lag/pending, the server's
  memory, and the new events (verdicts, capture→event latency, duplicates);
* every ``report_s``: one line with all of that and the p99 latency of the interval;
* at the end: ingest is stopped (SIGTERM: it finishes the frame in hand), every frame it sent
  is awaited, and the run **fails** if the accounting does not add up
  (``sent = pass + fail + uninspected + error``, no frame without an event, none with two) or
  if a worker's memory grows without bound: the least-squares slope of its RSS over the second
  half of the run above ``max_growth_mib_per_min`` (the first half is warm-up: allocator
  arenas, ONNX Runtime's memory pattern, Python's caches).

The server's memory is reported but not judged: the events stream (``events_max_len``) and the
dedup keys (``dedup_ttl_s``) are meant to fill up for their first hour.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import redis

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.ingest import bundle_input_size
from lineguard.stream.protocol import ENTRY_FIELD, ProtocolError, decode_event
from lineguard.stream.run import LocalPipeline, settings_env
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings
from lineguard.stream.tools.harness import (
    bundle_or_untrained,
    delete_prefix,
    run_prefix,
    with_sections,
)
from lineguard.stream.worker import health_report, line_key

SOAK_CAMERA = "soak"
WORKERS = ("ingest", "infer", "decide")
VERDICTS = ("pass", "fail", "uninspected", "error")


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (Linux ``/proc``), None if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def growth_mib_per_min(samples: list[tuple[float, float]]) -> float | None:
    """Least-squares slope (MiB per minute) of (seconds, MiB) samples over the second half of
    their time span; None with fewer than 4 samples there or under a minute of it."""
    if len(samples) < 2:
        return None
    t0, t1 = samples[0][0], samples[-1][0]
    half = [(t, v) for t, v in samples if t >= (t0 + t1) / 2]
    if len(half) < 4 or half[-1][0] - half[0][0] < 60:
        return None
    t = np.asarray([s[0] for s in half]) / 60.0
    v = np.asarray([s[1] for s in half])
    slope = np.polyfit(t - t.mean(), v, 1)[0]
    return float(slope)


@dataclass
class Tally:
    """The events of the soak camera: verdicts, duplicates and latencies, in bounded memory."""

    verdicts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0))
    duplicates: int = 0
    below: int = 0  # every seq below this has an event
    above: set[int] = field(default_factory=set)  # seqs at or above ``below`` with an event
    window: list[float] = field(default_factory=list)  # latencies (ms) since the last report
    reservoir: list[float] = field(default_factory=list)  # a uniform sample of all latencies
    seen_latencies: int = 0
    _rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))

    RESERVOIR = 100_000

    def add(self, seq: int, verdict: str, latency_ms: float | None) -> None:
        if seq < self.below or seq in self.above:
            self.duplicates += 1
            return
        self.above.add(seq)
        while self.below in self.above:
            self.above.discard(self.below)
            self.below += 1
        self.verdicts[verdict] = self.verdicts.get(verdict, 0) + 1
        if latency_ms is not None:
            self.window.append(latency_ms)
            self.seen_latencies += 1
            if len(self.reservoir) < self.RESERVOIR:
                self.reservoir.append(latency_ms)
            else:
                j = int(self._rng.integers(0, self.seen_latencies))
                if j < self.RESERVOIR:
                    self.reservoir[j] = latency_ms

    @property
    def events(self) -> int:
        return sum(self.verdicts.values())

    def has_all_below(self, n: int) -> bool:
        return self.below >= n

    def take_window_p99(self) -> float | None:
        values, self.window = self.window, []
        return float(np.percentile(values, 99)) if values else None


@dataclass
class Sample:
    t: float
    rss: dict[str, float]
    lengths: dict[str, int]
    lag: int | None
    pending: int | None
    server_mib: float | None
    sent: int


def synthetic_folder(folder: Path, size: int | tuple[int, int], n: int = 32) -> Path:
    """``n`` smooth synthetic scenes as PNG files (the ingest source, looped)."""
    from lineguard.stream.tools.bench_e2e import synthetic_images

    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(synthetic_images(n, size)):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


class _Soak:
    def __init__(self, settings: Settings, url: str, say: Callable[[str], None]) -> None:
        self.settings = settings
        self.url = url
        self.say = say
        self.client = connect(settings, url, client_name="lineguard-soak")
        self.bus = Bus.from_settings(self.client, settings)
        self.tally = Tally()
        self.cursor = "0-0"
        self.samples: list[Sample] = []
        self.host = socket.gethostname()

    def sent(self) -> int:
        return int(self.client.get(line_key(self.bus, "seq", SOAK_CAMERA)) or 0)

    def read_events(self) -> None:
        key = self.bus.key("events")
        while True:
            reply: Any = self.client.xread({key: self.cursor}, count=2000)
            rows = [row for _stream, part in (reply or ()) for row in part]
            if not rows:
                return
            for entry_id, fields in rows:
                self.cursor = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                try:
                    ev = decode_event(fields.get(ENTRY_FIELD), self.bus.limits)
                except ProtocolError:
                    continue
                if ev.camera != SOAK_CAMERA:
                    continue
                total = ev.latency.get("total")
                self.tally.add(ev.seq, ev.verdict, None if total is None else total * 1000)

    def pids(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for hb in health_report(self.bus):
            stage, pid = hb.get("stage"), hb.get("pid")
            if stage in WORKERS and isinstance(pid, int) and hb.get("host") == self.host:
                out[str(stage)] = pid
        return out

    def sample(self, t: float) -> Sample:
        rss = {stage: r for stage, pid in self.pids().items() if (r := rss_mib(pid)) is not None}
        stats = self.bus.group_stats("frames", self.settings.infer.group)
        try:
            server = float(self.client.info("memory").get("used_memory_rss", 0)) / 2**20
        except redis.RedisError:
            server = None
        s = Sample(
            t=t,
            rss=rss,
            lengths={str(k): n for k, n in self.bus.lengths().items()},
            lag=None if stats is None else stats.lag,
            pending=None if stats is None else stats.pending,
            server_mib=server,
            sent=self.sent(),
        )
        self.samples.append(s)
        return s

    def report(self, s: Sample, elapsed_s: float) -> None:
        v = self.tally.verdicts
        p99 = self.tally.take_window_p99()
        rss = " ".join(f"{w} {s.rss[w]:.1f}" for w in WORKERS if w in s.rss)
        self.say(
            f"[{elapsed_s / 60:5.1f} min] sent {s.sent} | pass {v['pass']} fail {v['fail']} "
            f"uninspected {v['uninspected']} error {v['error']} | in flight "
            f"{s.sent - self.tally.events} | duplicates {self.tally.duplicates} | p99 "
            + ("-" if p99 is None else f"{p99:.0f} ms")
            + f" | frames {s.lengths['frames']} (lag {s.lag}, pending {s.pending}) scores "
            f"{s.lengths['scores']} events {s.lengths['events']} dead {s.lengths['dead']} | "
            f"RSS MiB {rss} | server {s.server_mib or 0:.1f} MiB"
        )

    def close(self) -> None:
        self.client.close()


def soak(
    settings: Settings,
    *,
    minutes: float,
    rate: float,
    bundle: str | Path | None = None,
    runtime: str = "auto",
    device: str = "cpu",
    sample_s: float = 5.0,
    report_s: float = 60.0,
    max_growth_mib_per_min: float = 1.0,
    drain_timeout_s: float = 180.0,
    say: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the soak (see the module docstring); returns a JSON-ready result with ``ok``."""
    if minutes <= 0 or rate <= 0:
        raise ConfigError(f"--minutes ({minutes}) and --rate ({rate}) must be positive")
    external = settings.redis.url is not None
    prefix = run_prefix(settings, "soak")
    cfg = with_sections(settings, line={"camera": SOAK_CAMERA}, redis={"key_prefix": prefix})
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lineguard-soak-") as tmp:
        bundle_path = bundle_or_untrained(bundle, Path(tmp), say)
        size = bundle_input_size(bundle_path)
        folder = synthetic_folder(Path(tmp) / "frames", size)
        with redis_url_for(cfg) as url:
            soaker = _Soak(cfg, url, say)
            pipeline = LocalPipeline(cfg, url, bundle_path, mode="processes", runtime=runtime,
                                     device=device)  # fmt: skip
            ingest: subprocess.Popen[bytes] | None = None
            try:
                say(f"starting ingest ({rate:g} frames/s), infer and decide as processes")
                pipeline.start()
                cmd = [sys.executable, "-m", "lineguard.stream.cli", "ingest",
                       "--source", str(folder), "--loop", "--rate", f"{rate:g}",
                       "--size", "x".join(map(str, size)),
                       "--bundle", str(bundle_path)]  # fmt: skip
                env = {**os.environ, **settings_env(cfg, url)}
                ingest = subprocess.Popen(cmd, env=env)
                result = _watch(soaker, pipeline, ingest, minutes, sample_s, report_s,
                                drain_timeout_s)  # fmt: skip
            finally:
                if ingest is not None and ingest.poll() is None:
                    ingest.kill()
                    ingest.wait()
                pipeline.stop()
                if external:
                    delete_prefix(soaker.client, prefix)
                soaker.close()
    result.update(
        rate=rate,
        minutes=minutes,
        runtime=runtime,
        device=device,
        bundle="synthetic efficientnet_lite0 lite 256 px (untrained)"
        if bundle is None
        else str(bundle),
        load_avg_before=[round(x, 2) for x in load_before],
        load_avg_after=[round(x, 2) for x in os.getloadavg()],
    )
    return _judge(result, max_growth_mib_per_min)


def _watch(
    soaker: _Soak,
    pipeline: LocalPipeline,
    ingest: subprocess.Popen[bytes],
    minutes: float,
    sample_s: float,
    report_s: float,
    drain_timeout_s: float,
) -> dict[str, Any]:
    t_start = time.monotonic()
    end = t_start + minutes * 60
    next_report = t_start + report_s
    first_report: Sample | None = None
    while True:
        now = time.monotonic()
        pipeline.check()
        if ingest.poll() is not None:
            raise LineguardError(f"the ingest process exited early with status {ingest.returncode}")
        soaker.read_events()
        s = soaker.sample(now - t_start)
        if first_report is None and all(w in s.rss for w in WORKERS):
            first_report = s
        if now >= next_report:
            soaker.report(s, now - t_start)
            next_report += report_s
        if now >= end:
            break
        time.sleep(max(0.0, min(sample_s, end - time.monotonic())))
    ingest.send_signal(signal.SIGTERM)  # finishes the frame in hand and exits
    ingest.wait(60)
    sent = soaker.sent()
    deadline = time.monotonic() + drain_timeout_s
    while not soaker.tally.has_all_below(sent) and time.monotonic() < deadline:
        pipeline.check()
        soaker.read_events()
        time.sleep(0.2)
    soaker.read_events()
    last = soaker.sample(time.monotonic() - t_start)
    soaker.report(last, last.t)
    tally = soaker.tally
    totals = tally.reservoir
    worker_series = {
        w: [(s.t, s.rss[w]) for s in soaker.samples if w in s.rss and s.t <= minutes * 60]
        for w in WORKERS
    }
    return {
        "sent": sent,
        "verdicts": dict(tally.verdicts),
        "events": tally.events,
        "missing": max(0, sent - tally.below),
        "duplicates": tally.duplicates,
        "latency_ms": {
            "p50": round(float(np.percentile(totals, 50)), 1) if totals else None,
            "p99": round(float(np.percentile(totals, 99)), 1) if totals else None,
        },
        "rss_mib": {
            w: {
                "start": round(series[0][1], 1) if series else None,
                "end": round(series[-1][1], 1) if series else None,
                "max": round(max(v for _t, v in series), 1) if series else None,
                "growth_mib_per_min": _round(growth_mib_per_min(series)),
            }
            for w, series in worker_series.items()
        },
        "server_mib": {
            "start": _round(first_report.server_mib if first_report else None),
            "end": _round(last.server_mib),
        },
        "max_lengths": {
            k: max(s.lengths[k] for s in soaker.samples) for k in ("frames", "scores", "dead")
        },
        "seconds": round(last.t, 1),
    }


def _round(x: float | None, n: int = 2) -> float | None:
    return None if x is None else round(x, n)


def _judge(result: dict[str, Any], max_growth: float) -> dict[str, Any]:
    problems: list[str] = []
    v = result["verdicts"]
    if result["sent"] != sum(v.values()):
        problems.append(
            f"accounting: sent {result['sent']} != pass + fail + uninspected + error "
            f"= {sum(v.values())}"
        )
    if result["missing"]:
        problems.append(f"{result['missing']} frames never got an event")
    if result["duplicates"]:
        problems.append(f"{result['duplicates']} frames got more than one event")
    for w, r in result["rss_mib"].items():
        g = r["growth_mib_per_min"]
        if r["start"] is None:
            problems.append(f"no memory samples of the {w} worker")
        elif g is not None and g > max_growth:
            problems.append(
                f"{w} memory grows {g:.2f} MiB/min over the second half "
                f"(limit {max_growth:g}): {r['start']} → {r['end']} MiB"
            )
    result["max_growth_mib_per_min"] = max_growth
    result["problems"] = problems
    result["ok"] = not problems
    return result
