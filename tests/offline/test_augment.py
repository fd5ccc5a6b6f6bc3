"""The codec augmentation: an extra JPEG round trip on a share of the training images."""

from __future__ import annotations

import cv2
import numpy as np

from lineguard.offline.augment import codec_jitter


def _smooth(n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (n, 6, 6, 3)).astype(np.uint8)
    return np.stack([cv2.resize(im, (48, 32), interpolation=cv2.INTER_CUBIC) for im in low])


def test_codec_jitter_compresses_about_the_asked_share_and_nothing_else() -> None:
    images = _smooth(200)
    out = codec_jitter(images, np.random.default_rng(1), 0.5, qualities=(50, 60))
    assert out.shape == images.shape and out.dtype == np.uint8
    changed = np.array([not np.array_equal(a, b) for a, b in zip(images, out, strict=True)])
    assert 0.35 < changed.mean() < 0.65
    # a JPEG round trip moves pixels a little, not a lot: the image is the same part
    diff = np.abs(out[changed].astype(int) - images[changed].astype(int)).mean()
    assert 0.3 < diff < 12
    # the input is left alone, the same seed gives the same images, and p = 0 is the identity
    assert np.array_equal(images, _smooth(200))
    again = codec_jitter(images, np.random.default_rng(1), 0.5, qualities=(50, 60))
    assert np.array_equal(out, again)
    assert codec_jitter(images, np.random.default_rng(1), 0.0) is images


def test_the_patch_bank_also_holds_compressed_copies_but_never_an_images_twin() -> None:
    """Copies enter the bank's candidates; each image's leave-one-out score still excludes
    its own copy (else it would find its twin and read as perfectly normal)."""
    import torch

    from lineguard.engines.model import CSADModel, ModelConfig
    from lineguard.offline.banks import fit_patch_bank

    config = ModelConfig(input_size=64, class_names=("bg", "a"), patch_bank=256)
    torch.manual_seed(0)
    model = CSADModel(config, backbone_weights=None).eval()
    images = np.stack([cv2.resize(im, (64, 64)) for im in _smooth(6)])
    plain = fit_patch_bank(model, images, codec_share=0.0)
    copies = fit_patch_bank(model, images, codec_share=1.0)
    assert copies["candidates"] == 2 * plain["candidates"]
    ratio = np.asarray(copies["loo"]) / np.asarray(plain["loo"])
    assert ratio.min() > 0.7, ratio  # a twin in the bank would make it ≈ 0
