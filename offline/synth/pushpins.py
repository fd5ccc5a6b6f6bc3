"""Pushpins: a box with a grid of compartments and exactly one yellow pushpin in each.

The rule is per position, not per count of the whole box: an empty compartment next to a
doubled one keeps the total right and is still two anomalies' worth of wrong.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lineguard.offline.synth.drawing import (
    Frame,
    draw_polyline,
    fill_polys,
    jitter_colour,
    mix_colour,
    shade_colour,
)
from lineguard.offline.synth.product import (
    box_outline,
    logical_result,
    new_seed,
    pick_one,
    replace_part,
    sample_look,
    unknown_subtype,
)
from lineguard.offline.synth.scene import BLUE, COLOUR_NAMES, RED, RGB, YELLOW, Defect, Item, Scene

PUSHPIN_SUBTYPES = ("missing", "extra", "wrong_kind", "wrong_colour")


BOX = (0.06, 0.16, 0.94, 0.84)


ROWS, COLS = 3, 5


PIN_R = 0.03


BOX_COLOUR: RGB = (176, 188, 196)


def cell_box(row: int, col: int) -> tuple[float, float, float, float]:
    """A compartment's inner box (canonical coordinates, before the pose)."""
    x0, y0, x1, y1 = BOX
    w, h = (x1 - x0) / COLS, (y1 - y0) / ROWS
    pad = 0.012
    return (
        x0 + col * w + pad,
        y0 + row * h + pad,
        x0 + (col + 1) * w - pad,
        y0 + (row + 1) * h - pad,
    )


def cell_of(x: float, y: float) -> tuple[int, int]:
    """The compartment a canonical point lies in (row, col), clipped to the grid."""
    x0, y0, x1, y1 = BOX
    col = int(np.clip((x - x0) / ((x1 - x0) / COLS), 0, COLS - 1))
    row = int(np.clip((y - y0) / ((y1 - y0) / ROWS), 0, ROWS - 1))
    return row, col


def _pin(rng: np.random.Generator, x: float, y: float, slot: str, colour: RGB = YELLOW) -> Item:
    return Item(
        "pushpin",
        x,
        y,
        float(rng.uniform(0, 360)),
        PIN_R * rng.uniform(0.95, 1.05),
        jitter_colour(rng, colour, 6),
        new_seed(rng),
        slot,
    )


def _spot(rng: np.random.Generator, row: int, col: int, dx: float = 0.0) -> tuple[float, float]:
    cx0, cy0, cx1, cy1 = cell_box(row, col)
    return (
        float((cx0 + cx1) / 2 + dx + rng.uniform(-0.012, 0.012)),
        float((cy0 + cy1) / 2 + rng.uniform(-0.02, 0.02)),
    )


def pushpins_good(rng: np.random.Generator) -> Scene:
    look = sample_look(rng, 0.02, 3.0, (70, 70, 76))
    items = [_pin(rng, *_spot(rng, r, c), f"r{r}c{c}") for r in range(ROWS) for c in range(COLS)]
    return Scene("pushpins", tuple(items), look)


def pushpins_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    items = list(scene.items)
    i = int(rng.integers(0, len(items)))
    old = items[i]
    regions: list[tuple[Item | Defect, ...]]
    if subtype == "missing":
        del items[i]
        regions = [(old,)]
        detail = old.slot
    elif subtype == "extra":
        row, col = cell_of(old.x, old.y)
        moved = replace(old, x=_spot(rng, row, col, -0.038)[0])
        new = _pin(rng, *_spot(rng, row, col, 0.038), "extra")
        items[i] = moved
        items.append(new)
        regions = [(moved, old, new)]
        detail = old.slot
    elif subtype == "wrong_kind":
        new = replace_part(old, rng, kind="button", size=old.size * 1.15)
        items[i] = new
        regions = [(new, old)]
        detail = f"{old.slot}:button"
    elif subtype == "wrong_colour":
        colour = pick_one(rng, [RED, BLUE])
        new = replace(old, colour=jitter_colour(rng, colour, 6))
        items[i] = new
        regions = [(new,)]
        detail = f"{old.slot}:{COLOUR_NAMES[colour]}"
    else:
        raise unknown_subtype(subtype, PUSHPIN_SUBTYPES)
    return logical_result(scene, items, regions, subtype, detail)


def pushpins_outline(scene: Scene) -> list[np.ndarray]:
    return [box_outline(*BOX, 0.03)]


def draw_pushpins_box(img: np.ndarray, fr: Frame, scene: Scene) -> None:
    """A plastic box: rim, then one recessed compartment per grid cell with lit edges."""
    colour = jitter_colour(np.random.default_rng(scene.look.bg_seed), BOX_COLOUR, 5)
    fill_polys(img, fr, pushpins_outline(scene), shade_colour(colour, 0.8))
    floor = shade_colour(colour, 0.92)
    edge = max(1, round(fr.size * 0.005))
    for r in range(ROWS):
        for c in range(COLS):
            cx0, cy0, cx1, cy1 = cell_box(r, c)
            fill_polys(img, fr, [box_outline(cx0, cy0, cx1, cy1, 0.01)], floor)
            dark = np.array([[cx0, cy1], [cx0, cy0], [cx1, cy0]])
            light = np.array([[cx1, cy0], [cx1, cy1], [cx0, cy1]])
            draw_polyline(img, fr, dark, shade_colour(colour, 0.62), edge)
            draw_polyline(img, fr, light, mix_colour(colour, (255, 255, 255), 0.4), edge)
