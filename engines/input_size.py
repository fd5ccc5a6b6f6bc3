"""Input sizes: (height, width) in pixels, parsed from what users type, and the one resize
that brings a frame to that size.

Torch-free, so the stream workers (ingest reads a bundle's size from its manifest and resizes
before it encodes) and the CLI can use it without importing the model. Training, ``evaluate``
and ingest all resize through ``resize_frame``, so a file becomes the same pixels on every path.
"""

from __future__ import annotations

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError

# An input size is (height, width) in pixels; both multiples of 32 (the backbone and the
# autoencoder downsample by 32). A square side is written as one number.
InputSize = tuple[int, int]


def parse_input_size(
    value: int | str | tuple[int, int] | list[int], *, multiple: int = 32
) -> InputSize:
    """``256`` / ``"256"`` → ``(256, 256)``; ``"256x640"`` / ``[256, 640]`` → ``(256, 640)``
    (height × width, as numpy and torch order them). A model's sides must be multiples of 32;
    a frame size (``multiple=1``) only positive."""
    if isinstance(value, str):
        parts = value.lower().replace("×", "x").split("x")
        try:
            nums = [int(p) for p in parts]
        except ValueError:
            raise ConfigError(
                f"input size {value!r} is not a side (256) or HxW (256x640)"
            ) from None
    elif isinstance(value, int):
        nums = [value]
    else:
        nums = [int(v) for v in value]
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2:
        raise ConfigError(f"input size {value!r} is not a side (256) or HxW (256x640)")
    h, w = nums
    for side in (h, w):
        if multiple == 1 and side < 1:
            raise ConfigError(f"frame size {h}x{w}: each side must be a positive pixel count")
        if multiple > 1 and (side < multiple or side % multiple):
            raise ConfigError(
                f"input size {h}x{w}: each side must be a multiple of {multiple} (e.g. 256 or "
                "256x640), because the backbone and the autoencoder downsample by 32"
            )
    return (h, w)


def format_input_size(size: InputSize) -> str:
    """``(256, 256)`` → ``"256"``, ``(256, 640)`` → ``"256x640"``."""
    h, w = size
    return str(h) if h == w else f"{h}x{w}"


def resize_frame(image: np.ndarray, size: InputSize, *, nearest: bool = False) -> np.ndarray:
    """The full frame at ``size`` = (height, width), not aspect-keeping (the model's own resize
    is not either). Area averaging when shrinking on both axes (no aliasing), bilinear
    otherwise; nearest-neighbour for label maps and masks."""
    th, tw = size
    if image.shape[:2] == (th, tw):
        return image
    shrink = th <= image.shape[0] and tw <= image.shape[1]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(image, (tw, th), interpolation=interp)
