"""Component kinds of the pushpin, screw-bag and bottle families: outline (footprint, for masks
and shadows) and drawer (outline plus shading and detail), like ``components`` for the tray's.

Kept apart from ``components`` so that each family's parts can be read in one place; the
outline and drawer tables here are merged into ``components``' so that render, masks and
defects treat every kind the same way.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from lineguard.offline.synth.drawing import (
    Frame,
    circle_poly,
    draw_ellipse,
    draw_polyline,
    fill_polys,
    mix_colour,
    place_poly,
    rounded_rect,
    shade_colour,
)
from lineguard.offline.synth.scene import Item

HOLE = (58, 60, 64)  # the shadowed inside of a nut's or a washer's hole


SCREW_HEAD = 0.03  # half-height of a screw head; long and short screws differ in length only


SCREW_SHAFT = 0.013


def _pushpin(it: Item) -> list[np.ndarray]:
    needle = rounded_rect(0.65 * it.size, 0.09 * it.size, 0.04 * it.size)
    return [
        place_poly(circle_poly(it.size, 32), it),
        place_poly(needle, it, 1.3 * it.size, 0.0),
    ]


def _screw(it: Item) -> list[np.ndarray]:
    head = rounded_rect(0.014, SCREW_HEAD, 0.006)
    body = np.array(
        [
            [-it.size, -SCREW_SHAFT],
            [it.size - 0.02, -SCREW_SHAFT],
            [it.size, 0.0],
            [it.size - 0.02, SCREW_SHAFT],
            [-it.size, SCREW_SHAFT],
        ]
    )
    return [place_poly(head, it, -it.size - 0.008, 0.0), place_poly(body, it)]


def _hexagon(r: float) -> np.ndarray:
    t = np.arange(6) * math.pi / 3
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _nut(it: Item) -> list[np.ndarray]:
    return [place_poly(_hexagon(it.size), it)]


def _washer(it: Item) -> list[np.ndarray]:
    return [place_poly(circle_poly(it.size, 36), it)]


def _spring(it: Item) -> list[np.ndarray]:
    return [place_poly(rounded_rect(it.size, 0.022, 0.01), it)]


def _bottle(it: Item) -> list[np.ndarray]:
    """Body (half-height ``size``), shoulder and neck with the cap, as one outline."""
    hh, hw = it.size, 0.5 * it.size
    local = np.array(
        [
            [-hw, hh],
            [hw, hh],
            [hw, -0.62 * hh],
            [0.32 * hw, -0.92 * hh],
            [0.32 * hw, -1.42 * hh],
            [-0.32 * hw, -1.42 * hh],
            [-0.32 * hw, -0.92 * hh],
            [-hw, -0.62 * hh],
        ]
    )
    return [place_poly(local, it)]


def label_half(it: Item) -> tuple[float, float]:
    return it.size, 0.55 * it.size


def _label(it: Item) -> list[np.ndarray]:
    hw, hh = label_half(it)
    return [place_poly(rounded_rect(hw, hh, 0.08 * hh), it)]


PART_OUTLINES: dict[str, Callable[[Item], list[np.ndarray]]] = {
    "pushpin": _pushpin,
    "long_screw": _screw,
    "short_screw": _screw,
    "nut": _nut,
    "washer": _washer,
    "spring": _spring,
    "bottle": _bottle,
    "label": _label,
}


def _draw_pushpin(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A needle (tilted, seen from above) under a domed head lit from the top left."""
    s = it.size
    needle = np.array([[0.7 * s, 0.0], [1.9 * s, 0.0]])
    draw_polyline(img, fr, place_poly(needle, it), (176, 178, 182), round(fr.size * 0.006))
    fill_polys(img, fr, [place_poly(circle_poly(s, 32), it)], shade_colour(it.colour, 0.66))
    fill_polys(img, fr, [place_poly(circle_poly(0.82 * s, 32), it, -0.06 * s)], it.colour)
    hl = (it.x - 0.35 * s, it.y - 0.35 * s)
    draw_ellipse(img, fr, hl, 0.26 * s, 0.16 * s, -40.0, mix_colour(it.colour, (255,) * 3, 0.6))


def _draw_screw(img: np.ndarray, fr: Frame, it: Item) -> None:
    """Metal shaft with thread ridges, a wider head with a slot."""
    head, body = _screw(it)
    fill_polys(img, fr, [body], shade_colour(it.colour, 0.8))
    half = np.array([[-it.size, -0.4 * SCREW_SHAFT], [it.size - 0.02, -0.4 * SCREW_SHAFT]])
    draw_polyline(img, fr, place_poly(half, it), mix_colour(it.colour, (255,) * 3, 0.4), 1)
    ridge = shade_colour(it.colour, 0.5)
    for x in np.arange(-it.size + 0.02, it.size - 0.02, 0.011):
        line = np.array([[x, -SCREW_SHAFT], [x + 0.004, SCREW_SHAFT]])
        draw_polyline(img, fr, place_poly(line, it), ridge, 1)
    fill_polys(img, fr, [head], shade_colour(it.colour, 0.65))
    slot = np.array([[-it.size - 0.008, -0.6 * SCREW_HEAD], [-it.size - 0.008, 0.6 * SCREW_HEAD]])
    draw_polyline(img, fr, place_poly(slot, it), shade_colour(it.colour, 0.4), 1)


def _draw_nut(img: np.ndarray, fr: Frame, it: Item) -> None:
    fill_polys(img, fr, _nut(it), shade_colour(it.colour, 0.7))
    fill_polys(img, fr, [place_poly(_hexagon(0.84 * it.size), it)], it.colour)
    fill_polys(img, fr, [place_poly(circle_poly(0.5 * it.size, 24), it)], HOLE)
    ring = place_poly(circle_poly(0.58 * it.size, 24), it)
    draw_polyline(img, fr, np.vstack([ring, ring[:1]]), shade_colour(it.colour, 0.5), 1)


def _draw_washer(img: np.ndarray, fr: Frame, it: Item) -> None:
    fill_polys(img, fr, _washer(it), shade_colour(it.colour, 0.72))
    fill_polys(img, fr, [place_poly(circle_poly(0.86 * it.size, 36), it)], it.colour)
    fill_polys(img, fr, [place_poly(circle_poly(0.45 * it.size, 24), it)], HOLE)


def _draw_spring(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A coil seen from the side: a zigzag of wire between two end loops."""
    n = 11
    xs = np.linspace(-it.size, it.size, n)
    ys = 0.018 * np.where(np.arange(n) % 2 == 0, -1.0, 1.0)
    coil = place_poly(np.stack([xs, ys], axis=1), it)
    draw_polyline(img, fr, coil, shade_colour(it.colour, 0.6), round(fr.size * 0.008))
    draw_polyline(img, fr, coil, it.colour, round(fr.size * 0.004))


def bottle_liquid(it: Item, level: float) -> np.ndarray:
    """The liquid as a polygon: the body's inside from the bottom up to ``level`` (0…1)."""
    hh, hw = it.size, 0.5 * it.size
    inner_hw, bottom = 0.88 * hw, 0.94 * hh
    top = bottom - level * (bottom + 0.6 * hh)
    return place_poly(rounded_rect(inner_hw, (bottom - top) / 2, 0.02), it, 0.0, (bottom + top) / 2)


def _draw_bottle(img: np.ndarray, fr: Frame, it: Item) -> None:
    """Glass, the liquid up to its fill level, a highlight, and a cap on the neck."""
    level, r, g, b = it.params[:4]
    fill_polys(img, fr, _bottle(it), shade_colour(it.colour, 0.8))
    hh, hw = it.size, 0.5 * it.size
    inner = rounded_rect(0.9 * hw, 0.78 * hh, 0.02)
    fill_polys(img, fr, [place_poly(inner, it, 0.0, 0.16 * hh)], it.colour)
    fill_polys(img, fr, [bottle_liquid(it, level)], (int(r), int(g), int(b)))
    cap = rounded_rect(0.38 * hw, 0.12 * hh, 0.01)
    fill_polys(img, fr, [place_poly(cap, it, 0.0, -1.32 * hh)], (60, 62, 70))
    shine = np.array([[-0.66 * hw, -0.5 * hh], [-0.66 * hw, 0.8 * hh]])
    draw_polyline(
        img,
        fr,
        place_poly(shine, it),
        mix_colour(it.colour, (255,) * 3, 0.5),
        round(fr.size * 0.008),
    )


def _draw_label(img: np.ndarray, fr: Frame, it: Item) -> None:
    """A paper label; its type (``params[0]``) decides the emblem: stripes, a disc or a chevron."""
    hw, hh = label_half(it)
    kind = int(it.params[0])
    fill_polys(img, fr, _label(it), shade_colour(it.colour, 0.8))
    fill_polys(img, fr, [place_poly(rounded_rect(0.94 * hw, 0.9 * hh, 0.06 * hh), it)], it.colour)
    ink = (250, 248, 240)
    px = round(fr.size * 0.008)
    if kind == 0:
        for dy in (-0.45, 0.0, 0.45):
            bar = np.array([[-0.75 * hw, dy * hh], [0.75 * hw, dy * hh]])
            draw_polyline(img, fr, place_poly(bar, it), ink, px)
    elif kind == 1:
        fill_polys(img, fr, [place_poly(circle_poly(0.6 * hh, 28), it)], ink)
    else:
        chevron = np.array([[-0.6 * hw, 0.5 * hh], [0.0, -0.55 * hh], [0.6 * hw, 0.5 * hh]])
        draw_polyline(img, fr, place_poly(chevron, it), ink, px)


PART_DRAWERS: dict[str, Callable[[np.ndarray, Frame, Item], None]] = {
    "pushpin": _draw_pushpin,
    "long_screw": _draw_screw,
    "short_screw": _draw_screw,
    "nut": _draw_nut,
    "washer": _draw_washer,
    "spring": _draw_spring,
    "bottle": _draw_bottle,
    "label": _draw_label,
}
