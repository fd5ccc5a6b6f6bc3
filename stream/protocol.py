"""Bus messages: what travels between ingest, infer and decide, and how it is checked.

Every message is one msgpack map carrying a schema version ``v`` and a ``kind``; a stream entry
holds it under a single field (``ENTRY_FIELD``). Anything read from the bus is hostile until
proven otherwise: a camera bridge may be buggy, a peer may run a newer lineguard, a replay may
be truncated. So each decoder checks structure, types, ranges, sizes and image headers, and
the only exception it lets out is ``ProtocolError`` with a short machine-readable ``reason``
(used in dead-letter entries and metric labels) and a message a person can act on. Encoders run
the same checks, so nothing invalid is ever put on the wire by us.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Final, Literal, TypeAlias, TypeVar, cast

import cv2
import msgpack
import numpy as np

from lineguard.engines.errors import InputError
from lineguard.stream.settings import NAME_PATTERN, LimitsSettings

SCHEMA_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = frozenset({1})
ENTRY_FIELD: Final = b"m"
"""The stream entry field that holds the packed message."""

Encoding: TypeAlias = Literal["raw", "jpeg", "png"]
Verdict: TypeAlias = Literal["pass", "fail", "uninspected", "error"]
MapCodec: TypeAlias = Literal["png", "raw"]

ENCODINGS: Final = ("raw", "jpeg", "png")
VERDICTS: Final = ("pass", "fail", "uninspected", "error")
MAP_CODECS: Final = ("png", "raw")

# Machine-readable failure classes. Stable: they appear in dead-letter entries and metrics.
Reason: TypeAlias = Literal[
    "not_bytes",
    "too_large",
    "not_msgpack",
    "not_a_map",
    "bad_version",
    "wrong_kind",
    "missing_field",
    "extra_field",
    "wrong_type",
    "non_finite",
    "string_too_long",
    "too_many_entries",
    "bad_value",
    "negative_seq",
    "bad_shape",
    "image_too_large",
    "payload_size",
    "corrupt_image",
]

# Room for everything in a message besides the payload (keys, ids, scores, a low-res map).
_ENVELOPE_BYTES: Final = 256 * 1024
_DEFAULT_LIMITS: Final = LimitsSettings()
_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"
_PNG_IEND: Final = b"IEND\xaeB`\x82"
# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# OpenCV ≥ 4.10 decodes straight to RGB; older builds need a BGR→RGB pass.
_IMREAD_RGB: Final[int | None] = getattr(cv2, "IMREAD_COLOR_RGB", None)


class ProtocolError(InputError):
    """A bus message or its image cannot be used; ``reason`` says which class of problem."""

    def __init__(self, reason: Reason, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.reason: Reason = reason
        self.field = field


def frame_key(line: str, camera: str, seq: int) -> str:
    """The identity of a frame across stages; zero-padded so keys sort in capture order."""
    return f"{line}/{camera}/{seq:09d}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image. ``payload`` is RGB row-major uint8 for ``raw``, else the file bytes."""

    line: str
    camera: str
    seq: int
    t_capture: float
    encoding: Encoding
    shape: tuple[int, int, int]
    payload: bytes

    @property
    def key(self) -> str:
        return frame_key(self.line, self.camera, self.seq)


@dataclass(frozen=True, slots=True)
class LowResMap:
    """A small 2-D map (anomaly map or segmentation) quantised to uint8.

    Values are ``lo + (hi - lo) * q / 255`` for anomaly maps; segmentation stores class ids
    directly (``lo=0, hi=255``). PNG keeps a 64×64 map to a few hundred bytes on the bus.
    """

    shape: tuple[int, int]
    codec: MapCodec
    lo: float
    hi: float
    data: bytes

    @classmethod
    def from_float(cls, values: np.ndarray, codec: MapCodec = "png") -> LowResMap:
        """Quantise a float map; the range is stored so ``to_float`` restores it to 1/255."""
        arr = np.asarray(values, dtype=np.float32)
        if arr.ndim != 2 or arr.size == 0:
            raise ProtocolError(
                "bad_shape", f"a map must be a non-empty 2-D array, got {arr.shape}"
            )
        if not np.isfinite(arr).all():
            raise ProtocolError(
                "non_finite", "the map contains NaN or infinity; clean it before sending"
            )
        lo, hi = float(arr.min()), float(arr.max())
        span = hi - lo
        if span > 0:
            q = np.rint((arr - lo) * (255.0 / span))
        else:
            q = np.zeros(arr.shape, dtype=np.float32)
        return cls._pack(q.astype(np.uint8), codec, lo, hi)

    @classmethod
    def from_labels(cls, labels: np.ndarray, codec: MapCodec = "png") -> LowResMap:
        """Store a class-id map (values 0..255) losslessly."""
        arr = np.asarray(labels)
        if arr.ndim != 2 or arr.size == 0:
            raise ProtocolError(
                "bad_shape", f"a map must be a non-empty 2-D array, got {arr.shape}"
            )
        if arr.dtype != np.uint8:
            if arr.min() < 0 or arr.max() > 255:
                raise ProtocolError(
                    "bad_value", "class ids must be within 0..255 to fit a uint8 label map"
                )
            arr = arr.astype(np.uint8)
        return cls._pack(arr, codec, 0.0, 255.0)

    @classmethod
    def _pack(cls, q: np.ndarray, codec: MapCodec, lo: float, hi: float) -> LowResMap:
        q = np.ascontiguousarray(q)
        if codec == "png":
            ok, buf = cv2.imencode(".png", q)
            if not ok:
                raise ProtocolError("bad_value", f"PNG encoding of a {q.shape} map failed")
            data = buf.tobytes()
        else:
            data = q.tobytes()
        return cls(shape=(int(q.shape[0]), int(q.shape[1])), codec=codec, lo=lo, hi=hi, data=data)

    def to_uint8(self) -> np.ndarray:
        """The stored uint8 plane (class ids for segmentation)."""
        h, w = self.shape
        if self.codec == "raw":
            if len(self.data) != h * w:
                raise ProtocolError(
                    "payload_size", f"raw map holds {len(self.data)} bytes, shape needs {h * w}"
                )
            return np.frombuffer(self.data, dtype=np.uint8).reshape(h, w)
        dims = _png_header(self.data, "map")
        if dims[:2] != (h, w):
            raise ProtocolError(
                "bad_shape", f"map PNG is {dims[1]}x{dims[0]}, message says {w}x{h}", field="map"
            )
        _png_complete(self.data, "map")
        out = _imdecode(self.data, cv2.IMREAD_GRAYSCALE, "map")
        if out.shape != (h, w):
            raise ProtocolError("bad_shape", f"map decoded to {out.shape}, expected {(h, w)}")
        return out

    def to_labels(self) -> np.ndarray:
        return self.to_uint8()

    def to_float(self) -> np.ndarray:
        """Dequantised float32 map in the original value range."""
        q = self.to_uint8().astype(np.float32)
        return q * np.float32((self.hi - self.lo) / 255.0) + np.float32(self.lo)


@dataclass(frozen=True, slots=True)
class Scores:
    """Raw per-branch scores of one frame, or the reason it could not be scored (``error``).

    Scores are raw on purpose: decide owns calibration and fusion, so a threshold change
    never needs the GPU stage to restart.
    """

    line: str
    camera: str
    seq: int
    t_capture: float
    raw: dict[str, float]
    model: str
    timings: dict[str, float] = field(default_factory=dict)
    amap: LowResMap | None = None
    seg: LowResMap | None = None
    error: str | None = None

    @property
    def key(self) -> str:
        return frame_key(self.line, self.camera, self.seq)


@dataclass(frozen=True, slots=True)
class Event:
    """One verdict per frame, with enough context to audit it later.

    ``pass``/``fail`` carry the fused ``score`` and the ``threshold`` it was compared with;
    ``error``/``uninspected`` carry a ``reason`` instead, so a reject is never unexplained.
    """

    line: str
    camera: str
    seq: int
    verdict: Verdict
    score: float | None
    threshold: float | None
    contributions: dict[str, float]
    model: str
    latency: dict[str, float]
    reason: str
    t_capture: float
    t_event: float

    @property
    def key(self) -> str:
        return frame_key(self.line, self.camera, self.seq)


Message: TypeAlias = Frame | Scores | Event
_M = TypeVar("_M", Frame, Scores, Event)

_KIND_OF: Final[dict[type, str]] = {Frame: "frame", Scores: "scores", Event: "event"}
_FIELDS: Final[dict[str, frozenset[str]]] = {
    "frame": frozenset(
        {"v", "kind", "line", "camera", "seq", "t_capture", "encoding", "shape", "payload"}
    ),
    "scores": frozenset(
        {
            "v",
            "kind",
            "line",
            "camera",
            "seq",
            "t_capture",
            "raw",
            "model",
            "timings",
            "amap",
            "seg",
            "error",
        }
    ),
    "event": frozenset(
        {
            "v",
            "kind",
            "line",
            "camera",
            "seq",
            "verdict",
            "score",
            "threshold",
            "contributions",
            "model",
            "latency",
            "reason",
            "t_capture",
            "t_event",
        }
    ),
}
_MAP_FIELDS: Final = frozenset({"shape", "codec", "lo", "hi", "data"})
_UNSET: Final = object()


# --------------------------------------------------------------------------- encoding


def encode(msg: Message, limits: LimitsSettings | None = None) -> bytes:
    """Validate ``msg`` with the decoders' rules and pack it for the bus."""
    kind = _KIND_OF.get(type(msg))
    if kind is None:
        raise ProtocolError(
            "wrong_type", f"cannot encode {type(msg).__name__}; expected Frame, Scores or Event"
        )
    wire = _to_wire(msg, kind)
    _from_wire(wire, kind, limits or _DEFAULT_LIMITS)
    return msgpack.packb(wire, use_bin_type=True)


def _plain(value: Any) -> Any:
    """numpy scalars and tuples to msgpack-native values; anything else is checked later."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _map_wire(m: LowResMap | None) -> Any:
    if m is None or not isinstance(m, LowResMap):
        return m
    return {
        "shape": _plain(m.shape),
        "codec": m.codec,
        "lo": _plain(m.lo),
        "hi": _plain(m.hi),
        "data": m.data,
    }


def _to_wire(msg: Message, kind: str) -> dict[str, Any]:
    wire: dict[str, Any] = {"v": SCHEMA_VERSION, "kind": kind}
    for f in fields(msg):
        name = f.name
        value = getattr(msg, name)
        wire[name] = _map_wire(value) if name in ("amap", "seg") else _plain(value)
    return wire


# --------------------------------------------------------------------------- decoding


def decode(data: Any, limits: LimitsSettings | None = None) -> Message:
    """Decode any message kind; for code that reads a mixed stream (e.g. a dead-letter viewer)."""
    lim = limits or _DEFAULT_LIMITS
    wire = _unpack(data, lim)
    kind = wire.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(
            "wrong_kind",
            f"message kind {_short(kind)} is unknown; expected one of {sorted(_FIELDS)}",
            field="kind",
        )
    return _from_wire(wire, kind, lim)


def decode_frame(data: Any, limits: LimitsSettings | None = None) -> Frame:
    """Decode a frames-stream message; raises ``ProtocolError`` for anything unusable."""
    return _decode_kind(data, "frame", Frame, limits)


def decode_scores(data: Any, limits: LimitsSettings | None = None) -> Scores:
    """Decode a scores-stream message; raises ``ProtocolError`` for anything unusable."""
    return _decode_kind(data, "scores", Scores, limits)


def decode_event(data: Any, limits: LimitsSettings | None = None) -> Event:
    """Decode an events-stream message; raises ``ProtocolError`` for anything unusable."""
    return _decode_kind(data, "event", Event, limits)


def _decode_kind(data: Any, kind: str, cls: type[_M], limits: LimitsSettings | None) -> _M:
    lim = limits or _DEFAULT_LIMITS
    return cast(_M, _from_wire(_unpack(data, lim), kind, lim))  # kind selects the class


def _unpack(data: Any, limits: LimitsSettings) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError("not_bytes", f"a bus message must be bytes, got {type(data).__name__}")
    size = memoryview(data).nbytes
    cap = limits.max_frame_bytes + _ENVELOPE_BYTES
    if size > cap:
        raise ProtocolError(
            "too_large",
            f"message is {size} bytes, over the {cap}-byte limit; raise "
            "LINEGUARD_LIMITS__MAX_FRAME_BYTES or send smaller (compressed) frames",
        )
    if size == 0:
        raise ProtocolError("not_msgpack", "message is empty; expected a msgpack map")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:
        raise ProtocolError(
            "not_msgpack",
            f"message is not valid msgpack ({type(exc).__name__}: {_clip(str(exc))}); "
            "is the producer a lineguard of the same schema?",
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError("not_a_map", f"message must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError(
            "bad_version" if "v" in obj else "missing_field",
            f"message has no integer schema version 'v' (got {_short(version)}); this "
            f"lineguard reads versions {sorted(SUPPORTED_VERSIONS)}",
            field="v",
        )
    if version not in SUPPORTED_VERSIONS:
        advice = (
            "upgrade lineguard on this worker"
            if version > SCHEMA_VERSION
            else ("upgrade the producer")
        )
        raise ProtocolError(
            "bad_version",
            f"message schema version {version} is not supported (this lineguard reads "
            f"{sorted(SUPPORTED_VERSIONS)}); {advice}",
            field="v",
        )
    return obj


def _from_wire(wire: dict[str, Any], kind: str, limits: LimitsSettings) -> Message:
    got = wire.get("kind")
    if got != kind:
        raise ProtocolError(
            "wrong_kind", f"expected a {kind!r} message, got kind {_short(got)}", field="kind"
        )
    expected = _FIELDS[kind]
    keys = set(wire)
    if not all(isinstance(k, str) for k in keys):
        raise ProtocolError("wrong_type", f"{kind} message keys must be strings")
    missing = expected - keys
    if missing:
        raise ProtocolError(
            "missing_field",
            f"{kind} message lacks field(s) {sorted(missing)}",
            field=sorted(missing)[0],
        )
    extra = keys - expected
    if extra:
        shown = sorted(_clip(k, 40) for k in extra)[:5]
        raise ProtocolError(
            "extra_field",
            f"{kind} message has unknown field(s) {shown}; the producer may speak a newer "
            "schema than this lineguard",
            field=shown[0],
        )
    r = _Reader(wire, kind, limits)
    if kind == "frame":
        return r.frame()
    if kind == "scores":
        return r.scores()
    return r.event()


class _Reader:
    """Field-by-field checks with messages that name the message kind and the field."""

    def __init__(self, wire: Mapping[str, Any], kind: str, limits: LimitsSettings) -> None:
        self.wire = wire
        self.kind = kind
        self.limits = limits

    def fail(self, reason: Reason, name: str, what: str) -> ProtocolError:
        return ProtocolError(reason, f"{self.kind} field {name!r}: {what}", field=name)

    # scalars ---------------------------------------------------------------

    def _get(self, name: str, value: Any) -> Any:
        return self.wire[name] if value is _UNSET else value

    def text(self, name: str, *, max_len: int | None = None, value: Any = _UNSET) -> str:
        v = self._get(name, value)
        if not isinstance(v, str):
            raise self.fail("wrong_type", name, f"expected a string, got {_short(v)}")
        cap = self.limits.max_string_len if max_len is None else max_len
        if len(v) > cap:
            raise self.fail(
                "string_too_long",
                name,
                f"string of {len(v)} characters exceeds the limit of {cap} "
                "(LINEGUARD_LIMITS__MAX_STRING_LEN)",
            )
        return v

    def name(self, name: str) -> str:
        v = self.text(name)
        if not v or len(v) > 64 or not set(v) <= _NAME_CHARS or v[0] in "_.-":
            raise self.fail(
                "bad_value", name, f"{_short(v)} does not match {NAME_PATTERN} (id used in keys)"
            )
        return v

    def integer(self, name: str, *, value: Any = _UNSET) -> int:
        v = self._get(name, value)
        if type(v) is not int:
            raise self.fail("wrong_type", name, f"expected an integer, got {_short(v)}")
        return v

    def seq(self) -> int:
        v = self.integer("seq")
        if v < 0:
            raise self.fail("negative_seq", "seq", f"sequence number {v} is negative")
        if v >= 2**63:
            raise self.fail("bad_value", "seq", f"sequence number {v} does not fit 63 bits")
        return v

    def number(self, name: str, *, value: Any = _UNSET, key: str | None = None) -> float:
        v = self._get(name, value)
        label = name if key is None else f"{name}[{_clip(key, 40)!r}]"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail("wrong_type", label, f"expected a number, got {_short(v)}")
        f = float(v)
        if not math.isfinite(f):
            raise self.fail("non_finite", label, f"value {v} is not finite")
        return f

    def optional_number(self, name: str) -> float | None:
        return None if self.wire[name] is None else self.number(name)

    def timestamp(self, name: str) -> float:
        v = self.number(name)
        if v < 0:
            raise self.fail("bad_value", name, f"timestamp {v} is negative (epoch seconds)")
        return v

    def choice(self, name: str, options: tuple[str, ...], *, value: Any = _UNSET) -> str:
        v = self._get(name, value)
        if not isinstance(v, str):
            raise self.fail("wrong_type", name, f"expected one of {list(options)}, got {_short(v)}")
        if v not in options:
            raise self.fail("bad_value", name, f"{_short(v)} is not one of {list(options)}")
        return v

    def binary(self, name: str, *, value: Any = _UNSET) -> bytes:
        v = self._get(name, value)
        if not isinstance(v, bytes | bytearray | memoryview):
            raise self.fail("wrong_type", name, f"expected binary data, got {_short(v)}")
        return v if isinstance(v, bytes) else bytes(v)

    def float_dict(self, name: str) -> dict[str, float]:
        v = self.wire[name]
        if not isinstance(v, dict):
            raise self.fail(
                "wrong_type", name, f"expected a map of name to number, got {_short(v)}"
            )
        if len(v) > self.limits.max_entries:
            raise self.fail(
                "too_many_entries",
                name,
                f"{len(v)} entries exceed the limit of {self.limits.max_entries} "
                "(LINEGUARD_LIMITS__MAX_ENTRIES)",
            )
        out: dict[str, float] = {}
        for k, x in v.items():
            key = self.text(name, value=k) if isinstance(k, str) else None
            if key is None or not key:
                raise self.fail(
                    "wrong_type", name, f"keys must be non-empty strings, got {_short(k)}"
                )
            out[key] = self.number(name, value=x, key=key)
        return out

    # composites ------------------------------------------------------------

    def shape(self) -> tuple[int, int, int]:
        v = self.wire["shape"]
        if not isinstance(v, list) or len(v) != 3 or any(type(x) is not int for x in v):
            raise self.fail(
                "bad_shape", "shape", f"expected [height, width, channels], got {_short(v)}"
            )
        h, w, c = v
        if h < 1 or w < 1:
            raise self.fail("bad_shape", "shape", f"image size {w}x{h} is empty")
        if c not in (1, 3):
            raise self.fail("bad_shape", "shape", f"channels must be 1 or 3, got {c}")
        side = self.limits.max_image_side
        if h > side or w > side:
            raise self.fail(
                "image_too_large",
                "shape",
                f"image {w}x{h} exceeds the {side}-pixel side limit "
                "(LINEGUARD_LIMITS__MAX_IMAGE_SIDE); downscale at ingest",
            )
        return (h, w, c)

    def low_res_map(self, name: str) -> LowResMap | None:
        v = self.wire[name]
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail("wrong_type", name, f"expected a map object or nil, got {_short(v)}")
        keys = set(v)
        if keys != _MAP_FIELDS:
            missing, extra = _MAP_FIELDS - keys, keys - _MAP_FIELDS
            reason: Reason = "missing_field" if missing else "extra_field"
            raise self.fail(
                reason,
                name,
                f"map object needs exactly {sorted(_MAP_FIELDS)} "
                f"(missing {sorted(missing)}, unknown {sorted(_clip(str(k), 40) for k in extra)})",
            )
        shape = v["shape"]
        if not isinstance(shape, list) or len(shape) != 2 or any(type(x) is not int for x in shape):
            raise self.fail(
                "bad_shape", name, f"map shape must be [height, width], got {_short(shape)}"
            )
        h, w = shape
        side = self.limits.max_image_side
        if not (1 <= h <= side and 1 <= w <= side):
            raise self.fail("bad_shape", name, f"map size {w}x{h} is outside 1..{side}")
        codec = self.choice(name, MAP_CODECS, value=v["codec"])
        lo = self.number(name, value=v["lo"], key="lo")
        hi = self.number(name, value=v["hi"], key="hi")
        if hi < lo:
            raise self.fail("bad_value", name, f"map range hi={hi} is below lo={lo}")
        data = self.binary(name, value=v["data"])
        if codec == "raw" and len(data) != h * w:
            raise self.fail(
                "payload_size", name, f"raw map holds {len(data)} bytes, {w}x{h} needs {h * w}"
            )
        if codec == "png":
            if len(data) > self.limits.max_frame_bytes:
                raise self.fail("too_large", name, f"map PNG of {len(data)} bytes is too large")
            dims = _png_header(data, name)
            if dims[:2] != (h, w):
                raise self.fail(
                    "bad_shape", name, f"map PNG is {dims[1]}x{dims[0]}, message says {w}x{h}"
                )
        return LowResMap(shape=(h, w), codec=codec, lo=lo, hi=hi, data=data)  # type: ignore[arg-type]

    # messages --------------------------------------------------------------

    def frame(self) -> Frame:
        line, camera, seq = self.name("line"), self.name("camera"), self.seq()
        t_capture = self.timestamp("t_capture")
        encoding = self.choice("encoding", ENCODINGS)
        h, w, c = self.shape()
        payload = self.binary("payload")
        n = len(payload)
        if n == 0:
            raise self.fail("payload_size", "payload", "payload is empty")
        if encoding == "raw":
            need = h * w * c
            if need > self.limits.max_frame_bytes:
                raise self.fail(
                    "too_large",
                    "payload",
                    f"raw {w}x{h}x{c} frame needs {need} bytes, over "
                    f"LINEGUARD_LIMITS__MAX_FRAME_BYTES={self.limits.max_frame_bytes}",
                )
            if n != need:
                raise self.fail(
                    "payload_size",
                    "payload",
                    f"raw payload has {n} bytes but shape {w}x{h}x{c} needs {need}",
                )
        else:
            if n > self.limits.max_frame_bytes:
                raise self.fail(
                    "too_large",
                    "payload",
                    f"{encoding} payload of {n} bytes exceeds "
                    f"LINEGUARD_LIMITS__MAX_FRAME_BYTES={self.limits.max_frame_bytes}",
                )
            _check_header(payload, encoding, (h, w, c), self.limits)  # type: ignore[arg-type]
        return Frame(line, camera, seq, t_capture, encoding, (h, w, c), payload)  # type: ignore[arg-type]

    def scores(self) -> Scores:
        line, camera, seq = self.name("line"), self.name("camera"), self.seq()
        t_capture = self.timestamp("t_capture")
        raw = self.float_dict("raw")
        model = self.text("model")
        timings = self.float_dict("timings")
        amap = self.low_res_map("amap")
        seg = self.low_res_map("seg")
        error = self.wire["error"]
        if error is not None:
            error = self.text("error", max_len=self.limits.max_text_len)
            if not error:
                raise self.fail("bad_value", "error", "error must be nil or a non-empty reason")
        elif not raw:
            raise self.fail("bad_value", "raw", "scores without an error need at least one branch")
        return Scores(line, camera, seq, t_capture, raw, model, timings, amap, seg, error)

    def event(self) -> Event:
        line, camera, seq = self.name("line"), self.name("camera"), self.seq()
        verdict = self.choice("verdict", VERDICTS)
        score = self.optional_number("score")
        threshold = self.optional_number("threshold")
        contributions = self.float_dict("contributions")
        model = self.text("model")
        latency = self.float_dict("latency")
        reason = self.text("reason", max_len=self.limits.max_text_len)
        t_capture = self.timestamp("t_capture")
        t_event = self.timestamp("t_event")
        if verdict in ("pass", "fail") and (score is None or threshold is None):
            raise self.fail(
                "bad_value", "score", f"a {verdict!r} verdict needs both a score and a threshold"
            )
        if verdict in ("error", "uninspected") and not reason:
            raise self.fail("bad_value", "reason", f"a {verdict!r} verdict needs a reason")
        return Event(
            line,
            camera,
            seq,
            verdict,  # type: ignore[arg-type]
            score,
            threshold,
            contributions,
            model,
            latency,
            reason,
            t_capture,
            t_event,
        )


# --------------------------------------------------------------------------- images


def _png_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(height, width, colour type) from the IHDR chunk, without decompressing anything."""
    if len(data) < 33 or not data.startswith(_PNG_SIGNATURE) or data[12:16] != b"IHDR":
        raise ProtocolError(
            "corrupt_image", f"{name}: not a PNG (bad signature or IHDR header)", field=name
        )
    width = int.from_bytes(data[16:20], "big")
    height = int.from_bytes(data[20:24], "big")
    colour = data[25]
    if width == 0 or height == 0:
        raise ProtocolError(
            "corrupt_image", f"{name}: PNG header says {width}x{height}", field=name
        )
    return height, width, colour


def _png_complete(data: bytes, name: str) -> None:
    if not data.rstrip(b"\x00").endswith(_PNG_IEND):
        raise ProtocolError(
            "corrupt_image", f"{name}: PNG is truncated (no IEND chunk at the end)", field=name
        )


def _jpeg_header(data: bytes, name: str) -> tuple[int, int, int]:
    """(height, width, components) from the first SOF segment, scanning marker by marker."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise ProtocolError("corrupt_image", f"{name}: not a JPEG (no SOI marker)", field=name)
    i = 2
    while i + 4 <= n:
        if data[i] != 0xFF:
            break
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image / start of scan before any frame header
            break
        seg_len = int.from_bytes(data[i + 2 : i + 4], "big")
        if seg_len < 2:
            break
        if marker in _JPEG_SOF:
            if i + 10 > n or seg_len < 8:
                break
            height = int.from_bytes(data[i + 5 : i + 7], "big")
            width = int.from_bytes(data[i + 7 : i + 9], "big")
            components = data[i + 9]
            if height == 0 or width == 0:
                break
            return height, width, components
        i += 2 + seg_len
    raise ProtocolError(
        "corrupt_image", f"{name}: JPEG has no readable frame header (SOF)", field=name
    )


def _check_header(
    payload: bytes,
    encoding: Literal["jpeg", "png"],
    shape: tuple[int, int, int],
    limits: LimitsSettings,
) -> None:
    """Compare the file's own header with the declared shape before any pixel is decoded.

    This is the decompression-bomb guard: a 100-byte PNG may claim 60000×60000 pixels, and
    ``cv2.imdecode`` would try to allocate them all.
    """
    h, w, c = shape
    if encoding == "png":
        ih, iw, colour = _png_header(payload, "payload")
        channels = 1 if colour in (0, 4) else 3 if colour in (2, 3, 6) else 0
    else:
        ih, iw, comps = _jpeg_header(payload, "payload")
        channels = comps if comps in (1, 3) else 0
    side = limits.max_image_side
    if ih > side or iw > side:
        raise ProtocolError(
            "image_too_large",
            f"{encoding} header says {iw}x{ih}, over the {side}-pixel side limit "
            "(LINEGUARD_LIMITS__MAX_IMAGE_SIDE)",
            field="payload",
        )
    if (ih, iw) != (h, w):
        raise ProtocolError(
            "bad_shape",
            f"{encoding} header says {iw}x{ih} but the message declares {w}x{h}",
            field="shape",
        )
    if channels != c:
        raise ProtocolError(
            "bad_shape",
            f"{encoding} image has {channels or 'unsupported'} channel(s), message declares {c}",
            field="shape",
        )


def _imdecode(data: bytes, flags: int, name: str) -> np.ndarray:
    try:
        out = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ProtocolError(
            "corrupt_image", f"{name}: OpenCV could not decode it ({_clip(str(exc))})", field=name
        ) from None
    if out is None:
        raise ProtocolError(
            "corrupt_image", f"{name}: image data is corrupt or truncated", field=name
        )
    return out


def decode_image(frame: Frame, limits: LimitsSettings | None = None) -> np.ndarray:
    """The frame's pixels as an ``(H, W, 3)`` RGB uint8 array (grey is replicated).

    Headers are checked against the declared shape and the size limit before decoding, and
    the decoded size is checked again after, so a lying or truncated file becomes a
    ``ProtocolError`` (which the infer stage turns into an ``error`` verdict).
    The array may be read-only (raw frames are viewed, not copied).
    """
    lim = limits or _DEFAULT_LIMITS
    h, w, c = frame.shape
    payload = frame.payload
    if not isinstance(payload, bytes | bytearray | memoryview) or len(payload) == 0:
        raise ProtocolError("payload_size", "frame payload is empty or not bytes", field="payload")
    if frame.encoding == "raw":
        if len(payload) != h * w * c:
            raise ProtocolError(
                "payload_size",
                f"raw payload has {len(payload)} bytes but shape {w}x{h}x{c} needs {h * w * c}",
                field="payload",
            )
        img = np.frombuffer(payload, dtype=np.uint8).reshape(h, w, c)
        return np.repeat(img, 3, axis=2) if c == 1 else img
    if frame.encoding not in ("jpeg", "png"):
        raise ProtocolError("bad_value", f"unknown encoding {frame.encoding!r}", field="encoding")
    if len(payload) > lim.max_frame_bytes:
        raise ProtocolError(
            "too_large", f"payload of {len(payload)} bytes exceeds the frame limit", field="payload"
        )
    data = bytes(payload)
    _check_header(data, frame.encoding, (h, w, c), lim)
    if frame.encoding == "png":
        _png_complete(data, "payload")
    elif not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ProtocolError(
            "corrupt_image",
            "payload: JPEG is truncated (no EOI marker at the end)",
            field="payload",
        )
    if c == 1:
        grey = _imdecode(data, cv2.IMREAD_GRAYSCALE, "payload")
        out = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB) if grey.ndim == 2 else grey
    elif _IMREAD_RGB is not None:
        out = _imdecode(data, _IMREAD_RGB, "payload")
    else:
        out = cv2.cvtColor(_imdecode(data, cv2.IMREAD_COLOR, "payload"), cv2.COLOR_BGR2RGB)
    if out.shape != (h, w, 3) or out.dtype != np.uint8:
        raise ProtocolError(
            "bad_shape",
            f"{frame.encoding} decoded to {out.shape} {out.dtype}, expected {(h, w, 3)} uint8",
            field="payload",
        )
    return out


def encode_image(
    image: np.ndarray, encoding: Encoding = "jpeg", *, jpeg_quality: int = 90
) -> tuple[bytes, tuple[int, int, int]]:
    """Encode an RGB ``(H, W, 3)`` or grey ``(H, W)``/``(H, W, 1)`` uint8 image for a Frame."""
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise ProtocolError("bad_value", f"images must be uint8, got {arr.dtype}; convert first")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3) or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ProtocolError("bad_shape", f"image shape {arr.shape} is not (H, W), (H, W, 1|3)")
    h, w, c = (int(s) for s in arr.shape)
    if encoding == "raw":
        return np.ascontiguousarray(arr).tobytes(), (h, w, c)
    if encoding not in ("jpeg", "png"):
        raise ProtocolError("bad_value", f"unknown encoding {encoding!r}; use raw, jpeg or png")
    src = arr[:, :, 0] if c == 1 else cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", src, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        ok, buf = cv2.imencode(".png", src)
    if not ok:
        raise ProtocolError(
            "bad_value", f"OpenCV failed to encode a {w}x{h}x{c} image as {encoding}"
        )
    return buf.tobytes(), (h, w, c)


def make_frame(
    line: str,
    camera: str,
    seq: int,
    image: np.ndarray,
    *,
    encoding: Encoding = "jpeg",
    jpeg_quality: int = 90,
    t_capture: float,
) -> Frame:
    """Build a Frame from an RGB or grey uint8 image (what the ingest stage does per capture)."""
    payload, shape = encode_image(image, encoding, jpeg_quality=jpeg_quality)
    return Frame(line, camera, int(seq), float(t_capture), encoding, shape, payload)


# --------------------------------------------------------------------------- helpers


def _clip(text: str, n: int = 120) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _short(value: Any) -> str:
    """A bounded description of a hostile value for an error message."""
    if isinstance(value, bytes | bytearray | memoryview):
        return f"{len(value)} bytes of binary"
    if isinstance(value, dict | list):
        return f"a {type(value).__name__} of {len(value)} items"
    text = repr(value)
    return f"{type(value).__name__} {_clip(text, 60)}"
