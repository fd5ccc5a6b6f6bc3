"""Sources, the ingest stage and recordings, against a real server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.ingest import (
    Ingestor,
    IngestStage,
    Pacer,
    SeqConflictError,
    bundle_input_size,
)
from lineguard.stream.protocol import ENTRY_FIELD, Frame, decode_frame, decode_image, resize_to
from lineguard.stream.sources import (
    ArraySource,
    ImageFolder,
    Recording,
    SourceError,
    VideoCapture,
    open_source,
    read_image,
)
from lineguard.stream.worker import run_worker
from tests.stream.pipeline_helpers import settings_for, split_bundle


def frames_on(bus: Bus) -> list[Frame]:
    return [decode_frame(f[ENTRY_FIELD]) for _id, f in bus.client.xrange(bus.key("frames"))]


def colour(i: int, size: int = 48) -> np.ndarray:
    return np.full((size, size + 8, 3), (i * 20) % 256, np.uint8)


def test_image_folder_is_recursive_sorted_and_loops(tmp_path: Path) -> None:
    for rel, value in (("b/001.png", 3), ("a/010.png", 2), ("a/002.png", 1), ("c.jpg", 4)):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / rel), np.full((8, 8, 3), value, np.uint8))
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    src = open_source(str(tmp_path))
    assert isinstance(src, ImageFolder) and len(src) == 5
    names = [c.name for c in src]
    assert names == ["a/002.png", "a/010.png", "b/001.png", "c.jpg"]  # broken.png skipped
    looped = ImageFolder(tmp_path, loop=True)
    it = iter(looped)
    assert [next(it).name for _ in range(6)][4:] == ["a/002.png", "a/010.png"]
    first = next(iter(ImageFolder(tmp_path)))
    assert first.image.shape == (8, 8, 3) and first.image.dtype == np.uint8


def test_video_file_source(tmp_path: Path) -> None:
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, (32, 24))
    for i in range(5):
        writer.write(np.full((24, 32, 3), i * 40, np.uint8))
    writer.release()
    src = open_source(str(path))
    assert isinstance(src, VideoCapture) and src.kind == "video"
    caps = list(src)
    assert len(caps) == 5 and caps[0].image.shape == (24, 32, 3)
    looped = open_source(str(path), loop=True)
    it = iter(looped)
    assert len([next(it) for _ in range(12)]) == 12
    looped.close()


def test_open_source_errors_say_what_to_pass(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "missing"))
    (tmp_path / "one.png").write_bytes(cv2.imencode(".png", np.zeros((4, 4, 3), np.uint8))[1])
    with pytest.raises(SourceError, match="single image"):
        open_source(str(tmp_path / "one.png"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(SourceError, match="camera"):
        open_source("57")  # no such camera index here


def test_ingest_resizes_numbers_and_persists_the_next_seq(bus: Bus) -> None:
    ing = Ingestor(bus, camera="cam0", size=32, encoding="jpeg", max_len=100)
    for i in range(3):
        sent = ing.send(colour(i))
        assert sent.frame.seq == i
    frames = frames_on(bus)
    assert [f.seq for f in frames] == [0, 1, 2]
    assert all(f.shape == (32, 32, 3) and f.encoding == "jpeg" for f in frames)
    assert decode_image(frames[1]).shape == (32, 32, 3)
    # a restarted ingest continues where the last one stopped
    again = Ingestor(bus, camera="cam0", size=32)
    assert again.send(colour(9)).frame.seq == 3
    # another camera has its own numbers
    assert Ingestor(bus, camera="cam1", size=32).send(colour(0)).frame.seq == 0
    # two ingests on one camera: the stale one is refused instead of interleaving seqs
    with pytest.raises(SeqConflictError, match="another ingest"):
        ing.send(colour(0))
    assert len(frames_on(bus)) == 5
    # a counter that vanished (server restarted without persistence) is named as such
    bus.client.delete(again.seq_key)
    with pytest.raises(SeqConflictError, match="vanished"):
        again.send(colour(0))


def test_frames_carry_the_line_epoch_and_a_lost_epoch_stops_the_ingest(bus: Bus) -> None:
    """The epoch tells frames numbered again from 0 after Redis lost its data from the old
    ones with the same seqs: every frame carries it, and an ingest whose epoch vanished
    (even one still at seq 0, whose counter a fresh server would recreate) refuses to send."""
    ing = Ingestor(bus, camera="cam-e", size=32, encoding="png")
    sent = [ing.send(colour(i)).frame for i in range(2)]
    epoch = bus.current_epoch()
    assert epoch and ing.epoch == epoch and {f.epoch for f in sent} == {epoch}
    assert {f.epoch for f in frames_on(bus) if f.camera == "cam-e"} == {epoch}
    fresh = Ingestor(bus, camera="cam-f", size=32)  # at seq 0: nothing of it in Redis yet
    # what a restart without persistence does to this line: its keys are gone
    bus.client.delete(bus.epoch_key, ing.seq_key, ing.sent_key)
    for stale in (ing, fresh):
        with pytest.raises(SeqConflictError, match="vanished"):
            stale.send(colour(0))
    again = Ingestor(bus, camera="cam-e", size=32, encoding="png")
    frame = again.send(colour(3)).frame
    assert frame.seq == 0 and frame.epoch == again.epoch == bus.current_epoch() != epoch


def test_record_then_replay_the_recording(bus: Bus, tmp_path: Path) -> None:
    rec = tmp_path / "rec"
    settings = settings_for(bus, "redis://unused", **{"ingest.encoding": "jpeg"})
    src = ArraySource([colour(i) for i in range(4)])
    stage = IngestStage(bus, settings, src, size=32, record=rec)
    assert run_worker(stage, bus, burst=True, handle_signals=False) == 4
    index = [json.loads(x) for x in (rec / "index.jsonl").read_text().splitlines()]
    assert [r["seq"] for r in index] == [0, 1, 2, 3]
    recording = open_source(str(rec))
    assert isinstance(recording, Recording) and len(recording) == 4
    caps = list(recording)
    # the recording holds exactly the pixels that were sent (PNG, before the JPEG step)
    assert np.array_equal(caps[2].image, resize_to(colour(2), 32))
    assert caps[2].t_capture == pytest.approx(index[2]["t_capture"])
    # a recording cut off mid-line is still readable up to the cut
    with (rec / "index.jsonl").open("a") as fh:
        fh.write('{"file": "frames/cam0-0000')
    assert len(Recording(rec)) == 4


def test_bundle_input_size_and_read_image(tmp_path: Path) -> None:
    assert bundle_input_size(split_bundle().path) == (64, 64)
    with pytest.raises(ConfigError, match="--size"):
        bundle_input_size(tmp_path)
    path = tmp_path / "x.png"
    cv2.imwrite(str(path), np.dstack([np.zeros((4, 4)), np.zeros((4, 4)), np.full((4, 4), 255)]))
    assert read_image(path)[0, 0].tolist() == [255, 0, 0]  # BGR on disk, RGB in memory


def test_pacer_holds_the_rate() -> None:
    pacer = Pacer(100.0)
    t0 = time.monotonic()
    for _ in range(11):
        pacer.wait()
    assert 0.09 <= time.monotonic() - t0 < 0.5
    with pytest.raises(ConfigError):
        Pacer(0)


@pytest.mark.parametrize(
    ("encoding", "quality", "bundle", "sent", "warns"),
    [
        (None, None, "jpeg:80", "jpeg:80", False),  # unset: as the bundle was trained
        (None, None, "raw", "raw", False),
        (None, None, None, "jpeg:90", False),  # no bundle: the old default
        ("png", None, "raw", "png", False),  # lossless either way: same pixels
        ("jpeg", None, "jpeg:80", "jpeg:80", False),  # the bundle's quality by default
        ("jpeg", 95, "jpeg:80", "jpeg:95", True),
        ("raw", None, "jpeg:90", "raw", True),
        (None, 70, "jpeg:90", "jpeg:70", True),
    ],
)  # fmt: skip
def test_ingest_sends_as_the_bundle_expects_and_warns_when_told_otherwise(
    encoding: str | None, quality: int | None, bundle: str | None, sent: str, warns: bool
) -> None:
    from structlog.testing import capture_logs

    from lineguard.engines.codec import FrameCodec
    from lineguard.stream.ingest import frame_codec_for
    from lineguard.stream.settings import IngestSettings

    settings = IngestSettings(encoding=encoding, jpeg_quality=quality)  # type: ignore[arg-type]
    with capture_logs() as logs:
        codec = frame_codec_for(settings, None if bundle is None else FrameCodec.parse(bundle))
    assert codec.spec == sent
    mismatch = [e for e in logs if e["event"] == "ingest.codec_mismatch"]
    assert bool(mismatch) == warns, logs
    if warns:
        assert mismatch[0]["log_level"] == "warning" and mismatch[0]["bundle"] == bundle


def test_bundles_record_their_frame_codec_and_old_ones_read_as_lossless(tmp_path: Path) -> None:
    from lineguard.stream.ingest import bundle_frame_codec

    assert bundle_frame_codec(split_bundle().path).spec == "raw"  # ModelConfig's default
    manifest = json.loads((split_bundle().path / "manifest.json").read_text())
    assert manifest["model"]["frame_codec"] == "raw"
    del manifest["model"]["frame_codec"]  # a bundle written before the field existed
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert bundle_frame_codec(tmp_path).lossless
    manifest["model"]["frame_codec"] = "jpeg:abc"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match="quality"):
        bundle_frame_codec(tmp_path)
