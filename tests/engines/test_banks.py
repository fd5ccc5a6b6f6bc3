"""PSAD's image banks and the training-free few-shot branch, against plain numpy references."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lineguard.engines.banks import (
    FewShotBank,
    ImageBank,
    class_shares,
    composition,
    fewshot_descriptors,
)
from lineguard.engines.model import CSADModel, ModelConfig


def test_image_bank_distances_and_leave_one_out_match_numpy() -> None:
    rng = np.random.default_rng(0)
    good = rng.normal(0, [1.0, 5.0, 0.0], (12, 3))  # one dimension never varies
    bank = ImageBank(3, 12)
    loo = bank.fit(good)
    scale = np.maximum(good.std(axis=0), 1e-3)
    z = (good - good.mean(axis=0)) / scale
    d = np.linalg.norm(z[:, None] - z[None], axis=2)
    np.fill_diagonal(d, np.inf)
    np.testing.assert_allclose(loo, d.min(axis=1), rtol=1e-6)
    test = np.concatenate([good[:2], rng.normal(0, 1, (3, 3))])
    want = np.linalg.norm(((test - good.mean(0)) / scale)[:, None] - z[None], axis=2).min(1)
    got = bank(torch.from_numpy(test).float()).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
    assert got[:2] == pytest.approx(0.0, abs=1e-2)  # a good image is in its own bank
    # the constant dimension has a floored scale: leaving it is far from every good image
    moved = good[:1].copy()
    moved[0, 2] = 0.1
    assert float(bank(torch.from_numpy(moved).float())) > 10 * float(loo.max())
    with pytest.raises(ValueError, match="bank needs"):
        bank.fit(good[:5])


def test_class_shares_and_composition() -> None:
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    labels[0, :4, :4] = 1  # a quarter of class 1
    labels[1, :, :2] = 2
    shares = class_shares(labels, 3, 8)
    np.testing.assert_allclose(shares.numpy(), [[0.75, 0.25, 0.0], [0.75, 0.0, 0.25]])
    desc = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).reshape(2, 2, 4, 4)
    comp = composition(desc, labels, 3, 2).reshape(2, 2, 2)  # [B, class, D]
    np.testing.assert_allclose(comp[0, 0].numpy(), desc[0, :, :2, :2].mean(dim=(1, 2)).numpy())
    assert comp[0, 1].abs().sum() == 0  # class 2 absent from image 0: a zero vector
    np.testing.assert_allclose(comp[1, 1].numpy(), desc[1, :, :, :1].mean(dim=(1, 2)).numpy())


def _scene(rng: np.random.Generator, square: bool) -> np.ndarray:
    """A textured background with a bright part in the middle (and maybe a dark square on it)."""
    img = rng.integers(90, 110, (64, 64, 3)).astype(np.uint8)
    img[16:48, 16:48] = (200, 60, 40)
    if square:
        img[28:36, 28:36] = (0, 0, 255)
    return img


def test_fewshot_bank_masks_background_and_finds_a_defect() -> None:
    torch.manual_seed(0)
    model = CSADModel(ModelConfig(input_size=128, fewshot_shots=2)).eval()  # ImageNet lite0
    rng = np.random.default_rng(0)
    shots = np.stack([_scene(rng, False) for _ in range(2)])
    from lineguard.offline.banks import fit_fewshot_bank

    with torch.no_grad():
        info = fit_fewshot_bank(model, shots)
        # the part covers a quarter of the image (plus a rim of cells that straddle its edge)
        assert info["masking"] == 1.0 and 0.15 < info["foreground_fraction"] < 0.35
        assert len(info["loo"]) == 2
        tests = np.stack([_scene(rng, False), _scene(rng, True)])
        scores = model(torch.from_numpy(tests)).scores[:, -1].numpy()
    assert scores[1] > scores[0]
    # a frame-filling texture: everything looks like the border, masking switches off
    flat = CSADModel(ModelConfig(input_size=256, fewshot_shots=1)).eval()
    texture = rng.integers(90, 110, (1, 64, 64, 3)).astype(np.uint8)
    with torch.no_grad():
        assert fit_fewshot_bank(flat, texture)["masking"] == 0.0
        assert fit_fewshot_bank(flat, texture)["loo"] == []  # no leave-one-out from one shot


def test_fewshot_descriptors_are_unit_length() -> None:
    d = fewshot_descriptors(torch.randn(2, 5, 8, 8), torch.randn(2, 7, 4, 4))
    assert d.shape == (2, 64, 12)
    np.testing.assert_allclose(d.norm(dim=2).numpy(), 1.0, rtol=1e-5)
    bank = FewShotBank(12, 1, 8)
    with pytest.raises(ValueError, match="few-shot bank needs"):
        bank.fit(d)


def test_every_bank_exports_with_a_batch_axis(tmp_path: Path) -> None:
    import onnxruntime as ort

    from lineguard.engines.export import export_onnx

    config = ModelConfig(
        input_size=64,
        class_names=("bg", "a", "b"),
        patch_bank=32,
        hist_bank=6,
        comp_bank=6,
        fewshot_shots=2,
    )
    assert config.branches[2:] == ("patch_knn", "hist_knn", "comp_knn", "fewshot_knn")
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    model.patch_knn.set_bank(torch.randn(32, model.patch_knn.bank.shape[1]))
    model.hist_knn.fit(np.random.default_rng(1).dirichlet(np.ones(3), 6))
    model.comp_knn.fit(np.random.default_rng(2).normal(size=(6, model.comp_knn.bank.shape[1])))
    model.fewshot_knn.bank.copy_(torch.nn.functional.normalize(torch.randn(128, 152), dim=1))
    export_onnx(model, tmp_path / "m.onnx")
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"))
    got = session.run(["scores"], {"images": images})[0]
    one = session.run(["scores"], {"images": images[1:2]})[0]
    with torch.inference_mode():
        want = model(torch.from_numpy(images)).scores.numpy()
    assert got.shape == (3, 6)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(one[0], got[1], rtol=1e-4, atol=1e-4)
