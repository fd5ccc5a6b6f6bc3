"""Long parts are not squashed: the input takes the parts' aspect, and every branch, the
histogram grids, the maps, the export and the runtimes handle height ≠ width."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from lineguard.engines.bundle import load_bundle, save_bundle
from lineguard.engines.errors import ConfigError
from lineguard.engines.fusion import Calibration
from lineguard.engines.input_size import format_input_size, parse_input_size
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.engines.runtimes import open_runtime
from lineguard.offline.datasets import (
    input_size_for_aspect,
    load_image,
    median_aspect,
    open_dataset,
)
from lineguard.offline.evaluate import evaluate_bundle
from lineguard.offline.synth import make_line
from lineguard.offline.train import train_bundle
from tests.offline.test_training import TINY_PRESET

LONG = (64, 160)  # height, width of the long test input


def test_input_sizes_parse_as_height_by_width() -> None:
    assert parse_input_size(256) == (256, 256)
    assert parse_input_size("256") == (256, 256)
    assert parse_input_size("256x640") == (256, 640)
    assert parse_input_size([64, 160]) == (64, 160)
    assert format_input_size((256, 256)) == "256" and format_input_size((64, 160)) == "64x160"
    for bad in ("250", "256x", "axb", "256x640x3", "0x64"):
        with pytest.raises(ConfigError):
            parse_input_size(bad)
    assert parse_input_size("88x200", multiple=1) == (88, 200)  # a frame size, not a model's


def test_the_automatic_size_keeps_the_pixels_and_takes_the_aspect() -> None:
    # near-square parts stay the 256 px square (MVTec LOCO's 1600×1100 frames included)
    assert input_size_for_aspect(1.0) == (256, 256)
    assert input_size_for_aspect(1600 / 1100) == (256, 256)
    assert input_size_for_aspect(0.83) == (256, 256)
    # a 500×1250 commutator and a 1130×460 spindle keep their shape at about 256² pixels
    wide = input_size_for_aspect(1250 / 500)
    tall = input_size_for_aspect(460 / 1130)
    assert wide == (160, 416) and tall[0] > tall[1]
    for h, w in (wide, tall):
        assert h % 32 == 0 and w % 32 == 0
        assert 0.8 < h * w / 256**2 < 1.25
    # an extreme strip is capped at 4:1 rather than becoming 32 px high
    assert input_size_for_aspect(20.0) == input_size_for_aspect(4.0)
    with pytest.raises(ConfigError):
        input_size_for_aspect(0.0)


def test_model_outputs_have_the_inputs_aspect() -> None:
    config = ModelConfig(
        input_size=LONG,
        class_names=("bg", "a", "b"),
        patch_bank=16,
        hist_bank=4,
        comp_bank=4,
        fewshot_shots=1,
        position_prior=True,
        position_scale=True,
    )
    assert config.map_size == (16, 40) and config.patch_grid == (8, 20)
    assert ModelConfig.from_json(config.to_json()) == config
    assert config.to_json()["input_size"] == [64, 160]
    # a manifest from before non-square inputs names one side
    old = {**config.to_json(), "input_size": 64}
    assert ModelConfig.from_json(old).input_size == (64, 64)
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    images = torch.from_numpy(
        np.random.default_rng(0).integers(0, 256, (3, *LONG, 3), dtype=np.uint8)
    )
    with torch.inference_mode():
        out = model(images)
        one = model(images[:1])
    assert out.scores.shape == (3, len(config.branches))
    assert out.anomaly_map.shape == (3, 1, 16, 40)
    assert out.segmentation.shape == (3, *LONG)
    assert torch.isfinite(out.scores).all()
    torch.testing.assert_close(one.scores, out.scores[:1], rtol=1e-4, atol=1e-4)


def test_histogram_grids_must_divide_both_sides() -> None:
    with pytest.raises(ConfigError, match="both sides"):
        ModelConfig(input_size=(64, 96), hist_grids=(1, 64))  # 64 does not divide 96


def _long_line(root: Path) -> Path:
    """The synthetic tray, stretched to 2.5:1 (a long part with components on it)."""
    square = root / "square"
    make_line(
        square,
        seed=1,
        n_train=8,
        n_val=4,
        n_test_good=3,
        n_test_logical=3,
        n_test_structural=2,
        size=64,
    )
    long = root / "long"
    shutil.copytree(square, long)
    for path in long.rglob("*.png"):
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        interp = cv2.INTER_NEAREST if "ground_truth" in path.parts else cv2.INTER_LINEAR
        cv2.imwrite(str(path), cv2.resize(img, (160, 64), interpolation=interp))
    return long


@pytest.fixture(scope="module")
def long_line(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _long_line(tmp_path_factory.mktemp("long"))


def test_the_median_aspect_of_long_parts(long_line: Path) -> None:
    dataset = open_dataset(long_line)
    assert median_aspect(dataset.train) == pytest.approx(2.5)
    assert input_size_for_aspect(median_aspect(dataset.train)) == (160, 416)


def test_train_and_evaluate_long_parts_and_runtimes_agree(long_line: Path, tmp_path: Path) -> None:
    out = tmp_path / "bundle"
    seen: list[str] = []
    train_bundle(
        long_line, out, preset=TINY_PRESET, input_size="64x160", progress=False, log=seen.append
    )
    bundle = load_bundle(out)
    assert bundle.config.input_size == LONG
    assert bundle.manifest["preprocessing"]["input_size"] == [64, 160]
    result = evaluate_bundle(out, long_line, out_dir=tmp_path / "eval")
    assert np.isfinite(result.fused).all()
    # the same images through the exported graph and through torch give the same outputs
    images = np.stack(
        [load_image(s.path, LONG, bundle.config.codec) for s in open_dataset(long_line).test]
    )
    onnx = open_runtime(bundle, kind="onnxruntime")
    eager = open_runtime(bundle, kind="torch")
    a, b = onnx.run(images), eager.run(images)
    onnx.close()
    eager.close()
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-3, atol=1e-3)
    assert a.anomaly_map.shape == (len(images), 1, 16, 40)
    assert a.segmentation.shape == (len(images), *LONG)
    assert (a.segmentation != b.segmentation).mean() < 0.01


def test_the_faiss_stage_scores_long_parts_as_the_graph(tmp_path: Path) -> None:
    config = ModelConfig(input_size=LONG, class_names=("bg", "a"), patch_bank=24)
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    assert model.patch_knn is not None
    model.patch_knn.set_bank(torch.randn(24, model.patch_knn.bank.shape[1]))
    graph = save_bundle(model, tmp_path / "graph", Calibration.neutral(config.branches))
    faiss_model = CSADModel(replace(config, patch_search="faiss-flat"), backbone_weights=None)
    faiss_model.load_state_dict(model.state_dict())
    faiss = save_bundle(
        faiss_model.eval(), tmp_path / "faiss", Calibration.neutral(config.branches)
    )
    images = np.random.default_rng(1).integers(0, 256, (2, *LONG, 3), dtype=np.uint8)
    a = open_runtime(graph, kind="torch").run(images)
    b = open_runtime(faiss, kind="torch").run(images)
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, rtol=1e-4, atol=1e-4)
