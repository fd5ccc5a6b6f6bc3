"""The pushpin, screw-bag and bottle families: each good scene keeps its family's rule, each
logical subtype breaks it (checked on the scene data, independently of how the edit was made),
and each family writes a whole line with masks, deterministically.
"""

from __future__ import annotations

import json
import typing
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from lineguard.offline import synth
from lineguard.offline.synth import apply_anomaly, make_line, render_masks, sample_good, scene_rng
from lineguard.offline.synth.bottle import DRINKS, FILL, LABEL_DY, label_spot
from lineguard.offline.synth.pushpins import COLS, ROWS, cell_of
from lineguard.offline.synth.scene import STRUCTURAL_SUBTYPES, YELLOW, Scene
from lineguard.offline.synth.screwbag import COUNTS

NEW_FAMILIES = ("pushpins", "screwbag", "bottle")


def _pushpin_faults(scene: Scene) -> list[str]:
    """What breaks "one yellow pushpin per compartment" (empty if nothing does)."""
    per_cell = Counter(cell_of(it.x, it.y) for it in scene.items)
    faults = [f"cell {rc} holds {n}" for rc, n in per_cell.items() if n != 1]
    faults += [
        f"cell {(r, c)} empty" for r in range(ROWS) for c in range(COLS) if not per_cell[(r, c)]
    ]
    for it in scene.items:
        if it.kind != "pushpin":
            faults.append(f"{it.slot} is a {it.kind}")
        elif np.abs(np.subtract(it.colour, YELLOW)).max() > 40:
            faults.append(f"{it.slot} is coloured {it.colour}")
    return faults


def _screwbag_faults(scene: Scene) -> list[str]:
    """What breaks "two long screws, two short, one nut, two washers, nothing else"."""
    counts = Counter(it.kind for it in scene.items)
    return [
        f"{k}: {counts[k]} not {COUNTS.get(k, 0)}"
        for k in set(counts) | set(COUNTS)
        if counts[k] != COUNTS.get(k, 0)
    ]


def _bottle_faults(scene: Scene) -> list[str]:
    """What breaks "filled to the mark, the drink's label, at its height, straight"."""
    bottles = [it for it in scene.items if it.kind == "bottle"]
    labels = [it for it in scene.items if it.kind == "label"]
    assert len(bottles) == 1
    bottle = bottles[0]
    faults = []
    if abs(bottle.params[0] - FILL) > 0.05:
        faults.append(f"filled to {bottle.params[0]:.2f}")
    if len(labels) != 1:
        return [*faults, f"{len(labels)} labels"]
    label = labels[0]
    liquid = np.array(bottle.params[1:4])
    drink = int(np.argmin([np.abs(liquid - np.array(d[1])).sum() for d in DRINKS]))
    if int(label.params[0]) != drink:
        faults.append(f"{DRINKS[int(label.params[0])][0]} label on {DRINKS[drink][0]}")
    x, y = label_spot(bottle, LABEL_DY)
    if np.hypot(label.x - x, label.y - y) > 0.03:
        faults.append("label off its place")
    if abs(label.angle - bottle.angle) > 5:
        faults.append("label turned")
    return faults


FAULTS = {"pushpins": _pushpin_faults, "screwbag": _screwbag_faults, "bottle": _bottle_faults}


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_good_scenes_keep_the_rule(kind: str) -> None:
    for i in range(20):
        scene = sample_good(kind, scene_rng(11, "train", i))
        assert FAULTS[kind](scene) == [], (kind, i)


@pytest.mark.parametrize(
    ("kind", "subtype"),
    [(k, s) for k in NEW_FAMILIES for s in synth.PRODUCTS[k].logical_subtypes],
)
def test_each_logical_subtype_breaks_the_rule(kind: str, subtype: str) -> None:
    for seed in range(8):
        rng = scene_rng(seed, "test_logical", 0)
        bad = apply_anomaly(kind, sample_good(kind, rng), "logical", subtype, rng)
        assert FAULTS[kind](bad), (kind, subtype, seed, bad.detail)
        assert all(m.any() for m in render_masks(bad, 64)), (kind, subtype, seed)


def test_screwbag_subtypes_break_it_by_counts() -> None:
    """Missing and extra change one kind's count by one; a wrong kind keeps the total."""
    for subtype, total in (("missing", -1), ("extra", 1), ("wrong_kind", 0), ("foreign", 1)):
        rng = scene_rng(5, "test_logical", 1)
        bad = apply_anomaly("screwbag", sample_good("screwbag", rng), "logical", subtype, rng)
        assert len(bad.items) - sum(COUNTS.values()) == total, subtype


@pytest.mark.parametrize("kind", NEW_FAMILIES)
@pytest.mark.parametrize("subtype", STRUCTURAL_SUBTYPES)
def test_structural_defects_keep_the_rule_and_have_masks(kind: str, subtype: str) -> None:
    for seed in range(4):
        rng = scene_rng(seed, "test_structural", 0)
        bad = apply_anomaly(kind, sample_good(kind, rng), "structural", subtype, rng)
        assert FAULTS[kind](bad) == [], (kind, subtype, seed)
        masks = render_masks(bad, 64)
        assert len(masks) == 1 and masks[0].any(), (kind, subtype, seed, bad.detail)


@pytest.mark.parametrize("kind", NEW_FAMILIES)
def test_family_line_layout_meta_and_determinism(kind: str, tmp_path: Path) -> None:
    subtypes = synth.PRODUCTS[kind].logical_subtypes
    args = dict(
        seed=2,
        n_train=2,
        n_val=1,
        n_test_good=1,
        n_test_logical=len(subtypes),
        n_test_structural=3,
        size=64,
        kind=kind,
    )
    a = make_line(tmp_path / "a", **args)  # type: ignore[arg-type]
    b = make_line(tmp_path / "b", **args)  # type: ignore[arg-type]
    meta = json.loads((a.root / "meta.json").read_text())
    assert meta["kind"] == kind and meta["subtypes"]["logical"] == list(subtypes)
    logical = [r for r in meta["images"] if r["anomaly_type"] == "logical"]
    assert sorted(r["subtype"] for r in logical) == sorted(subtypes)
    assert all(r["masks"] for r in meta["images"] if r["anomaly_type"] != "good")
    files = sorted(p.relative_to(a.root).as_posix() for p in a.root.rglob("*.png"))
    assert "train/good/001.png" in files and "validation/good/000.png" in files
    for rel in files:
        assert (a.root / rel).read_bytes() == (b.root / rel).read_bytes(), rel
    other = make_line(tmp_path / "c", **{**args, "seed": 3})  # type: ignore[arg-type]
    assert (other.root / "train/good/000.png").read_bytes() != (
        a.root / "train/good/000.png"
    ).read_bytes()


def test_cli_offers_every_family() -> None:
    from lineguard.stream.cli import offline

    hints = typing.get_type_hints(offline.synth, include_extras=True)
    literal = typing.get_args(hints["kind"])[0]
    assert set(typing.get_args(literal)) == set(synth.PRODUCTS)
