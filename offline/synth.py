"""Synthetic product lines in the MVTec LOCO AD layout.

Logical anomalies need products that follow rules: which component sits where, how many of
each, in which colour. Real LOCO data is not always at hand (licence, air-gapped CI), so this
module draws such products itself. Each product has component kinds that differ in shape,
colour, texture and size, placed by fixed rules and jittered the way a real line jitters
(pose, per-slot placement, lighting, sensor noise, a textured background).

A scene is first described as plain data (:class:`Scene`) and only then drawn
(:func:`render`). An anomaly is therefore an edit of a good scene, and its ground-truth mask is
drawn from the same geometry as the pixels, so masks and images cannot drift apart. Every image
is a pure function of ``(seed, split, index)``: the same seed gives byte-identical PNGs, and a
test image does not change when the training split grows.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol, TypeVar

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError

RGB = tuple[int, int, int]
T = TypeVar("T")

LOGICAL_SUBTYPES = ("missing", "extra", "swapped", "wrong_kind", "wrong_count", "wrong_colour")
STRUCTURAL_SUBTYPES = ("scratch", "contamination", "dent")
# Stable stream ids: one random stream per (seed, split, index), independent of split sizes.
SPLIT_IDS = {"train": 1, "validation": 2, "test_good": 3, "test_logical": 4, "test_structural": 5}
FORMAT_VERSION = 1
MIN_SIZE = 48

_SHIFT = 4  # OpenCV fixed-point bits: sub-pixel placement keeps small parts round at 64 px
_ONE = 1 << _SHIFT

RED: RGB = (196, 38, 34)
YELLOW: RGB = (232, 196, 52)
BLUE: RGB = (38, 78, 186)
WHITE: RGB = (232, 230, 220)
BROWN: RGB = (150, 98, 52)
ORANGE: RGB = (226, 118, 38)
HOUSING: RGB = (214, 214, 206)
TRAY: RGB = (202, 194, 174)
# Foreign matter for contamination; one that contrasts with what it lands on is chosen.
DIRT: dict[str, RGB] = {
    "oil": (46, 38, 32),
    "mould": (88, 120, 58),
    "rust": (158, 74, 30),
    "dust": (120, 116, 106),
}
COLOUR_NAMES: dict[RGB, str] = {RED: "red", YELLOW: "yellow", BLUE: "blue", WHITE: "white"}


# --------------------------------------------------------------------------------------------
# Scene description
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One component instance in canonical coordinates (the unit square, before the pose).

    ``size`` is the kind's characteristic length (radius, half-length, pin pitch); ``tex``
    seeds the texture details so that drawing an item twice gives the same pixels.
    """

    kind: str
    x: float
    y: float
    angle: float = 0.0
    size: float = 0.05
    colour: RGB = (128, 128, 128)
    tex: int = 0
    slot: str = ""
    params: tuple[float, ...] = ()


@dataclass(frozen=True)
class Defect:
    """A structural defect: a scratch, a contamination or a dent on item ``target``."""

    kind: str
    points: tuple[tuple[float, float], ...]
    radius: float = 0.0
    colour: RGB = (0, 0, 0)
    target: int = -1
    tex: int = 0


@dataclass(frozen=True)
class Look:
    """Everything about the capture that is not the product: pose, light, noise, background."""

    dx: float = 0.0
    dy: float = 0.0
    theta: float = 0.0  # degrees
    brightness: float = 1.0
    contrast: float = 1.0
    gradient: float = 0.0
    gradient_dir: float = 0.0  # radians
    noise: float = 2.0
    background: RGB = (62, 66, 72)
    bg_seed: int = 0
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """A product instance: items, capture conditions, defects and ground-truth regions.

    Each region is one ground-truth mask file: the union of the footprints it lists (an item
    footprint may belong to an item that is not drawn, e.g. where a missing part should be).
    """

    product: str
    items: tuple[Item, ...]
    look: Look
    defects: tuple[Defect, ...] = ()
    regions: tuple[tuple[Item | Defect, ...], ...] = ()
    anomaly_type: str = "good"
    subtype: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_line` wrote and how long it took."""

    root: Path
    kind: str
    seed: int
    size: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


# --------------------------------------------------------------------------------------------
# Geometry and drawing helpers
# --------------------------------------------------------------------------------------------


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
        return np.round(self.px(pts) * _ONE).astype(np.int32)

    def point(self, x: float, y: float) -> tuple[int, int]:
        q = self.fixed((x, y))[0]
        return int(q[0]), int(q[1])

    def length(self, v: float) -> int:
        return max(1, round(v * self.size * _ONE))


def _rot(local: np.ndarray, angle_deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg))
    return local @ np.array([[c, s], [-s, c]])


def _place(local: np.ndarray, it: Item, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """Local item coordinates (item angle, origin at its centre) to canonical ones."""
    return _rot(local + np.array([dx, dy]), it.angle) + np.array([it.x, it.y])


def _circle(r: float, n: int = 40, wobble: np.ndarray | None = None) -> np.ndarray:
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    rr = r * (1.0 if wobble is None else wobble)
    return np.stack([rr * np.cos(t), rr * np.sin(t)], axis=1)


def _rounded_rect(hw: float, hh: float, r: float, n: int = 6) -> np.ndarray:
    r = min(r, hw, hh)
    pts = []
    for cx, cy, a0 in ((hw - r, hh - r, 0), (-hw + r, hh - r, 90), (-hw + r, -hh + r, 180)):
        t = np.radians(np.linspace(a0, a0 + 90, n))
        pts.append(np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1))
    t = np.radians(np.linspace(270, 360, n))
    pts.append(np.stack([hw - r + r * np.cos(t), -hh + r + r * np.sin(t)], axis=1))
    return np.concatenate(pts)


def _stadium(half_len: float, half_w: float, n: int = 10) -> np.ndarray:
    return _rounded_rect(half_len, half_w, half_w, n)


def _ribbon(centre: np.ndarray, half_w: np.ndarray) -> np.ndarray:
    """A polygon of varying half-width around a centreline (banana, cable)."""
    d = np.gradient(centre, axis=0)
    d /= np.linalg.norm(d, axis=1, keepdims=True) + 1e-12
    normal = np.stack([-d[:, 1], d[:, 0]], axis=1) * half_w[:, None]
    return np.concatenate([centre + normal, (centre - normal)[::-1]])


def _mix(c: RGB, other: RGB, t: float) -> RGB:
    return tuple(round((1 - t) * a + t * b) for a, b in zip(c, other, strict=True))  # type: ignore[return-value]


def _shade(c: RGB, f: float) -> RGB:
    return tuple(int(min(255, max(0, round(v * f)))) for v in c)  # type: ignore[return-value]


def _fill(img: np.ndarray, fr: Frame, polys: Iterable[np.ndarray], colour: RGB | int) -> None:
    aa = cv2.LINE_AA if img.ndim == 3 else cv2.LINE_8
    cv2.fillPoly(img, [fr.fixed(p) for p in polys], _cv(colour), aa, _SHIFT)


def _ellipse(
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
    cv2.ellipse(img, fr.point(*c), axes, angle + fr.theta, 0, 360, _cv(colour), -1, aa, _SHIFT)


def _polyline(img: np.ndarray, fr: Frame, pts: np.ndarray, colour: RGB | int, px: int) -> None:
    aa = cv2.LINE_AA if img.ndim == 3 else cv2.LINE_8
    cv2.polylines(img, [fr.fixed(pts)], False, _cv(colour), max(1, px), aa, _SHIFT)


def _cv(colour: RGB | int) -> tuple[int, ...] | int:
    return colour if isinstance(colour, int) else tuple(int(v) for v in colour)


def _jitter_colour(rng: np.random.Generator, c: RGB, amount: float = 8.0) -> RGB:
    f = rng.uniform(0.93, 1.07)
    return tuple(int(np.clip(v * f + rng.normal(0, amount / 2), 0, 255)) for v in c)  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Component kinds: an outline (the footprint, used for masks) and a drawer (outline + texture)
# --------------------------------------------------------------------------------------------


def _wobble(tex: int, n: int, amount: float, lobes: int = 0) -> np.ndarray:
    r = np.random.default_rng(tex)
    t = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
    w = (
        1.0
        + amount * np.sin(2 * t + r.uniform(0, 6.3))
        + 0.5 * amount * np.sin(3 * t + r.uniform(0, 6.3))
    )
    if lobes:
        w += 0.07 * np.abs(np.sin(lobes * t / 2 + r.uniform(0, 6.3)))
    return w


def _banana_centre(it: Item, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(-1.0, 1.0, n)
    bend = it.params[0] if it.params else 0.25
    local = np.stack([t * it.size, bend * it.size * (t**2 - 0.4)], axis=1)
    half_w = it.size * 0.27 * (0.35 + 0.65 * np.sqrt(np.clip(1 - t**2, 0, 1)))
    return _place(local, it), half_w


def _cable_centre(it: Item, n: int = 32) -> np.ndarray:
    x0, y0, x1, y1, s0, s1 = it.params[:6]
    p0, p3 = np.array([x0, y0]), np.array([x1, y1])
    reach = 0.35 * abs(x1 - x0)
    p1, p2 = p0 + np.array([reach, s0]), p3 + np.array([-reach, s1])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def _block_half(it: Item) -> tuple[float, float]:
    n = int(it.params[0])
    return 0.072, n * it.size / 2 + 0.028


def _outline(it: Item) -> list[np.ndarray]:
    """The item's footprint as canonical polygons."""
    k = it.kind
    if k == "apple":
        return [_place(_circle(it.size, 40, _wobble(it.tex, 40, 0.035)), it)]
    if k == "walnut":
        return [_place(_circle(it.size, 48, _wobble(it.tex, 48, 0.03, lobes=9)), it)]
    if k in ("button", "disc"):
        return [_place(_circle(it.size, 36), it)]
    if k == "banana":
        centre, half_w = _banana_centre(it)
        return [_ribbon(centre, half_w)]
    if k == "tag":
        return [_place(_rounded_rect(it.size, it.size, 0.2 * it.size), it)]
    if k == "pill":
        return [_place(_stadium(it.size, 0.46 * it.size), it)]
    if k == "bar":
        return [_place(_rounded_rect(it.size, 0.24 * it.size, 0.1 * it.size), it)]
    if k == "granules":
        lo, hi = _bed_cut(it)
        return [_place(_rounded_rect((hi - lo) / 2, it.params[1], 0.01), it, (lo + hi) / 2)]
    if k == "area":
        hw, hh = it.params[:2]
        return [_place(_rounded_rect(hw, hh, 0.01), it)]
    if k == "block":
        hw, hh = _block_half(it)
        return [_place(_rounded_rect(hw, hh, 0.012), it)]
    if k == "cable":
        centre = _cable_centre(it)
        return [_ribbon(centre, np.full(len(centre), it.size))]
    raise ConfigError(f"unknown component kind {k!r}: this is a bug in offline/synth.py")


def _draw_round(img: np.ndarray, fr: Frame, it: Item) -> None:
    """Apples, walnuts: a dark rim, a body lit from the top left, a highlight, speckles, a stem.

    Light comes from a fixed direction, so shading offsets use an unrotated copy of the item.
    """
    rng = np.random.default_rng(it.tex + 1)
    r = it.size
    lit = replace(it, angle=0.0)
    _fill(img, fr, _outline(it), _shade(it.colour, 0.62))
    body = _rot(_circle(0.86 * r, 40, _wobble(it.tex, 40, 0.035)), it.angle)
    _fill(img, fr, [_place(body, lit, -0.06 * r, -0.06 * r)], it.colour)
    if it.kind == "walnut":
        crease = _place(np.array([[0.0, -0.8 * r], [0.08 * r, 0.0], [0.0, 0.8 * r]]), it)
        _polyline(img, fr, crease, _shade(it.colour, 0.55), round(fr.size * 0.006))
        for _ in range(10):
            a, d = rng.uniform(0, 6.3), rng.uniform(0.2, 0.75) * r
            c = _place(np.array([[d * math.cos(a), d * math.sin(a)]]), it)[0]
            _ellipse(
                img,
                fr,
                (c[0], c[1]),
                0.14 * r,
                0.05 * r,
                rng.uniform(0, 180),
                _shade(it.colour, 0.75),
            )
        return
    for _ in range(9):
        a, d = rng.uniform(0, 6.3), rng.uniform(0.15, 0.75) * r
        c = _place(np.array([[d * math.cos(a), d * math.sin(a)]]), it)[0]
        _ellipse(
            img,
            fr,
            (c[0], c[1]),
            0.045 * r,
            0.03 * r,
            rng.uniform(0, 180),
            _mix(it.colour, (240, 220, 140), 0.45),
        )
    hl = _place(np.array([[-0.38 * r, -0.36 * r]]), lit)[0]
    _ellipse(
        img, fr, (hl[0], hl[1]), 0.24 * r, 0.13 * r, -40.0, _mix(it.colour, (255, 255, 255), 0.5)
    )
    stem = _place(np.array([[0.0, 0.0], [0.12 * r, -0.18 * r], [0.2 * r, -0.34 * r]]), it)
    _polyline(img, fr, stem, (92, 62, 30), round(fr.size * 0.008))


def _draw_banana(img: np.ndarray, fr: Frame, it: Item) -> None:
    centre, hw = _banana_centre(it)
    _fill(img, fr, [_ribbon(centre, hw)], _shade(it.colour, 0.7))
    inner = _ribbon(centre - (0.0, 0.12 * it.size * 0.27), hw * 0.72)
    _fill(img, fr, [inner], it.colour)
    _polyline(
        img,
        fr,
        centre[3:-3] + np.array([0.0, 0.05 * it.size]),
        _shade(it.colour, 0.8),
        round(fr.size * 0.005),
    )
    for end in (centre[0], centre[-1]):
        _ellipse(img, fr, (end[0], end[1]), 0.05 * it.size, 0.04 * it.size, 0, (88, 64, 30))


def _draw_tag(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    _fill(img, fr, _outline(it), _shade(it.colour, 0.75))
    _fill(img, fr, [_place(_rounded_rect(0.9 * s, 0.9 * s, 0.17 * s), it)], it.colour)
    ring = _place(_rounded_rect(0.78 * s, 0.78 * s, 0.12 * s), it)
    _polyline(img, fr, np.vstack([ring, ring[:1]]), (236, 236, 236), round(fr.size * 0.006))
    for i, w in enumerate((0.5, 0.38, 0.45)):
        bar = _place(_rounded_rect(w * s, 0.06 * s, 0.02 * s), it, -0.1 * s, (i - 0.6) * 0.3 * s)
        _fill(img, fr, [bar], (236, 236, 236))
    hole = _place(np.array([[0.0, -0.6 * s]]), it)[0]
    _ellipse(img, fr, (hole[0], hole[1]), 0.09 * s, 0.09 * s, 0, (70, 70, 74))


def _draw_disc(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A round tag (wrong kind for the square tag slot) or a button (wrong kind for a pill)."""
    s = it.size
    _fill(img, fr, _outline(it), _shade(it.colour, 0.72))
    _fill(img, fr, [_place(_circle(0.88 * s, 36), it)], it.colour)
    if it.kind == "disc":
        ring = _place(_circle(0.7 * s, 36), it)
        _polyline(img, fr, np.vstack([ring, ring[:1]]), (236, 236, 236), round(fr.size * 0.006))
        _fill(img, fr, [_place(_rounded_rect(0.4 * s, 0.07 * s, 0.02 * s), it)], (236, 236, 236))
    else:
        for hx, hy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            c = _place(np.array([[0.28 * s * hx, 0.28 * s * hy]]), it)[0]
            _ellipse(img, fr, (c[0], c[1]), 0.13 * s, 0.13 * s, 0, _shade(it.colour, 0.6))


def _draw_pill(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    _fill(img, fr, _outline(it), _shade(it.colour, 0.72))
    _fill(img, fr, [_place(_stadium(0.92 * s, 0.38 * s), it, 0, -0.03 * s)], it.colour)
    half = _place(_rounded_rect(0.46 * s, 0.38 * s, 0.3 * s), it, 0.42 * s, -0.03 * s)
    _fill(img, fr, [half], _shade(it.colour, 0.9))
    _polyline(
        img,
        fr,
        _place(np.array([[-0.55 * s, -0.2 * s], [0.5 * s, -0.2 * s]]), it),
        _mix(it.colour, (255, 255, 255), 0.6),
        round(fr.size * 0.004),
    )


def _draw_bar(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    _fill(img, fr, _outline(it), _shade(it.colour, 0.7))
    _fill(
        img, fr, [_place(_rounded_rect(0.95 * s, 0.16 * s, 0.08 * s), it, 0, -0.03 * s)], it.colour
    )
    for i in range(-3, 4):
        ridge = _place(np.array([[i * 0.25 * s, -0.16 * s], [i * 0.25 * s, 0.16 * s]]), it)
        _polyline(img, fr, ridge, _shade(it.colour, 0.8), 1)


def _bed_cut(it: Item) -> tuple[float, float]:
    """The filled part of a granule bed along its width, in local x (all of it by default)."""
    hw = it.params[0]
    return (it.params[2], it.params[3]) if len(it.params) >= 4 else (-hw, hw)


def _draw_granules(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A bed of small grains: many little ellipses of varying tone over a dark floor.

    The grains are laid out over the full bed and then cut, so a partly filled bed keeps
    exactly the grains a full one has in the part that remains.
    """
    rng = np.random.default_rng(it.tex)
    hw, hh = it.params[:2]
    lo, hi = _bed_cut(it)
    _fill(img, fr, _outline(it), _shade(it.colour, 0.45))
    n = int(hw * hh * 4 / (math.pi * 0.0115**2) * 1.15)
    xs = rng.uniform(-hw + 0.008, hw - 0.008, n)
    ys = rng.uniform(-hh + 0.008, hh - 0.008, n)
    pts = _place(np.stack([xs, ys], axis=1), it)
    rad = rng.uniform(0.008, 0.0135, n)
    elong = rng.uniform(0.55, 0.9, n)
    ang = rng.uniform(0, 180, n)
    tone = rng.uniform(0.72, 1.22, n)
    keep = (xs >= lo + 0.004) & (xs <= hi - 0.004)
    pts, rad, elong, ang, tone = pts[keep], rad[keep], elong[keep], ang[keep], tone[keep]
    # Hundreds of grains: transform and colour them in bulk, then only draw in the loop.
    centres = fr.fixed(pts).tolist()
    ax = np.maximum(1, np.round(rad * fr.size * _ONE)).astype(int).tolist()
    ay = np.maximum(1, np.round(rad * elong * fr.size * _ONE)).astype(int).tolist()
    angles = (ang + fr.theta).tolist()
    colours = np.clip(np.round(np.outer(tone, it.colour)), 0, 255).astype(int).tolist()
    for c, a, b, t, col in zip(centres, ax, ay, angles, colours, strict=True):
        cv2.ellipse(img, c, (a, b), t, 0, 360, col, -1, cv2.LINE_AA, _SHIFT)


def _draw_block(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A terminal block: housing, one port per pin on the cable side, levers or screws."""
    n, style, side = int(it.params[0]), int(it.params[1]), it.params[2]
    hw, hh = _block_half(it)
    _fill(img, fr, _outline(it), _shade(it.colour, 0.7))
    _fill(
        img,
        fr,
        [_place(_rounded_rect(hw - 0.006, hh - 0.006, 0.01), it, -0.003, -0.003)],
        it.colour,
    )
    for k in range(n):
        y = (k - (n - 1) / 2) * it.size
        port = _place(_rounded_rect(0.018, 0.016, 0.004), it, side * (hw - 0.03), y)
        _fill(img, fr, [port], (54, 54, 58))
        if style == 0:
            lever = _place(_rounded_rect(0.026, 0.022, 0.006), it, -side * 0.02, y)
            _fill(img, fr, [lever], ORANGE)
        else:
            c = _place(np.array([[-side * 0.02, y]]), it)[0]
            _ellipse(img, fr, (c[0], c[1]), 0.022, 0.022, 0, (150, 152, 156))
            slot = _place(np.array([[-side * 0.02 - 0.016, y], [-side * 0.02 + 0.016, y]]), it)
            _polyline(img, fr, slot, (70, 70, 74), round(fr.size * 0.006))


def _draw_cable(img: np.ndarray, fr: Frame, it: Item) -> None:
    centre = _cable_centre(it)
    n = len(centre)
    _fill(img, fr, [_ribbon(centre, np.full(n, it.size))], _shade(it.colour, 0.62))
    _fill(img, fr, [_ribbon(centre - (0, 0.2 * it.size), np.full(n, 0.7 * it.size))], it.colour)
    hl = _mix(it.colour, (255, 255, 255), 0.45)
    _polyline(img, fr, centre[2:-2] - (0, 0.35 * it.size), hl, round(fr.size * 0.004))


DRAWERS: dict[str, Callable[[np.ndarray, Frame, Item], None]] = {
    "apple": _draw_round,
    "walnut": _draw_round,
    "banana": _draw_banana,
    "tag": _draw_tag,
    "disc": _draw_disc,
    "button": _draw_disc,
    "pill": _draw_pill,
    "bar": _draw_bar,
    "granules": _draw_granules,
    "area": lambda img, fr, it: None,  # a footprint only: marks where something should be
    "block": _draw_block,
    "cable": _draw_cable,
}


# --------------------------------------------------------------------------------------------
# Products: how a good one looks and which rules its logical anomalies break
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """A product: a good-scene sampler, its logical edits and where defects may land."""

    name: str
    sample_good: Callable[[np.random.Generator], Scene]
    apply_logical: Callable[[Scene, str, np.random.Generator], Scene]
    draw_base: Callable[[np.ndarray, Frame, Scene], None]
    base_outline: Callable[[Scene], list[np.ndarray]]
    surface: tuple[float, float, float, float]  # canonical box where surface defects may land
    dentable: tuple[str, ...]


def _seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def _sample_look(rng: np.random.Generator, shift: float, turn: float, bg: RGB) -> Look:
    return Look(
        dx=float(rng.uniform(-shift, shift)),
        dy=float(rng.uniform(-shift, shift)),
        theta=float(rng.uniform(-turn, turn)),
        brightness=float(rng.uniform(0.86, 1.12)),
        contrast=float(rng.uniform(0.88, 1.1)),
        gradient=float(rng.uniform(0.0, 0.22)),
        gradient_dir=float(rng.uniform(0, 2 * math.pi)),
        noise=float(rng.uniform(1.5, 3.5)),
        background=_jitter_colour(rng, bg, 6),
        bg_seed=_seed(rng),
        noise_seed=_seed(rng),
    )


def _sub(it: Item, rng: np.random.Generator, **changes: object) -> Item:
    """A new item with fresh texture, as if another physical part had been put there."""
    return replace(it, tex=_seed(rng), **changes)  # type: ignore[arg-type]


# ---- tray: a 2x2 compartment tray plus a pill strip -------------------------------------------

TRAY_BOX = (0.08, 0.10, 0.92, 0.90)
TRAY_COMPARTMENTS = {
    "fruit": (0.11, 0.13, 0.49, 0.49),
    "banana": (0.51, 0.13, 0.89, 0.49),
    "granules": (0.11, 0.51, 0.49, 0.73),
    "tag": (0.51, 0.51, 0.89, 0.73),
    "pills": (0.11, 0.75, 0.89, 0.87),
}
APPLE_R, BANANA_L, TAG_S, PILL_L = 0.074, 0.15, 0.056, 0.042
PILL_X = (0.25, 0.41, 0.57)
PILL_FREE_X = 0.74  # the pill strip's empty end: where a fourth pill would go


def _tray_apple(rng: np.random.Generator, x: float, y: float, slot: str) -> Item:
    return Item(
        "apple",
        x,
        y,
        float(rng.uniform(0, 360)),
        APPLE_R * rng.uniform(0.95, 1.05),
        _jitter_colour(rng, RED),
        _seed(rng),
        slot,
    )


def _tray_pill(rng: np.random.Generator, x: float, y: float, slot: str) -> Item:
    return Item(
        "pill",
        x,
        y,
        float(rng.uniform(-7, 7)),
        PILL_L * rng.uniform(0.96, 1.04),
        _jitter_colour(rng, WHITE, 5),
        _seed(rng),
        slot,
    )


def _tray_tag(rng: np.random.Generator, x: float, y: float, slot: str) -> Item:
    return Item(
        "tag",
        x,
        y,
        float(rng.uniform(-9, 9)),
        TAG_S * rng.uniform(0.96, 1.04),
        _jitter_colour(rng, BLUE),
        _seed(rng),
        slot,
    )


def _j(rng: np.random.Generator, v: float, amount: float = 0.012) -> float:
    return float(v + rng.uniform(-amount, amount))


def _tray_good(rng: np.random.Generator) -> Scene:
    look = _sample_look(rng, 0.025, 4.0, (60, 64, 70))
    gx0, gy0, gx1, gy1 = TRAY_COMPARTMENTS["granules"]
    bed_hw, bed_hh = (gx1 - gx0) / 2 - 0.012, (gy1 - gy0) / 2 - 0.012
    items = [
        Item(
            "granules",
            (gx0 + gx1) / 2,
            (gy0 + gy1) / 2,
            0.0,
            0.0,
            _jitter_colour(rng, BROWN, 10),
            _seed(rng),
            "granules",
            (bed_hw, bed_hh),
        ),
        *(
            _tray_pill(rng, _j(rng, x, 0.01), _j(rng, 0.81, 0.008), f"pill{i}")
            for i, x in enumerate(PILL_X)
        ),
        _tray_tag(rng, _j(rng, 0.70), _j(rng, 0.62, 0.01), "tag"),
        Item(
            "banana",
            _j(rng, 0.70),
            _j(rng, 0.31),
            float(rng.uniform(-33, -17)),
            BANANA_L * rng.uniform(0.95, 1.05),
            _jitter_colour(rng, YELLOW),
            _seed(rng),
            "banana",
            (float(rng.uniform(0.2, 0.32)),),
        ),
        _tray_apple(rng, _j(rng, 0.205), _j(rng, 0.31), "apple0"),
        _tray_apple(rng, _j(rng, 0.395), _j(rng, 0.31), "apple1"),
    ]
    return Scene("tray", tuple(items), look)


def _slots(items: Sequence[Item]) -> dict[str, int]:
    return {it.slot: i for i, it in enumerate(items)}


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(0, len(options)))]


def _tray_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    items = list(scene.items)
    at = _slots(items)
    regions: list[tuple[Item | Defect, ...]] = []
    if subtype == "missing":
        what = _pick(rng, ["banana", "tag", "granules", "pills"])
        slots = ["pill0", "pill1", "pill2"] if what == "pills" else [what]
        regions = [(items[at[s]],) for s in slots]
        items = [it for it in items if it.slot not in slots]
        detail = what
    elif subtype == "extra":
        what = _pick(rng, ["apple", "pill", "tag"])
        gx0, gy0, gx1, gy1 = TRAY_COMPARTMENTS["granules"]
        spots = [(float(rng.uniform(gx0 + 0.08, gx1 - 0.08)), _j(rng, (gy0 + gy1) / 2, 0.02))]
        if what != "apple":
            spots += [(_j(rng, 0.585, 0.006), _j(rng, 0.195, 0.006))]
        x, y = spots[int(rng.integers(0, len(spots)))]
        maker = {"apple": _tray_apple, "pill": _tray_pill, "tag": _tray_tag}[what]
        new = replace(maker(rng, x, y, "extra"), angle=float(rng.uniform(0, 360)))
        items.append(new)
        regions = [(new,)]
        detail = what
    elif subtype == "swapped":
        a = _pick(rng, ["apple0", "apple1", "banana", "pill0", "pill1", "pill2"])
        b = "tag"
        ia, ib = at[a], at[b]
        pa, pb = items[ia], items[ib]
        items[ia] = replace(pa, x=pb.x, y=pb.y)
        items[ib] = replace(pb, x=pa.x, y=pa.y)
        regions = [(items[ia], pb), (items[ib], pa)]
        detail = f"{a}<->{b}"
    elif subtype == "wrong_kind":
        slot = _pick(rng, ["apple0", "apple1", "banana", "tag", "pill0", "pill1", "pill2"])
        old = items[at[slot]]
        base = slot.rstrip("0123456789")
        kind, colour, size = {
            "apple": ("walnut", _mix(BROWN, (255, 255, 255), 0.15), old.size),
            "banana": ("bar", old.colour, old.size * 0.95),
            "tag": ("disc", old.colour, old.size * 1.08),
            "pill": ("button", old.colour, old.size * 0.62),
        }[base]
        new = _sub(old, rng, kind=kind, colour=_jitter_colour(rng, colour), size=size)
        items[at[slot]] = new
        regions = [(new, old)]
        detail = f"{slot}:{kind}"
    elif subtype == "wrong_count":
        what = _pick(rng, ["apples=1", "pills=2", "pills=4", "granules=part"])
        if what == "apples=1" or what == "pills=2":
            slot = _pick(
                rng, ["apple0", "apple1"] if what == "apples=1" else ["pill0", "pill1", "pill2"]
            )
            regions = [(items[at[slot]],)]
            items = [it for it in items if it.slot != slot]
        elif what == "pills=4":
            ref = items[at["pill2"]]
            new = _sub(
                ref,
                rng,
                x=_j(rng, PILL_FREE_X, 0.01),
                y=_j(rng, 0.81, 0.008),
                angle=float(rng.uniform(-7, 7)),
                slot="pill3",
            )
            items.append(new)
            regions = [(new,)]
        else:
            bed = items[at["granules"]]
            hw, hh = bed.params[:2]
            keep = float(rng.uniform(0.35, 0.6))
            sign = 1.0 if rng.random() < 0.5 else -1.0
            cut = hw * (2 * keep - 1)  # local x where the grains stop
            lo, hi = (-hw, cut) if sign > 0 else (-cut, hw)
            items[at["granules"]] = replace(bed, params=(hw, hh, lo, hi))
            gone_lo, gone_hi = (cut, hw) if sign > 0 else (-hw, -cut)
            gone = Item(
                "area",
                bed.x + (gone_lo + gone_hi) / 2,
                bed.y,
                slot="granules",
                params=((gone_hi - gone_lo) / 2, hh),
            )
            regions = [(gone,)]
        detail = what
    elif subtype == "wrong_colour":
        slot = _pick(rng, ["apple0", "apple1", "banana", "tag", "pill0", "pill1", "pill2"])
        choices = {"apple": [YELLOW], "banana": [RED], "tag": [RED, YELLOW], "pill": [BLUE, YELLOW]}
        palette = choices[slot.rstrip("0123456789")]
        colour = palette[int(rng.integers(0, len(palette)))]
        new = replace(items[at[slot]], colour=_jitter_colour(rng, colour))
        items[at[slot]] = new
        regions = [(new,)]
        detail = f"{slot}:{COLOUR_NAMES[colour]}"
    else:
        raise ConfigError(
            f"unknown logical subtype {subtype!r}: use one of {', '.join(LOGICAL_SUBTYPES)}"
        )
    return replace(
        scene,
        items=tuple(items),
        regions=tuple(regions),
        anomaly_type="logical",
        subtype=subtype,
        detail=detail,
    )


def _tray_outline(scene: Scene) -> list[np.ndarray]:
    x0, y0, x1, y1 = TRAY_BOX
    it = Item("area", (x0 + x1) / 2, (y0 + y1) / 2)
    return [_place(_rounded_rect((x1 - x0) / 2, (y1 - y0) / 2, 0.04), it)]


def _box(x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
    it = Item("area", (x0 + x1) / 2, (y0 + y1) / 2)
    return _place(_rounded_rect((x1 - x0) / 2, (y1 - y0) / 2, r), it)


def _draw_tray(img: np.ndarray, fr: Frame, scene: Scene) -> None:
    """The tray: a rim, a body, recessed compartments (dark top-left edges, light bottom-right)."""
    tray = _jitter_colour(np.random.default_rng(scene.look.bg_seed), TRAY, 5)
    _fill(img, fr, _tray_outline(scene), _shade(tray, 0.78))
    x0, y0, x1, y1 = TRAY_BOX
    _fill(img, fr, [_box(x0 + 0.006, y0 + 0.006, x1 - 0.006, y1 - 0.006, 0.036)], tray)
    floor = _shade(tray, 0.9)
    edge = max(1, round(fr.size * 0.006))
    for cx0, cy0, cx1, cy1 in TRAY_COMPARTMENTS.values():
        _fill(img, fr, [_box(cx0, cy0, cx1, cy1, 0.012)], floor)
        dark = np.array([[cx0, cy1], [cx0, cy0], [cx1, cy0]])
        light = np.array([[cx1, cy0], [cx1, cy1], [cx0, cy1]])
        _polyline(img, fr, dark, _shade(tray, 0.66), edge)
        _polyline(img, fr, light, _mix(tray, (255, 255, 255), 0.35), edge)


# ---- connectors: two terminal blocks joined by one cable ------------------------------------

CABLE_COLOURS: dict[int, RGB] = {2: YELLOW, 3: BLUE, 5: RED}
PIN_PITCH = 0.072


def _block(rng: np.random.Generator, x: float, n: int, side: float, slot: str) -> Item:
    return Item(
        "block",
        _j(rng, x, 0.02),
        _j(rng, 0.5, 0.03),
        float(rng.uniform(-5, 5)),
        PIN_PITCH,
        _jitter_colour(rng, HOUSING, 4),
        _seed(rng),
        slot,
        (float(n), 0.0, side),
    )


def _port(block: Item, k: int) -> tuple[float, float]:
    n, side = int(block.params[0]), block.params[2]
    hw, _ = _block_half(block)
    p = _place(np.array([[side * (hw - 0.012), (k - (n - 1) / 2) * block.size]]), block)[0]
    return float(p[0]), float(p[1])


def _cable(
    rng: np.random.Generator,
    left: Item,
    right: Item,
    k_left: int,
    k_right: int,
    colour: RGB,
    slot: str = "cable",
) -> Item:
    (x0, y0), (x1, y1) = _port(left, k_left), _port(right, k_right)
    sags = (float(rng.uniform(-0.14, 0.14)), float(rng.uniform(-0.14, 0.14)))
    return Item(
        "cable",
        (x0 + x1) / 2,
        (y0 + y1) / 2,
        0.0,
        0.016,
        _jitter_colour(rng, colour),
        _seed(rng),
        slot,
        (x0, y0, x1, y1, *sags, float(k_left), float(k_right)),
    )


def _recable(
    rng: np.random.Generator, cable: Item, left: Item, right: Item, kl: int, kr: int
) -> Item:
    """The same cable attached to other ports (keeps its colour and sag)."""
    (x0, y0), (x1, y1) = _port(left, kl), _port(right, kr)
    p = cable.params
    return replace(
        cable,
        x=(x0 + x1) / 2,
        y=(y0 + y1) / 2,
        params=(x0, y0, x1, y1, p[4], p[5], float(kl), float(kr)),
    )


def _connectors_good(rng: np.random.Generator) -> Scene:
    look = _sample_look(rng, 0.03, 6.0, (150, 150, 146))
    n = (2, 3, 5)[int(rng.integers(0, 3))]
    left = _block(rng, 0.27, n, 1.0, "left")
    right = _block(rng, 0.73, n, -1.0, "right")
    k = int(rng.integers(0, n))
    cable = _cable(rng, left, right, k, k, CABLE_COLOURS[n])
    return Scene("connectors", (cable, left, right), look, detail=f"pins={n}")


def _connectors_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    cable, left, right = scene.items[:3]
    n, k = int(left.params[0]), int(cable.params[6])
    items: list[Item] = [cable, left, right]
    regions: list[tuple[Item | Defect, ...]]
    if subtype == "missing":
        items = [left, right]
        regions = [(cable,)]
        detail = "cable"
    elif subtype == "extra":
        m = _pick(rng, [i for i in range(n) if i != k])
        extra = _cable(rng, left, right, m, m, cable.colour, "extra")
        items = [cable, extra, left, right]
        regions = [(extra,)]
        detail = f"cable@{m}"
    elif subtype == "swapped":
        m = _pick(rng, [i for i in range(n) if i != k])
        kl, kr = (k, m) if rng.random() < 0.5 else (m, k)
        moved = _recable(rng, cable, left, right, kl, kr)
        items = [moved, left, right]
        regions = [(moved, cable)]  # the cable as it lies and where it belongs
        detail = f"ports {kl}->{kr}"
    elif subtype == "wrong_kind":
        i = 1 + int(rng.integers(0, 2))
        items[i] = replace(items[i], params=(items[i].params[0], 1.0, items[i].params[2]))
        regions = [(items[i],)]
        detail = f"{items[i].slot}:screw"
    elif subtype == "wrong_count":
        i = 1 + int(rng.integers(0, 2))
        counts = [v for v in CABLE_COLOURS if v != n]
        m = _pick(rng, [v for v in counts if v > k] or counts)
        old = items[i]
        # Shift the block so that port k stays put: the cable then need not move.
        dy = ((m - 1) / 2 - (n - 1) / 2) * old.size
        c, s = math.cos(math.radians(old.angle)), math.sin(math.radians(old.angle))
        items[i] = replace(
            old, x=old.x - s * dy, y=old.y + c * dy, params=(float(m), *old.params[1:])
        )
        regions = [(items[i], old)]
        if k >= m:  # no port k on the new block: the cable moves to the last port
            items[0] = _recable(rng, cable, items[1], items[2], m - 1, m - 1)
            regions = [(items[i], old, items[0], cable)]
        detail = f"{items[i].slot}:pins={m}"
    elif subtype == "wrong_colour":
        m = _pick(rng, [v for v in CABLE_COLOURS if v != n])
        items[0] = replace(cable, colour=_jitter_colour(rng, CABLE_COLOURS[m]))
        regions = [(items[0],)]
        detail = f"cable:{COLOUR_NAMES[CABLE_COLOURS[m]]}"
    else:
        raise ConfigError(
            f"unknown logical subtype {subtype!r}: use one of {', '.join(LOGICAL_SUBTYPES)}"
        )
    return replace(
        scene,
        items=tuple(items),
        regions=tuple(regions),
        anomaly_type="logical",
        subtype=subtype,
        detail=detail,
    )


PRODUCTS: dict[str, Product] = {
    "tray": Product(
        "tray",
        _tray_good,
        _tray_logical,
        _draw_tray,
        _tray_outline,
        (0.12, 0.14, 0.88, 0.86),
        ("apple", "banana", "tag", "pill"),
    ),
    "connectors": Product(
        "connectors",
        _connectors_good,
        _connectors_logical,
        lambda img, fr, scene: None,
        lambda scene: [],
        (0.2, 0.3, 0.8, 0.7),
        ("block", "cable"),
    ),
}


# --------------------------------------------------------------------------------------------
# Structural defects (shared by all products)
# --------------------------------------------------------------------------------------------


def _on_item(rng: np.random.Generator, it: Item, spread: float = 0.45) -> tuple[float, float]:
    """A point well inside the item's footprint."""
    if it.kind in ("cable", "banana"):
        centre = _cable_centre(it) if it.kind == "cable" else _banana_centre(it)[0]
        c = centre[int(rng.integers(len(centre) // 4, 3 * len(centre) // 4))]
        return float(c[0]), float(c[1])
    if it.kind == "block":
        hw, hh = _block_half(it)
        p = _place(np.array([[rng.uniform(-0.5, 0.5) * hw, rng.uniform(-0.7, 0.7) * hh]]), it)[0]
        return float(p[0]), float(p[1])
    a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0, spread) * it.size
    return float(it.x + d * math.cos(a)), float(it.y + d * math.sin(a))


def _distance(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _surface_colour(product: Product, scene: Scene) -> RGB:
    return TRAY if product.name == "tray" else scene.look.background


def _apply_structural(
    product: Product, scene: Scene, subtype: str, rng: np.random.Generator
) -> Scene:
    targets = [i for i, it in enumerate(scene.items) if it.kind in product.dentable]
    ti = targets[int(rng.integers(0, len(targets)))]
    target = scene.items[ti]
    if subtype == "scratch":
        on_item = rng.random() < 0.6
        if on_item:
            x, y = _on_item(rng, target)
            base = target.colour
        else:
            sx0, sy0, sx1, sy1 = product.surface
            x, y = float(rng.uniform(sx0, sx1)), float(rng.uniform(sy0, sy1))
            base = _surface_colour(product, scene)
        a = rng.uniform(0, math.pi)
        length = rng.uniform(0.08, 0.17)
        t = np.linspace(-0.5, 0.5, 4)
        bow = rng.uniform(-0.15, 0.15) * length * (1 - 4 * t**2)
        pts = np.stack(
            [
                x + t * length * math.cos(a) - bow * math.sin(a),
                y + t * length * math.sin(a) + bow * math.cos(a),
            ],
            axis=1,
        )
        # Light or dark, but always one that stands out from what it scratches.
        options = [(True, _mix(base, (252, 252, 248), 0.7)), (False, _shade(base, 0.42))]
        options = [o for o in options if _distance(o[1], base) >= 60] or options[1:]
        light, colour = options[int(rng.integers(0, len(options)))]
        defect = Defect(
            "scratch",
            tuple(map(tuple, pts.tolist())),
            0.0,
            colour,
            ti if on_item else -1,
            _seed(rng),
        )
        detail = f"{'light' if light else 'dark'} on {target.slot if on_item else 'surface'}"
    elif subtype == "contamination":
        if rng.random() < 0.5:
            x, y = _on_item(rng, target)
            where, base = target.slot, target.colour
        else:
            sx0, sy0, sx1, sy1 = product.surface
            x, y = float(rng.uniform(sx0, sx1)), float(rng.uniform(sy0, sy1))
            where, base = "surface", _surface_colour(product, scene)
        names = [k for k, c in DIRT.items() if _distance(c, base) > 110] or list(DIRT)
        dirt = names[int(rng.integers(0, len(names)))]
        colour = _jitter_colour(rng, DIRT[dirt], 6)
        defect = Defect(
            "contamination", ((x, y),), float(rng.uniform(0.016, 0.032)), colour, -1, _seed(rng)
        )
        detail = f"{dirt} on {where}"
    elif subtype == "dent":
        x, y = _on_item(rng, target, 0.35)
        r = float(np.clip(rng.uniform(0.35, 0.55) * target.size, 0.018, 0.04))
        if target.kind in ("cable", "block"):
            r = 0.03
        defect = Defect("dent", ((x, y),), r, (0, 0, 0), ti, _seed(rng))
        detail = target.slot
    else:
        raise ConfigError(
            f"unknown structural subtype {subtype!r}: use one of {', '.join(STRUCTURAL_SUBTYPES)}"
        )
    return replace(
        scene,
        defects=(defect,),
        regions=((defect,),),
        anomaly_type="structural",
        subtype=subtype,
        detail=detail,
    )


def _blob_polys(d: Defect) -> list[np.ndarray]:
    """A contamination: one irregular blob plus a few satellite spots, from the defect's seed."""
    rng = np.random.default_rng(d.tex)
    x, y = d.points[0]
    centre = Item("area", x, y)
    polys = [_place(_circle(d.radius, 28, _wobble(d.tex, 28, 0.22)), centre)]
    for _ in range(int(rng.integers(0, 5))):
        a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(1.3, 2.6) * d.radius
        r = d.radius * rng.uniform(0.15, 0.35)
        spot = Item("area", x + dist * math.cos(a), y + dist * math.sin(a))
        polys.append(_place(_circle(r, 12, _wobble(_seed(rng), 12, 0.2)), spot))
    return polys


def _scratch_px(size: int) -> int:
    return max(1, round(size * 0.006))


def _apply_dent(img: np.ndarray, fr: Frame, d: Defect, target: Item) -> None:
    """Push pixels towards the dent centre and shade one flank dark and the other light."""
    size = img.shape[0]
    c = fr.px(d.points[0])[0]
    rad = max(2.0, d.radius * size)
    x0, y0 = max(0, int(c[0] - 2 * rad)), max(0, int(c[1] - 2 * rad))
    x1, y1 = min(size, int(c[0] + 2 * rad) + 1), min(size, int(c[1] + 2 * rad) + 1)
    if x1 <= x0 or y1 <= y0:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    ddx, ddy = xx - c[0], yy - c[1]
    g = np.exp(-(ddx**2 + ddy**2) / (rad * rad)).astype(np.float32)
    mx, my = xx - 0.22 * ddx * g, yy - 0.22 * ddy * g
    mx, my = mx.astype(np.float32), my.astype(np.float32)
    window = cv2.remap(img, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    la = np.random.default_rng(d.tex).uniform(0, 2 * math.pi)
    side = (ddx * math.cos(la) + ddy * math.sin(la)) / rad
    shade = (1.0 - 0.7 * g * np.clip(side, -1.5, 1.5) - 0.15 * g)[..., None]
    dented = np.clip(window.astype(np.float32) * shade, 0, 255)
    sil = np.zeros((size, size), np.uint8)
    _fill(sil, fr, _outline(target), 255)
    w = (cv2.GaussianBlur(sil, (3, 3), 0)[y0:y1, x0:x1].astype(np.float32) / 255.0)[..., None]
    patch = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.round(patch * (1 - w) + dented * w).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _background(size: int, look: Look) -> np.ndarray:
    """A conveyor-like surface: smooth blotches plus a faint woven stripe pattern."""
    rng = np.random.default_rng(look.bg_seed)
    cells = max(4, size // 10)
    low = cv2.resize(
        rng.standard_normal((cells, cells), dtype=np.float32),
        (size, size),
        interpolation=cv2.INTER_CUBIC,
    )
    a = rng.uniform(0, math.pi)
    period = rng.uniform(5.0, 9.0) * size / 256
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    weave = np.sin((xx * math.cos(a) + yy * math.sin(a)) * (2 * math.pi / period))
    tex = 5.0 * low + 3.0 * weave
    return np.asarray(look.background, np.float32)[None, None, :] + tex[..., None]


def _shadow(size: int, fr: Frame, polys: list[np.ndarray]) -> np.ndarray:
    small = max(16, size // 4)
    sfr = replace(fr, size=small, dx=fr.dx + 0.012, dy=fr.dy + 0.02)
    m = np.zeros((small, small), np.uint8)
    if polys:
        _fill(m, sfr, polys, 255)
    blurred = cv2.GaussianBlur(m, (0, 0), max(1.0, small * 0.012))
    big = cv2.resize(blurred, (size, size), interpolation=cv2.INTER_LINEAR)
    return big.astype(np.float32) / 255.0


def render(scene: Scene, size: int) -> np.ndarray:
    """Draw a scene as an RGB uint8 image of ``size`` x ``size`` (a pure function of both)."""
    product = PRODUCTS[scene.product]
    look = scene.look
    fr = Frame(size, look.dx, look.dy, look.theta)
    bg = _background(size, look)
    shadow_polys = product.base_outline(scene) or [p for it in scene.items for p in _outline(it)]
    bg *= (1.0 - 0.45 * _shadow(size, fr, shadow_polys))[..., None]
    img = np.clip(np.round(bg), 0, 255).astype(np.uint8)
    product.draw_base(img, fr, scene)
    for it in scene.items:
        DRAWERS[it.kind](img, fr, it)
    for d in scene.defects:
        if d.kind == "dent":
            _apply_dent(img, fr, d, scene.items[d.target])
        elif d.kind == "scratch":
            _polyline(img, fr, np.asarray(d.points), d.colour, _scratch_px(size))
        elif d.kind == "contamination":
            _fill(img, fr, _blob_polys(d), d.colour)
    return _capture(img, look)


def _capture(img: np.ndarray, look: Look) -> np.ndarray:
    """Lighting (gain, gradient, contrast) and sensor noise, applied last like a camera would."""
    size = img.shape[0]
    ramp = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gain = look.brightness * (
        1.0
        + look.gradient
        * (
            math.cos(look.gradient_dir) * ramp[None, :]
            + math.sin(look.gradient_dir) * ramp[:, None]
        )
    )
    out = img.astype(np.float32) * gain[..., None]
    out = (out - 128.0) * look.contrast + 128.0
    noise = np.random.default_rng(look.noise_seed).standard_normal(out.shape, dtype=np.float32)
    out += look.noise * noise
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def render_masks(scene: Scene, size: int) -> list[np.ndarray]:
    """One 0/255 uint8 mask per ground-truth region of the scene (empty list for goods)."""
    look = scene.look
    fr = Frame(size, look.dx, look.dy, look.theta)
    masks = []
    for region in scene.regions:
        m = np.zeros((size, size), np.uint8)
        for shape in region:
            if isinstance(shape, Item):
                _fill(m, fr, _outline(shape), 255)
            elif shape.kind == "scratch":
                _polyline(m, fr, np.asarray(shape.points), 255, _scratch_px(size) + 2)
            elif shape.kind == "contamination":
                _fill(m, fr, _blob_polys(shape), 255)
            elif shape.kind == "dent":
                disc = np.zeros_like(m)
                x, y = shape.points[0]
                _fill(disc, fr, [_place(_circle(shape.radius, 32), Item("area", x, y))], 255)
                sil = np.zeros_like(m)
                _fill(sil, fr, _outline(scene.items[shape.target]), 255)
                m |= disc & sil
        masks.append(m)
    return masks


def render_components(scene: Scene, size: int) -> tuple[np.ndarray, tuple[str, ...]]:
    """Ground-truth component map: 0 background, k = k-th item kind (sorted) of the product.

    Not written to disk (unsupervised training must not see it); used to measure how well the
    pseudo-labels recover the real components, and as user labels in few-shot tests.
    """
    look = scene.look
    fr = Frame(size, look.dx, look.dy, look.theta)
    kinds = tuple(sorted({it.kind for it in scene.items}))
    out = np.zeros((size, size), np.uint8)
    for it in scene.items:
        _fill(out, fr, _outline(it), kinds.index(it.kind) + 1)
    return out, ("background", *kinds)


# --------------------------------------------------------------------------------------------
# Scenes by (seed, split, index) and the dataset writer
# --------------------------------------------------------------------------------------------


def _product(kind: str) -> Product:
    if kind not in PRODUCTS:
        raise ConfigError(
            f"unknown synthetic product kind {kind!r}: use one of {', '.join(PRODUCTS)}"
        )
    return PRODUCTS[kind]


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image; independent of how many images other splits have."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def sample_good(kind: str, rng: np.random.Generator) -> Scene:
    """A defect-free scene of product ``kind``."""
    return _product(kind).sample_good(rng)


def apply_anomaly(
    kind: str, scene: Scene, anomaly_type: str, subtype: str, rng: np.random.Generator
) -> Scene:
    """Edit a good scene into a ``logical`` or ``structural`` anomaly of the given subtype."""
    product = _product(kind)
    if anomaly_type == "logical":
        return product.apply_logical(scene, subtype, rng)
    if anomaly_type == "structural":
        return _apply_structural(product, scene, subtype, rng)
    raise ConfigError(f"unknown anomaly type {anomaly_type!r}: use 'logical' or 'structural'")


def make_scene(kind: str, seed: int, split: str, index: int) -> Scene:
    """The scene of image ``index`` of ``split``; anomaly subtypes cycle so counts stay balanced."""
    rng = scene_rng(seed, split, index)
    scene = sample_good(kind, rng)
    if split == "test_logical":
        return apply_anomaly(kind, scene, "logical", LOGICAL_SUBTYPES[index % 6], rng)
    if split == "test_structural":
        return apply_anomaly(kind, scene, "structural", STRUCTURAL_SUBTYPES[index % 3], rng)
    return scene


_FOLDERS = {
    "train": "train/good",
    "validation": "validation/good",
    "test_good": "test/good",
    "test_logical": "test/logical_anomalies",
    "test_structural": "test/structural_anomalies",
}


def _write_png(path: Path, img: np.ndarray) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ConfigError(f"could not encode {path} as PNG: check that OpenCV has PNG support")
    path.write_bytes(buf.tobytes())


def _check_args(out_dir: Path, seed: int, counts: dict[str, int], size: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}: pass e.g. seed=0")
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{name} must be a non-negative integer, got {n!r}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ConfigError(
            f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}: use e.g. 256"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a folder: pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise ConfigError(
            f"output folder {out_dir} is not empty and holds no synthetic line (no meta.json): "
            "pass an empty or new folder, so nothing of yours is overwritten"
        )


def make_line(
    out_dir: Path | str,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 100,
    n_test_good: int = 100,
    n_test_logical: int = 100,
    n_test_structural: int = 100,
    size: int = 256,
    kind: str = "tray",
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic product line in the MVTec LOCO AD layout under ``out_dir``.

    An existing line in ``out_dir`` (one with a ``meta.json``) is replaced; any other non-empty
    folder is refused so that a typo cannot wipe unrelated files.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    counts = {
        "train": n_train,
        "validation": n_val,
        "test_good": n_test_good,
        "test_logical": n_test_logical,
        "test_structural": n_test_structural,
    }
    _check_args(out, seed, counts, size)
    _product(kind)
    for sub in ("train", "validation", "test", "ground_truth"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for split, n in counts.items():
        if n:
            (out / _FOLDERS[split]).mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "format": "lineguard-synth",
        "version": FORMAT_VERSION,
        "complete": False,  # marks the folder as ours even if this run is interrupted
        "kind": kind,
        "seed": seed,
        "size": [size, size],
        "counts": counts,
        "subtypes": {"logical": list(LOGICAL_SUBTYPES), "structural": list(STRUCTURAL_SUBTYPES)},
        "images": [],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    jobs = [(split, i) for split, n in counts.items() for i in range(n)]
    bar = _progress(len(jobs), progress, f"synth {kind}")
    records = []
    for split, i in jobs:
        scene = make_scene(kind, seed, split, i)
        name = _name(i, counts[split])
        rel = f"{_FOLDERS[split]}/{name}.png"
        _write_png(out / rel, render(scene, size))
        if split.startswith("test"):
            mask_files = []
            if scene.regions:
                gt = Path("ground_truth") / _FOLDERS[split].split("/")[1] / name
                (out / gt).mkdir(parents=True, exist_ok=True)
                for j, mask in enumerate(render_masks(scene, size)):
                    _write_png(out / gt / f"{j:03d}.png", mask)
                    mask_files.append(f"{gt.as_posix()}/{j:03d}.png")
            records.append(
                {
                    "path": rel,
                    "anomaly_type": scene.anomaly_type,
                    "subtype": scene.subtype,
                    "detail": scene.detail,
                    "masks": mask_files,
                }
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    meta.update(complete=True, images=records)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return SynthSummary(out, kind, seed, size, dict(counts), seconds)


def _name(i: int, n: int) -> str:
    """Zero-padded so that name order is index order (000.png like LOCO, wider past 999)."""
    return f"{i:0{max(3, len(str(n - 1)))}d}"


class _Bar(Protocol):
    """The part of a tqdm progress bar that is used here."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str) -> _Bar | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; tqdm is not a dependency
        return None
    return tqdm(total=total, desc=desc, unit="img")  # type: ignore[no-any-return]


def summary_dict(summary: SynthSummary) -> dict[str, object]:
    """A JSON-friendly view of a :class:`SynthSummary` (for CLIs and logs)."""
    d = asdict(summary)
    d["root"] = str(summary.root)
    return d
