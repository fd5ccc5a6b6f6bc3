"""The decide stage driven step by step: verdicts, exactly-once events, holes, reloads."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.decide import CameraState, DecideStage, latency_of
from lineguard.stream.protocol import Scores
from lineguard.stream.worker import line_key
from tests.stream.pipeline_helpers import SplitBundle, all_events, settings_for, split_bundle

T0 = 1_795_000_000.0


def scores(split: SplitBundle, seq: int, *, bad: bool = False, camera: str = "cam0") -> Scores:
    raw = split.bad_raw if bad else split.good_raw
    timings = {
        "t_queued": T0 + seq + 0.001,
        "t_read": T0 + seq + 0.002,
        "t_scored": T0 + seq + 0.01,
    }
    return Scores("line1", camera, seq, T0 + seq, dict(raw), split.version, timings)


def make_stage(bus: Bus, url: str, bundle: Path | None = None, **kw: object) -> DecideStage:
    settings = settings_for(bus, url, **{"decide.block_ms": 50})
    stage = DecideStage(bus, settings, bundle or split_bundle().path, consumer="d", **kw)  # type: ignore[arg-type]
    stage.setup()
    return stage


def drain(stage: DecideStage, steps: int = 20) -> None:
    idle = 0
    for _ in range(steps):
        idle = idle + 1 if stage.step() == 0 else 0
        if idle >= 2:
            return


def verdicts(bus: Bus) -> dict[int, str]:
    return {e.seq: e.verdict for e in all_events(bus)}


def test_pass_fail_and_error_events(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    stage = make_stage(bus, redis_url)
    bus.add("scores", scores(split, 0))
    bus.add("scores", scores(split, 1, bad=True))
    err = Scores("line1", "cam0", 2, T0 + 2, {}, split.version, {}, error="cannot decode frame")
    bus.add("scores", err)
    drain(stage)
    events = {e.seq: e for e in all_events(bus)}
    assert [events[i].verdict for i in range(3)] == ["pass", "fail", "error"]
    assert events[0].score is not None and events[0].score < 0 < events[1].score  # type: ignore[operator]
    assert events[1].threshold == split.calibration.threshold
    assert set(events[1].contributions) == {"patch_hist", "lgst"}
    contributions = np.array([list(events[1].contributions.values())])
    assert split.calibration.combined(contributions)[0] == pytest.approx(events[1].score)
    assert events[2].reason == "cannot decode frame" and events[2].score is None
    lat = events[0].latency
    assert lat["queue"] == latency_of(scores(split, 0), T0, T0)["queue"]
    assert lat["total"] >= lat["decide"] >= 0
    assert bus.pending("scores", "decide") == []


def test_duplicated_score_gives_one_event_even_after_a_restart(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    stage = make_stage(bus, redis_url)
    for _ in range(3):
        bus.add("scores", scores(split, 0))
    bus.add("scores", scores(split, 1, bad=True))
    drain(stage)
    assert len(all_events(bus)) == 2
    assert stage.counts["duplicates"] == 2
    # a fresh decide (crash + restart) reads the watermark from Redis: still no second event
    again = make_stage(bus, redis_url)
    assert again.cameras["cam0"].next == 2
    bus.add("scores", scores(split, 1, bad=True))
    drain(again)
    assert len(all_events(bus)) == 2
    # above the watermark the dedup mark decides, inside the same script as the event
    bus.client.set(line_key(bus, "seen", "cam0", "7"), "1")
    bus.add("scores", scores(split, 7))
    drain(again)
    assert 7 not in verdicts(bus)  # (2..6 are holes now and become uninspected)
    assert again.counts["duplicates"] == 2


def test_holes_become_uninspected_and_counts_add_up(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    stage = make_stage(bus, redis_url)
    for seq in (0, 1, 4, 5):
        bus.add("scores", scores(split, seq, bad=seq == 5))
    drain(stage)
    v = verdicts(bus)
    assert v == {0: "pass", 1: "pass", 2: "uninspected", 3: "uninspected", 4: "pass", 5: "fail"}
    assert Counter(e.seq for e in all_events(bus)) == Counter(range(6))  # one each
    assert stage.cameras["cam0"].next == 6
    assert stage.counts["uninspected"] == 2
    # a late score for a frame already declared uninspected is a duplicate
    bus.add("scores", scores(split, 3))
    drain(stage)
    assert verdicts(bus)[3] == "uninspected" and len(all_events(bus)) == 6


def test_a_hole_still_in_flight_is_not_declared(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    stage = make_stage(bus, redis_url)
    # frame 1 is being scored by some infer worker (read, not acknowledged)
    bus.ensure_group("frames", "infer")
    from lineguard.stream.ingest import Ingestor
    from tests.stream.pipeline_helpers import GOOD

    ing = Ingestor(bus, camera="cam0", size=64, encoding="png")
    ing.next_seq = 1
    bus.client.set(ing.seq_key, 1)
    ing.send(GOOD)
    bus.client.incr(ing.seq_key)  # ingest numbered frame 2 too (its scores come below)
    assert len(bus.read_group("frames", "infer", "slow-worker", count=1)) == 1
    bus.add("scores", scores(split, 0))
    bus.add("scores", scores(split, 2))
    drain(stage)
    assert verdicts(bus) == {0: "pass", 2: "pass"}
    assert set(stage.cameras["cam0"].missing) == {1}
    bus.add("scores", scores(split, 1, bad=True))  # its scores arrive late: a normal verdict
    drain(stage)
    assert verdicts(bus) == {0: "pass", 1: "fail", 2: "pass"}
    assert stage.counts["uninspected"] == 0


def test_grace_period_declares_a_stuck_hole(bus: Bus, redis_url: str) -> None:
    split = split_bundle()
    stage = make_stage(bus, redis_url, gap_grace_s=0.0)
    bus.ensure_group("frames", "infer")
    bus.add("scores", scores(split, 0))
    bus.add("scores", scores(split, 3))
    drain(stage)
    assert verdicts(bus) == {0: "pass", 1: "uninspected", 2: "uninspected", 3: "pass"}


def test_calibration_follows_the_bundle_and_unknown_models_are_errors(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    first = split_bundle(tmp_path / "bundle")
    stage = make_stage(bus, redis_url, bundle=first.path)
    bus.add("scores", scores(first, 0, bad=True))
    drain(stage)
    # raise the threshold above the bad frame's fused score (≈ +10): it would now pass
    second = split_bundle(tmp_path / "bundle", threshold_shift=50.0)
    s1 = scores(second, 1, bad=True)
    bus.add("scores", s1)
    late = scores(first, 2, bad=True)  # still in flight from the previous model
    bus.add("scores", late)
    unknown = Scores("line1", "cam0", 3, T0, dict(first.bad_raw), "mystery-model", {})
    bus.add("scores", unknown)
    drain(stage)
    events = {e.seq: e for e in all_events(bus)}
    assert events[0].verdict == "fail" and events[0].model == first.version
    assert events[1].verdict == "pass" and events[1].threshold == 50.0
    assert events[2].verdict == "fail" and events[2].threshold == 0.0
    assert events[3].verdict == "error" and "mystery-model" in events[3].reason
    assert stage.current == second.version and stage.counts["reloads"] == 1


def test_camera_state_watermark() -> None:
    cam = CameraState()
    now = time.monotonic()
    cam.observe(3, now)
    assert set(cam.missing) == {0, 1, 2}
    cam.mark(3)
    assert cam.next == 0 and cam.has_event(3) and not cam.has_event(0)
    for seq in (0, 2, 1):
        cam.mark(seq)
    assert cam.next == 4 and not cam.done and not cam.missing
    assert cam.watermark_with({4, 5, 7}) == 6


def test_a_camera_ingest_never_numbered_opens_only_bounded_holes(bus: Bus, redis_url: str) -> None:
    """One forged frame of an unknown camera with seq 120 used to open 120 phantom
    `uninspected` events; now a message may open at most UNCOUNTED_MAX_GAP holes and a
    camera UNCOUNTED_MAX_HOLES in all, beyond which it is dead-lettered with the reason."""
    from lineguard.stream.decide import UNCOUNTED_MAX_GAP, UNCOUNTED_MAX_HOLES

    split = split_bundle()
    stage = make_stage(bus, redis_url)
    bus.add("scores", scores(split, 120, camera="forged"))
    drain(stage)
    assert all_events(bus) == []
    dead = bus.dead_letters()
    assert [d.reason for d in dead] == ["seq_not_issued"]
    assert "would open a gap of 120 frames" in dead[0].detail
    # small holes are still accounted, up to the camera's total
    seq, opened, sent = -1, 0, 0
    while opened + UNCOUNTED_MAX_GAP <= UNCOUNTED_MAX_HOLES:
        seq += UNCOUNTED_MAX_GAP + 1  # each message skips UNCOUNTED_MAX_GAP seqs
        opened += UNCOUNTED_MAX_GAP
        sent += 1
        bus.add("scores", scores(split, seq, camera="bridge"))
    bus.add("scores", scores(split, seq + UNCOUNTED_MAX_GAP + 1, camera="bridge"))
    drain(stage, steps=60)
    events = [e for e in all_events(bus) if e.camera == "bridge"]
    assert Counter(e.verdict for e in events) == {"pass": sent, "uninspected": opened}
    assert bus.dead_letters()[0].reason == "seq_not_issued"
    assert "has opened 256 holes already" in bus.dead_letters()[0].detail


def test_a_frame_without_a_score_gets_uninspected_at_its_deadline_and_only_that(
    bus: Bus, redis_url: str
) -> None:
    """Infer is down: frames ingest sent get `uninspected` (deadline) at capture + deadline;
    their scores arriving later are counted as late, never a second verdict; a frame scored
    in time gets its normal verdict."""
    from lineguard.stream.ingest import Ingestor
    from tests.stream.pipeline_helpers import GOOD

    split = split_bundle()
    settings = settings_for(bus, redis_url, **{"decide.block_ms": 50, "decide.deadline_ms": 400})
    stage = DecideStage(bus, settings, split.path, consumer="d")
    stage.setup()
    ing = Ingestor(bus, camera="cam0", size=64, encoding="png")
    sent = [ing.send(GOOD) for _ in range(5)]
    t_sent = time.time()
    while len(all_events(bus)) < 5 and time.time() - t_sent < 10:
        stage.step()
    events = all_events(bus)
    assert [(e.seq, e.verdict) for e in events] == [(s, "uninspected") for s in range(5)]
    assert all("deadline" in e.reason and "400 ms" in e.reason for e in events)
    for e, s in zip(events, sent, strict=True):
        assert 0.4 <= e.t_event - s.frame.t_capture < 3.0  # on time, not before
    for s in range(5):  # infer is back: the scores arrive late
        bus.add("scores", scores(split, s))
    drain(stage)
    assert len(all_events(bus)) == 5 and stage.counts["late"] == 5
    assert stage.counts["duplicates"] == 0
    ing.send(GOOD)
    bus.add("scores", scores(split, 5))
    drain(stage)
    assert verdicts(bus)[5] == "pass" and len(all_events(bus)) == 6
