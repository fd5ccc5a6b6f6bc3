"""What the pseudo-labels found: per-class statistics and a contact sheet of example crops.

The component branch is only as good as the classes stage 1 discovers, and a list of
``component_3`` names says nothing about them. A sheet with a few crops per class, and how
often and how large each class appears, lets an engineer see at a glance whether the parts
were understood (one class per kind of part) or not (a class for shadows, two kinds merged).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError

CROP = 64
PER_CLASS = 6
LABEL_W = 120


def component_stats(labels: np.ndarray, names: Sequence[str]) -> list[dict[str, Any]]:
    """Per class (not background): instances, mean instance area, images it appears in.

    ``labels`` is ``[N, H, W]`` class ids (0 background). An instance is one connected region
    of the class; ``area`` is its mean share of the image.
    """
    n = len(labels)
    rows = []
    for k in range(1, len(names)):
        per_image, areas = [], []
        for m in labels:
            count, _, stats, _ = cv2.connectedComponentsWithStats((m == k).astype(np.uint8))
            per_image.append(count - 1)
            areas.extend((stats[1:, cv2.CC_STAT_AREA] / m.size).tolist())
        present = sum(1 for c in per_image if c)
        rows.append(
            {
                "class": names[k],
                "instances": int(sum(per_image)),
                "per_image": float(sum(per_image) / present) if present else 0.0,
                "area": float(np.mean(areas)) if areas else 0.0,
                "images": present,
                "of_images": n,
            }
        )
    return rows


def _crops(images: np.ndarray, labels: np.ndarray, k: int, limit: int) -> list[np.ndarray]:
    """Up to ``limit`` crops of class ``k``, one per image, the class outlined in white."""
    out = []
    for img, m in zip(images, labels, strict=True):
        count, comp, stats, _ = cv2.connectedComponentsWithStats((m == k).astype(np.uint8))
        if count < 2:
            continue
        j = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        x, y, w, h = (int(v) for v in stats[j, :4])
        pad = max(3, max(w, h) // 4)
        x0, y0 = max(0, x - pad), max(0, y - pad)
        x1, y1 = min(m.shape[1], x + w + pad), min(m.shape[0], y + h + pad)
        crop = np.ascontiguousarray(img[y0:y1, x0:x1])
        region = (comp[y0:y1, x0:x1] == j).astype(np.uint8)
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(crop, contours, -1, (255, 255, 255), 1)
        out.append(cv2.resize(crop, (CROP, CROP), interpolation=cv2.INTER_NEAREST))
        if len(out) == limit:
            break
    return out


def contact_sheet(
    images: np.ndarray, labels: np.ndarray, names: Sequence[str], per_class: int = PER_CLASS
) -> np.ndarray:
    """An RGB sheet: one row per class, its name and ``per_class`` crops from different images."""
    if len(images) != len(labels) or images.shape[1:3] != labels.shape[1:3]:
        raise ConfigError(
            f"images {images.shape} and label maps {labels.shape} differ: pass one map per image"
        )
    stats = component_stats(labels, names)
    rows = []
    for k, row in enumerate(stats, start=1):
        strip = np.full((CROP + 8, LABEL_W + per_class * (CROP + 4), 3), 32, np.uint8)
        cv2.putText(strip, row["class"], (4, 22), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (255,) * 3, 1)
        info = f"{row['images']}/{row['of_images']} img"
        cv2.putText(strip, info, (4, 42), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (200,) * 3, 1)
        cv2.putText(
            strip,
            f"area {100 * row['area']:.1f}%",
            (4, 60),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.38,
            (200,) * 3,
            1,
        )
        for i, crop in enumerate(_crops(images, labels, k, per_class)):
            x = LABEL_W + i * (CROP + 4)
            strip[4 : 4 + CROP, x : x + CROP] = crop
        rows.append(strip)
    if not rows:
        strip = np.full((CROP + 8, LABEL_W + per_class * (CROP + 4), 3), 32, np.uint8)
        cv2.putText(
            strip, "no component classes", (4, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255,) * 3, 1
        )
        rows.append(strip)
    return np.concatenate(rows, axis=0)


def png_bytes(image: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ConfigError("could not encode the contact sheet as PNG: check OpenCV's PNG support")
    return buf.tobytes()
