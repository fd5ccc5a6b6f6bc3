"""Messages to and from msgpack, checked field by field on the way in.

Every message is one msgpack map carrying a schema version ``v`` and a ``kind``; a stream entry
holds it under a single field (``ENTRY_FIELD``). Anything read from the bus is hostile until
proven otherwise: a camera bridge may be buggy, a peer may run a newer lineguard, a replay may be
truncated. So each decoder checks structure, types, ranges and sizes, and the only exception it
lets out is ``ProtocolError``. Encoders run the same checks, so nothing invalid is ever put on
the wire by us.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final, TypeVar, cast

import msgpack
import numpy as np

from lineguard.stream.protocol.errors import ProtocolError, Reason, clip, short
from lineguard.stream.protocol.images import check_header, png_header
from lineguard.stream.protocol.messages import (
    ENCODINGS,
    MAP_CODECS,
    SCHEMA_VERSION,
    SUPPORTED_VERSIONS,
    VERDICTS,
    Event,
    Frame,
    LowResMap,
    Message,
    Scores,
)
from lineguard.stream.settings import NAME_PATTERN, LimitsSettings

# Room for everything in a message besides the payload (keys, ids, scores, a low-res map).
_ENVELOPE_BYTES: Final = 256 * 1024


_DEFAULT_LIMITS: Final = LimitsSettings()


_NAME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


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


_SINCE_V2: Final = frozenset({"epoch"})
"""Fields schema 2 added to every kind (``_FIELDS`` is schema 1)."""


_MAX_EPOCH_LEN: Final = 64


_MAP_FIELDS: Final = frozenset({"shape", "codec", "lo", "hi", "data"})


_UNSET: Final = object()


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


def decode(data: Any, limits: LimitsSettings | None = None) -> Message:
    """Decode any message kind; for code that reads a mixed stream (e.g. a dead-letter viewer)."""
    lim = limits or _DEFAULT_LIMITS
    wire = _unpack(data, lim)
    kind = wire.get("kind")
    if not isinstance(kind, str) or kind not in _FIELDS:
        raise ProtocolError(
            "wrong_kind",
            f"message kind {short(kind)} is unknown; expected one of {sorted(_FIELDS)}",
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


@dataclass(frozen=True, slots=True)
class FrameIdentity:
    """Which frame a message claims to be, read from a message that failed validation."""

    line: str
    camera: str
    seq: int
    t_capture: float
    epoch: str = ""


def frame_identity(data: Any, limits: LimitsSettings | None = None) -> FrameIdentity | None:
    """The identity fields of a frames-stream message that ``decode_frame`` refused, when
    they alone are well-formed; ``None`` otherwise.

    Lets infer give a frame with a corrupt image or shape an ``error`` verdict naming the
    real cause, instead of leaving a hole that decide can only call a sequence gap.
    """
    lim = limits or _DEFAULT_LIMITS
    try:
        wire = _unpack(data, lim)
        if wire.get("kind") != "frame" or not all(k in wire for k in _IDENTITY):
            return None
        r = _Reader(wire, "frame", lim)
        return FrameIdentity(
            r.name("line"), r.name("camera"), r.seq(), r.number("t_capture"), r.epoch()
        )
    except ProtocolError:
        return None


_IDENTITY: Final = ("line", "camera", "seq", "t_capture")


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
            f"message is not valid msgpack ({type(exc).__name__}: {clip(str(exc))}); "
            "is the producer a lineguard of the same schema?",
        ) from None
    if not isinstance(obj, dict):
        raise ProtocolError("not_a_map", f"message must be a msgpack map, got {type(obj).__name__}")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError(
            "bad_version" if "v" in obj else "missing_field",
            f"message has no integer schema version 'v' (got {short(version)}); this "
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
            "wrong_kind", f"expected a {kind!r} message, got kind {short(got)}", field="kind"
        )
    expected = _FIELDS[kind] | (_SINCE_V2 if wire.get("v", SCHEMA_VERSION) >= 2 else frozenset())
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
        shown = sorted(clip(k, 40) for k in extra)[:5]
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
            raise self.fail("wrong_type", name, f"expected a string, got {short(v)}")
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
                "bad_value", name, f"{short(v)} does not match {NAME_PATTERN} (id used in keys)"
            )
        return v

    def integer(self, name: str, *, value: Any = _UNSET) -> int:
        v = self._get(name, value)
        if type(v) is not int:
            raise self.fail("wrong_type", name, f"expected an integer, got {short(v)}")
        return v

    def seq(self) -> int:
        v = self.integer("seq")
        if v < 0:
            raise self.fail("negative_seq", "seq", f"sequence number {v} is negative")
        if v >= 2**63:
            raise self.fail("bad_value", "seq", f"sequence number {v} does not fit 63 bits")
        return v

    def epoch(self) -> str:
        """The line epoch the message belongs to; ``""`` when unknown (schema 1 has none)."""
        if "epoch" not in self.wire:
            return ""
        v = self.text("epoch", max_len=_MAX_EPOCH_LEN)
        if not set(v) <= _NAME_CHARS:
            raise self.fail(
                "bad_value", "epoch", f"{short(v)} is not an epoch id (letters, digits)"
            )
        return v

    def number(self, name: str, *, value: Any = _UNSET, key: str | None = None) -> float:
        v = self._get(name, value)
        label = name if key is None else f"{name}[{clip(key, 40)!r}]"
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise self.fail("wrong_type", label, f"expected a number, got {short(v)}")
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
            raise self.fail("wrong_type", name, f"expected one of {list(options)}, got {short(v)}")
        if v not in options:
            raise self.fail("bad_value", name, f"{short(v)} is not one of {list(options)}")
        return v

    def binary(self, name: str, *, value: Any = _UNSET) -> bytes:
        v = self._get(name, value)
        if not isinstance(v, bytes | bytearray | memoryview):
            raise self.fail("wrong_type", name, f"expected binary data, got {short(v)}")
        return v if isinstance(v, bytes) else bytes(v)

    def float_dict(self, name: str) -> dict[str, float]:
        v = self.wire[name]
        if not isinstance(v, dict):
            raise self.fail("wrong_type", name, f"expected a map of name to number, got {short(v)}")
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
                    "wrong_type", name, f"keys must be non-empty strings, got {short(k)}"
                )
            out[key] = self.number(name, value=x, key=key)
        return out

    # composites ------------------------------------------------------------

    def shape(self) -> tuple[int, int, int]:
        v = self.wire["shape"]
        if not isinstance(v, list) or len(v) != 3 or any(type(x) is not int for x in v):
            raise self.fail(
                "bad_shape", "shape", f"expected [height, width, channels], got {short(v)}"
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
        if h * w > self.limits.max_image_pixels:
            raise self.fail(
                "image_too_large",
                "shape",
                f"image {w}x{h} has {h * w} pixels, over the {self.limits.max_image_pixels} "
                "limit (LINEGUARD_LIMITS__MAX_IMAGE_PIXELS); downscale at ingest",
            )
        return (h, w, c)

    def low_res_map(self, name: str) -> LowResMap | None:
        v = self.wire[name]
        if v is None:
            return None
        if not isinstance(v, dict):
            raise self.fail("wrong_type", name, f"expected a map object or nil, got {short(v)}")
        keys = set(v)
        if keys != _MAP_FIELDS:
            missing, extra = _MAP_FIELDS - keys, keys - _MAP_FIELDS
            reason: Reason = "missing_field" if missing else "extra_field"
            raise self.fail(
                reason,
                name,
                f"map object needs exactly {sorted(_MAP_FIELDS)} "
                f"(missing {sorted(missing)}, unknown {sorted(clip(str(k), 40) for k in extra)})",
            )
        shape = v["shape"]
        if not isinstance(shape, list) or len(shape) != 2 or any(type(x) is not int for x in shape):
            raise self.fail(
                "bad_shape", name, f"map shape must be [height, width], got {short(shape)}"
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
            dims = png_header(data, name)
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
            check_header(payload, encoding, (h, w, c), self.limits)  # type: ignore[arg-type]
        epoch = self.epoch()
        return Frame(line, camera, seq, t_capture, encoding, (h, w, c), payload, epoch)  # type: ignore[arg-type]

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
        epoch = self.epoch()
        return Scores(line, camera, seq, t_capture, raw, model, timings, amap, seg, error, epoch)

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
            self.epoch(),
        )
