"""The synthetic line generator: layout, determinism, ground truth that matches the pixels."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.offline import synth
from lineguard.offline.synth import (
    LOGICAL_SUBTYPES,
    STRUCTURAL_SUBTYPES,
    SynthSummary,
    apply_anomaly,
    make_line,
    make_scene,
    render,
    render_masks,
    sample_good,
    scene_rng,
)
from lineguard.offline.synth import writer as synth_writer
from tests.offline.conftest import TINY_COUNTS, make_tiny

FOLDERS = {
    "train": "train/good",
    "validation": "validation/good",
    "test_good": "test/good",
    "test_logical": "test/logical_anomalies",
    "test_structural": "test/structural_anomalies",
}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _read(path: Path, flags: int = cv2.IMREAD_UNCHANGED) -> np.ndarray:
    img = cv2.imread(str(path), flags)
    assert img is not None, path
    return img


def test_layout_and_counts(tiny_line: SynthSummary) -> None:
    root = tiny_line.root
    expected = TINY_COUNTS
    assert tiny_line.counts == expected
    for split, folder in FOLDERS.items():
        names = sorted(p.name for p in (root / folder).iterdir())
        assert names == [f"{i:03d}.png" for i in range(expected[split])]
    img = _read(root / "train/good/000.png")
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8


def test_meta_matches_files_and_masks(tiny_line: SynthSummary) -> None:
    root = tiny_line.root
    meta = json.loads((root / "meta.json").read_text())
    assert meta["seed"] == 3 and meta["kind"] == "tray" and meta["size"] == [64, 64]
    assert meta["counts"] == tiny_line.counts
    assert meta["complete"] is True
    records = {r["path"]: r for r in meta["images"]}
    tests = {p.relative_to(root).as_posix() for p in (root / "test").rglob("*.png")}
    assert set(records) == tests
    seen: dict[str, set[str]] = {"logical": set(), "structural": set()}
    for rel, r in records.items():
        img = _read(root / rel)
        if rel.startswith("test/good/"):
            assert r["anomaly_type"] == "good" and r["subtype"] is None and r["masks"] == []
            continue
        kind = "logical" if "logical_anomalies" in rel else "structural"
        assert r["anomaly_type"] == kind
        seen[kind].add(r["subtype"])
        assert r["masks"], rel
        stem = Path(rel).stem
        gt_dir = root / "ground_truth" / Path(rel).parent.name / stem
        assert sorted(p.relative_to(root).as_posix() for p in gt_dir.iterdir()) == r["masks"]
        for m in r["masks"]:
            mask = _read(root / m)
            assert mask.shape == img.shape[:2] and mask.dtype == np.uint8
            assert set(np.unique(mask).tolist()) <= {0, 255}
            assert mask.any(), m
    assert seen["logical"] == set(LOGICAL_SUBTYPES)
    assert seen["structural"] == set(STRUCTURAL_SUBTYPES)


def test_same_seed_same_bytes_other_seed_other_images(
    tiny_line: SynthSummary, tmp_path: Path
) -> None:
    again = make_tiny(tmp_path / "again", seed=3)
    assert _files(again.root) == _files(tiny_line.root)
    other = make_tiny(tmp_path / "other", seed=4)
    a, b = _files(tiny_line.root), _files(other.root)
    images = {k for k in a if not k.startswith("ground_truth/")}
    assert images == {k for k in b if not k.startswith("ground_truth/")}
    for rel in ("train/good/000.png", "test/logical_anomalies/000.png"):
        assert a[rel] != b[rel]


def test_test_images_do_not_depend_on_other_split_sizes(tmp_path: Path) -> None:
    small = make_line(
        tmp_path / "a",
        seed=1,
        n_train=1,
        n_val=0,
        n_test_good=0,
        n_test_logical=2,
        n_test_structural=0,
        size=64,
    )
    large = make_line(
        tmp_path / "b",
        seed=1,
        n_train=3,
        n_val=2,
        n_test_good=1,
        n_test_logical=2,
        n_test_structural=0,
        size=64,
    )
    for rel in ("train/good/000.png", "test/logical_anomalies/001.png"):
        assert (small.root / rel).read_bytes() == (large.root / rel).read_bytes()


def _changed(kind: str, seed: int, anomaly_type: str, subtype: str, size: int, thresh: int):
    """Render the good scene and its anomalous edit from the same random stream."""
    rng = scene_rng(seed, "test_logical", 0)
    good = sample_good(kind, rng)
    bad = apply_anomaly(kind, good, anomaly_type, subtype, rng)
    diff = np.abs(render(good, size).astype(int) - render(bad, size).astype(int)).max(axis=2)
    masks = render_masks(bad, size)
    union = np.zeros((size, size), np.uint8)
    for m in masks:
        union |= m
    return diff > thresh, union, masks, bad


LOGICAL_CASES = [(k, s) for k, p in sorted(synth.PRODUCTS.items()) for s in p.logical_subtypes]


@pytest.mark.parametrize(("kind", "subtype"), LOGICAL_CASES)
def test_each_logical_subtype_changes_the_image_where_the_mask_says(
    kind: str, subtype: str
) -> None:
    for seed in range(4):
        changed, union, masks, bad = _changed(kind, seed, "logical", subtype, 64, 40)
        assert bad.anomaly_type == "logical" and bad.subtype == subtype
        assert masks and all(m.any() for m in masks)
        assert changed[union > 0].sum() >= 4, (kind, subtype, seed, bad.detail)
        # Shadows move with parts, so allow a little change just outside the mask.
        near = cv2.dilate(union, np.ones((7, 7), np.uint8)) > 0
        assert changed[near].sum() >= 0.7 * changed.sum(), (kind, subtype, seed, bad.detail)


@pytest.mark.parametrize("kind", sorted(synth.PRODUCTS))
@pytest.mark.parametrize("subtype", STRUCTURAL_SUBTYPES)
def test_each_structural_subtype_changes_the_image_inside_its_mask(kind: str, subtype: str) -> None:
    for seed in range(4):
        changed, union, masks, bad = _changed(kind, seed, "structural", subtype, 128, 20)
        assert bad.anomaly_type == "structural" and bad.subtype == subtype
        assert len(masks) == 1 and masks[0].any()
        assert changed[union > 0].sum() >= 3, (kind, subtype, seed, bad.detail)
        near = cv2.dilate(union, np.ones((5, 5), np.uint8)) > 0
        assert not changed[~near].any(), (kind, subtype, seed, bad.detail)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    index=st.integers(0, 500),
    split=st.sampled_from(["train", "test_good", "test_logical", "test_structural"]),
    kind=st.sampled_from(sorted(synth.PRODUCTS)),
)
def test_any_scene_renders_with_matching_masks(
    seed: int, index: int, split: str, kind: str
) -> None:
    scene = make_scene(kind, seed, split, index)
    img = render(scene, 64)
    assert img.shape == (64, 64, 3) and img.dtype == np.uint8
    assert np.array_equal(img, render(scene, 64))
    masks = render_masks(scene, 64)
    assert bool(masks) == (split in ("test_logical", "test_structural"))
    assert all(m.shape == (64, 64) and m.any() for m in masks)


def test_connectors_product_writes_a_line(tmp_path: Path) -> None:
    s = make_line(
        tmp_path / "c",
        seed=0,
        n_train=2,
        n_val=1,
        n_test_good=1,
        n_test_logical=6,
        n_test_structural=3,
        size=64,
        kind="connectors",
        progress=True,
    )
    meta = json.loads((s.root / "meta.json").read_text())
    assert meta["kind"] == "connectors"
    subtypes = {r["subtype"] for r in meta["images"] if r["anomaly_type"] == "logical"}
    assert subtypes == set(LOGICAL_SUBTYPES)


def test_rewriting_a_line_drops_stale_images(tmp_path: Path) -> None:
    make_line(
        tmp_path / "l",
        n_train=3,
        n_val=1,
        n_test_good=1,
        n_test_logical=1,
        n_test_structural=1,
        size=48,
    )
    make_line(
        tmp_path / "l",
        n_train=1,
        n_val=1,
        n_test_good=0,
        n_test_logical=0,
        n_test_structural=0,
        size=48,
    )
    assert sorted(p.name for p in (tmp_path / "l/train/good").iterdir()) == ["000.png"]
    assert not (tmp_path / "l/test").exists()


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"kind": "teapot"}, "'teapot'"),
        ({"size": 16}, "16"),
        ({"seed": -1}, "-1"),
        ({"n_train": -2}, "n_train"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=r"use|must") as info:
        make_line(tmp_path / "x", **kwargs)
    assert needle in str(info.value)
    assert not (tmp_path / "x" / "train").exists()


def test_refuses_to_write_into_a_foreign_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(LineguardError, match="not empty") as info:
        make_line(
            tmp_path,
            n_train=1,
            n_val=0,
            n_test_good=0,
            n_test_logical=0,
            n_test_structural=0,
            size=48,
        )
    assert str(tmp_path) in str(info.value)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_names_sort_in_index_order() -> None:
    assert synth_writer._name(7, 10) == "007"
    assert synth_writer._name(7, 1500) == "0007"
    names = [synth_writer._name(i, 1001) for i in range(1001)]
    assert names == sorted(names)
