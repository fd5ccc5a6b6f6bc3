"""The infer stage driven step by step against a real server (no threads, no mocks)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from lineguard.engines.bundle import load_bundle
from lineguard.engines.errors import ConfigError
from lineguard.engines.model import Outputs
from lineguard.stream.bus import Bus
from lineguard.stream.infer import InferStage, entry_time, resolve_runtime
from lineguard.stream.ingest import Ingestor
from lineguard.stream.protocol import ENTRY_FIELD, Frame, Scores, decode_scores, encode
from lineguard.stream.worker import ConsumerPruner
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for, split_bundle

ROOT = Path(__file__).resolve().parents[2]


def read_scores(bus: Bus) -> list[Scores]:
    return [decode_scores(f[ENTRY_FIELD]) for _id, f in bus.client.xrange(bus.key("scores"))]


def make_stage(bus: Bus, url: str, bundle: Path | None = None, **kw: object) -> InferStage:
    overrides: dict[str, object] = {"infer.block_ms": 100}  # idle steps return quickly
    overrides.update({k: v for k, v in kw.items() if "." in k or "__" in k})
    options = {k: v for k, v in kw.items() if k not in overrides}
    settings = settings_for(bus, url, **overrides)
    stage = InferStage(
        bus, settings, bundle or split_bundle().path, runtime="onnxruntime", consumer="t",
        **options,  # type: ignore[arg-type]
    )  # fmt: skip
    stage.setup()
    return stage


def drain(stage: InferStage, steps: int = 10) -> None:
    for _ in range(steps):
        if stage.step() == 0:
            return


def test_batch_scores_every_frame_with_version_timings_and_maps(bus: Bus, redis_url: str) -> None:
    stage = make_stage(bus, redis_url, maps=True)
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="jpeg")
    for i in range(5):
        ing.send(BAD if i == 2 else GOOD)
    drain(stage)
    out = read_scores(bus)
    assert [s.seq for s in out] == list(range(5))
    assert all(s.error is None and s.model == split_bundle().version for s in out)
    assert set(out[0].raw) == {"patch_hist", "lgst"}
    assert out[2].raw["lgst"] > out[0].raw["lgst"]
    t = out[0].timings
    assert {"t_queued", "t_read", "t_scored", "queue", "forward", "batch"} <= set(t)
    assert t["t_queued"] <= t["t_read"] <= t["t_scored"]
    assert t["batch"] == 5  # the five frames were one dynamic batch
    assert out[0].amap is not None and out[0].amap.shape == (SIZE // 4, SIZE // 4)
    assert out[0].seg is not None and out[0].seg.shape == out[0].amap.shape
    n_classes = len(load_bundle(split_bundle().path).config.class_names)
    assert int(out[0].seg.to_labels().max()) < n_classes  # class ids, not a quantised float
    assert bus.pending("frames", "infer") == []  # acknowledged with the results
    assert stage.status()["frames"] == 5


def test_undecodable_image_is_that_frames_error_and_bad_messages_go_dead(
    bus: Bus, redis_url: str
) -> None:
    stage = make_stage(bus, redis_url)
    ok, png = cv2.imencode(".png", GOOD)
    assert ok
    truncated = Frame("line1", "cam0", 1, time.time(), "png", (SIZE, SIZE, 3), png.tobytes()[:60])
    good = Frame("line1", "cam0", 0, time.time(), "png", (SIZE, SIZE, 3), png.tobytes())
    bus.add_frame(good, max_len=100)
    bus.add_frame(truncated, max_len=100)  # header fine, pixels missing
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: b"\xc1"})
    other_line = Frame("line2", "cam0", 5, time.time(), "png", (SIZE, SIZE, 3), png.tobytes())
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: encode(other_line)})
    drain(stage)
    by_seq = {s.seq: s for s in read_scores(bus)}
    assert by_seq[0].error is None
    assert by_seq[1].error is not None and "truncated" in by_seq[1].error
    assert by_seq[1].raw == {}
    assert sorted(d.reason for d in bus.dead_letters()) == ["not_msgpack", "wrong_line"]
    assert bus.pending("frames", "infer") == []


def test_a_refused_frame_that_says_who_it_is_gets_an_error_naming_the_cause(
    bus: Bus, redis_url: str
) -> None:
    """A message whose image or shape is invalid but whose line, camera, seq and capture time
    are readable: dead-lettered *and* given an error verdict with the reason, so decide does
    not call it a sequence gap. One that names no frame (garbage) gets no verdict."""
    import msgpack

    stage = make_stage(bus, redis_url)
    ok, png = cv2.imencode(".png", GOOD)
    assert ok
    frame = Frame("line1", "cam0", 4, time.time(), "png", (SIZE, SIZE, 3), png.tobytes())
    fields = msgpack.unpackb(encode(frame), raw=False)
    fields["shape"] = [SIZE, SIZE * 2, 3]  # the PNG header says otherwise
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: msgpack.packb(fields, use_bin_type=True)})
    forged = dict(fields, seq=-1)
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: msgpack.packb(forged, use_bin_type=True)})
    elsewhere = dict(fields, line="line2")
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: msgpack.packb(elsewhere, use_bin_type=True)})
    drain(stage)
    scores = read_scores(bus)
    assert [(s.camera, s.seq) for s in scores] == [("cam0", 4)]
    assert scores[0].error is not None and "refused by infer (bad_shape)" in scores[0].error
    assert "dead stream" in scores[0].error and scores[0].raw == {}
    assert scores[0].t_capture == pytest.approx(frame.t_capture)
    assert sorted(d.reason for d in bus.dead_letters()) == [
        "bad_shape",
        "bad_shape",
        "negative_seq",
    ]
    assert bus.pending("frames", "infer") == []


def test_rows_check_turns_a_short_result_into_errors(bus: Bus, redis_url: str) -> None:
    stage = make_stage(bus, redis_url)
    assert stage.model is not None
    real = stage.model.runtime

    class DropsARow:
        """A runtime that loses the last row, as a buggy padding path would."""

        kind = real.kind

        def run(self, images: np.ndarray) -> Outputs:
            out = real.run(images)
            return out.map(lambda x: np.asarray(x)[:-1])

        def close(self) -> None:
            real.close()

    stage.model.runtime = DropsARow()  # type: ignore[assignment]
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    for _ in range(3):
        ing.send(GOOD)
    drain(stage)
    out = read_scores(bus)
    assert len(out) == 3
    assert all(s.error and "shape" in s.error for s in out)


def test_entries_of_a_dead_consumer_are_reclaimed_and_poison_is_dead_lettered(
    bus: Bus, redis_url: str
) -> None:
    stage = make_stage(
        bus, redis_url, **{"infer.reclaim_idle_ms": 50, "infer.reclaim_interval_ms": 10}
    )
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    for _ in range(4):
        ing.send(GOOD)
    taken = bus.read_group("frames", "infer", "dead-worker", count=4)
    # seq 3 crashed workers over and over: every XCLAIM is one more delivery
    for _ in range(3):
        bus.client.xclaim(bus.key("frames"), "infer", "dead-worker", 0, [taken[3].id])
    time.sleep(0.1)
    drain(stage)
    by_seq = {s.seq: s for s in read_scores(bus)}
    assert sorted(by_seq) == [0, 1, 2, 3]
    assert all(by_seq[i].error is None for i in range(3))
    assert by_seq[3].error is not None and "MAX_DELIVERIES" in by_seq[3].error
    dead = bus.dead_letters()
    assert [d.reason for d in dead] == ["max_deliveries"] and dead[0].deliveries == 5
    assert stage.counts["reclaimed"] == 4
    assert bus.pending("frames", "infer") == []


def test_hot_reload_swaps_the_bundle_between_batches(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    first = split_bundle(tmp_path / "bundle")
    stage = make_stage(bus, redis_url, bundle=first.path, reload_interval_s=0.0)
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    ing.send(GOOD)
    drain(stage)
    second = split_bundle(tmp_path / "bundle", threshold_shift=1.0)  # replaced in place
    assert second.version != first.version
    stage.step()  # notices the new bundle and loads it in the background ...
    assert stage.loading.wait(60)
    ing.send(GOOD)
    drain(stage)  # ... and swaps it in before the next batch
    versions = [s.model for s in read_scores(bus)]
    assert versions == [first.version, second.version]
    assert stage.counts["reloads"] == 1
    # a broken replacement is refused and the working model stays
    (tmp_path / "bundle" / "manifest.json").write_text("{}")
    ing.send(GOOD)
    drain(stage)
    assert read_scores(bus)[-1].model == second.version


def test_runtime_choice_and_entry_time() -> None:
    bundle = split_bundle()
    from lineguard.engines.bundle import load_bundle

    b = load_bundle(bundle.path)
    assert resolve_runtime("auto", "cpu", b) == "onnxruntime"
    assert resolve_runtime("auto", "cuda", b) == "torch"
    with pytest.raises(ConfigError, match="unknown runtime"):
        resolve_runtime("tflite", "cpu", b)
    assert entry_time("1700000000123-4") == pytest.approx(1700000000.123)


def test_consumers_of_workers_that_are_gone_are_pruned(bus: Bus, redis_url: str) -> None:
    stage = make_stage(bus, redis_url)
    key = bus.key("frames")
    # an old pod: it read once and left nothing pending; its name stays in the group forever
    bus.client.xreadgroup("infer", "pod-gone", {key: ">"}, count=1, block=None)
    time.sleep(0.05)
    stage.reclaimer.pruner = ConsumerPruner(bus, "frames", "infer", idle_ms=20, every_s=0.0)
    stage.reclaimer.next_at = 0.0
    stage.step()
    names = {c["name"].decode() for c in bus.client.xinfo_consumers(key, "infer")}
    assert "pod-gone" not in names


def test_frames_encoded_unlike_the_bundle_are_warned_about_once(bus: Bus, redis_url: str) -> None:
    """The split bundle was calibrated on lossless frames: JPEG frames from cam0 get one
    warning (not one per frame), PNG frames from cam1 none."""
    from structlog.testing import capture_logs

    stage = make_stage(bus, redis_url)
    with capture_logs() as logs:
        jpeg = Ingestor(bus, camera="cam0", size=SIZE, encoding="jpeg")
        png = Ingestor(bus, camera="cam1", size=SIZE, encoding="png")
        for _ in range(3):
            jpeg.send(GOOD)
            png.send(GOOD)
        drain(stage)
    warned = [e for e in logs if e["event"] == "infer.codec_mismatch"]
    assert [(e["camera"], e["frame_encoding"], e["bundle"]) for e in warned] == [
        ("cam0", "jpeg", "raw")
    ]
    assert len(read_scores(bus)) == 6  # warned, still scored


def test_the_next_batch_is_read_and_decoded_while_the_forward_runs(
    bus: Bus, redis_url: str
) -> None:
    """16 queued frames, max_batch 8: the second batch is read (and decoded) before the first
    is published, batches are still published in order, and each frame's timings are its own
    batch's."""
    stage = make_stage(bus, redis_url, **{"infer.max_batch": 8})
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    for _ in range(16):
        ing.send(GOOD)
    assert stage.step() == 8  # read, decoded, submitted: not yet published
    assert read_scores(bus) == []
    assert stage.step() == 8  # reads the second batch, then publishes the first
    first = read_scores(bus)
    assert [s.seq for s in first] == list(range(8))
    drain(stage)
    out = read_scores(bus)
    assert [s.seq for s in out] == list(range(16))
    a, b = out[0].timings, out[8].timings
    assert b["t_read"] < a["t_scored"]  # overlapped: read before the first batch was out
    for t in (a, b):
        assert t["batch"] == 8 and t["forward"] > 0 and t["decode"] > 0 and t["wait"] >= 0
    assert bus.pending("frames", "infer") == []


class _SendsDuringForward:
    """The real runtime, but its ``n``-th call first waits for ``gate`` and sends ``frames``
    (real XADDs): frames that land while a forward runs, after the loop last looked."""

    def __init__(self, real: Any, call: int, gate: threading.Event, send: Any) -> None:
        self.kind = real.kind
        self.real, self.call, self.gate, self.send = real, call, gate, send
        self.calls = 0

    def run(self, images: np.ndarray) -> Outputs:
        self.calls += 1
        if self.calls == self.call:
            assert self.gate.wait(10), "the loop never read while this forward ran"
            self.send()
        return self.real.run(images)

    def close(self) -> None:
        self.real.close()


def test_frames_that_arrive_during_a_forward_join_the_next_batch_before_it_starts(
    bus: Bus, redis_url: str
) -> None:
    """While a forward runs the loop stages what is queued (frame 1); frames that land later
    in that forward (2 and 3) still join the next batch the moment the forward ends, rather
    than waiting one forward more, and each one's queue wait ends when it was read."""
    stage = make_stage(bus, redis_url)
    assert stage.model is not None
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    gate = threading.Event()
    stage.model.runtime = _SendsDuringForward(  # type: ignore[assignment]
        stage.model.runtime, 1, gate, lambda: [ing.send(GOOD) for _ in range(2)]
    )
    real_read = stage.reader.read_batch

    def read_batch(max_batch: int, max_delay_ms: int, block_ms: int | None) -> list[Any]:
        out = real_read(max_batch, max_delay_ms, block_ms)
        if stage._inflight is not None:
            gate.set()  # the look while the forward runs is over: now frames 2 and 3 land
        return out

    stage.reader.read_batch = read_batch  # type: ignore[method-assign]
    ing.send(GOOD)
    assert stage.step() == 1  # idle: frame 0 is launched alone, at once
    ing.send(GOOD)
    assert stage.step() == 3  # frame 1 staged during forward 0, 2 and 3 taken as it ended
    assert [s.seq for s in read_scores(bus)] == [0]  # batch 0 published while 1–3 run
    drain(stage)
    out = read_scores(bus)
    assert [s.seq for s in out] == [0, 1, 2, 3]
    assert [s.timings["batch"] for s in out] == [1, 3, 3, 3]
    for s in out[1:]:
        t = s.timings
        assert t["t_queued"] <= t["t_read"] <= t["t_scored"]  # read after it was queued
    assert out[2].timings["t_read"] > out[1].timings["t_read"]
    assert bus.pending("frames", "infer") == []


def test_a_batch_with_nothing_to_score_is_published_after_the_forward_before_it(
    bus: Bus, redis_url: str
) -> None:
    """A batch whose every image fails to decode has no forward to wait for, but it was read
    after the batch in flight and is published after it."""
    stage = make_stage(bus, redis_url)
    ok, png = cv2.imencode(".png", GOOD)
    assert ok
    good = Frame("line1", "cam0", 0, time.time(), "png", (SIZE, SIZE, 3), png.tobytes())
    bus.add_frame(good, max_len=100)
    assert stage.step() == 1  # frame 0's forward runs
    broken = png.tobytes()[:60]
    bus.add_frame(
        Frame("line1", "cam0", 1, time.time(), "png", (SIZE, SIZE, 3), broken), max_len=100
    )
    assert stage.step() == 1
    out = read_scores(bus)
    assert [s.seq for s in out] == [0, 1]
    assert out[0].error is None and out[1].error is not None
    assert bus.pending("frames", "infer") == []
