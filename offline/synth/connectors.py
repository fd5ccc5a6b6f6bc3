"""Connectors: two terminal blocks joined by one cable, whose colour and pin positions must match
on both ends.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from lineguard.offline.synth.components import block_half
from lineguard.offline.synth.drawing import jitter_colour, place_poly
from lineguard.offline.synth.product import (
    jittered,
    logical_result,
    new_seed,
    pick_one,
    sample_look,
    unknown_subtype,
)
from lineguard.offline.synth.scene import (
    BLUE,
    COLOUR_NAMES,
    HOUSING,
    LOGICAL_SUBTYPES,
    RED,
    RGB,
    YELLOW,
    Defect,
    Item,
    Scene,
)

CABLE_COLOURS: dict[int, RGB] = {2: YELLOW, 3: BLUE, 5: RED}


PIN_PITCH = 0.072


def _block(rng: np.random.Generator, x: float, n: int, side: float, slot: str) -> Item:
    return Item(
        "block",
        jittered(rng, x, 0.02),
        jittered(rng, 0.5, 0.03),
        float(rng.uniform(-5, 5)),
        PIN_PITCH,
        jitter_colour(rng, HOUSING, 4),
        new_seed(rng),
        slot,
        (float(n), 0.0, side),
    )


def _port(block: Item, k: int) -> tuple[float, float]:
    n, side = int(block.params[0]), block.params[2]
    hw, _ = block_half(block)
    p = place_poly(np.array([[side * (hw - 0.012), (k - (n - 1) / 2) * block.size]]), block)[0]
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
        jitter_colour(rng, colour),
        new_seed(rng),
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


def connectors_good(rng: np.random.Generator) -> Scene:
    look = sample_look(rng, 0.03, 6.0, (150, 150, 146))
    n = (2, 3, 5)[int(rng.integers(0, 3))]
    left = _block(rng, 0.27, n, 1.0, "left")
    right = _block(rng, 0.73, n, -1.0, "right")
    k = int(rng.integers(0, n))
    cable = _cable(rng, left, right, k, k, CABLE_COLOURS[n])
    return Scene("connectors", (cable, left, right), look, detail=f"pins={n}")


def connectors_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    cable, left, right = scene.items[:3]
    n, k = int(left.params[0]), int(cable.params[6])
    items: list[Item] = [cable, left, right]
    regions: list[tuple[Item | Defect, ...]]
    if subtype == "missing":
        items = [left, right]
        regions = [(cable,)]
        detail = "cable"
    elif subtype == "extra":
        m = pick_one(rng, [i for i in range(n) if i != k])
        extra = _cable(rng, left, right, m, m, cable.colour, "extra")
        items = [cable, extra, left, right]
        regions = [(extra,)]
        detail = f"cable@{m}"
    elif subtype == "swapped":
        m = pick_one(rng, [i for i in range(n) if i != k])
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
        m = pick_one(rng, [v for v in counts if v > k] or counts)
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
        m = pick_one(rng, [v for v in CABLE_COLOURS if v != n])
        items[0] = replace(cable, colour=jitter_colour(rng, CABLE_COLOURS[m]))
        regions = [(items[0],)]
        detail = f"cable:{COLOUR_NAMES[CABLE_COLOURS[m]]}"
    else:
        raise unknown_subtype(subtype, LOGICAL_SUBTYPES)
    return logical_result(scene, items, regions, subtype, detail)
