"""Frame images on the bus: sniffing headers, decoding with limits, encoding, resizing.

A frame's payload is raw RGB, PNG or JPEG. Before a single pixel is decoded, the file's own
header is compared with the declared shape and the size limits: this is the decompression-bomb
guard (a 100-byte PNG may claim 60000×60000 pixels, and ``cv2.imdecode`` would allocate them
all). Nothing here knows the message types beyond reading a frame's fields.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

import cv2
import numpy as np

from lineguard.engines.codec import IMREAD_RGB, encode_pixels
from lineguard.engines.input_size import resize_frame
from lineguard.stream.protocol.errors import ProtocolError, clip

if TYPE_CHECKING:
    from lineguard.stream.protocol.messages import Encoding, Frame
from lineguard.stream.settings import LimitsSettings

_PNG_SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"


_PNG_IEND: Final = b"IEND\xaeB`\x82"


# JPEG start-of-frame markers carry the image size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF: Final = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


_DEFAULT_LIMITS: Final = LimitsSettings()
_IMREAD_RGB: Final[int | None] = IMREAD_RGB  # what training's round trip decodes with too


def png_header(data: bytes, name: str) -> tuple[int, int, int]:
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


def png_complete(data: bytes, name: str) -> None:
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


def check_header(
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
        ih, iw, colour = png_header(payload, "payload")
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
    if ih * iw > limits.max_image_pixels:
        raise ProtocolError(
            "image_too_large",
            f"{encoding} header says {iw}x{ih} = {ih * iw} pixels, over the "
            f"{limits.max_image_pixels}-pixel limit (LINEGUARD_LIMITS__MAX_IMAGE_PIXELS)",
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


def imdecode(data: bytes, flags: int, name: str) -> np.ndarray:
    try:
        out = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)
    except cv2.error as exc:
        raise ProtocolError(
            "corrupt_image", f"{name}: OpenCV could not decode it ({clip(str(exc))})", field=name
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
    check_header(data, frame.encoding, (h, w, c), lim)
    if frame.encoding == "png":
        png_complete(data, "payload")
    elif not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise ProtocolError(
            "corrupt_image",
            "payload: JPEG is truncated (no EOI marker at the end)",
            field="payload",
        )
    if c == 1:
        grey = imdecode(data, cv2.IMREAD_GRAYSCALE, "payload")
        out = cv2.cvtColor(grey, cv2.COLOR_GRAY2RGB) if grey.ndim == 2 else grey
    elif _IMREAD_RGB is not None:
        out = imdecode(data, _IMREAD_RGB, "payload")
    else:
        out = cv2.cvtColor(imdecode(data, cv2.IMREAD_COLOR, "payload"), cv2.COLOR_BGR2RGB)
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
    try:
        # the same encoder as training's round trip (lineguard.engines.codec)
        return encode_pixels(arr, encoding, jpeg_quality), (h, w, c)
    except ValueError:
        raise ProtocolError(
            "bad_value", f"OpenCV failed to encode a {w}x{h}x{c} image as {encoding}"
        ) from None


def resize_to(image: np.ndarray, size: int | tuple[int, int] | None) -> np.ndarray:
    """Resize the full frame to ``size`` = (height, width), or a square side (the model's own
    resize is not aspect-keeping either, so the two agree); area interpolation when shrinking
    avoids aliasing."""
    if size is None:
        return image
    return resize_frame(image, (size, size) if isinstance(size, int) else size)
