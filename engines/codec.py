"""How a frame's pixels travel from the camera to the model, and the same round trip offline.

A bundle is only as good as the agreement between the pixels it was calibrated on and the
pixels the line scores. JPEG at quality 90 moves patch statistics enough to push a third of a
demo's good parts over a threshold calibrated on lossless files, so the codec is part of the
model: training, the memory banks and calibration see every image after exactly the round
trip the line will apply (:meth:`FrameCodec.round_trip`), the bundle records it
(``ModelConfig.frame_codec``), ingest sends that way by default, and ``evaluate`` scores test
files through it. Encoding here and in ``lineguard.stream.protocol`` is one function
(:func:`encode_pixels`), so the two cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError

Encoding = Literal["raw", "jpeg", "png"]
ENCODINGS: tuple[Encoding, ...] = ("raw", "jpeg", "png")
DEFAULT_JPEG_QUALITY = 90
# OpenCV ≥ 4.10 decodes straight to RGB; older builds need a BGR→RGB pass. The bus's decoder
# (lineguard.stream.protocol.images) makes the same choice.
IMREAD_RGB: int | None = getattr(cv2, "IMREAD_COLOR_RGB", None)


def encode_pixels(image: np.ndarray, encoding: Encoding, jpeg_quality: int) -> bytes:
    """OpenCV's JPEG/PNG bytes of an RGB ``(H, W, 3)`` or grey ``(H, W, 1)`` uint8 image."""
    c = image.shape[2]
    src = image[:, :, 0] if c == 1 else cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    if encoding == "jpeg":
        ok, buf = cv2.imencode(".jpg", src, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    else:
        ok, buf = cv2.imencode(".png", src)
    if not ok:
        raise ValueError(f"OpenCV failed to encode a {image.shape} image as {encoding}")
    return bytes(buf.tobytes())


def decode_pixels(data: bytes, channels: int) -> np.ndarray:
    """The inverse of :func:`encode_pixels`: RGB ``(H, W, 3)`` uint8 (grey is replicated)."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if channels == 1:
        return cv2.cvtColor(_imdecode(buf, cv2.IMREAD_GRAYSCALE), cv2.COLOR_GRAY2RGB)
    if IMREAD_RGB is not None:
        return _imdecode(buf, IMREAD_RGB)
    return cv2.cvtColor(_imdecode(buf, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def _imdecode(buf: np.ndarray, flags: int) -> np.ndarray:
    out = cv2.imdecode(buf, flags)
    if out is None:
        raise ValueError("image data is corrupt or truncated")
    return np.asarray(out)


@dataclass(frozen=True)
class FrameCodec:
    """A frame encoding on the bus: ``raw``, ``png`` (both lossless) or ``jpeg`` at a quality.

    Written as a short spec — ``"raw"``, ``"png"``, ``"jpeg:90"`` — in bundles and settings.
    """

    encoding: Encoding = "jpeg"
    jpeg_quality: int = DEFAULT_JPEG_QUALITY

    def __post_init__(self) -> None:
        if self.encoding not in ENCODINGS:
            raise ConfigError(
                f"unknown frame encoding {self.encoding!r}; use one of {', '.join(ENCODINGS)}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ConfigError(f"JPEG quality must be 1..100, got {self.jpeg_quality}")

    @classmethod
    def parse(cls, spec: str) -> FrameCodec:
        """``"raw"``, ``"png"``, ``"jpeg"`` (quality 90) or ``"jpeg:Q"``."""
        name, _, quality = spec.strip().lower().partition(":")
        if quality and name != "jpeg":
            raise ConfigError(f"frame codec {spec!r}: only jpeg takes a quality (jpeg:90)")
        try:
            q = int(quality) if quality else DEFAULT_JPEG_QUALITY
        except ValueError:
            raise ConfigError(f"frame codec {spec!r}: the quality must be a number") from None
        if name not in ENCODINGS:
            raise ConfigError(f"unknown frame codec {spec!r}; use raw, png, jpeg or jpeg:QUALITY")
        return cls(cast(Encoding, name), q)

    @property
    def lossless(self) -> bool:
        return self.encoding != "jpeg"

    @property
    def spec(self) -> str:
        return f"jpeg:{self.jpeg_quality}" if self.encoding == "jpeg" else self.encoding

    def same_pixels(self, other: FrameCodec) -> bool:
        """Whether the two deliver identical pixels (raw and PNG do; JPEG only at one quality)."""
        return (self.lossless and other.lossless) or self.spec == other.spec

    def round_trip(self, image: np.ndarray) -> np.ndarray:
        """``image`` (RGB uint8, ``(H, W, 3)``) as the model receives it after the bus."""
        if self.lossless:
            return image
        return decode_pixels(encode_pixels(image, self.encoding, self.jpeg_quality), 3)

    def __str__(self) -> str:
        return self.spec


LOSSLESS = FrameCodec("raw")
# What ingest sends unless told otherwise, so what `train` records unless told otherwise: a
# bundle trained for it is scored on the line as `evaluate` scores it.
DEFAULT_FRAME_CODEC = FrameCodec().spec
