"""Screw bag: loose parts in a clear bag, anywhere and in any orientation, but always the same
number of each kind (two long screws, two short screws, one nut, two washers).

Nothing here has a fixed place, so only counting tells a good bag from a bad one: a position
prior or a per-position histogram sees nothing wrong with an extra nut.
"""

from __future__ import annotations

import math

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
    sample_look,
    unknown_subtype,
)
from lineguard.offline.synth.scene import RGB, Defect, Item, Scene

SCREWBAG_SUBTYPES = ("missing", "extra", "wrong_kind", "foreign")


COUNTS = {"long_screw": 2, "short_screw": 2, "nut": 1, "washer": 2}


BAG = (0.12, 0.12, 0.88, 0.88)


INSIDE = (0.21, 0.22, 0.79, 0.8)  # where part centres may lie


STEEL: RGB = (168, 172, 178)


BRASS: RGB = (196, 160, 82)


BAG_COLOUR: RGB = (206, 212, 214)


_SIZE = {"long_screw": 0.1, "short_screw": 0.058, "nut": 0.032, "washer": 0.036, "spring": 0.06}


_COLOUR = {"long_screw": STEEL, "short_screw": STEEL, "nut": STEEL, "washer": STEEL}


def reach(kind: str, size: float) -> float:
    """Radius of a circle around a part's centre that holds all of it (for spacing)."""
    return size + 0.03 if kind in ("long_screw", "short_screw", "spring") else size + 0.008


def _free_spot(
    rng: np.random.Generator, kind: str, size: float, placed: list[Item]
) -> tuple[float, float]:
    """A centre whose reach circle clears every placed part (best of many tries if none)."""
    x0, y0, x1, y1 = INSIDE
    best, best_gap = (0.5, 0.5), -math.inf
    for _ in range(300):
        x, y = float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1))
        gap = min(
            (
                math.hypot(x - p.x, y - p.y) - reach(p.kind, p.size) - reach(kind, size)
                for p in placed
            ),
            default=math.inf,
        )
        if gap >= 0.006:
            return x, y
        if gap > best_gap:
            best, best_gap = (x, y), gap
    return best


def _part(rng: np.random.Generator, kind: str, placed: list[Item], slot: str) -> Item:
    size = _SIZE[kind] * float(rng.uniform(0.96, 1.04))
    x, y = _free_spot(rng, kind, size, placed)
    colour = BRASS if kind == "spring" else _COLOUR[kind]
    return Item(
        kind,
        x,
        y,
        float(rng.uniform(0, 360)),
        size,
        jitter_colour(rng, colour, 5),
        new_seed(rng),
        slot,
    )


def screwbag_good(rng: np.random.Generator) -> Scene:
    look = sample_look(rng, 0.02, 5.0, (64, 60, 58))
    items: list[Item] = []
    for kind, n in COUNTS.items():
        for k in range(n):
            items.append(_part(rng, kind, items, f"{kind}{k}"))
    return Scene("screwbag", tuple(items), look)


def screwbag_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    items = list(scene.items)
    regions: list[tuple[Item | Defect, ...]]
    if subtype == "missing":
        i = int(rng.integers(0, len(items)))
        old = items.pop(i)
        regions = [(old,)]
        detail = f"{old.kind}={COUNTS[old.kind] - 1}"
    elif subtype == "extra":
        kind = pick_one(rng, list(COUNTS))
        new = _part(rng, kind, items, "extra")
        items.append(new)
        regions = [(new,)]
        detail = f"{kind}={COUNTS[kind] + 1}"
    elif subtype == "wrong_kind":
        i = int(rng.integers(0, len(items)))
        old = items.pop(i)
        kind = pick_one(rng, [k for k in COUNTS if k != old.kind])
        new = _part(rng, kind, items, old.slot)
        items.insert(i, new)
        regions = [(new, old)]
        detail = f"{old.kind}->{kind}"
    elif subtype == "foreign":
        new = _part(rng, "spring", items, "foreign")
        items.append(new)
        regions = [(new,)]
        detail = "spring"
    else:
        raise unknown_subtype(subtype, SCREWBAG_SUBTYPES)
    return logical_result(scene, items, regions, subtype, detail)


def screwbag_outline(scene: Scene) -> list[np.ndarray]:
    return [box_outline(*BAG, 0.05)]


def draw_bag(img: np.ndarray, fr: Frame, scene: Scene) -> None:
    """A clear bag: a pale film, a welded seam along the top and a few creases."""
    rng = np.random.default_rng(scene.look.bg_seed + 1)
    film = jitter_colour(rng, BAG_COLOUR, 5)
    fill_polys(img, fr, screwbag_outline(scene), shade_colour(film, 0.86))
    x0, y0, x1, y1 = BAG
    fill_polys(img, fr, [box_outline(x0 + 0.01, y0 + 0.01, x1 - 0.01, y1 - 0.01, 0.045)], film)
    seam = box_outline(x0 + 0.01, y0 + 0.012, x1 - 0.01, y0 + 0.05, 0.01)
    fill_polys(img, fr, [seam], shade_colour(film, 0.9))
    for _ in range(4):
        ax, ay = rng.uniform(x0 + 0.05, x1 - 0.05), rng.uniform(y0 + 0.08, y1 - 0.05)
        a, n = rng.uniform(0, math.pi), rng.uniform(0.08, 0.2)
        bx = float(np.clip(ax + n * math.cos(a), x0 + 0.03, x1 - 0.03))
        by = float(np.clip(ay + n * math.sin(a), y0 + 0.06, y1 - 0.03))
        line = np.array([[ax, ay], [bx, by]])
        draw_polyline(img, fr, line, mix_colour(film, (255, 255, 255), 0.5), 1)
