"""Pictures of a reject for the page: the frame, its anomaly map over it, its segmentation.

Everything is rendered on the server with OpenCV, once per frame key, and kept encoded in a
bounded LRU cache (``ImageCache``), so a page that reloads or ten pages that watch the same
line cost no extra decoding. Sizes are capped (``thumb_side``, ``large_side``): a 4K camera
frame still becomes a JPEG of a few tens of kilobytes.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

import cv2
import numpy as np

ImageKind: TypeAlias = Literal["thumb", "frame", "overlay", "seg"]
IMAGE_KINDS: Final[tuple[ImageKind, ...]] = ("thumb", "frame", "overlay", "seg")
MEDIA_TYPES: Final = {"jpeg": "image/jpeg", "png": "image/png"}

# Class 0 is background (left transparent); the others get distinct, colour-blind-friendly
# hues (Okabe-Ito first, then a few more), repeating past the end.
_PALETTE: Final = np.array(
    [
        (0, 0, 0),
        (230, 159, 0),
        (86, 180, 233),
        (0, 158, 115),
        (240, 228, 66),
        (0, 114, 178),
        (213, 94, 0),
        (204, 121, 167),
        (170, 255, 195),
        (128, 128, 255),
        (255, 128, 128),
        (200, 200, 200),
    ],
    dtype=np.uint8,
)


@dataclass(frozen=True, slots=True)
class Picture:
    """One encoded image: the bytes and their media type."""

    data: bytes
    media_type: str


class ImageCache:
    """A thread-safe LRU of encoded pictures, bounded by count and by total bytes."""

    def __init__(self, max_items: int = 512, max_bytes: int = 32 * 1024 * 1024) -> None:
        self.max_items = max(1, max_items)
        self.max_bytes = max(1, max_bytes)
        self._items: OrderedDict[tuple[str, str], Picture] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str, kind: str) -> Picture | None:
        with self._lock:
            pic = self._items.get((key, kind))
            if pic is not None:
                self._items.move_to_end((key, kind))
            return pic

    def put(self, key: str, kind: str, pic: Picture) -> None:
        if len(pic.data) > self.max_bytes:
            return  # would evict everything and still not fit
        with self._lock:
            old = self._items.pop((key, kind), None)
            if old is not None:
                self._bytes -= len(old.data)
            self._items[(key, kind)] = pic
            self._bytes += len(pic.data)
            while len(self._items) > self.max_items or self._bytes > self.max_bytes:
                _k, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped.data)

    def has_all(self, key: str, kinds: tuple[str, ...]) -> bool:
        with self._lock:
            return all((key, k) in self._items for k in kinds)

    @property
    def size_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)


def fit(image: np.ndarray, side: int) -> np.ndarray:
    """Shrink so the longer side is at most ``side`` pixels (never enlarge)."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    if scale >= 1:
        return image
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> Picture:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError(f"JPEG encoding of a {rgb.shape} image failed")
    return Picture(buf.tobytes(), MEDIA_TYPES["jpeg"])


def encode_png(rgb: np.ndarray) -> Picture:
    bgr = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    if not ok:
        raise ValueError(f"PNG encoding of a {rgb.shape} image failed")
    return Picture(buf.tobytes(), MEDIA_TYPES["png"])


def _unit(values: np.ndarray) -> np.ndarray:
    """Scale to 0..1 by the map's own range (a flat map becomes all zeros)."""
    v = values.astype(np.float32)
    lo, hi = float(v.min()), float(v.max())
    if hi - lo <= 1e-12:
        return np.zeros_like(v)
    return (v - lo) / (hi - lo)


def _base(frame: np.ndarray | None, shape: tuple[int, ...], side: int) -> np.ndarray:
    """The frame fitted into ``side``, or (frame trimmed from the stream) grey at the map's
    own aspect, so a long part's map is not drawn into a square."""
    if frame is not None:
        return fit(frame, side)
    mh, mw = shape[0], shape[1]
    scale = side / max(mh, mw, 1)
    return np.full((max(1, round(mh * scale)), max(1, round(mw * scale)), 3), 48, np.uint8)


def heat_overlay(frame: np.ndarray | None, amap: np.ndarray, side: int) -> np.ndarray:
    """The anomaly map as a heat map over the frame: hot regions strong, cold ones clear.

    Without a frame (trimmed from the stream) the heat map is drawn on grey.
    """
    base = _base(frame, amap.shape[:2], side)
    h, w = base.shape[:2]
    a = cv2.resize(_unit(amap), (w, h), interpolation=cv2.INTER_LINEAR)
    heat_bgr = cv2.applyColorMap((a * 255).astype(np.uint8), cv2.COLORMAP_JET)
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = (0.75 * np.clip((a - 0.4) / 0.6, 0.0, 1.0))[..., None]  # cold parts stay clear
    out = base.astype(np.float32) * (1 - alpha) + heat * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def seg_overlay(frame: np.ndarray | None, labels: np.ndarray, side: int) -> np.ndarray:
    """Component classes in fixed colours, half over the frame (background stays clear)."""
    base = _base(frame, labels.shape[:2], side)
    h, w = base.shape[:2]
    lab = cv2.resize(labels.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    colours = _PALETTE[lab % len(_PALETTE)]
    mask = (lab > 0)[..., None]
    mixed = (base.astype(np.uint16) + colours.astype(np.uint16) * 3) // 4
    return np.where(mask, mixed.astype(np.uint8), base)


def render_reject(
    frame: np.ndarray | None,
    amap: np.ndarray | None,
    seg: np.ndarray | None,
    *,
    thumb_side: int = 160,
    large_side: int = 512,
) -> dict[ImageKind, Picture]:
    """Every picture the page shows for one reject; kinds whose inputs are missing are left out.

    ``thumb`` is the map over the frame (or the frame, or the map alone) at gallery size;
    ``frame``, ``overlay`` and ``seg`` are the large views.
    """
    out: dict[ImageKind, Picture] = {}
    if frame is not None:
        out["frame"] = encode_jpeg(fit(frame, large_side))
    if amap is not None:
        out["overlay"] = encode_jpeg(heat_overlay(frame, amap, large_side))
        out["thumb"] = encode_jpeg(heat_overlay(frame, amap, thumb_side), quality=80)
    elif frame is not None:
        out["thumb"] = encode_jpeg(fit(frame, thumb_side), quality=80)
    if seg is not None:
        out["seg"] = encode_png(seg_overlay(frame, seg, large_side))
    return out
