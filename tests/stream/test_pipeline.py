"""The three stages together against a real server: one event per frame, in order, with the
right verdicts; trimmed frames accounted as uninspected; poison messages dead-lettered while
the line keeps going."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from prometheus_client import generate_latest

from lineguard.stream.bus import Bus
from lineguard.stream.feed import send_source, wait_for_events
from lineguard.stream.run import LocalPipeline
from lineguard.stream.sources import ArraySource
from lineguard.stream.tools.replay import replay
from tests.stream.pipeline_helpers import (
    BAD,
    GOOD,
    SIZE,
    all_events,
    settings_for,
    split_bundle,
    wait_until,
    write_folder,
)


def test_replay_of_200_frames_gives_one_event_each_in_order(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    split = split_bundle()
    labels = write_folder(tmp_path / "frames", lambda i: i % 7 == 3 or i % 11 == 0, 200)
    settings = settings_for(bus, redis_url)
    with LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime"):
        summary = replay(settings, str(tmp_path / "frames"), size=SIZE, timeout_s=60)
    assert summary.ok, summary.to_json()
    assert summary.sent == 200
    events = all_events(bus)
    assert len(events) == 200
    assert [e.seq for e in events] == list(range(200))  # one camera, one infer worker: in order
    assert {e.camera for e in events} == {settings.line.camera}
    expected = ["fail" if bad else "pass" for bad in labels]
    assert [e.verdict for e in events] == expected
    assert all(e.model == split.version for e in events)
    fail = next(e for e in events if e.verdict == "fail")
    assert fail.score is not None and fail.threshold == 0.0 and fail.score > 5
    assert "lgst" in fail.reason or "patch_hist" in fail.reason
    assert set(fail.latency) >= {"queue", "infer", "handoff", "decide", "total"}
    text = generate_latest().decode()
    for name in (
        "lineguard_verdicts_total",
        "lineguard_batch_size_bucket",
        "lineguard_stage_seconds_bucket",
        "lineguard_frames_in_total",
        "lineguard_infer_seconds_count",
    ):
        assert name in text


def test_trimmed_frames_become_uninspected_and_counts_add_up(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    settings = settings_for(
        bus, redis_url, **{"infer.reclaim_idle_ms": 200, "infer.reclaim_interval_ms": 100}
    )
    # 30 frames queue up while no infer worker runs; a consumer that then dies reads 5 of them
    bus.ensure_group("frames", "infer")
    sent = send_source(bus, settings, ArraySource([GOOD, BAD], count=30), size=SIZE)
    ghost = bus.read_group("frames", "infer", "ghost", count=5)
    assert len(ghost) == 5
    # the stream is trimmed before anyone scores them: 5 pending and 10 undelivered vanish
    bus.client.xtrim(bus.key("frames"), maxlen=15, approximate=False)
    with LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime"):
        events, counts = wait_for_events(
            bus, sent.camera, sent.seqs, since=sent.events_from, timeout_s=30
        )
        # the dead consumer's trimmed entries are cleaned out of the pending list by the
        # infer worker's XAUTOCLAIM, which reports them as deleted (and counts them)
        wait_until(lambda: bus.pending("frames", "infer") == [], 10, "XAUTOCLAIM clean-up")
    assert len(events) == 30 and max(counts.values()) == 1
    verdicts = Counter(e.verdict for e in events.values())
    assert verdicts["uninspected"] == 15
    assert verdicts["pass"] + verdicts["fail"] == 15
    assert sum(verdicts.values()) == sent.count  # frames = pass + fail + uninspected + error
    assert {s for s, e in events.items() if e.verdict == "uninspected"} == set(range(15))
    assert all(e.reason for e in events.values() if e.verdict == "uninspected")
    assert len(all_events(bus)) == 30
    assert 'lineguard_trimmed_total{stage="infer"}' in generate_latest().decode()


def test_malformed_messages_go_dead_while_the_line_continues(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    settings = settings_for(bus, redis_url)
    with LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime"):
        first = send_source(bus, settings, ArraySource([GOOD], count=3), size=SIZE)
        bus.client.xadd(bus.key("frames"), {b"m": b"\xc1 not msgpack"})
        bus.client.xadd(bus.key("frames"), {b"other": b"no message field"})
        bus.client.xadd(bus.key("scores"), {b"m": b"\x93\x01\x02\x03"})  # an array, not a map
        second = send_source(bus, settings, ArraySource([BAD], count=3), size=SIZE)
        events, counts = wait_for_events(
            bus, first.camera, first.seqs + second.seqs, since=first.events_from, timeout_s=30
        )
        dead = bus.dead_letters()
    assert [events[s].verdict for s in sorted(events)] == ["pass"] * 3 + ["fail"] * 3
    assert max(counts.values()) == 1
    reasons = sorted(d.reason for d in dead)
    assert reasons == ["missing_field", "not_a_map", "not_msgpack"]
    by_reason = {d.reason: d for d in dead}
    assert by_reason["not_msgpack"].fields[b"m"] == b"\xc1 not msgpack"  # kept byte for byte
    assert by_reason["not_a_map"].group == "decide"
    assert by_reason["not_msgpack"].detail
