"""The messages that travel between ingest, infer and decide: frames, scores, events.

Plain frozen dataclasses with the frame key that identifies a frame across stages; how they are
put on the wire and checked on the way back is ``wire``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import cv2
import numpy as np

from lineguard.stream.protocol.errors import ProtocolError
from lineguard.stream.protocol.images import encode_image, imdecode, png_complete, png_header

SCHEMA_VERSION: Final = 2
"""2 added ``epoch`` to every message; 1 (no epoch) is still read, as epoch ``""``."""


SUPPORTED_VERSIONS: Final = frozenset({1, 2})


ENTRY_FIELD: Final = b"m"
"""The stream entry field that holds the packed message."""


Encoding: TypeAlias = Literal["raw", "jpeg", "png"]


Verdict: TypeAlias = Literal["pass", "fail", "uninspected", "error"]


MapCodec: TypeAlias = Literal["png", "raw"]


ENCODINGS: Final = ("raw", "jpeg", "png")


VERDICTS: Final = ("pass", "fail", "uninspected", "error")


MAP_CODECS: Final = ("png", "raw")


def frame_key(line: str, camera: str, seq: int) -> str:
    """The identity of a frame across stages; zero-padded so keys sort in capture order.

    Unique within one epoch of the line (``Bus.ensure_epoch``) only: a Redis server that
    lost its data numbers frames from 0 again, so whatever outlives Redis (the history, its
    pictures) keys a frame on (epoch, frame key), and every message carries the epoch."""
    return f"{line}/{camera}/{seq:09d}"


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured image. ``payload`` is RGB row-major uint8 for ``raw``, else the file bytes.

    ``epoch`` is the line's epoch when ingest numbered the frame (``""``: unknown, a v1
    message); scores and events copy it, so a verdict names the numbering it belongs to."""

    line: str
    camera: str
    seq: int
    t_capture: float
    encoding: Encoding
    shape: tuple[int, int, int]
    payload: bytes
    epoch: str = ""

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
        dims = png_header(self.data, "map")
        if dims[:2] != (h, w):
            raise ProtocolError(
                "bad_shape", f"map PNG is {dims[1]}x{dims[0]}, message says {w}x{h}", field="map"
            )
        png_complete(self.data, "map")
        out = imdecode(self.data, cv2.IMREAD_GRAYSCALE, "map")
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
    epoch: str = ""

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
    epoch: str = ""

    @property
    def key(self) -> str:
        return frame_key(self.line, self.camera, self.seq)


Message: TypeAlias = Frame | Scores | Event


def make_frame(
    line: str,
    camera: str,
    seq: int,
    image: np.ndarray,
    *,
    encoding: Encoding = "jpeg",
    jpeg_quality: int = 90,
    t_capture: float,
    epoch: str = "",
) -> Frame:
    """Build a Frame from an RGB or grey uint8 image (what the ingest stage does per capture)."""
    payload, shape = encode_image(image, encoding, jpeg_quality=jpeg_quality)
    return Frame(line, camera, int(seq), float(t_capture), encoding, shape, payload, epoch)
