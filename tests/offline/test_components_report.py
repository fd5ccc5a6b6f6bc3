"""The contact sheet and statistics of the discovered component classes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lineguard.engines.errors import ConfigError
from lineguard.offline.components_report import (
    CROP,
    PER_CLASS,
    component_stats,
    contact_sheet,
    png_bytes,
)


def _maps() -> tuple[np.ndarray, np.ndarray]:
    """Four 32 px images: class 1 twice in every image, class 2 once in the first two."""
    labels = np.zeros((4, 32, 32), np.uint8)
    labels[:, 2:6, 2:6] = 1
    labels[:, 20:24, 20:24] = 1
    labels[:2, 10:18, 2:10] = 2
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[labels == 1] = (200, 40, 40)
    images[labels == 2] = (40, 40, 200)
    return images, labels


def test_stats_count_instances_area_and_images() -> None:
    _, labels = _maps()
    rows = component_stats(labels, ("background", "a", "b", "never"))
    assert [r["class"] for r in rows] == ["a", "b", "never"]
    a, b, never = rows
    assert a["instances"] == 8 and a["per_image"] == 2.0 and a["images"] == 4
    assert a["area"] == pytest.approx(16 / 1024)
    assert b["instances"] == 2 and b["images"] == 2 and b["area"] == pytest.approx(64 / 1024)
    assert never["images"] == 0 and never["instances"] == 0 and never["of_images"] == 4


def test_sheet_has_a_row_per_class_with_crops_of_it() -> None:
    images, labels = _maps()
    sheet = contact_sheet(images, labels, ("background", "a", "b"))
    assert sheet.dtype == np.uint8 and sheet.shape[0] == 2 * (CROP + 8)
    row_a, row_b = sheet[: CROP + 8], sheet[CROP + 8 :]
    first_crop = row_a[4 : 4 + CROP, 120 : 120 + CROP]
    assert (first_crop[..., 0] > 150).mean() > 0.1  # class a is red
    b_crops = [
        row_b[4 : 4 + CROP, 120 + i * (CROP + 4) : 120 + i * (CROP + 4) + CROP]
        for i in range(PER_CLASS)
    ]
    assert (b_crops[0][..., 2] > 150).mean() > 0.1 and (
        b_crops[2] == 32
    ).all()  # b: two images only
    decoded = cv2.imdecode(np.frombuffer(png_bytes(sheet), np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == sheet.shape


def test_sheet_without_classes_and_mismatched_maps() -> None:
    images, labels = _maps()
    assert contact_sheet(images, labels, ("background",)).shape[0] == CROP + 8
    with pytest.raises(ConfigError, match="one map per image"):
        contact_sheet(images[:2], labels, ("background", "a"))
