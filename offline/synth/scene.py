"""A synthetic scene as plain data: the items on it, the defects on them, how it was lit.

A scene is described before it is drawn, so an anomaly is an edit of a good scene and its
ground-truth mask comes from the same geometry as its pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

RGB = tuple[int, int, int]


T = TypeVar("T")


LOGICAL_SUBTYPES = ("missing", "extra", "swapped", "wrong_kind", "wrong_count", "wrong_colour")


STRUCTURAL_SUBTYPES = ("scratch", "contamination", "dent")


# Stable stream ids: one random stream per (seed, split, index), independent of split sizes.
SPLIT_IDS = {"train": 1, "validation": 2, "test_good": 3, "test_logical": 4, "test_structural": 5}


FORMAT_VERSION = 1


MIN_SIZE = 48


RED: RGB = (196, 38, 34)


YELLOW: RGB = (232, 196, 52)


BLUE: RGB = (38, 78, 186)


WHITE: RGB = (232, 230, 220)


BROWN: RGB = (150, 98, 52)


ORANGE: RGB = (226, 118, 38)


HOUSING: RGB = (214, 214, 206)


TRAY: RGB = (202, 194, 174)


# Foreign matter for contamination; one that contrasts with what it lands on is chosen.
DIRT: dict[str, RGB] = {
    "oil": (46, 38, 32),
    "mould": (88, 120, 58),
    "rust": (158, 74, 30),
    "dust": (120, 116, 106),
}


COLOUR_NAMES: dict[RGB, str] = {RED: "red", YELLOW: "yellow", BLUE: "blue", WHITE: "white"}


@dataclass(frozen=True)
class Item:
    """One component instance in canonical coordinates (the unit square, before the pose).

    ``size`` is the kind's characteristic length (radius, half-length, pin pitch); ``tex``
    seeds the texture details so that drawing an item twice gives the same pixels.
    """

    kind: str
    x: float
    y: float
    angle: float = 0.0
    size: float = 0.05
    colour: RGB = (128, 128, 128)
    tex: int = 0
    slot: str = ""
    params: tuple[float, ...] = ()


@dataclass(frozen=True)
class Defect:
    """A structural defect: a scratch, a contamination or a dent on item ``target``."""

    kind: str
    points: tuple[tuple[float, float], ...]
    radius: float = 0.0
    colour: RGB = (0, 0, 0)
    target: int = -1
    tex: int = 0


@dataclass(frozen=True)
class Look:
    """Everything about the capture that is not the product: pose, light, noise, background."""

    dx: float = 0.0
    dy: float = 0.0
    theta: float = 0.0  # degrees
    brightness: float = 1.0
    contrast: float = 1.0
    gradient: float = 0.0
    gradient_dir: float = 0.0  # radians
    noise: float = 2.0
    background: RGB = (62, 66, 72)
    bg_seed: int = 0
    noise_seed: int = 0


@dataclass(frozen=True)
class Scene:
    """A product instance: items, capture conditions, defects and ground-truth regions.

    Each region is one ground-truth mask file: the union of the footprints it lists (an item
    footprint may belong to an item that is not drawn, e.g. where a missing part should be).
    """

    product: str
    items: tuple[Item, ...]
    look: Look
    defects: tuple[Defect, ...] = ()
    regions: tuple[tuple[Item | Defect, ...], ...] = ()
    anomaly_type: str = "good"
    subtype: str | None = None
    detail: str = ""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_line` wrote and how long it took."""

    root: Path
    kind: str
    seed: int
    size: int
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
