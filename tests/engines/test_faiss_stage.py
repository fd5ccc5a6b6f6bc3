"""A patch bank searched by faiss after the engine scores exactly like the in-graph search."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from lineguard.engines.bundle import save_bundle
from lineguard.engines.errors import ConfigError
from lineguard.engines.fusion import Calibration
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.engines.runtimes import open_runtime
from lineguard.offline.calibrate import raw_scores

GRAPH = ModelConfig(
    input_size=64,
    class_names=("bg", "a"),
    patch_bank=48,
    position_prior=True,
    position_scale=True,
    position_scale_knn=True,
)


def _pair() -> tuple[CSADModel, CSADModel]:
    torch.manual_seed(0)
    graph = CSADModel(GRAPH, backbone_weights=None).eval()
    graph.patch_knn.set_bank(torch.randn(48, graph.patch_knn.bank.shape[1]))
    graph.patch_knn.q_a.fill_(0.5)
    graph.patch_knn.q_b.fill_(2.0)
    gh, gw = GRAPH.patch_grid  # the bank's prior lives on its descriptor grid (8×8 at 64 px)
    graph.prior_knn.copy_(torch.linspace(0, 0.2, gh * gw).reshape(1, 1, gh, gw))
    graph.prior_scale_lgst.copy_(torch.linspace(0.5, 2.0, 16 * 16).reshape(1, 1, 16, 16))
    graph.prior_scale_knn.copy_(torch.linspace(0.25, 3.0, gh * gw).reshape(1, 1, gh, gw))
    faiss = CSADModel(replace(GRAPH, patch_search="faiss-flat"), backbone_weights=None).eval()
    faiss.load_state_dict(graph.state_dict())
    return graph, faiss


def test_faiss_stage_matches_the_graph_on_every_runtime(tmp_path: Path) -> None:
    graph, faiss = _pair()
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    np.testing.assert_allclose(raw_scores(faiss, images), raw_scores(graph, images), atol=1e-4)
    cal = Calibration.neutral(GRAPH.branches)
    a = save_bundle(graph, tmp_path / "graph", cal)
    b = save_bundle(faiss, tmp_path / "faiss", cal)
    want = open_runtime(a, kind="onnxruntime").run(images)
    for kind in ("onnxruntime", "torch"):
        got = open_runtime(b, kind=kind, max_batch=2).run(images)  # two chunks, then the stage
        assert got.patch_features is None  # the workers see the usual three outputs
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(got.anomaly_map, want.anomaly_map, rtol=1e-4, atol=1e-4)
    # the bank lives in the weights file, not in the exported graph
    shapes = {tuple(t.dims) for t in onnx.load(str(b.onnx_path)).graph.initializer}
    assert tuple(graph.patch_knn.bank.shape) not in shapes
    assert tuple(graph.patch_knn.bank.shape) in {
        tuple(t.dims) for t in onnx.load(str(a.onnx_path)).graph.initializer
    }


def test_tensorrt_refuses_a_faiss_searched_bundle(tmp_path: Path) -> None:
    from lineguard.engines.runtimes.tensorrt_rt import TensorRTRuntime

    _, faiss = _pair()
    bundle = save_bundle(faiss, tmp_path / "b", Calibration.neutral(GRAPH.branches))
    with pytest.raises(ConfigError, match="onnxruntime or torch"):
        TensorRTRuntime(bundle)
    with pytest.raises(ConfigError, match="patch_search"):
        replace(GRAPH, patch_search="annoy")
