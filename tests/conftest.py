"""Shared fixtures: tiny models and bundles that build in well under a second on a CPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lineguard.engines.bundle import Bundle, save_bundle
from lineguard.engines.fusion import Calibration
from lineguard.engines.model import CSADModel, ModelConfig

TINY = ModelConfig(input_size=64, profile="lite", class_names=("background", "a", "b", "c"))


def tiny_model(seed: int = 0, config: ModelConfig = TINY, weights: str | None = None) -> CSADModel:
    """A random-weight model whose buffers look calibrated (non-trivial μ, σ, Σ⁻¹, quantiles)."""
    torch.manual_seed(seed)
    model = CSADModel(config, backbone_weights=weights).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for g in config.hist_grids:
            n = (config.num_classes - 1) * g * g
            a = torch.randn(n, n, generator=gen)
            model.patch_hist.set_gaussian(
                g, torch.rand(n, generator=gen).numpy(), (a @ a.T / n + torch.eye(n)).numpy()
            )
            model.patch_hist.set_normalisation(g, 0.5, 2.0)
        model.lgst.teacher.mean.normal_(0, 0.1, generator=gen)
        model.lgst.teacher.std.uniform_(0.5, 1.5, generator=gen)
        model.lgst.q_local_b.fill_(3.0)
        model.lgst.q_global_b.fill_(2.0)
    return model


def random_images(n: int, size: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    model = tiny_model()
    path: Path = tmp_path_factory.mktemp("bundles") / "tiny"
    return save_bundle(model, path, Calibration.neutral(model.config.branches, threshold=1.0))
