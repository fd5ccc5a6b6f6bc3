"""What a product family is (a good-scene sampler, its logical edits, where defects may land),
and the sampling helpers every family shares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.drawing import Frame, jitter_colour, place_poly, rounded_rect
from lineguard.offline.synth.scene import LOGICAL_SUBTYPES, RGB, Defect, Item, Look, Scene, T


@dataclass(frozen=True)
class Product:
    """A product: a good-scene sampler, its logical edits and where defects may land.

    Each family breaks its own kinds of rule, so each names its logical subtypes; the writer
    cycles through them so that a line's test split holds every subtype equally often.
    ``surface_colour`` is what a scratch or a stain off the parts lies on (the scene's
    background when None), so that defects are drawn in a colour that stands out from it.
    """

    name: str
    sample_good: Callable[[np.random.Generator], Scene]
    apply_logical: Callable[[Scene, str, np.random.Generator], Scene]
    draw_base: Callable[[np.ndarray, Frame, Scene], None]
    base_outline: Callable[[Scene], list[np.ndarray]]
    surface: tuple[float, float, float, float]  # canonical box where surface defects may land
    dentable: tuple[str, ...]
    logical_subtypes: tuple[str, ...] = LOGICAL_SUBTYPES
    surface_colour: RGB | None = None


def no_base(img: np.ndarray, fr: Frame, scene: Scene) -> None:
    """For products that lie directly on the conveyor (nothing drawn under the parts)."""


def no_outline(scene: Scene) -> list[np.ndarray]:
    return []


def logical_result(
    scene: Scene,
    items: Sequence[Item],
    regions: Sequence[tuple[Item | Defect, ...]],
    subtype: str,
    detail: str,
) -> Scene:
    """The edited scene every family's logical edit returns."""
    return replace(
        scene,
        items=tuple(items),
        regions=tuple(regions),
        anomaly_type="logical",
        subtype=subtype,
        detail=detail,
    )


def unknown_subtype(subtype: str, known: Sequence[str]) -> ConfigError:
    return ConfigError(f"unknown logical subtype {subtype!r}: use one of {', '.join(known)}")


def new_seed(rng: np.random.Generator) -> int:
    return int(rng.integers(0, 2**31 - 1))


def sample_look(rng: np.random.Generator, shift: float, turn: float, bg: RGB) -> Look:
    return Look(
        dx=float(rng.uniform(-shift, shift)),
        dy=float(rng.uniform(-shift, shift)),
        theta=float(rng.uniform(-turn, turn)),
        brightness=float(rng.uniform(0.86, 1.12)),
        contrast=float(rng.uniform(0.88, 1.1)),
        gradient=float(rng.uniform(0.0, 0.22)),
        gradient_dir=float(rng.uniform(0, 2 * math.pi)),
        noise=float(rng.uniform(1.5, 3.5)),
        background=jitter_colour(rng, bg, 6),
        bg_seed=new_seed(rng),
        noise_seed=new_seed(rng),
    )


def replace_part(it: Item, rng: np.random.Generator, **changes: object) -> Item:
    """A new item with fresh texture, as if another physical part had been put there."""
    return replace(it, tex=new_seed(rng), **changes)  # type: ignore[arg-type]


def jittered(rng: np.random.Generator, v: float, amount: float = 0.012) -> float:
    return float(v + rng.uniform(-amount, amount))


def slot_index(items: Sequence[Item]) -> dict[str, int]:
    return {it.slot: i for i, it in enumerate(items)}


def pick_one(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(0, len(options)))]


def box_outline(x0: float, y0: float, x1: float, y1: float, r: float) -> np.ndarray:
    it = Item("area", (x0 + x1) / 2, (y0 + y1) / 2)
    return place_poly(rounded_rect((x1 - x0) / 2, (y1 - y0) / 2, r), it)
