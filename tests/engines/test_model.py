"""The fused module: shapes, batch invariance, ONNX parity with a real dynamic batch axis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from lineguard.engines.errors import ConfigError, InputError
from lineguard.engines.export import export_onnx
from lineguard.engines.model import CSADModel, ModelConfig
from tests.conftest import TINY, random_images, tiny_model


def run_torch(model: CSADModel, images: np.ndarray) -> tuple[np.ndarray, ...]:
    with torch.inference_mode():
        return tuple(model(torch.from_numpy(images)).map(lambda t: t.numpy())[:3])


def test_outputs_have_documented_shapes_and_dtypes() -> None:
    scores, amap, seg = run_torch(tiny_model(), random_images(3))
    assert scores.shape == (3, 2) and scores.dtype == np.float32
    assert amap.shape == (3, 1, 16, 16) and amap.dtype == np.float32
    assert seg.shape == (3, 64, 64) and seg.dtype == np.uint8
    assert np.isfinite(scores).all()


def test_batch_scores_equal_single_image_scores() -> None:
    model, images = tiny_model(), random_images(5, seed=3)
    batch = run_torch(model, images)[0]
    singles = np.concatenate([run_torch(model, images[i : i + 1])[0] for i in range(5)])
    np.testing.assert_allclose(batch, singles, atol=1e-4)


def test_other_frame_sizes_are_resized_inside() -> None:
    scores, _, seg = run_torch(tiny_model(), random_images(2, size=96))
    assert scores.shape == (2, 2) and seg.shape == (2, 64, 64)


def test_bad_input_and_config_are_refused() -> None:
    with pytest.raises(InputError, match=r"\[B, H, W, 3\]"):
        tiny_model()(torch.zeros(2, 3, 64, 64, dtype=torch.uint8))
    with pytest.raises(ConfigError, match="multiple of 32"):
        ModelConfig(input_size=100)
    with pytest.raises(ConfigError, match="unknown profile"):
        ModelConfig(profile="huge")
    with pytest.raises(ConfigError, match="unknown backbone"):
        ModelConfig(backbone="vgg")


def export_and_session(model: CSADModel, path: Path) -> Any:
    import onnxruntime as ort

    export_onnx(model, path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("pretrained", [False, True], ids=["random", "lite0-imagenet"])
def test_onnx_exported_at_batch_1_matches_torch_at_batch_3(
    tmp_path: Path, pretrained: bool
) -> None:
    model = tiny_model(weights="imagenet" if pretrained else None)
    session = export_and_session(model, tmp_path / "m.onnx")
    graph_input = onnx.load(str(tmp_path / "m.onnx")).graph.input[0]
    assert graph_input.type.tensor_type.shape.dim[0].dim_param == "batch"
    images = random_images(3, seed=7)
    got = session.run(None, {"images": images})
    want = run_torch(model, images)
    np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(got[1], want[1], atol=1e-4, rtol=1e-4)
    assert (got[2] != want[2]).mean() < 1e-3  # argmax may flip on exact ties only


def test_onnx_batch_invariance(tmp_path: Path) -> None:
    session = export_and_session(tiny_model(seed=1), tmp_path / "m.onnx")
    images = random_images(4, seed=11)
    batch = session.run(["scores"], {"images": images})[0]
    singles = np.concatenate(
        [session.run(["scores"], {"images": images[i : i + 1]})[0] for i in range(4)]
    )
    np.testing.assert_allclose(batch, singles, atol=1e-4)


def test_paper_profile_builds_with_wrn50() -> None:
    config = ModelConfig(
        backbone="wide_resnet50_2", profile="paper", input_size=64, class_names=TINY.class_names
    )
    scores, amap, _ = run_torch(CSADModel(config, backbone_weights=None).eval(), random_images(1))
    assert scores.shape == (1, 2) and amap.shape == (1, 1, 16, 16)
