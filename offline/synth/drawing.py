"""Geometry and drawing helpers in a scene's canonical coordinates (0…1 across the image).

Shapes are polygons placed by an item's pose and drawn with OpenCV at sub-pixel precision, so
small parts stay round at 64 px and masks match pixels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lineguard.offline.synth.scene import RGB, Item

SUBPIXEL_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel placement keeps small parts round at 64 px


SUBPIXEL_ONE = 1 << SUBPIXEL_SHIFT


@dataclass(frozen=True)
class Frame:
    """Maps canonical coordinates to pixels, applying the whole product's pose."""

    size: int
    dx: float = 0.0
    dy: float = 0.0
    theta: float = 0.0

    def px(self, pts: np.ndarray | Sequence[float]) -> np.ndarray:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2) - 0.5
        c, s = math.cos(math.radians(self.theta)), math.sin(math.radians(self.theta))
        x = c * p[:, 0] - s * p[:, 1] + 0.5 + self.dx
        y = s * p[:, 0] + c * p[:, 1] + 0.5 + self.dy
        return np.stack([x, y], axis=1) * self.size

    def fixed(self, pts: np.ndarray | Sequence[float]) -> np.ndarray:
        return np.round(self.px(pts) * SUBPIXEL_ONE).astype(np.int32)

    def point(self, x: float, y: float) -> tuple[int, int]:
        q = self.fixed((x, y))[0]
        return int(q[0]), int(q[1])

    def length(self, v: float) -> int:
        return max(1, round(v * self.size * SUBPIXEL_ONE))


def rotate(local: np.ndarray, angle_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return local @ np.array([[c, s], [-s, c]])


def place_poly(local: np.ndarray, it: Item, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Local item coordinates (item angle, origin at its centre) to canonical ones."""
    return rotate(local + np.array([dx, dy]), it.angle) + np.array([it.x, it.y])


def circle_poly(r: float, n: int = 40, wobble: np.ndarray | None = None) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    rr = r * (1.0 if wobble is None else wobble)
    return np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)


def rounded_rect(hw: float, hh: float, r: float, n: int = 6) -> np.ndarray:
    r = min(r, hw, hh)
    pts = []
    for cx, cy, a0 in ((hw - r, hh - r, 0), (-hw + r, hh - r, 90), (-hw + r, -hh + r, 180)):
        t = np.radians(np.linspace(a0, a0 + 90, n))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    t = np.radians(np.linspace(270, 360, n))
    pts.append(np.stack([hw - r + r * np.cos(t), -hh + r + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def stadium_poly(half_len: float, half_w: float, n: int = 10) -> np.ndarray:
    return rounded_rect(half_len, half_w, half_w, n)


def ribbon_poly(centre: np.ndarray, half_w: np.ndarray) -> np.ndarray:
    """A polygon of varying half-width around a centreline (banana, cable)."""
    d = np.gradient(centre, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) * half_w[:, None]
    return np.concatenate([centre + normal, (centre - normal)[::-1]])


def mix_colour(c: RGB, other: RGB, t: float) -> RGB:
    return tuple(round((1 - t) * a + t * b) for a, b in zip(c, other, strict=True))  # type: ignore[return-value]


def shade_colour(c: RGB, f: float) -> RGB:
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def fill_polys(img: np.ndarray, fr: Frame, polys: Iterable[np.ndarray], colour: RGB | int) -> None:
    aa = cv2.LINE_AA if img.ndim == 3 else cv2.LINE_8
    cv2.fillPoly(img, [fr.fixed(p) for p in polys], _cv(colour), aa, SUBPIXEL_SHIFT)


def draw_ellipse(
    img: np.ndarray,
    fr: Frame,
    c: tuple[float, float],
    ax: float,
    ay: float,
    angle: float,
    colour: RGB | int,
) -> None:
    axes = (fr.length(ax), fr.length(ay))
    aa = cv2.LINE_AA if img.ndim == 3 else cv2.LINE_8
    cv2.ellipse(
        img, fr.point(*c), axes, angle + fr.theta, 0, 360, _cv(colour), -1, aa, SUBPIXEL_SHIFT
    )


def draw_polyline(img: np.ndarray, fr: Frame, pts: np.ndarray, colour: RGB | int, px: int) -> None:
    aa = cv2.LINE_AA if img.ndim == 3 else cv2.LINE_8
    cv2.polylines(img, [fr.fixed(pts)], False, _cv(colour), max(1, px), aa, SUBPIXEL_SHIFT)


def _cv(colour: RGB | int) -> tuple[int, ...] | int:
    return colour if isinstance(colour, int) else tuple(int(v) for v in colour)


def jitter_colour(rng: np.random.Generator, c: RGB, amount: float = 8.0) -> RGB:
    f = rng.uniform(0.93, 1.07)
    return tuple(int(np.clip(v * f + rng.normal(0, amount / 2), 0, 255)) for v in c)  # type: ignore[return-value]
