"""Component kinds: each has an outline (its footprint, used for masks) and a drawer (outline
plus texture), so a component looks like one kind of part under any pose.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.drawing import (
    SUBPIXEL_ONE,
    SUBPIXEL_SHIFT,
    Frame,
    circle_poly,
    draw_ellipse,
    draw_polyline,
    fill_polys,
    mix_colour,
    place_poly,
    ribbon_poly,
    rotate,
    rounded_rect,
    shade_colour,
    stadium_poly,
)
from lineguard.offline.synth.parts import PART_DRAWERS, PART_OUTLINES
from lineguard.offline.synth.scene import ORANGE, Item


def wobble(tex: int, n: int, amount: float, lobes: int = 0) -> np.ndarray:
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


def banana_centre(it: Item, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    t = np.linspace(-1.0, 1.0, n)
    bend = it.params[0] if it.params else 0.25
    local = np.stack([t * it.size, bend * it.size * (t**2 - 0.4)], axis=1)
    half_w = it.size * 0.27 * (0.35 + 0.65 * np.sqrt(np.clip(1 - t**2, 0, 1)))
    return place_poly(local, it), half_w


def cable_centre(it: Item, n: int = 32) -> np.ndarray:
    x0, y0, x1, y1, s0, s1 = it.params[:6]
    p0, p3 = np.array([x0, y0]), np.array([x1, y1])
    reach = 0.35 * abs(x1 - x0)
    p1, p2 = p0 + np.array([reach, s0]), p3 + np.array([-reach, s1])
    t = np.linspace(0, 1, n)[:, None]
    return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3


def block_half(it: Item) -> tuple[float, float]:
    n = int(it.params[0])
    return 0.072, n * it.size / 2 + 0.028


def item_outline(it: Item) -> list[np.ndarray]:
    """The item's footprint as canonical polygons."""
    k = it.kind
    if k == "apple":
        return [place_poly(circle_poly(it.size, 40, wobble(it.tex, 40, 0.035)), it)]
    if k == "walnut":
        return [place_poly(circle_poly(it.size, 48, wobble(it.tex, 48, 0.03, lobes=9)), it)]
    if k in ("button", "disc"):
        return [place_poly(circle_poly(it.size, 36), it)]
    if k == "banana":
        centre, half_w = banana_centre(it)
        return [ribbon_poly(centre, half_w)]
    if k == "tag":
        return [place_poly(rounded_rect(it.size, it.size, 0.2 * it.size), it)]
    if k == "pill":
        return [place_poly(stadium_poly(it.size, 0.46 * it.size), it)]
    if k == "bar":
        return [place_poly(rounded_rect(it.size, 0.24 * it.size, 0.1 * it.size), it)]
    if k == "granules":
        lo, hi = _bed_cut(it)
        return [place_poly(rounded_rect((hi - lo) / 2, it.params[1], 0.01), it, (lo + hi) / 2)]
    if k == "area":
        hw, hh = it.params[:2]
        return [place_poly(rounded_rect(hw, hh, 0.01), it)]
    if k == "block":
        hw, hh = block_half(it)
        return [place_poly(rounded_rect(hw, hh, 0.012), it)]
    if k == "cable":
        centre = cable_centre(it)
        return [ribbon_poly(centre, np.full(len(centre), it.size))]
    if k in PART_OUTLINES:
        return PART_OUTLINES[k](it)
    raise ConfigError(f"unknown component kind {k!r}: this is a bug in offline/synth")


def _draw_round(img: np.ndarray, fr: Frame, it: Item) -> None:
    """Apples, walnuts: a dark rim, a body lit from the top left, a highlight, speckles, a stem.

    Light comes from a fixed direction, so shading offsets use an unrotated copy of the item.
    """
    rng = np.random.default_rng(it.tex + 1)
    r = it.size
    lit = replace(it, angle=0.0)
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.62))
    body = rotate(circle_poly(0.86 * r, 40, wobble(it.tex, 40, 0.035)), it.angle)
    fill_polys(img, fr, [place_poly(body, lit, -0.06 * r, -0.06 * r)], it.colour)
    if it.kind == "walnut":
        crease = place_poly(np.array([[0.0, -0.8 * r], [0.08 * r, 0.0], [0.0, 0.8 * r]]), it)
        draw_polyline(img, fr, crease, shade_colour(it.colour, 0.55), round(fr.size * 0.006))
        for _ in range(10):
            a, d = rng.uniform(0, 6.3), rng.uniform(0.2, 0.75) * r
            c = place_poly(np.array([[d * math.cos(a), d * math.sin(a)]]), it)[0]
            draw_ellipse(
                img,
                fr,
                (c[0], c[1]),
                0.14 * r,
                0.05 * r,
                rng.uniform(0, 180),
                shade_colour(it.colour, 0.75),
            )
        return
    for _ in range(9):
        a, d = rng.uniform(0, 6.3), rng.uniform(0.15, 0.75) * r
        c = place_poly(np.array([[d * math.cos(a), d * math.sin(a)]]), it)[0]
        draw_ellipse(
            img,
            fr,
            (c[0], c[1]),
            0.045 * r,
            0.03 * r,
            rng.uniform(0, 180),
            mix_colour(it.colour, (240, 220, 140), 0.45),
        )
    hl = place_poly(np.array([[-0.38 * r, -0.36 * r]]), lit)[0]
    draw_ellipse(
        img,
        fr,
        (hl[0], hl[1]),
        0.24 * r,
        0.13 * r,
        -40.0,
        mix_colour(it.colour, (255, 255, 255), 0.5),
    )
    stem = place_poly(np.array([[0.0, 0.0], [0.12 * r, -0.18 * r], [0.2 * r, -0.34 * r]]), it)
    draw_polyline(img, fr, stem, (92, 62, 30), round(fr.size * 0.008))


def _draw_banana(img: np.ndarray, fr: Frame, it: Item) -> None:
    centre, hw = banana_centre(it)
    fill_polys(img, fr, [ribbon_poly(centre, hw)], shade_colour(it.colour, 0.7))
    inner = ribbon_poly(centre - (0.0, 0.12 * it.size * 0.27), hw * 0.72)
    fill_polys(img, fr, [inner], it.colour)
    draw_polyline(
        img,
        fr,
        centre[3:-3] + np.array([0.0, 0.05 * it.size]),
        shade_colour(it.colour, 0.8),
        round(fr.size * 0.005),
    )
    for end in (centre[0], centre[-1]):
        draw_ellipse(img, fr, (end[0], end[1]), 0.05 * it.size, 0.04 * it.size, 0, (88, 64, 30))


def _draw_tag(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.75))
    fill_polys(img, fr, [place_poly(rounded_rect(0.9 * s, 0.9 * s, 0.17 * s), it)], it.colour)
    ring = place_poly(rounded_rect(0.78 * s, 0.78 * s, 0.12 * s), it)
    draw_polyline(img, fr, np.vstack([ring, ring[:1]]), (236, 236, 236), round(fr.size * 0.006))
    for i, w in enumerate((0.5, 0.38, 0.45)):
        bar = place_poly(rounded_rect(w * s, 0.06 * s, 0.02 * s), it, -0.1 * s, (i - 0.6) * 0.3 * s)
        fill_polys(img, fr, [bar], (236, 236, 236))
    hole = place_poly(np.array([[0.0, -0.6 * s]]), it)[0]
    draw_ellipse(img, fr, (hole[0], hole[1]), 0.09 * s, 0.09 * s, 0, (70, 70, 74))


def _draw_disc(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A round tag (wrong kind for the square tag slot) or a button (wrong kind for a pill)."""
    s = it.size
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.72))
    fill_polys(img, fr, [place_poly(circle_poly(0.88 * s, 36), it)], it.colour)
    if it.kind == "disc":
        ring = place_poly(circle_poly(0.7 * s, 36), it)
        draw_polyline(img, fr, np.vstack([ring, ring[:1]]), (236, 236, 236), round(fr.size * 0.006))
        fill_polys(
            img, fr, [place_poly(rounded_rect(0.4 * s, 0.07 * s, 0.02 * s), it)], (236, 236, 236)
        )
    else:
        for hx, hy in ((-1, -1), (1, -1), (-1, 1), (1, 1)):
            c = place_poly(np.array([[0.28 * s * hx, 0.28 * s * hy]]), it)[0]
            draw_ellipse(img, fr, (c[0], c[1]), 0.13 * s, 0.13 * s, 0, shade_colour(it.colour, 0.6))


def _draw_pill(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.72))
    fill_polys(img, fr, [place_poly(stadium_poly(0.92 * s, 0.38 * s), it, 0, -0.03 * s)], it.colour)
    half = place_poly(rounded_rect(0.46 * s, 0.38 * s, 0.3 * s), it, 0.42 * s, -0.03 * s)
    fill_polys(img, fr, [half], shade_colour(it.colour, 0.9))
    draw_polyline(
        img,
        fr,
        place_poly(np.array([[-0.55 * s, -0.2 * s], [0.5 * s, -0.2 * s]]), it),
        mix_colour(it.colour, (255, 255, 255), 0.6),
        round(fr.size * 0.004),
    )


def _draw_bar(img: np.ndarray, fr: Frame, it: Item) -> None:
    s = it.size
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.7))
    fill_polys(
        img,
        fr,
        [place_poly(rounded_rect(0.95 * s, 0.16 * s, 0.08 * s), it, 0, -0.03 * s)],
        it.colour,
    )
    for i in range(-3, 4):
        ridge = place_poly(np.array([[i * 0.25 * s, -0.16 * s], [i * 0.25 * s, 0.16 * s]]), it)
        draw_polyline(img, fr, ridge, shade_colour(it.colour, 0.8), 1)


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
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.45))
    n = int(hw * hh * 4 / (math.pi * 0.0115**2) * 1.15)
    xs = rng.uniform(-hw + 0.008, hw - 0.008, n)
    ys = rng.uniform(-hh + 0.008, hh - 0.008, n)
    pts = place_poly(np.stack([xs, ys], axis=1), it)
    rad = rng.uniform(0.008, 0.0135, n)
    elong = rng.uniform(0.55, 0.9, n)
    ang = rng.uniform(0, 180, n)
    tone = rng.uniform(0.72, 1.22, n)
    keep = (xs >= lo + 0.004) & (xs <= hi - 0.004)
    pts, rad, elong, ang, tone = pts[keep], rad[keep], elong[keep], ang[keep], tone[keep]
    # Hundreds of grains: transform and colour them in bulk, then only draw in the loop.
    centres = fr.fixed(pts).tolist()
    ax = np.maximum(1, np.round(rad * fr.size * SUBPIXEL_ONE)).astype(int).tolist()
    ay = np.maximum(1, np.round(rad * elong * fr.size * SUBPIXEL_ONE)).astype(int).tolist()
    angles = (ang + fr.theta).tolist()
    colours = np.clip(np.round(np.outer(tone, it.colour)), 0, 255).astype(int).tolist()
    for c, a, b, t, col in zip(centres, ax, ay, angles, colours, strict=True):
        cv2.ellipse(img, c, (a, b), t, 0, 360, col, -1, cv2.LINE_AA, SUBPIXEL_SHIFT)


def _draw_block(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A terminal block: housing, one port per pin on the cable side, levers or screws."""
    n, style, side = int(it.params[0]), int(it.params[1]), it.params[2]
    hw, hh = block_half(it)
    fill_polys(img, fr, item_outline(it), shade_colour(it.colour, 0.7))
    fill_polys(
        img,
        fr,
        [place_poly(rounded_rect(hw - 0.006, hh - 0.006, 0.01), it, -0.003, -0.003)],
        it.colour,
    )
    for k in range(n):
        y = (k - (n - 1) / 2) * it.size
        port = place_poly(rounded_rect(0.018, 0.016, 0.004), it, side * (hw - 0.03), y)
        fill_polys(img, fr, [port], (54, 54, 58))
        if style == 0:
            lever = place_poly(rounded_rect(0.026, 0.022, 0.006), it, -side * 0.02, y)
            fill_polys(img, fr, [lever], ORANGE)
        else:
            c = place_poly(np.array([[-side * 0.02, y]]), it)[0]
            draw_ellipse(img, fr, (c[0], c[1]), 0.022, 0.022, 0, (150, 152, 156))
            slot = place_poly(np.array([[-side * 0.02 - 0.016, y], [-side * 0.02 + 0.016, y]]), it)
            draw_polyline(img, fr, slot, (70, 70, 74), round(fr.size * 0.006))


def _draw_cable(img: np.ndarray, fr: Frame, it: Item) -> None:
    centre = cable_centre(it)
    n = len(centre)
    fill_polys(img, fr, [ribbon_poly(centre, np.full(n, it.size))], shade_colour(it.colour, 0.62))
    fill_polys(
        img, fr, [ribbon_poly(centre - (0, 0.2 * it.size), np.full(n, 0.7 * it.size))], it.colour
    )
    hl = mix_colour(it.colour, (255, 255, 255), 0.45)
    draw_polyline(img, fr, centre[2:-2] - (0, 0.35 * it.size), hl, round(fr.size * 0.004))


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
    **PART_DRAWERS,
}
