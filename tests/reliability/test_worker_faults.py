"""Workers die or stall: infer SIGKILLed over and over, decide SIGKILLed once, infer paused
(SIGSTOP) while ingest keeps sending into a tiny frames stream.

Workers are real ``lineguard`` processes on a private server; ingest runs in a thread of the
test at a fixed rate. The contract checked every time: each frame ingest sent gets exactly one
event, and frames = pass + fail + uninspected + error.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from lineguard.stream.bus import Bus, connect
from lineguard.stream.settings import RedisSettings
from tests.reliability.helpers import (
    IngestThread,
    RedisProcess,
    WorkerProcess,
    heartbeat_consumers,
    server_binary,
    stopped,
    unique_prefix,
    wait_for_every_seq,
    wait_until,
    worker_env,
)
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for, split_bundle

IMAGES = [GOOD, BAD, GOOD]
EXPECTED = ["pass", "fail", "pass"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(server_binary() is None, reason="no redis-server/valkey-server"),
]


def bus_on(url: str) -> Bus:
    return Bus(
        connect(RedisSettings(url=url, socket_timeout=5.0, retries=1)),
        line="line1",
        prefix=unique_prefix(),
    )


def infer_proc(env: dict[str, str], bundle: Path, name: str, log: Path) -> WorkerProcess:
    args = ["--bundle", str(bundle), "--runtime", "onnxruntime", "--consumer", name]
    return WorkerProcess("infer", args, env, log)


def decide_proc(env: dict[str, str], bundle: Path, log: Path) -> WorkerProcess:
    args = ["--bundle", str(bundle), "--consumer", "decide-0", "--gap-grace-s", "30"]
    return WorkerProcess("decide", args, env, log)


def test_infer_killed_repeatedly_and_decide_once_every_frame_gets_one_event(
    tmp_path: Path, own_server: RedisProcess
) -> None:
    split = split_bundle()
    bus = bus_on(own_server.url)
    settings = settings_for(bus, own_server.url)
    env = worker_env(
        own_server.url,
        bus,
        **{
            "infer.max_delay_ms": 150,  # A holds frames a while, so kills find a batch
            "infer.reclaim_idle_ms": 1500,
            "infer.reclaim_interval_ms": 300,
            "decide.reclaim_idle_ms": 1500,
        },
    )
    victim = infer_proc(env, split.path, "infer-a", tmp_path / "infer-a.log")
    steady = infer_proc(env, split.path, "infer-b", tmp_path / "infer-b.log")
    decide = decide_proc(env, split.path, tmp_path / "decide.log")
    n = 150
    kills_holding = 0
    with stopped(victim, steady, decide):
        for p in (victim, steady, decide):
            p.start()
        wait_until(
            lambda: (
                {"infer-a", "infer-b"} <= heartbeat_consumers(bus, "infer")
                and "decide-0" in heartbeat_consumers(bus, "decide")
            ),
            120,
            "workers to be ready",
        )
        ingest = IngestThread(settings, IMAGES, n, size=SIZE, fps=15).start()
        try:
            for round_ in range(3):
                target = 20 + 35 * round_
                wait_until(lambda: ingest.sent >= target, 60, "frames to flow")  # noqa: B023
                try:  # SIGKILL while it holds unacknowledged frames, if we can catch it so
                    wait_until(
                        lambda: bus.pending("frames", "infer", consumer="infer-a") != [],
                        3,
                        "infer-a to hold a batch",
                        interval_s=0.005,
                    )
                    kills_holding += 1
                except AssertionError:
                    pass
                victim.signal(signal.SIGKILL)
                assert victim.proc is not None and victim.proc.wait(10) == -signal.SIGKILL
                if round_ == 1:  # decide dies once, in the middle of the run
                    decide.signal(signal.SIGKILL)
                    assert decide.proc is not None and decide.proc.wait(10) == -signal.SIGKILL
                    decide.start()
                victim.start()  # same consumer name: re-reads its own backlog first
            ingest.join(120)
        finally:
            ingest.close()
        assert ingest.sent == n
        events = wait_for_every_seq(bus, "cam0", n, 120)
        per_seq = Counter(e.seq for e in events)
        assert max(per_seq.values()) == 1, f"duplicated events: {per_seq.most_common(3)}"
        by_seq = {e.seq: e for e in events}
        for seq, ev in by_seq.items():
            if ev.verdict == "error":  # only a frame that kept killing workers may be one
                assert "MAX_DELIVERIES" in ev.reason, ev.reason
            else:
                assert ev.verdict == EXPECTED[seq % 3], (seq, ev.verdict, ev.reason)
        assert sum(1 for e in events if e.verdict == "error") <= 2
        assert kills_holding >= 1, "no kill caught infer-a holding a batch"
        wait_until(lambda: bus.pending("frames", "infer") == [], 30, "no frame left pending")
        assert victim.starts == 4 and decide.starts == 2
    bus.client.close()


def test_backpressure_keeps_the_stream_bounded_and_trimmed_frames_are_uninspected(
    tmp_path: Path, own_server: RedisProcess
) -> None:
    """Infer is paused (SIGSTOP) while ingest sends 40 frames/s into a frames stream capped at
    20 entries: Redis holds at most ~20 frames, and each frame trimmed before it was scored
    becomes an ``uninspected`` event."""
    split = split_bundle()
    bus = bus_on(own_server.url)
    max_len = 20
    # raw 64×64 RGB frames are 12 KiB: one per radix-tree node, so MAXLEN ~ trims exactly
    settings = settings_for(
        bus, own_server.url, **{"ingest.max_len": max_len, "ingest.encoding": "raw"}
    )
    env = worker_env(own_server.url, bus, **{"ingest.max_len": max_len})
    infer = infer_proc(env, split.path, "infer-0", tmp_path / "infer.log")
    decide = decide_proc(env, split.path, tmp_path / "decide.log")
    n = 200
    lengths: list[int] = []
    memory: list[int] = []
    with stopped(infer, decide):
        infer.start()
        decide.start()
        wait_until(
            lambda: (
                "infer-0" in heartbeat_consumers(bus, "infer")
                and "decide-0" in heartbeat_consumers(bus, "decide")
            ),
            120,
            "workers to be ready",
        )
        ingest = IngestThread(settings, IMAGES, n, size=SIZE, fps=40).start()
        try:
            wait_until(lambda: ingest.sent >= 30, 30, "frames to flow")
            infer.signal(signal.SIGSTOP)
            t_pause = time.monotonic()
            while time.monotonic() - t_pause < 3.0:  # ~120 frames arrive meanwhile
                lengths.append(bus.length("frames"))
                memory.append(int(bus.client.memory_usage(bus.key("frames")) or 0))
                time.sleep(0.05)
            infer.signal(signal.SIGCONT)
            ingest.join(60)
        finally:
            ingest.close()
        assert ingest.sent == n
        events = wait_for_every_seq(bus, "cam0", n, 90)
    per_seq = Counter(e.seq for e in events)
    assert max(per_seq.values()) == 1
    verdicts = Counter(e.verdict for e in events)
    assert sum(verdicts.values()) == n  # frames = pass + fail + uninspected + error
    assert verdicts["error"] == 0
    assert verdicts["uninspected"] >= 50, verdicts  # ~120 arrived during a 3 s pause
    for e in events:
        if e.verdict == "uninspected":
            assert "trimmed" in e.reason and e.score is None
        else:
            assert e.verdict == EXPECTED[e.seq % 3]
    assert max(lengths) <= max_len + 1, f"frames stream grew past MAXLEN: {max(lengths)}"
    frame_bytes = SIZE * SIZE * 3
    assert max(memory) < (max_len + 2) * frame_bytes * 1.5, max(memory)
    bus.client.close()


def test_infer_down_past_the_deadline_every_frame_gets_one_verdict_on_time(
    tmp_path: Path, redis_url: str
) -> None:
    """Infer is not running: each frame gets `uninspected` (deadline) within deadline + a
    small tolerance. Infer then starts and scores them all: no second verdict (each is
    counted late); frames captured after its return get their normal verdicts."""
    split = split_bundle()
    bus = bus_on(redis_url)
    settings = settings_for(bus, redis_url)
    env = worker_env(redis_url, bus, **{"decide.deadline_ms": 1500})
    decide = decide_proc(env, split.path, tmp_path / "decide.log")
    infer = infer_proc(env, split.path, "infer-0", tmp_path / "infer.log")
    with stopped(decide, infer):
        decide.start()
        wait_until(lambda: "decide-0" in heartbeat_consumers(bus, "decide"), 60, "decide up")
        first = IngestThread(settings, IMAGES, 12, size=SIZE, fps=20).start()
        first.join(30)
        first.close()
        events = wait_for_every_seq(bus, "cam0", 12, 15)
        assert {e.verdict for e in events} == {"uninspected"}
        assert all("deadline" in e.reason for e in events)
        late = max(e.t_event - e.t_capture for e in events)
        assert 1.5 <= late < 1.5 + 3.0, late  # the deadline, plus decide's step and a loaded box
        infer.start()
        wait_until(lambda: bus.length("scores") >= 12, 90, "infer to score the backlog")
        second = IngestThread(settings, IMAGES, 6, size=SIZE, fps=5).start()
        second.join(30)
        second.close()
        events = wait_for_every_seq(bus, "cam0", 18, 60)
        assert Counter(e.seq for e in events) == Counter(range(18))  # one each
        after = {e.seq: e.verdict for e in events if e.seq >= 12}
        assert after == {12 + i: EXPECTED[i % 3] for i in range(6)}
        wait_until(
            lambda: len([e for e in decide.logs() if e.get("event") == "decide.late_score"]) >= 12,
            30,
            "the late scores to be counted",
        )
        assert [decide.stop(), infer.stop()] == [0, 0]
    bus.client.close()
