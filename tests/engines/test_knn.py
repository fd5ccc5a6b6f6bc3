"""The patch bank's descriptor: PatchCore's mid-level taps, and the legacy taps old bundles use."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from lineguard.engines.backbones import backbone_spec
from lineguard.engines.errors import ConfigError
from lineguard.engines.knn import descriptor_kind, patch_descriptors, to_map
from lineguard.engines.model import CSADModel, ModelConfig


def _taps(size: int = 64) -> tuple[torch.Tensor, ...]:
    channels = backbone_spec("efficientnet_lite0").channels
    torch.manual_seed(0)
    return tuple(torch.randn(2, channels[s], size // s, size // s) for s in (4, 8, 16))


def test_mid_descriptor_is_patchcores_recipe() -> None:
    f4, f8, f16 = _taps()
    got = patch_descriptors((f4, f8, f16), "mid")
    assert got.shape == (2, 40 + 112, 8, 8)  # lite0 strides 8 + 16 on the stride-8 grid

    def pool(t: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(t, 3, stride=1, padding=1, count_include_pad=False)

    # each tap averaged over its 3×3 neighbourhood first, then the coarse one upsampled
    up = F.interpolate(pool(f16), size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(got, torch.cat([pool(f8), up], dim=1))


def test_shallow_descriptor_is_what_old_bundles_were_fitted_with() -> None:
    f4, f8, f16 = _taps()
    got = patch_descriptors((f4, f8, f16), "shallow")
    assert got.shape == (2, 24 + 40, 16, 16)
    up = F.interpolate(f8, size=(16, 16), mode="bilinear", align_corners=False)
    want = F.avg_pool2d(torch.cat([f4, up], 1), 3, stride=1, padding=1, count_include_pad=False)
    torch.testing.assert_close(got, want)
    with pytest.raises(ConfigError, match="unknown patch descriptor"):
        descriptor_kind("deep")


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "wide_resnet50_2"])
def test_descriptor_width_follows_the_backbone(backbone: str) -> None:
    channels = backbone_spec(backbone).channels
    assert descriptor_kind("mid").dim(channels) == channels[8] + channels[16]
    if backbone == "wide_resnet50_2":
        assert descriptor_kind("mid").dim(channels) == 512 + 1024  # PatchCore's layers 2 and 3


def test_model_scores_on_the_grid_and_shows_the_map_at_a_quarter() -> None:
    config = ModelConfig(input_size=64, class_names=("bg", "a"), patch_bank=16)
    assert config.patch_descriptor == "mid" and config.patch_grid == (8, 8)
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    assert model.patch_knn is not None
    model.patch_knn.set_bank(torch.randn(16, 152))
    images = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
        x = model.preprocess(images)
        features = model.backbone(x)
        knn = model.patch_knn(model.describe_patches(features))
        lgst = model.lgst(x, features)
    assert out.anomaly_map.shape == (3, 1, 16, 16)  # what decide and the dashboard read
    k = config.branches.index("patch_knn")
    # PatchCore's image score: the largest patch distance on the descriptor grid
    torch.testing.assert_close(out.scores[:, k], knn.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(out.anomaly_map, lgst + to_map(knn, (16, 16)))


def test_a_manifest_without_the_field_keeps_the_old_descriptor() -> None:
    written = ModelConfig(input_size=64, patch_bank=8).to_json()
    del written["patch_descriptor"]  # what lineguard wrote before the descriptor was a choice
    old = ModelConfig.from_json(written)
    assert old.patch_descriptor == "shallow" and old.patch_grid == (16, 16)
    model = CSADModel(old, backbone_weights=None)
    assert model.patch_knn is not None and tuple(model.patch_knn.bank.shape) == (8, 64)
    with pytest.raises(ConfigError, match="patch_descriptor"):
        ModelConfig(patch_descriptor="deep")


def test_auto_search_stays_in_the_graph_up_to_the_cap_and_can_be_forced() -> None:
    from lineguard.engines.model import GRAPH_SEARCH_MAX, resolve_patch_search
    from lineguard.offline.banks import PATCH_BANK_CAP

    assert GRAPH_SEARCH_MAX >= PATCH_BANK_CAP  # a default bank runs everywhere, TensorRT too
    assert resolve_patch_search("auto", GRAPH_SEARCH_MAX) == "graph"
    assert resolve_patch_search("auto", GRAPH_SEARCH_MAX + 1).startswith("faiss-")
    assert resolve_patch_search("graph", 10**6) == "graph"  # forced
    assert resolve_patch_search("faiss-ivf", 16) == "faiss-ivf"
