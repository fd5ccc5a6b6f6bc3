"""Bottle: one bottle seen from the side, filled to a fixed level with one of three drinks and
wearing the label that belongs to that drink, at a fixed height.

The drink varies from bottle to bottle, so neither the liquid's colour nor the label's is
wrong on its own: only the pair can be (a label of another drink), and the fill level and the
label's place are measured against the bottle, not the image.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from lineguard.offline.synth.drawing import jitter_colour
from lineguard.offline.synth.parts import label_half
from lineguard.offline.synth.product import (
    jittered,
    logical_result,
    new_seed,
    pick_one,
    sample_look,
    unknown_subtype,
)
from lineguard.offline.synth.scene import RGB, Defect, Item, Scene

BOTTLE_SUBTYPES = ("wrong_fill", "label_swapped", "label_misplaced", "label_missing")


# Per drink: the liquid's colour and its label's colour; the label's emblem is the drink index.
DRINKS: tuple[tuple[str, RGB, RGB], ...] = (
    ("juice", (232, 142, 36), (236, 196, 60)),
    ("cola", (74, 36, 22), (190, 34, 40)),
    ("water", (150, 190, 222), (44, 92, 180)),
)


FILL = 0.8  # fraction of the body's height a good bottle is filled to


BODY_HH = 0.3


GLASS: RGB = (190, 206, 200)


LABEL_DY = 0.3 * BODY_HH  # label centre below the body centre, along the bottle


def label_spot(bottle: Item, along: float = LABEL_DY) -> tuple[float, float]:
    """Where a label centred ``along`` below the bottle's centre sits, in canonical coords."""
    a = np.radians(bottle.angle)
    return float(bottle.x - np.sin(a) * along), float(bottle.y + np.cos(a) * along)


def _label(rng: np.random.Generator, bottle: Item, drink: int, along: float = LABEL_DY) -> Item:
    x, y = label_spot(bottle, along)
    return Item(
        "label",
        x,
        y,
        bottle.angle + float(rng.uniform(-1.0, 1.0)),
        0.125,
        jitter_colour(rng, DRINKS[drink][2], 5),
        new_seed(rng),
        "label",
        (float(drink),),
    )


def bottle_good(rng: np.random.Generator) -> Scene:
    look = sample_look(rng, 0.02, 3.0, (92, 96, 90))
    drink = int(rng.integers(0, len(DRINKS)))
    liquid = jitter_colour(rng, DRINKS[drink][1], 5)
    bottle = Item(
        "bottle",
        jittered(rng, 0.5, 0.02),
        jittered(rng, 0.58, 0.015),
        float(rng.uniform(-2.5, 2.5)),
        BODY_HH * float(rng.uniform(0.98, 1.02)),
        jitter_colour(rng, GLASS, 4),
        new_seed(rng),
        "bottle",
        (FILL + float(rng.uniform(-0.015, 0.015)), *map(float, liquid)),
    )
    label = _label(rng, bottle, drink, LABEL_DY + float(rng.uniform(-0.006, 0.006)))
    return Scene("bottle", (bottle, label), look, detail=DRINKS[drink][0])


def _level_band(bottle: Item, a: float, b: float) -> Item:
    """The body's inside between fill levels ``a`` and ``b`` as a mask footprint."""
    hh = bottle.size
    bottom, span = 0.94 * hh, 0.94 * hh + 0.6 * hh
    ya, yb = bottom - a * span, bottom - b * span
    x, y = label_spot(bottle, (ya + yb) / 2)
    return Item("area", x, y, bottle.angle, params=(0.44 * hh, abs(ya - yb) / 2))


def bottle_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    bottle, label = scene.items[:2]
    drink = int(label.params[0])
    items: list[Item] = [bottle, label]
    regions: list[tuple[Item | Defect, ...]]
    if subtype == "wrong_fill":
        level = bottle.params[0]
        new_level = (
            float(rng.uniform(0.4, 0.62)) if rng.random() < 0.7 else float(rng.uniform(0.97, 1.0))
        )
        items[0] = replace(bottle, params=(new_level, *bottle.params[1:]))
        regions = [(_level_band(bottle, min(level, new_level), max(level, new_level)),)]
        detail = f"fill={new_level:.2f}"
    elif subtype == "label_swapped":
        other = pick_one(rng, [d for d in range(len(DRINKS)) if d != drink])
        new = replace(label, colour=jitter_colour(rng, DRINKS[other][2], 5), params=(float(other),))
        items[1] = new
        regions = [(new,)]
        detail = f"{DRINKS[drink][0]} with {DRINKS[other][0]} label"
    elif subtype == "label_misplaced":
        _, hh = label_half(label)
        if rng.random() < 0.6:
            shift = float(rng.uniform(1.1, 1.6)) * hh * (1.0 if rng.random() < 0.5 else -1.0)
            x, y = label_spot(bottle, LABEL_DY + shift)
            new = replace(label, x=x, y=y)
            detail = f"shifted {shift:+.3f}"
        else:
            turn = float(rng.uniform(14, 24)) * (1.0 if rng.random() < 0.5 else -1.0)
            new = replace(label, angle=label.angle + turn)
            detail = f"turned {turn:+.0f} deg"
        items[1] = new
        regions = [(new, label)]
    elif subtype == "label_missing":
        items = [bottle]
        regions = [(label,)]
        detail = "label"
    else:
        raise unknown_subtype(subtype, BOTTLE_SUBTYPES)
    return logical_result(scene, items, regions, subtype, detail)
