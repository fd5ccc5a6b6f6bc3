"""Scenes to pixels: background, shadows, items, defects, then the camera (lighting gradient,
contrast, sensor noise); masks and component maps from the same geometry.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np

from lineguard.offline.synth.components import DRAWERS, item_outline
from lineguard.offline.synth.defects import apply_dent, blob_polys, scratch_px
from lineguard.offline.synth.drawing import (
    Frame,
    circle_poly,
    draw_polyline,
    fill_polys,
    place_poly,
)
from lineguard.offline.synth.products import PRODUCTS
from lineguard.offline.synth.scene import Item, Look, Scene


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
        fill_polys(m, sfr, polys, 255)
    blurred = cv2.GaussianBlur(m, (0, 0), max(1.0, small * 0.012))
    big = cv2.resize(blurred, (size, size), interpolation=cv2.INTER_LINEAR)
    return big.astype(np.float32) / 255.0


def render(scene: Scene, size: int) -> np.ndarray:
    """Draw a scene as an RGB uint8 image of ``size`` x ``size`` (a pure function of both)."""
    product = PRODUCTS[scene.product]
    look = scene.look
    fr = Frame(size, look.dx, look.dy, look.theta)
    bg = _background(size, look)
    shadow_polys = product.base_outline(scene) or [
        p for it in scene.items for p in item_outline(it)
    ]
    bg *= (1.0 - 0.45 * _shadow(size, fr, shadow_polys))[..., None]
    img = np.clip(np.round(bg), 0, 255).astype(np.uint8)
    product.draw_base(img, fr, scene)
    for it in scene.items:
        DRAWERS[it.kind](img, fr, it)
    for d in scene.defects:
        if d.kind == "dent":
            apply_dent(img, fr, d, scene.items[d.target])
        elif d.kind == "scratch":
            draw_polyline(img, fr, np.asarray(d.points), d.colour, scratch_px(size))
        elif d.kind == "contamination":
            fill_polys(img, fr, blob_polys(d), d.colour)
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
                fill_polys(m, fr, item_outline(shape), 255)
            elif shape.kind == "scratch":
                draw_polyline(m, fr, np.asarray(shape.points), 255, scratch_px(size) + 2)
            elif shape.kind == "contamination":
                fill_polys(m, fr, blob_polys(shape), 255)
            elif shape.kind == "dent":
                disc = np.zeros_like(m)
                x, y = shape.points[0]
                fill_polys(
                    disc, fr, [place_poly(circle_poly(shape.radius, 32), Item("area", x, y))], 255
                )
                sil = np.zeros_like(m)
                fill_polys(sil, fr, item_outline(scene.items[shape.target]), 255)
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
        fill_polys(out, fr, item_outline(it), kinds.index(it.kind) + 1)
    return out, ("background", *kinds)
