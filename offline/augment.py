"""Image augmentations for training, on uint8 NHWC torch tensors (the model's input format).

Kept deliberately mild: the students must learn what good parts look like under the lighting
drift a line really has, not become invariant to the defects we want them to notice.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

# A camera's own JPEG before the line's: qualities from a cheap industrial camera's to a good one
CODEC_QUALITIES = (60, 95)


def color_jitter(
    images: torch.Tensor, generator: torch.Generator, strength: float = 0.2
) -> torch.Tensor:
    """Random brightness, contrast and saturation per image (±strength), back to uint8."""
    x = images.to(torch.float32)
    n = x.shape[0]

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(n, 1, 1, 1, generator=generator) * 2 - 1) * strength).to(x)

    x = x * factor()
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * factor() + mean
    gray = x.mean(dim=3, keepdim=True)
    x = (x - gray) * factor() + gray
    return x.clamp(0, 255).round().to(torch.uint8)


def codec_jitter(
    images: np.ndarray,
    rng: np.random.Generator,
    probability: float,
    qualities: tuple[int, int] = CODEC_QUALITIES,
) -> np.ndarray:
    """An extra JPEG round trip, at a random quality, for each uint8 ``[N, H, W, 3]`` image
    with ``probability``.

    Training images have already been through the bundle's frame codec (what ingest sends);
    a camera that itself only speaks JPEG compresses them once more before that, at a quality
    the bundle never saw. Networks trained only on the one codec read those block artefacts
    as texture, and good parts drift towards the threshold; a share of steps on doubly
    compressed images teaches them that compression is not a defect.
    """
    if probability <= 0:
        return images
    out = images.copy()
    for i in np.flatnonzero(rng.random(len(images)) < probability):
        quality = int(rng.integers(qualities[0], qualities[1] + 1))
        bgr = cv2.cvtColor(np.ascontiguousarray(images[i]), cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR) if ok else None
        if decoded is not None:
            out[i] = cv2.cvtColor(decoded, cv2.COLOR_BGR2RGB)
    return out


def procedural_images(n: int, size: int | tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Out-of-distribution images for the student penalty, made without any download.

    EfficientAD penalises the student's output on ImageNet images so that it only learns to
    imitate the teacher on the product. ImageNet is not available offline; this substitute mixes
    colour gradients, stripes at random frequencies and orientations, random shapes and noise,
    which covers the same purpose (varied natural-ish statistics unlike the product). A folder
    of arbitrary photos can replace it (``penalty="folder"``).
    """
    h, w = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = yy / h, xx / w
    out = np.empty((n, h, w, 3), dtype=np.uint8)
    for i in range(n):
        base = (
            rng.uniform(0, 255, 3)
            + rng.uniform(-120, 120, 3)
            * (np.cos(rng.uniform(0, np.pi)) * xx + np.sin(rng.uniform(0, np.pi)) * yy)[..., None]
        )
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 40)
        stripes = np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy))
        img = base + rng.uniform(0, 80) * stripes[..., None] * rng.uniform(-1, 1, 3)
        for _ in range(rng.integers(0, 6)):
            cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.03, 0.3)
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rng.uniform(0, 255, 3)
        img += rng.normal(0, rng.uniform(0, 25), img.shape)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out
