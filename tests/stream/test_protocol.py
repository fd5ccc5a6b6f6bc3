"""Protocol: round trips, every class of hostile input, and a fuzz proof that decoders only
ever raise ``ProtocolError``."""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Callable
from typing import Any

import cv2
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lineguard.engines.errors import InputError, LineguardError
from lineguard.stream.protocol import (
    SCHEMA_VERSION,
    Event,
    Frame,
    LowResMap,
    ProtocolError,
    Scores,
    decode,
    decode_event,
    decode_frame,
    decode_image,
    decode_scores,
    encode,
    encode_image,
    frame_key,
    make_frame,
)
from lineguard.stream.settings import LimitsSettings

T0 = 1_795_000_000.25


def smooth_rgb(h: int = 48, w: int = 64) -> np.ndarray:
    """A gradient image: JPEG reproduces it closely, unlike noise."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), (x + y) % 256], axis=2)
    return img.astype(np.uint8)


def frame(encoding: str = "png", image: np.ndarray | None = None, seq: int = 7) -> Frame:
    return make_frame(
        "line1",
        "cam0",
        seq,
        smooth_rgb() if image is None else image,
        encoding=encoding,  # type: ignore[arg-type]
        t_capture=T0,
    )


def scores(**kw: Any) -> Scores:
    base: dict[str, Any] = {
        "line": "line1",
        "camera": "cam0",
        "seq": 7,
        "t_capture": T0,
        "raw": {"hist": 1.5, "lgst": -0.25},
        "model": "csad-lite0@3",
        "timings": {"queue_wait": 0.002, "t_infer_start": T0 + 0.01, "t_infer_end": T0 + 0.02},
    }
    base.update(kw)
    return Scores(**base)


def event(**kw: Any) -> Event:
    base: dict[str, Any] = {
        "line": "line1",
        "camera": "cam0",
        "seq": 7,
        "verdict": "fail",
        "score": 4.5,
        "threshold": 3.0,
        "contributions": {"hist": 3.0, "lgst": 1.5},
        "model": "csad-lite0@3",
        "latency": {"e2e": 0.031, "infer": 0.012},
        "reason": "",
        "t_capture": T0,
        "t_event": T0 + 0.031,
    }
    base.update(kw)
    return Event(**base)


def wire(msg: Frame | Scores | Event) -> dict[str, Any]:
    out = msgpack.unpackb(encode(msg), raw=False)
    assert isinstance(out, dict)
    return out


def pack(d: Any) -> bytes:
    return msgpack.packb(d, use_bin_type=True)


def png_with_header(width: int, height: int, colour: int = 2) -> bytes:
    """A PNG whose IHDR claims any size, with no pixel data behind it (a bomb's header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 16


# --------------------------------------------------------------------------- round trips


def test_frame_key_is_sortable() -> None:
    assert frame_key("line1", "cam0", 123) == "line1/cam0/000000123"
    keys = [frame_key("l", "c", s) for s in (9, 10, 100, 2)]
    assert sorted(keys) == [frame_key("l", "c", s) for s in (2, 9, 10, 100)]
    assert frame("png").key == "line1/cam0/000000007"


@pytest.mark.parametrize("encoding", ["raw", "png", "jpeg"])
@pytest.mark.parametrize("channels", [1, 3])
def test_frame_round_trip_and_image(encoding: str, channels: int) -> None:
    rgb = smooth_rgb()
    src = rgb if channels == 3 else rgb[:, :, 0]
    f = frame(encoding, src)
    assert f.shape == (48, 64, channels)
    back = decode_frame(encode(f))
    assert back == f
    img = decode_image(back)
    assert img.shape == (48, 64, 3) and img.dtype == np.uint8
    expected = rgb if channels == 3 else np.repeat(rgb[:, :, :1], 3, axis=2)
    err = np.abs(img.astype(int) - expected.astype(int)).mean()
    assert err == 0 if encoding != "jpeg" else err < 6


def test_raw_channel_order_is_rgb() -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    img[..., 0] = 200  # red
    for enc in ("raw", "png", "jpeg"):
        out = decode_image(decode_frame(encode(frame(enc, img))))
        assert out[..., 0].mean() > 150 and out[..., 2].mean() < 50, enc


def test_scores_round_trip_with_maps() -> None:
    amap = np.linspace(0.0, 5.0, 16 * 12, dtype=np.float32).reshape(16, 12)
    labels = (np.arange(16 * 12) % 5).astype(np.uint8).reshape(16, 12)
    s = scores(amap=LowResMap.from_float(amap), seg=LowResMap.from_labels(labels, codec="raw"))
    back = decode_scores(encode(s))
    assert back == s
    assert back.key == s.key
    assert back.amap is not None and back.seg is not None
    np.testing.assert_allclose(back.amap.to_float(), amap, atol=5.0 / 255 + 1e-6)
    np.testing.assert_array_equal(back.seg.to_labels(), labels)


def test_scores_error_form() -> None:
    s = scores(raw={}, error="decode failed: corrupt_image")
    assert decode_scores(encode(s)).error == "decode failed: corrupt_image"
    with pytest.raises(ProtocolError) as info:
        encode(scores(raw={}))
    assert info.value.reason == "bad_value"


def test_numpy_values_are_accepted_on_encode() -> None:
    s = scores(raw={"hist": np.float32(1.5)}, seq=np.int64(7))
    assert decode_scores(encode(s)).raw == {"hist": 1.5}


@pytest.mark.parametrize("verdict", ["pass", "fail", "uninspected", "error"])
def test_event_round_trip(verdict: str) -> None:
    kw: dict[str, Any] = {"verdict": verdict}
    if verdict in ("uninspected", "error"):
        kw |= {"score": None, "threshold": None, "reason": "trimmed before inference"}
    e = event(**kw)
    assert decode_event(encode(e)) == e
    assert decode(encode(e)) == e


def test_event_rules() -> None:
    with pytest.raises(ProtocolError, match="needs both a score"):
        encode(event(verdict="pass", score=None))
    with pytest.raises(ProtocolError, match="needs a reason"):
        encode(event(verdict="error", reason=""))


def test_low_res_map_constant_and_bad_input() -> None:
    m = LowResMap.from_float(np.full((3, 4), 2.5))
    np.testing.assert_allclose(m.to_float(), 2.5)
    with pytest.raises(ProtocolError) as info:
        LowResMap.from_float(np.array([[np.nan, 1.0]]))
    assert info.value.reason == "non_finite"
    with pytest.raises(ProtocolError):
        LowResMap.from_labels(np.array([[300]]))


def test_protocol_error_is_a_lineguard_input_error() -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(b"\x00")
    assert isinstance(info.value, InputError) and isinstance(info.value, LineguardError)


# --------------------------------------------------------------------------- hostile inputs

Mutator = Callable[[dict[str, Any]], Any]


def _set(**kv: Any) -> Mutator:
    def apply(d: dict[str, Any]) -> dict[str, Any]:
        d.update(kv)
        return d

    return apply


def _drop(name: str) -> Mutator:
    def apply(d: dict[str, Any]) -> dict[str, Any]:
        del d[name]
        return d

    return apply


PNG = frame("png")
RAW = frame("raw")
JPEG = frame("jpeg")

FRAME_CASES: list[tuple[str, Frame, Mutator, str]] = [
    ("list instead of map", RAW, lambda d: [1, 2, 3], "not_a_map"),
    ("missing v", RAW, _drop("v"), "missing_field"),
    ("string v", RAW, _set(v="1"), "bad_version"),
    ("future v", RAW, _set(v=SCHEMA_VERSION + 1), "bad_version"),
    ("wrong kind", RAW, _set(kind="event"), "wrong_kind"),
    ("missing field", RAW, _drop("payload"), "missing_field"),
    ("extra field", RAW, _set(extra=1), "extra_field"),
    ("seq as string", RAW, _set(seq="7"), "wrong_type"),
    ("seq as bool", RAW, _set(seq=True), "wrong_type"),
    ("negative seq", RAW, _set(seq=-1), "negative_seq"),
    ("nan time", RAW, _set(t_capture=math.nan), "non_finite"),
    ("inf time", RAW, _set(t_capture=math.inf), "non_finite"),
    ("negative time", RAW, _set(t_capture=-5.0), "bad_value"),
    ("huge camera name", RAW, _set(camera="c" * 100_000), "string_too_long"),
    ("key-breaking line", RAW, _set(line="line{1}"), "bad_value"),
    ("empty line", RAW, _set(line=""), "bad_value"),
    ("unknown encoding", RAW, _set(encoding="webp"), "bad_value"),
    ("two-element shape", RAW, _set(shape=[48, 64]), "bad_shape"),
    ("zero-size shape", RAW, _set(shape=[0, 64, 3]), "bad_shape"),
    ("four channels", RAW, _set(shape=[48, 64, 4]), "bad_shape"),
    ("float shape", RAW, _set(shape=[48.0, 64, 3]), "bad_shape"),
    ("oversized shape", RAW, _set(shape=[60_000, 60_000, 3]), "image_too_large"),
    ("raw size mismatch", RAW, _set(shape=[48, 65, 3]), "payload_size"),
    ("empty payload", PNG, _set(payload=b""), "payload_size"),
    ("payload as string", RAW, _set(payload="abc"), "wrong_type"),
    ("png not png", PNG, _set(payload=b"\x00" * 200), "corrupt_image"),
    ("png shape lie", PNG, _set(shape=[40, 64, 3]), "bad_shape"),
    ("png channel lie", PNG, _set(shape=[48, 64, 1]), "bad_shape"),
    ("png bomb header", PNG, _set(payload=png_with_header(60_000, 60_000)), "image_too_large"),
    ("jpeg not jpeg", JPEG, _set(payload=b"\xff\xd8" + b"\x00" * 100), "corrupt_image"),
    ("jpeg cut in header", JPEG, lambda d: _set(payload=d["payload"][:30])(d), "corrupt_image"),
    ("jpeg shape lie", JPEG, _set(shape=[48, 32, 3]), "bad_shape"),
]


@pytest.mark.parametrize(
    ("base", "mutate", "reason"),
    [pytest.param(b, m, r, id=name) for name, b, m, r in FRAME_CASES],
)
def test_hostile_frames(base: Frame, mutate: Mutator, reason: str) -> None:
    data = pack(mutate(wire(base)))
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.reason == reason, str(info.value)
    assert str(info.value)  # a readable message, always


SCORES_CASES: list[tuple[str, Mutator, str]] = [
    ("score nan", _set(raw={"hist": math.nan}), "non_finite"),
    ("score string", _set(raw={"hist": "1"}), "wrong_type"),
    ("score key bytes", _set(raw={b"hist": 1.0}), "wrong_type"),
    ("too many branches", _set(raw={f"b{i}": 1.0 for i in range(1000)}), "too_many_entries"),
    ("raw not a map", _set(raw=[1.0, 2.0]), "wrong_type"),
    ("long model", _set(model="m" * 300), "string_too_long"),
    ("error not str", _set(error=5), "wrong_type"),
    ("empty error", _set(raw={}, error=""), "bad_value"),
    ("map not a map", _set(amap=b"xx"), "wrong_type"),
    (
        "map missing data",
        _set(amap={"shape": [2, 2], "codec": "raw", "lo": 0.0, "hi": 1.0}),
        "missing_field",
    ),
    (
        "raw map size",
        _set(amap={"shape": [2, 2], "codec": "raw", "lo": 0.0, "hi": 1.0, "data": b"abc"}),
        "payload_size",
    ),
    (
        "map range inverted",
        _set(amap={"shape": [1, 1], "codec": "raw", "lo": 1.0, "hi": 0.0, "data": b"a"}),
        "bad_value",
    ),
    (
        "map png lie",
        _set(
            amap={
                "shape": [9, 9],
                "codec": "png",
                "lo": 0.0,
                "hi": 1.0,
                "data": png_with_header(4, 4, 0),
            }
        ),
        "bad_shape",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "reason"), [pytest.param(m, r, id=name) for name, m, r in SCORES_CASES]
)
def test_hostile_scores(mutate: Mutator, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_scores(pack(mutate(wire(scores()))))
    assert info.value.reason == reason, str(info.value)


EVENT_CASES: list[tuple[str, Mutator, str]] = [
    ("unknown verdict", _set(verdict="maybe"), "bad_value"),
    ("score inf", _set(score=math.inf), "non_finite"),
    ("huge reason", _set(reason="r" * 100_000), "string_too_long"),
    ("latency not map", _set(latency=None), "wrong_type"),
    ("t_event missing", _drop("t_event"), "missing_field"),
]


@pytest.mark.parametrize(
    ("mutate", "reason"), [pytest.param(m, r, id=name) for name, m, r in EVENT_CASES]
)
def test_hostile_events(mutate: Mutator, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_event(pack(mutate(wire(event()))))
    assert info.value.reason == reason, str(info.value)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ("a string", "not_bytes"),
        (None, "not_bytes"),
        (b"", "not_msgpack"),
        (b"\xc1", "not_msgpack"),
        (b"\x85\xa1v", "not_msgpack"),  # truncated map
        (pack({"v": 1}) + b"\x00", "not_msgpack"),  # trailing bytes
        (pack({(1, 2): 3}), "not_msgpack"),  # non-string map key
        (pack("just a string"), "not_a_map"),
        (pack({"v": 1, "kind": "frame"}), "missing_field"),
        (pack({"v": 1, "kind": "nope"}), "wrong_kind"),
    ],
)
def test_garbage_bytes(data: Any, reason: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.reason == reason
    for decoder in (decode_scores, decode_event, decode):
        with pytest.raises(ProtocolError):
            decoder(data)


def test_wrong_version_message_lists_supported() -> None:
    with pytest.raises(ProtocolError, match=r"reads \[1, 2\].*upgrade lineguard"):
        decode_frame(pack(_set(v=9)(wire(RAW))))


def test_oversized_message_is_refused_before_unpacking() -> None:
    small = LimitsSettings(max_frame_bytes=1024)
    big = frame("raw", np.zeros((600, 600, 3), np.uint8))
    data = encode(big)
    with pytest.raises(ProtocolError) as info:
        decode_frame(data, small)
    assert info.value.reason == "too_large"
    assert "LINEGUARD_LIMITS__MAX_FRAME_BYTES" in str(info.value)


def test_configurable_string_limit() -> None:
    limits = LimitsSettings(max_string_len=8)
    with pytest.raises(ProtocolError) as info:
        decode_scores(encode(scores()), limits)  # model name is 12 characters
    assert info.value.reason == "string_too_long"


def test_encode_refuses_invalid_messages() -> None:
    bad = Frame("line1", "cam0", 1, math.nan, "raw", (1, 1, 3), b"abc")
    with pytest.raises(ProtocolError) as info:
        encode(bad)
    assert info.value.reason == "non_finite"
    with pytest.raises(ProtocolError) as info:
        encode({"v": 1})  # type: ignore[arg-type]
    assert info.value.reason == "wrong_type"


# --------------------------------------------------------------------------- images


def test_truncated_png_and_jpeg_fail_on_decode_image() -> None:
    for f in (frame("png"), frame("jpeg")):
        cut = Frame(f.line, f.camera, f.seq, f.t_capture, f.encoding, f.shape, f.payload[:-40])
        decoded = decode_frame(encode(cut))  # headers are intact, so this passes
        with pytest.raises(ProtocolError) as info:
            decode_image(decoded)
        assert info.value.reason == "corrupt_image", f.encoding


def test_corrupt_body_with_valid_ends_fails() -> None:
    f = frame("png")
    body = bytearray(f.payload)
    body[40:-20] = b"\x00" * (len(body) - 60)  # keep IHDR and IEND, destroy IDAT
    bad = Frame(f.line, f.camera, f.seq, f.t_capture, "png", f.shape, bytes(body))
    with pytest.raises(ProtocolError) as info:
        decode_image(bad)
    assert info.value.reason == "corrupt_image"


def test_decode_image_checks_shape_and_limits() -> None:
    f = frame("png")
    lie = Frame(f.line, f.camera, f.seq, f.t_capture, "png", (10, 10, 3), f.payload)
    with pytest.raises(ProtocolError) as info:
        decode_image(lie)
    assert info.value.reason == "bad_shape"
    with pytest.raises(ProtocolError) as info:
        decode_image(f, LimitsSettings(max_image_side=32))
    assert info.value.reason == "image_too_large"
    raw = frame("raw")
    short = Frame(raw.line, raw.camera, 1, T0, "raw", raw.shape, raw.payload[:-1])
    with pytest.raises(ProtocolError) as info:
        decode_image(short)
    assert info.value.reason == "payload_size"
    empty = Frame(raw.line, raw.camera, 1, T0, "jpeg", raw.shape, b"")
    with pytest.raises(ProtocolError) as info:
        decode_image(empty)
    assert info.value.reason == "payload_size"


def test_encode_image_validates() -> None:
    with pytest.raises(ProtocolError):
        encode_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(ProtocolError):
        encode_image(np.zeros((4, 4, 2), np.uint8))
    payload, shape = encode_image(np.zeros((4, 5), np.uint8), "png")
    assert shape == (4, 5, 1)
    decoded = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded is not None and decoded.shape == (4, 5)


# --------------------------------------------------------------------------- fuzz

DECODERS = (decode_frame, decode_scores, decode_event, decode)
FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=4), children, max_size=5)
    ),
    max_leaves=25,
)


def _only_protocol_errors(data: Any) -> None:
    for decoder in DECODERS:
        try:
            decoder(data)
        except ProtocolError as exc:
            assert exc.reason and str(exc)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    _only_protocol_errors(data)


@FUZZ
@given(msgpack_values)
def test_fuzz_arbitrary_msgpack(value: Any) -> None:
    _only_protocol_errors(pack(value))


VALID = {
    "frame_raw": wire(RAW),
    "frame_png": wire(PNG),
    "frame_jpeg": wire(JPEG),
    "scores": wire(
        scores(amap=LowResMap.from_float(np.eye(4)), seg=LowResMap.from_labels(np.eye(3)))
    ),
    "event": wire(event()),
}


@FUZZ
@given(
    st.sampled_from(sorted(VALID)),
    st.lists(st.tuples(st.text(max_size=12), msgpack_values), min_size=1, max_size=3),
    st.data(),
)
def test_fuzz_mutated_valid_messages(
    which: str, junk: list[tuple[str, Any]], data: st.DataObject
) -> None:
    """Replace real fields (or nested map fields) with junk: reaches the deep checks."""
    msg = dict(VALID[which])
    for new_key, value in junk:
        key = data.draw(st.sampled_from([*sorted(msg), new_key]))
        if isinstance(msg.get(key), dict) and data.draw(st.booleans()):
            inner = dict(msg[key])
            inner[data.draw(st.sampled_from([*sorted(map(str, inner)), new_key]))] = value
            msg[key] = inner
        else:
            msg[key] = value
    _only_protocol_errors(pack(msg))


@FUZZ
@given(st.sampled_from(["frame_png", "frame_jpeg"]), st.binary(max_size=64), st.data())
def test_fuzz_image_payload_bytes(which: str, noise: bytes, data: st.DataObject) -> None:
    """Corrupt image bytes in place: decode_frame and decode_image raise only ProtocolError."""
    msg = dict(VALID[which])
    payload = bytearray(msg["payload"])
    if noise:
        at = data.draw(st.integers(min_value=0, max_value=len(payload) - 1))
        payload[at : at + len(noise)] = noise
    cut = data.draw(st.integers(min_value=0, max_value=len(payload)))
    msg["payload"] = bytes(payload[:cut] if data.draw(st.booleans()) else payload)
    try:
        f = decode_frame(pack(msg))
    except ProtocolError:
        return
    try:
        img = decode_image(f)
    except ProtocolError:
        return
    assert img.shape == (48, 64, 3)


def test_a_png_bomb_is_refused_by_its_pixel_count_before_decoding() -> None:
    """8000×8000 is under the 8192-pixel side limit but decodes to 64 MP (192 MB as RGB)
    from a ~200 KB file: the pixel limit refuses it from the declared shape and from the
    PNG header, so nothing is allocated for it."""
    ok, buf = cv2.imencode(".png", np.zeros((8000, 8000), np.uint8))
    assert ok and len(buf) < 400_000
    bomb = Frame("line1", "cam0", 1, T0, "png", (8000, 8000, 1), buf.tobytes())
    roomy = LimitsSettings(max_image_pixels=64_000_000)
    data = encode(bomb, roomy)  # a sender with a larger limit (or a forger) put it on the bus
    with pytest.raises(ProtocolError) as info:
        decode_frame(data)
    assert info.value.reason == "image_too_large"
    assert "LINEGUARD_LIMITS__MAX_IMAGE_PIXELS" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        decode_image(bomb)  # a Frame built in-process: the header check catches it too
    assert info.value.reason == "image_too_large"
    assert decode_frame(data, roomy).shape == (8000, 8000, 1)  # the limit is the gate


def test_every_message_carries_its_epoch_and_schema_1_reads_as_no_epoch() -> None:
    """Schema 2 added ``epoch`` (the frame key repeats after Redis lost its data); schema 1
    messages (no epoch) still decode, as epoch ``""``, and each schema has its own fields."""
    f = make_frame("line1", "cam0", 7, smooth_rgb(), encoding="png", t_capture=T0, epoch="e1")
    for msg, decoder in (
        (f, decode_frame),
        (scores(epoch="e1"), decode_scores),
        (event(epoch="e1"), decode_event),
    ):
        w = wire(msg)
        assert w["v"] == SCHEMA_VERSION == 2 and w["epoch"] == "e1"
        assert decoder(pack(w)) == msg
        old = {k: v for k, v in w.items() if k != "epoch"} | {"v": 1}
        assert decoder(pack(old)).epoch == ""
        with pytest.raises(ProtocolError) as missing:
            decoder(pack({**old, "v": 2}))
        assert (missing.value.reason, missing.value.field) == ("missing_field", "epoch")
        with pytest.raises(ProtocolError) as extra:
            decoder(pack({**w, "v": 1}))
        assert extra.value.reason == "extra_field"
        for bad in ("a/b", "x" * 65, 7):
            with pytest.raises(ProtocolError) as refused:
                decoder(pack({**w, "epoch": bad}))
            assert refused.value.field == "epoch"
