"""Structural defects shared by every product: scratches, contamination and dents, each placed
on a component or the product's surface and recorded with its geometry for the mask.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.components import (
    banana_centre,
    block_half,
    cable_centre,
    item_outline,
    wobble,
)
from lineguard.offline.synth.drawing import (
    Frame,
    circle_poly,
    fill_polys,
    jitter_colour,
    mix_colour,
    place_poly,
    shade_colour,
)
from lineguard.offline.synth.product import Product, new_seed
from lineguard.offline.synth.scene import DIRT, RGB, STRUCTURAL_SUBTYPES, Defect, Item, Scene


def _on_item(rng: np.random.Generator, it: Item, spread: float = 0.45) -> tuple[float, float]:
    """A point well inside the item's footprint."""
    if it.kind in ("cable", "banana"):
        centre = cable_centre(it) if it.kind == "cable" else banana_centre(it)[0]
        c = centre[int(rng.integers(len(centre) // 4, 3 * len(centre) // 4))]
        return float(c[0]), float(c[1])
    if it.kind == "block":
        hw, hh = block_half(it)
        p = place_poly(np.array([[rng.uniform(-0.5, 0.5) * hw, rng.uniform(-0.7, 0.7) * hh]]), it)[
            0
        ]
        return float(p[0]), float(p[1])
    if it.kind == "bottle":
        # The plain band of liquid between its surface and the label: a dent's shading reaches
        # past the masked disc, and there it only meets the liquid's flat colour.
        local = [[rng.uniform(-0.13, 0.13) * it.size, rng.uniform(-0.13, -0.09) * it.size]]
        p = place_poly(np.array(local), it)[0]
        return float(p[0]), float(p[1])
    a, d = rng.uniform(0, 2 * math.pi), rng.uniform(0, spread) * it.size
    return float(it.x + d * math.cos(a)), float(it.y + d * math.sin(a))


def _seen_colour(it: Item) -> RGB:
    """The colour around an on-item point: a bottle's liquid (where _on_item puts it)."""
    if it.kind == "bottle":
        r, g, b = (int(v) for v in it.params[1:4])
        return (r, g, b)
    return it.colour


def _distance(a: RGB, b: RGB) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _surface_colour(product: Product, scene: Scene) -> RGB:
    return product.surface_colour or scene.look.background


def apply_structural(
    product: Product, scene: Scene, subtype: str, rng: np.random.Generator
) -> Scene:
    targets = [i for i, it in enumerate(scene.items) if it.kind in product.dentable]
    ti = targets[int(rng.integers(0, len(targets)))]
    target = scene.items[ti]
    if subtype == "scratch":
        on_item = rng.random() < 0.6
        if on_item:
            x, y = _on_item(rng, target)
            base = _seen_colour(target)
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
        options = [
            (True, mix_colour(base, (252, 252, 248), 0.7)),
            (False, shade_colour(base, 0.42)),
        ]
        options = [o for o in options if _distance(o[1], base) >= 60] or options[1:]
        light, colour = options[int(rng.integers(0, len(options)))]
        defect = Defect(
            "scratch",
            tuple(map(tuple, pts.tolist())),
            0.0,
            colour,
            ti if on_item else -1,
            new_seed(rng),
        )
        detail = f"{'light' if light else 'dark'} on {target.slot if on_item else 'surface'}"
    elif subtype == "contamination":
        if rng.random() < 0.5:
            x, y = _on_item(rng, target)
            where, base = target.slot, _seen_colour(target)
        else:
            sx0, sy0, sx1, sy1 = product.surface
            x, y = float(rng.uniform(sx0, sx1)), float(rng.uniform(sy0, sy1))
            where, base = "surface", _surface_colour(product, scene)
        names = [k for k, c in DIRT.items() if _distance(c, base) > 110] or list(DIRT)
        dirt = names[int(rng.integers(0, len(names)))]
        colour = jitter_colour(rng, DIRT[dirt], 6)
        defect = Defect(
            "contamination", ((x, y),), float(rng.uniform(0.016, 0.032)), colour, -1, new_seed(rng)
        )
        detail = f"{dirt} on {where}"
    elif subtype == "dent":
        x, y = _on_item(rng, target, 0.35)
        r = float(np.clip(rng.uniform(0.35, 0.55) * target.size, 0.018, 0.04))
        if target.kind in ("cable", "block"):
            r = 0.03
        elif target.kind == "bottle":
            r = 0.022
        defect = Defect("dent", ((x, y),), r, (0, 0, 0), ti, new_seed(rng))
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


def blob_polys(d: Defect) -> list[np.ndarray]:
    """A contamination: one irregular blob plus a few satellite spots, from the defect's seed."""
    rng = np.random.default_rng(d.tex)
    x, y = d.points[0]
    centre = Item("area", x, y)
    polys = [place_poly(circle_poly(d.radius, 28, wobble(d.tex, 28, 0.22)), centre)]
    for _ in range(int(rng.integers(0, 5))):
        a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(1.3, 2.6) * d.radius
        r = d.radius * rng.uniform(0.15, 0.35)
        spot = Item("area", x + dist * math.cos(a), y + dist * math.sin(a))
        polys.append(place_poly(circle_poly(r, 12, wobble(new_seed(rng), 12, 0.2)), spot))
    return polys


def scratch_px(size: int) -> int:
    return max(1, round(size * 0.006))


def apply_dent(img: np.ndarray, fr: Frame, d: Defect, target: Item) -> None:
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
    fill_polys(sil, fr, item_outline(target), 255)
    w = (cv2.GaussianBlur(sil, (3, 3), 0)[y0:y1, x0:x1].astype(np.float32) / 255.0)[..., None]
    patch = img[y0:y1, x0:x1].astype(np.float32)
    img[y0:y1, x0:x1] = np.round(patch * (1 - w) + dented * w).astype(np.uint8)
