"""The tray: a 2×2 compartment tray plus a pill strip, with fixed kinds and counts per
compartment.
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
    place_poly,
    rounded_rect,
    shade_colour,
)
from lineguard.offline.synth.product import (
    box_outline,
    jittered,
    logical_result,
    new_seed,
    pick_one,
    replace_part,
    sample_look,
    slot_index,
    unknown_subtype,
)
from lineguard.offline.synth.scene import (
    BLUE,
    BROWN,
    COLOUR_NAMES,
    LOGICAL_SUBTYPES,
    RED,
    TRAY,
    WHITE,
    YELLOW,
    Defect,
    Item,
    Scene,
)

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
        jitter_colour(rng, RED),
        new_seed(rng),
        slot,
    )


def _tray_pill(rng: np.random.Generator, x: float, y: float, slot: str) -> Item:
    return Item(
        "pill",
        x,
        y,
        float(rng.uniform(-7, 7)),
        PILL_L * rng.uniform(0.96, 1.04),
        jitter_colour(rng, WHITE, 5),
        new_seed(rng),
        slot,
    )


def _tray_tag(rng: np.random.Generator, x: float, y: float, slot: str) -> Item:
    return Item(
        "tag",
        x,
        y,
        float(rng.uniform(-9, 9)),
        TAG_S * rng.uniform(0.96, 1.04),
        jitter_colour(rng, BLUE),
        new_seed(rng),
        slot,
    )


def tray_good(rng: np.random.Generator) -> Scene:
    look = sample_look(rng, 0.025, 4.0, (60, 64, 70))
    gx0, gy0, gx1, gy1 = TRAY_COMPARTMENTS["granules"]
    bed_hw, bed_hh = (gx1 - gx0) / 2 - 0.012, (gy1 - gy0) / 2 - 0.012
    items = [
        Item(
            "granules",
            (gx0 + gx1) / 2,
            (gy0 + gy1) / 2,
            0.0,
            0.0,
            jitter_colour(rng, BROWN, 10),
            new_seed(rng),
            "granules",
            (bed_hw, bed_hh),
        ),
        *(
            _tray_pill(rng, jittered(rng, x, 0.01), jittered(rng, 0.81, 0.008), f"pill{i}")
            for i, x in enumerate(PILL_X)
        ),
        _tray_tag(rng, jittered(rng, 0.70), jittered(rng, 0.62, 0.01), "tag"),
        Item(
            "banana",
            jittered(rng, 0.70),
            jittered(rng, 0.31),
            float(rng.uniform(-33, -17)),
            BANANA_L * rng.uniform(0.95, 1.05),
            jitter_colour(rng, YELLOW),
            new_seed(rng),
            "banana",
            (float(rng.uniform(0.2, 0.32)),),
        ),
        _tray_apple(rng, jittered(rng, 0.205), jittered(rng, 0.31), "apple0"),
        _tray_apple(rng, jittered(rng, 0.395), jittered(rng, 0.31), "apple1"),
    ]
    return Scene("tray", tuple(items), look)


def tray_logical(scene: Scene, subtype: str, rng: np.random.Generator) -> Scene:
    items = list(scene.items)
    at = slot_index(items)
    regions: list[tuple[Item | Defect, ...]] = []
    if subtype == "missing":
        what = pick_one(rng, ["banana", "tag", "granules", "pills"])
        slots = ["pill0", "pill1", "pill2"] if what == "pills" else [what]
        regions = [(items[at[s]],) for s in slots]
        items = [it for it in items if it.slot not in slots]
        detail = what
    elif subtype == "extra":
        what = pick_one(rng, ["apple", "pill", "tag"])
        gx0, gy0, gx1, gy1 = TRAY_COMPARTMENTS["granules"]
        spots = [(float(rng.uniform(gx0 + 0.08, gx1 - 0.08)), jittered(rng, (gy0 + gy1) / 2, 0.02))]
        if what != "apple":
            spots += [(jittered(rng, 0.585, 0.006), jittered(rng, 0.195, 0.006))]
        x, y = spots[int(rng.integers(0, len(spots)))]
        maker = {"apple": _tray_apple, "pill": _tray_pill, "tag": _tray_tag}[what]
        new = replace(maker(rng, x, y, "extra"), angle=float(rng.uniform(0, 360)))
        items.append(new)
        regions = [(new,)]
        detail = what
    elif subtype == "swapped":
        a = pick_one(rng, ["apple0", "apple1", "banana", "pill0", "pill1", "pill2"])
        b = "tag"
        ia, ib = at[a], at[b]
        pa, pb = items[ia], items[ib]
        items[ia] = replace(pa, x=pb.x, y=pb.y)
        items[ib] = replace(pb, x=pa.x, y=pa.y)
        regions = [(items[ia], pb), (items[ib], pa)]
        detail = f"{a}<->{b}"
    elif subtype == "wrong_kind":
        slot = pick_one(rng, ["apple0", "apple1", "banana", "tag", "pill0", "pill1", "pill2"])
        old = items[at[slot]]
        base = slot.rstrip("0123456789")
        kind, colour, size = {
            "apple": ("walnut", mix_colour(BROWN, (255, 255, 255), 0.15), old.size),
            "banana": ("bar", old.colour, old.size * 0.95),
            "tag": ("disc", old.colour, old.size * 1.08),
            "pill": ("button", old.colour, old.size * 0.62),
        }[base]
        new = replace_part(old, rng, kind=kind, colour=jitter_colour(rng, colour), size=size)
        items[at[slot]] = new
        regions = [(new, old)]
        detail = f"{slot}:{kind}"
    elif subtype == "wrong_count":
        what = pick_one(rng, ["apples=1", "pills=2", "pills=4", "granules=part"])
        if what == "apples=1" or what == "pills=2":
            slot = pick_one(
                rng, ["apple0", "apple1"] if what == "apples=1" else ["pill0", "pill1", "pill2"]
            )
            regions = [(items[at[slot]],)]
            items = [it for it in items if it.slot != slot]
        elif what == "pills=4":
            ref = items[at["pill2"]]
            new = replace_part(
                ref,
                rng,
                x=jittered(rng, PILL_FREE_X, 0.01),
                y=jittered(rng, 0.81, 0.008),
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
        slot = pick_one(rng, ["apple0", "apple1", "banana", "tag", "pill0", "pill1", "pill2"])
        choices = {"apple": [YELLOW], "banana": [RED], "tag": [RED, YELLOW], "pill": [BLUE, YELLOW]}
        palette = choices[slot.rstrip("0123456789")]
        colour = palette[int(rng.integers(0, len(palette)))]
        new = replace(items[at[slot]], colour=jitter_colour(rng, colour))
        items[at[slot]] = new
        regions = [(new,)]
        detail = f"{slot}:{COLOUR_NAMES[colour]}"
    else:
        raise unknown_subtype(subtype, LOGICAL_SUBTYPES)
    return logical_result(scene, items, regions, subtype, detail)


def tray_outline(scene: Scene) -> list[np.ndarray]:
    x0, y0, x1, y1 = TRAY_BOX
    it = Item("area", (x0 + x1) / 2, (y0 + y1) / 2)
    return [place_poly(rounded_rect((x1 - x0) / 2, (y1 - y0) / 2, 0.04), it)]


def draw_tray(img: np.ndarray, fr: Frame, scene: Scene) -> None:
    """The tray: a rim, a body, recessed compartments (dark top-left edges, light bottom-right)."""
    tray = jitter_colour(np.random.default_rng(scene.look.bg_seed), TRAY, 5)
    fill_polys(img, fr, tray_outline(scene), shade_colour(tray, 0.78))
    x0, y0, x1, y1 = TRAY_BOX
    fill_polys(img, fr, [box_outline(x0 + 0.006, y0 + 0.006, x1 - 0.006, y1 - 0.006, 0.036)], tray)
    floor = shade_colour(tray, 0.9)
    edge = max(1, round(fr.size * 0.006))
    for cx0, cy0, cx1, cy1 in TRAY_COMPARTMENTS.values():
        fill_polys(img, fr, [box_outline(cx0, cy0, cx1, cy1, 0.012)], floor)
        dark = np.array([[cx0, cy1], [cx0, cy0], [cx1, cy0]])
        light = np.array([[cx1, cy0], [cx1, cy1], [cx0, cy1]])
        draw_polyline(img, fr, dark, shade_colour(tray, 0.66), edge)
        draw_polyline(img, fr, light, mix_colour(tray, (255, 255, 255), 0.35), edge)
