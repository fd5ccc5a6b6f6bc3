"""Hostile and broken input written straight into the streams of a running line.

``tests/stream/test_protocol.py`` proves the decoders (every class of bad message, plus
hypothesis fuzzing); this file proves the *pipeline*: raw bytes XADDed into the frames and
scores streams while infer and decide run (threads, real server) end up in the dead stream
with the decoder's reason, or — for a frame whose message is sound but whose image is not — as
that frame's ``error`` event; real frames sent in between keep getting the right verdicts, and
the workers are still alive afterwards.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np
import pytest

from lineguard.stream.bus import Bus, connect
from lineguard.stream.decide import DecideStage
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.protocol import ENTRY_FIELD, SCHEMA_VERSION, Scores, encode, make_frame
from lineguard.stream.settings import Settings
from lineguard.stream.worker import StopFlag, line_key, run_worker
from tests.reliability.helpers import events_now, wait_until
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for, split_bundle

LIMIT = 64 * 1024  # LINEGUARD_LIMITS__MAX_FRAME_BYTES for these tests


@contextmanager
def line(bus: Bus, settings: Settings) -> Iterator[list[threading.Thread]]:
    """Infer and decide in threads, each with its own client, as ``lineguard run`` has them."""
    split = split_bundle()
    stop = StopFlag()
    stages: list[InferStage | DecideStage] = []
    for make in (
        lambda b: InferStage(b, settings, split.path, runtime="onnxruntime", consumer="i0"),
        lambda b: DecideStage(b, settings, split.path, consumer="d0"),
    ):
        stages.append(make(Bus.from_settings(connect(settings), settings)))
    threads = [
        threading.Thread(
            target=run_worker,
            args=(s, s.bus),
            kwargs={"stop": stop, "handle_signals": False},
            daemon=True,
        )
        for s in stages
    ]
    for t in threads:
        t.start()
    try:
        yield threads
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        for s in stages:
            s.bus.client.close()


def wire_frame(image: np.ndarray = GOOD, encoding: str = "png", seq: int = 0) -> dict[str, Any]:
    f = make_frame("line1", "cam0", seq, image, encoding=encoding, t_capture=1.0)  # type: ignore[arg-type]
    out = msgpack.unpackb(encode(f), raw=False)
    assert isinstance(out, dict)
    return out


def wire_scores(seq: int = 0, **changes: Any) -> dict[str, Any]:
    s = Scores("line1", "cam0", seq, 1.0, {"patch_hist": 1.0, "lgst": 1.0}, "m-1")
    out = msgpack.unpackb(encode(s), raw=False)
    out.update(changes)
    return out


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def changed(base: dict[str, Any], **kv: Any) -> bytes:
    return pack({**base, **kv})


def without(base: dict[str, Any], name: str) -> bytes:
    return pack({k: v for k, v in base.items() if k != name})


# Entries XADDed to the frames stream with no seq handed out: dead-lettered by infer.
FRAMES_DEAD: list[tuple[str, Callable[[], dict[bytes, bytes]], str]] = [
    ("not msgpack", lambda: {ENTRY_FIELD: b"\xc1\xffnot msgpack at all"}, "not_msgpack"),
    (
        "jpeg bytes, no envelope",
        lambda: {ENTRY_FIELD: b"\xff\xd8\xff\xe0" + bytes(64)},
        "not_msgpack",
    ),
    ("empty message", lambda: {ENTRY_FIELD: b""}, "not_msgpack"),
    ("no message field", lambda: {b"payload": b"x"}, "missing_field"),
    ("array, not a map", lambda: {ENTRY_FIELD: pack([1, 2, 3])}, "not_a_map"),
    (
        "schema v2",
        lambda: {ENTRY_FIELD: changed(wire_frame(), v=SCHEMA_VERSION + 1)},
        "bad_version",
    ),
    ("schema v0", lambda: {ENTRY_FIELD: changed(wire_frame(), v=0)}, "bad_version"),
    ("version as text", lambda: {ENTRY_FIELD: changed(wire_frame(), v="1")}, "bad_version"),
    ("no version", lambda: {ENTRY_FIELD: without(wire_frame(), "v")}, "missing_field"),
    ("missing payload", lambda: {ENTRY_FIELD: without(wire_frame(), "payload")}, "missing_field"),
    ("extra field", lambda: {ENTRY_FIELD: changed(wire_frame(), colour="red")}, "extra_field"),
    ("seq as float", lambda: {ENTRY_FIELD: changed(wire_frame(), seq=3.0)}, "wrong_type"),
    ("payload as text", lambda: {ENTRY_FIELD: changed(wire_frame(), payload="abc")}, "wrong_type"),
    (
        "shape of floats",
        lambda: {ENTRY_FIELD: changed(wire_frame(), shape=[64.0, 64, 3])},
        "bad_shape",
    ),
    (
        "4 channels (RGBA)",
        lambda: {ENTRY_FIELD: changed(wire_frame(), shape=[64, 64, 4])},
        "bad_shape",
    ),
    (
        "zero-size shape",
        lambda: {ENTRY_FIELD: changed(wire_frame(), shape=[0, 64, 3])},
        "bad_shape",
    ),
    (
        "zero-size payload",
        lambda: {ENTRY_FIELD: changed(wire_frame(), payload=b"")},
        "payload_size",
    ),
    (
        "shape lies about png",
        lambda: {ENTRY_FIELD: changed(wire_frame(), shape=[32, 32, 3])},
        "bad_shape",
    ),
    (
        "raw float32 pixels",
        lambda: {
            ENTRY_FIELD: changed(
                wire_frame(encoding="raw"), payload=np.zeros((SIZE, SIZE, 3), np.float32).tobytes()
            )
        },
        "payload_size",
    ),
    (
        "oversized raw frame",
        lambda: {
            ENTRY_FIELD: changed(
                wire_frame(encoding="raw"),
                shape=[200, 200, 3],
                payload=bytes(200 * 200 * 3),
            )
        },
        "too_large",
    ),
    ("oversized message", lambda: {ENTRY_FIELD: bytes(LIMIT + 300 * 1024)}, "too_large"),
    (
        "huge camera name",
        lambda: {ENTRY_FIELD: changed(wire_frame(), camera="c" * 50_000)},
        "string_too_long",
    ),
    (
        "bomb header",
        lambda: {ENTRY_FIELD: changed(wire_frame(), shape=[60000, 60000, 3])},
        "image_too_large",
    ),
    ("other line", lambda: {ENTRY_FIELD: changed(wire_frame(), line="line9")}, "wrong_line"),
]


# Entries XADDed to the scores stream: dead-lettered by decide.
def entry(obj: Any) -> dict[bytes, bytes]:
    return {ENTRY_FIELD: pack(obj)}


SCORES_DEAD: list[tuple[str, Callable[[], dict[bytes, bytes]], str]] = [
    ("not msgpack", lambda: {ENTRY_FIELD: b"\x93\x01"}, "not_msgpack"),
    ("no message field", lambda: {b"x": b"1"}, "missing_field"),
    ("schema v9", lambda: entry(wire_scores(v=9)), "bad_version"),
    ("nan score", lambda: entry(wire_scores(raw={"lgst": float("nan")})), "non_finite"),
    ("huge error text", lambda: entry(wire_scores(raw={}, error="e" * 100_000)), "string_too_long"),
    ("extra field", lambda: entry(wire_scores(verdict="pass")), "extra_field"),
    ("a frame on scores", lambda: entry(wire_frame()), "wrong_kind"),
    (
        "too many branches",
        lambda: entry(wire_scores(raw={f"b{i}": 1.0 for i in range(500)})),
        "too_many_entries",
    ),
]


def broken_images() -> list[tuple[str, bytes, str]]:
    """(name, packed frame message, encoding): sound messages whose pixels cannot be had."""
    png = wire_frame(encoding="png")
    jpg = wire_frame(encoding="jpeg")
    body = bytearray(png["payload"])
    body[40:-20] = bytes(len(body) - 60)  # IHDR and IEND intact, IDAT destroyed
    return [
        ("truncated png", pack({**png, "payload": png["payload"][:-30]}), "truncated"),
        ("truncated jpeg", pack({**jpg, "payload": jpg["payload"][:-60]}), "truncated"),
        ("png with a zeroed body", pack({**png, "payload": bytes(body)}), "corrupt"),
    ]


def send_raw_with_seq(ing: Ingestor, packed: dict[str, Any]) -> int:
    """A buggy camera bridge: takes the next seq the way ingest does, XADDs its own bytes."""
    seq = ing.next_seq
    data = pack({**packed, "seq": seq})
    ing._append(seq, data)
    ing.next_seq += 1
    return seq


def test_hostile_entries_land_in_dead_or_as_error_events_and_the_line_keeps_going(
    bus: Bus, redis_url: str
) -> None:
    settings = settings_for(bus, redis_url, **{"limits.max_frame_bytes": LIMIT})
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    labels: dict[int, str] = {}
    broken: dict[int, str] = {}
    with line(bus, settings) as threads:
        for i, (_name, fields, _reason) in enumerate(FRAMES_DEAD + SCORES_DEAD):
            img = BAD if i % 3 == 1 else GOOD
            labels[ing.send(img).frame.seq] = "fail" if img is BAD else "pass"
            stream = "frames" if i < len(FRAMES_DEAD) else "scores"
            bus.client.xadd(bus.key(stream), fields())  # type: ignore[arg-type]
        for name, packed, expect in broken_images():
            broken[send_raw_with_seq(ing, msgpack.unpackb(packed, raw=False))] = expect
            labels[ing.send(GOOD).frame.seq] = "pass"
            assert name
        n = ing.next_seq

        def settled() -> bool:
            seqs = {e.seq for e in events_now(bus) if e.camera == "cam0"}
            return seqs >= set(range(n)) and bus.length("dead") >= len(FRAMES_DEAD + SCORES_DEAD)

        wait_until(settled, 60, "an event per frame and every dead letter")
        assert all(t.is_alive() for t in threads), "a worker died on hostile input"
        # and the line still works after all that
        after = ing.send(BAD).frame.seq
        wait_until(lambda: after in {e.seq for e in events_now(bus)}, 30, "a verdict afterwards")
    events = [e for e in events_now(bus) if e.camera == "cam0"]
    assert Counter(e.seq for e in events).most_common(1)[0][1] == 1
    by_seq = {e.seq: e for e in events}
    for seq, verdict in labels.items():
        assert by_seq[seq].verdict == verdict, (seq, by_seq[seq])
    for seq, expect in broken.items():
        ev = by_seq[seq]
        assert ev.verdict == "error" and "cannot decode frame" in ev.reason, ev
        assert expect in ev.reason, ev.reason
    assert by_seq[after].verdict == "fail"
    dead = bus.dead_letters(count=1000)
    got = Counter((d.group, d.reason) for d in dead)
    want = Counter(("infer", r) for _n, _f, r in FRAMES_DEAD)
    want.update(("decide", r) for _n, _f, r in SCORES_DEAD)
    assert got == want
    assert all(d.detail for d in dead), "every dead letter says why"
    assert bus.pending("frames", "infer") == [] and bus.pending("scores", "decide") == []


def test_a_dead_letter_does_not_copy_an_oversized_message_whole(bus: Bus, redis_url: str) -> None:
    """The dead stream keeps the original fields for inspection, but never more than the
    frame limit per field: otherwise every oversized message would be stored twice, and the
    dead stream's memory would have no bound at all."""
    settings = settings_for(bus, redis_url, **{"limits.max_frame_bytes": LIMIT})
    blob = bytes(range(256)) * (8 * 1024)  # 2 MiB
    with line(bus, settings):
        bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: blob})
        wait_until(lambda: bus.length("dead") == 1, 30, "the dead letter")
    (dead,) = bus.dead_letters()
    assert dead.reason == "too_large"
    kept = dead.fields[ENTRY_FIELD]
    assert len(kept) <= LIMIT and blob.startswith(kept)
    assert str(len(blob)) in dead.detail
    usage = int(bus.client.memory_usage(bus.key("dead")) or 0)
    assert usage < 2 * LIMIT, usage


def test_a_forged_seq_far_ahead_does_not_turn_real_frames_uninspected(
    bus: Bus, redis_url: str
) -> None:
    """A well-formed frame with a seq ingest never handed out (a buggy bridge, a reset
    camera, a forged message) used to open a gap of up to a million seqs: decide declared
    them all uninspected — including the real frames still to come, whose verdicts were then
    dropped as duplicates. Now it is dead-lettered and the real frames keep their verdicts."""
    settings = settings_for(bus, redis_url)
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    with line(bus, settings) as threads:
        for _ in range(3):
            ing.send(GOOD)
        wait_until(lambda: len(events_now(bus)) == 3, 30, "first verdicts")
        forged = wire_frame(seq=ing.next_seq + 5_000)
        bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: pack(forged)})
        wait_until(lambda: bus.length("dead") == 1, 30, "the forged frame dead-lettered")
        for i in range(6):
            ing.send(BAD if i % 2 else GOOD)
        wait_until(lambda: len(events_now(bus)) >= 9, 30, "later verdicts")
        assert all(t.is_alive() for t in threads)
    events = events_now(bus)
    assert [e.seq for e in events] == list(range(9))
    assert [e.verdict for e in events] == ["pass"] * 3 + ["pass", "fail"] * 3
    (dead,) = bus.dead_letters()
    assert dead.reason == "seq_not_issued" and dead.group == "decide"
    assert "5003" in dead.detail or str(forged["seq"]) in dead.detail
    assert int(bus.client.get(line_key(bus, "seq", "cam0")) or 0) == 9


@pytest.mark.parametrize("camera", ["ghost-cam"])
def test_a_frame_from_a_camera_ingest_never_numbered_is_dead_lettered(
    bus: Bus, redis_url: str, camera: str
) -> None:
    """No seq counter at all for the camera: the frame did not come through ingest. With a
    huge seq it would otherwise make decide invent a million uninspected parts."""
    settings = settings_for(bus, redis_url)
    f = wire_frame(seq=2_000_000)
    f["camera"] = camera
    with line(bus, settings):
        bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: pack(f)})
        wait_until(lambda: bus.length("dead") == 1, 30, "the dead letter")
    assert bus.length("events") == 0
    assert bus.dead_letters()[0].reason == "seq_not_issued"
