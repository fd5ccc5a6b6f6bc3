"""``bench logical`` end to end on tiny lines: one row per family, JSON written as it goes."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

from lineguard.engines.errors import ConfigError
from lineguard.offline.families_bench import (
    SEEDS,
    LineCounts,
    bench_logical,
    families_of,
    seed_for,
)
from lineguard.offline.synth import PRODUCTS
from tests.offline.test_training import TINY_PRESET


def test_every_family_has_distinct_selection_and_report_seeds() -> None:
    assert set(SEEDS) == set(PRODUCTS)
    for family, (selection, report) in SEEDS.items():
        assert selection != report, family
        assert seed_for(family, "selection") == selection and seed_for(family, "report") == report
    assert families_of("all") == list(PRODUCTS)
    with pytest.raises(ConfigError, match="teapot"):
        families_of("tray,teapot")
    with pytest.raises(ConfigError, match="selection"):
        seed_for("tray", "test")


def test_bench_runs_each_family_and_writes_rows(tmp_path: Path) -> None:
    counts = LineCounts(train=6, validation=4, test_good=4, logical=4, structural=3, size=64)
    out = tmp_path / "bench.json"
    rows, wall = bench_logical(
        ["screwbag"],
        tmp_path / "work",
        role="selection",
        counts=counts,
        preset=TINY_PRESET,
        input_size=64,
        json_path=out,
        keep=True,
        log=lambda _m: None,
    )
    assert [r.family for r in rows] == ["screwbag"]
    for r in rows:
        assert r.seed == SEEDS[r.family][0] and r.role == "selection"
        assert r.logical is not None and 0.0 <= r.logical <= 1.0
        assert r.structural is not None and 0.0 <= r.structural <= 1.0
        assert {"lgst", "patch_hist"} <= set(r.branches)
        subtypes = {k for k in r.subtypes if k.startswith("logical/")}
        assert subtypes == {f"logical/{s}" for s in PRODUCTS[r.family].logical_subtypes}
        assert r.false_reject_rate is not None and r.train_s > 0
    saved = json.loads(out.read_text())
    assert [r["family"] for r in saved["rows"]] == ["screwbag"]
    assert saved["wall_s"] <= wall and saved["counts"]["size"] == 64
    bundle = tmp_path / "work" / "screwbag-1.bundle"
    sheet = cv2.imread(str(bundle / "report" / "components.png"))
    assert sheet is not None and sheet.shape[0] > 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    classes = manifest["extra"]["components"]
    assert [c["class"] for c in classes] == manifest["model"]["class_names"][1:]
    assert all(0 <= c["images"] <= c["of_images"] == 6 for c in classes)


def test_bench_removes_lines_unless_kept(tmp_path: Path) -> None:
    counts = LineCounts(train=3, validation=2, test_good=2, logical=4, structural=3, size=48)
    rows, _ = bench_logical(
        ["bottle"],
        tmp_path,
        counts=counts,
        preset=TINY_PRESET,
        input_size=64,
        log=lambda _m: None,
    )
    assert rows[0].seed == SEEDS["bottle"][1] and rows[0].role == "report"
    assert not (tmp_path / "bottle-0").exists() and not (tmp_path / "bottle-0.bundle").exists()
