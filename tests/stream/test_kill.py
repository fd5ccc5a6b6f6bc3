"""Crash recovery with real processes: an infer worker killed with SIGKILL while it holds a
batch loses nothing (a peer reclaims the entries), and SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lineguard.stream.bus import Bus, connect
from lineguard.stream.decide import DecideStage
from lineguard.stream.feed import send_source, wait_for_events
from lineguard.stream.settings import Settings
from lineguard.stream.sources import ArraySource
from lineguard.stream.worker import StopFlag, line_key, run_worker
from tests.stream.pipeline_helpers import (
    BAD,
    GOOD,
    SIZE,
    all_events,
    settings_for,
    split_bundle,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[2]


def start_infer(env: dict[str, str], bundle: Path, consumer: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lineguard.stream.cli", "--log-format", "json", "infer"]
    cmd += ["--bundle", str(bundle), "--consumer", consumer, "--runtime", "onnxruntime"]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.PIPE)


def heartbeat(bus: Bus, consumer: str) -> dict[str, object] | None:
    raw = bus.client.get(line_key(bus, "health", "infer", consumer))
    return None if raw is None else json.loads(raw)


@pytest.fixture
def decide_thread(bus: Bus, redis_url: str) -> Iterator[None]:
    """A decide worker in this process (its own client), stopped after the test."""
    settings = settings_for(bus, redis_url)
    client = connect(settings)
    stop = StopFlag()
    stage = DecideStage(Bus.from_settings(client, settings), settings, split_bundle().path)
    t = threading.Thread(
        target=run_worker,
        args=(stage, stage.bus),
        kwargs={"stop": stop, "handle_signals": False},
        daemon=True,
    )
    t.start()
    yield
    stop.set()
    t.join(10)
    client.close()


def test_sigkill_mid_batch_is_reclaimed_and_every_frame_gets_one_event(
    bus: Bus, redis_url: str, decide_thread: None
) -> None:
    split = split_bundle()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env.update(
        LINEGUARD_REDIS__URL=redis_url,
        LINEGUARD_REDIS__KEY_PREFIX=bus.prefix,
        LINEGUARD_LINE__ID=bus.line,
    )
    # Worker A batches very patiently: after the first frame it waits 20 s for more, so
    # the frames sit read-but-unacknowledged in its pending list when it is killed.
    env_a = dict(
        env,
        LINEGUARD_INFER__MAX_BATCH="64",
        LINEGUARD_INFER__BATCH_BUCKETS="64",
        LINEGUARD_INFER__MAX_DELAY_MS="20000",
        LINEGUARD_REDIS__SOCKET_TIMEOUT="60",
    )
    # Worker B takes over entries idle for more than 0.5 s.
    env_b = dict(
        env, LINEGUARD_INFER__RECLAIM_IDLE_MS="500", LINEGUARD_INFER__RECLAIM_INTERVAL_MS="200"
    )
    settings: Settings = settings_for(bus, redis_url)
    a = start_infer(env_a, split.path, "worker-a")
    b: subprocess.Popen[bytes] | None = None
    try:
        wait_until(lambda: heartbeat(bus, "worker-a") is not None, 60, "worker A to start")
        first = send_source(bus, settings, ArraySource([GOOD, BAD, GOOD], count=12), size=SIZE)
        wait_until(
            lambda: len(bus.pending("frames", "infer", consumer="worker-a")) == 12,
            20,
            "worker A to hold the batch",
        )
        a.send_signal(signal.SIGKILL)
        assert a.wait(10) == -signal.SIGKILL
        assert bus.length("scores") == 0  # A died before publishing anything

        b = start_infer(env_b, split.path, "worker-b")
        second = send_source(bus, settings, ArraySource([BAD], count=4), size=SIZE)
        seqs = first.seqs + second.seqs
        events, counts = wait_for_events(
            bus, first.camera, seqs, since=first.events_from, timeout_s=60
        )
        assert sorted(events) == seqs
        assert max(counts.values()) == 1
        assert len(all_events(bus)) == len(seqs)
        expected = ["pass", "fail", "pass"] * 4 + ["fail"] * 4
        assert [events[s].verdict for s in seqs] == expected
        wait_until(  # the heartbeat (refreshed every 2 s) reports what B took over
            lambda: int((heartbeat(bus, "worker-b") or {}).get("reclaimed", 0)) >= 12,  # type: ignore[call-overload]
            10,
            "worker B to report the reclaimed entries",
        )
        assert bus.pending("frames", "infer") == []
        assert bus.dead_letters() == []

        # SIGTERM: B finishes what it holds and exits cleanly, removing its heartbeat
        b.send_signal(signal.SIGTERM)
        assert b.wait(20) == 0
        assert heartbeat(bus, "worker-b") is None
    finally:
        for proc in (a, b):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
