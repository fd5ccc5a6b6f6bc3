"""Dataset reading: the three layouts, the seeded validation carve, pixels, and clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.offline.datasets import (
    Dataset,
    DatasetNotFoundError,
    EmptySplitError,
    ImageReadError,
    MissingSplitError,
    Sample,
    load_image,
    load_mask,
    open_dataset,
)
from lineguard.offline.synth import SynthSummary

MAGNETIC_TILE = Path("/work/shared/data/magnetic_tile")


def _write(path: Path, img: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), img)
    return path


def _noise(h: int, w: int, seed: int, channels: int = 3) -> np.ndarray:
    shape = (h, w, channels) if channels > 1 else (h, w)
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


@pytest.fixture
def mvtec(tmp_path: Path) -> Path:
    """A tiny MVTec AD layout: 10 goods of mixed sizes and channels, 2 test goods, 2 defects."""
    root = tmp_path / "mvtec"
    for i in range(10):
        h, w = (40 + 3 * i, 50) if i % 2 else (64, 48)
        _write(root / f"train/good/{i:03d}.png", _noise(h, w, i, 1 if i % 3 == 0 else 3))
    for i in range(2):
        _write(root / f"test/good/{i:03d}.png", _noise(32, 32, 100 + i))
    for i in range(2):
        _write(root / f"test/scratch/{i:03d}.png", _noise(32, 32, 200 + i))
        mask = np.zeros((32, 32), np.uint8)
        mask[4 : 10 + i, 5:20] = 255
        _write(root / f"ground_truth/scratch/{i:03d}_mask.png", mask)
    return root


def test_loco_layout_from_a_synthetic_line(tiny_line: SynthSummary) -> None:
    ds = open_dataset(tiny_line.root)
    assert ds.layout == "loco" and ds.root == tiny_line.root
    assert (len(ds.train), len(ds.validation)) == (4, 2)
    assert all(s.label == 0 and s.anomaly_type == "good" and not s.masks for s in ds.train)
    goods = [s for s in ds.test if s.label == 0]
    logical = [s for s in ds.test if s.anomaly_type == "logical"]
    structural = [s for s in ds.test if s.anomaly_type == "structural"]
    assert (len(goods), len(logical), len(structural)) == (2, 6, 3)
    # Subtypes come from the generator's meta.json.
    assert {s.defect for s in logical} == {
        "missing", "extra", "swapped", "wrong_kind", "wrong_count", "wrong_colour"
    }  # fmt: skip
    assert {s.defect for s in structural} == {"scratch", "contamination", "dent"}
    assert all(s.masks and s.label == 1 for s in logical + structural)
    assert ds.test == sorted(ds.test, key=lambda s: s.path)
    assert goods[0].mask_paths is None


def test_loco_masks_of_one_image_are_merged(tiny_line: SynthSummary) -> None:
    ds = open_dataset(tiny_line.root)
    swapped = next(s for s in ds.test if s.defect == "swapped")
    assert len(swapped.masks) == 2
    parts = [np.asarray(cv2.imread(str(p), cv2.IMREAD_GRAYSCALE)) > 0 for p in swapped.masks]
    merged = load_mask(swapped)
    assert merged.dtype == np.uint8 and set(np.unique(merged).tolist()) <= {0, 1}
    assert np.array_equal(merged.astype(bool), parts[0] | parts[1])
    assert load_mask(swapped, 32).shape == (32, 32)
    good = next(s for s in ds.test if s.label == 0)
    assert load_mask(good).shape == (64, 64) and not load_mask(good).any()
    assert load_mask(good, (20, 30)).shape == (20, 30)


def test_loco_without_meta_uses_folder_names(tiny_line: SynthSummary, tmp_path: Path) -> None:
    root = tmp_path / "loco"
    shutil.copytree(tiny_line.root, root)
    (root / "meta.json").unlink()
    ds = open_dataset(root, layout="loco")
    assert {s.defect for s in ds.test if s.label} == {"logical_anomalies", "structural_anomalies"}


def test_loco_without_train_good_names_the_folder(tiny_line: SynthSummary, tmp_path: Path) -> None:
    root = tmp_path / "loco"
    shutil.copytree(tiny_line.root, root)
    shutil.rmtree(root / "train")
    with pytest.raises(MissingSplitError) as info:
        open_dataset(root)
    assert str(root / "train" / "good") in str(info.value)


def test_mvtec_layout(mvtec: Path) -> None:
    ds = open_dataset(mvtec)
    assert ds.layout == "mvtec"
    assert (len(ds.train), len(ds.validation)) == (8, 2)
    assert [s.defect for s in ds.test] == ["good", "good", "scratch", "scratch"]
    bad = ds.test[2]
    assert (bad.label, bad.anomaly_type) == (1, "structural")
    assert bad.masks == (mvtec / "ground_truth/scratch/000_mask.png",)
    m = load_mask(bad)
    assert m.shape == (32, 32) and m.sum() == 6 * 15
    assert ds.counts() == {"train": 8, "validation": 2, "test/good": 2, "test/scratch": 2}


def test_mvtec_validation_carve_is_seeded_and_disjoint(mvtec: Path) -> None:
    a = open_dataset(mvtec, seed=7)
    b = open_dataset(mvtec, seed=7)
    assert a == b
    train, val = {s.path for s in a.train}, {s.path for s in a.validation}
    assert not train & val
    assert train | val == set((mvtec / "train/good").iterdir())
    assert a.train == sorted(a.train, key=lambda s: s.path)
    others = {frozenset(s.path for s in open_dataset(mvtec, seed=k).validation) for k in range(8)}
    assert len(others) > 1
    assert len(open_dataset(mvtec, val_fraction=0.5).validation) == 5
    assert open_dataset(mvtec, val_fraction=0.0).validation == []


def test_plain_folder_layout(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path / f"img{i}.jpg", _noise(30, 40, i))
    _write(tmp_path / "nested/ignored.png", _noise(8, 8, 9))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert ds.layout == "folder" and ds.test == []
    assert len(ds.train) + len(ds.validation) == 5 and len(ds.validation) == 1
    assert all(s.path.parent == tmp_path for s in ds.train + ds.validation)


def test_grayscale_is_replicated_and_channels_are_rgb(tmp_path: Path) -> None:
    gray = _write(tmp_path / "g.png", _noise(20, 24, 0, 1))
    img = load_image(gray)
    assert img.shape == (20, 24, 3) and img.dtype == np.uint8
    assert np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 1], img[..., 2])
    bgr = np.zeros((4, 4, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    assert load_image(_write(tmp_path / "r.png", bgr))[0, 0].tolist() == [255, 0, 0]


def test_sixteen_bit_and_alpha_images(tmp_path: Path) -> None:
    deep = np.full((6, 6), 65535, np.uint16)
    deep[0, 0] = 0
    img = load_image(_write(tmp_path / "d.png", deep))
    assert img.dtype == np.uint8 and img[1, 1].tolist() == [255, 255, 255] and img[0, 0].max() == 0
    rgba = np.zeros((5, 5, 4), np.uint8)
    rgba[..., 0] = 200  # blue
    rgba[..., 3] = 128
    assert load_image(_write(tmp_path / "a.png", rgba))[0, 0].tolist() == [0, 0, 200]


def test_mixed_sizes_are_resized(mvtec: Path) -> None:
    ds = open_dataset(mvtec)
    shapes = {load_image(s.path).shape for s in ds.train}
    assert len(shapes) > 1
    assert {load_image(s.path, 32).shape for s in ds.train} == {(32, 32, 3)}
    assert load_image(ds.train[0].path, (20, 36)).shape == (20, 36, 3)
    assert load_image(ds.train[0].path, 200).shape == (200, 200, 3)


@pytest.mark.parametrize("bad", [0, -3, (10,), (10, 0), "64"])
def test_bad_size_is_a_config_error(mvtec: Path, bad: object) -> None:
    with pytest.raises(ConfigError, match="size"):
        load_image(mvtec / "test/good/000.png", bad)  # type: ignore[arg-type]


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        open_dataset(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    f = _write(tmp_path / "one.png", _noise(4, 4, 0))
    with pytest.raises(DatasetNotFoundError, match="not a folder"):
        open_dataset(f)


def test_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(EmptySplitError, match="cannot tell the layout"):
        open_dataset(tmp_path)
    with pytest.raises(EmptySplitError, match="holds no images") as info:
        open_dataset(tmp_path, layout="folder")
    assert str(tmp_path) in str(info.value)
    (tmp_path / "train/good").mkdir(parents=True)
    with pytest.raises(EmptySplitError) as info:
        open_dataset(tmp_path)
    assert str(tmp_path / "train/good") in str(info.value)


def test_mvtec_without_train_good(tmp_path: Path) -> None:
    (tmp_path / "train/bad").mkdir(parents=True)
    with pytest.raises(MissingSplitError, match="train/good"):
        open_dataset(tmp_path)


def test_explicit_layout_that_does_not_fit(mvtec: Path) -> None:
    with pytest.raises(MissingSplitError, match="validation/good"):
        open_dataset(mvtec, layout="loco")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"layout": "coco"}, "'coco'"),
        ({"val_fraction": 1.0}, "1.0"),
        ({"val_fraction": -0.1}, "-0.1"),
    ],
)
def test_bad_options_are_config_errors(mvtec: Path, kwargs: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_dataset(mvtec, **kwargs)
    assert needle in str(info.value)


def test_corrupt_and_missing_images_name_the_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for path in (broken, empty, tmp_path / "gone.png"):
        with pytest.raises(ImageReadError) as info:
            load_image(path)
        assert str(path) in str(info.value)
        assert isinstance(info.value, LineguardError)
    # A corrupt file is listed like any other and fails, by name, when read.
    _write(tmp_path / "ok.png", _noise(4, 4, 1))
    ds = open_dataset(tmp_path, val_fraction=0.0)
    assert broken in {s.path for s in ds.train}


def test_anomaly_without_ground_truth(tmp_path: Path) -> None:
    img = _write(tmp_path / "x.png", _noise(8, 8, 0))
    with pytest.raises(ImageReadError, match="no ground-truth mask"):
        load_mask(Sample(img, 1, "structural", "crack"))


@pytest.mark.skipif(not MAGNETIC_TILE.is_dir(), reason="magnetic_tile dataset not present")
def test_magnetic_tile_counts() -> None:
    ds: Dataset = open_dataset(MAGNETIC_TILE)
    assert ds.layout == "mvtec"
    assert len(ds.train) + len(ds.validation) == 666
    assert len(ds.validation) == round(0.2 * 666)
    counts = ds.counts()
    expected = {"good": 286, "blowhole": 115, "break": 85, "crack": 57, "fray": 32, "uneven": 99}
    assert {k: counts[f"test/{k}"] for k in expected} == expected
    assert all(s.masks for s in ds.test if s.label)
    bad = next(s for s in ds.test if s.label)
    img, mask = load_image(bad.path), load_mask(bad)
    assert img.ndim == 3 and img.shape[:2] == mask.shape and mask.any()
    assert load_image(bad.path, 64).shape == (64, 64, 3)
