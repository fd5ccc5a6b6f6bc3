"""Histograms, Mahalanobis and trimmed statistics against plain numpy references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineguard.engines.histogram import (
    PatchHistogram,
    class_histograms,
    fit_gaussian,
    mahalanobis,
    trimmed_stats,
)


def numpy_histograms(labels: np.ndarray, num_classes: int, grid: int) -> np.ndarray:
    _, h, w = labels.shape
    ch, cw = h // grid, w // grid
    rows = []
    for img in labels:
        cells = np.zeros((num_classes - 1, grid, grid))
        for gy in range(grid):
            for gx in range(grid):
                cell = img[gy * ch : (gy + 1) * ch, gx * cw : (gx + 1) * cw]
                for c in range(1, num_classes):
                    cells[c - 1, gy, gx] = np.mean(cell == c)
        rows.append(cells.ravel())
    return np.stack(rows)


@pytest.mark.parametrize("grid", [1, 2, 4])
def test_histograms_match_numpy(grid: int) -> None:
    labels = np.random.default_rng(grid).integers(0, 5, (3, 32, 32))
    got = class_histograms(torch.from_numpy(labels), 5, grid, 32).numpy()
    np.testing.assert_allclose(got, numpy_histograms(labels, 5, grid), atol=1e-6)


def test_mahalanobis_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 4))
    mean, inv = fit_gaussian(rng.normal(size=(50, 4)))
    ref = [np.sqrt((r - mean) @ inv @ (r - mean)) for r in x]
    got = mahalanobis(torch.from_numpy(x).float(), torch.from_numpy(mean), torch.from_numpy(inv))
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5)


def test_fit_gaussian_matches_regularised_numpy_inverse() -> None:
    x = np.random.default_rng(1).normal(size=(40, 3))
    mean, inv = fit_gaussian(x)
    cov = np.cov(x, rowvar=False)
    ridge = 1e-2 * np.mean(np.diag(cov)) + 1e-6
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-5)
    np.testing.assert_allclose(inv, np.linalg.inv(cov + ridge * np.eye(3)), rtol=1e-4)


def test_singular_covariance_gives_finite_scores() -> None:
    # Class 2 never appears on good parts: a zero-variance direction.
    goods = np.random.default_rng(2).uniform(0.1, 0.2, size=(30, 3))
    goods[:, 1] = 0.0
    mean, inv = fit_gaussian(goods)
    assert np.all(np.isfinite(inv))
    normal = torch.tensor([[0.15, 0.0, 0.15]])
    odd = torch.tensor([[0.15, 0.3, 0.15]])  # the never-seen class shows up
    s_normal = mahalanobis(normal, torch.from_numpy(mean), torch.from_numpy(inv))
    s_odd = mahalanobis(odd, torch.from_numpy(mean), torch.from_numpy(inv))
    assert torch.isfinite(s_odd).all() and torch.isfinite(s_normal).all()
    assert s_odd.item() > 10 * s_normal.item()  # the pseudo-inverse would have scored it ~0


def test_single_sample_and_constant_features_stay_finite() -> None:
    mean, inv = fit_gaussian(np.ones((1, 4)))
    assert np.all(np.isfinite(inv)) and np.all(np.isfinite(mean))
    mean, inv = fit_gaussian(np.zeros((10, 4)))
    assert np.all(np.isfinite(inv))


def test_trimmed_stats_match_numpy() -> None:
    v = np.concatenate([np.arange(100, dtype=float), [1e6]])
    mu, sigma = trimmed_stats(v)
    lo, hi = np.quantile(v, [0.2, 0.8])
    kept = v[(v >= lo) & (v <= hi)]
    assert mu == pytest.approx(kept.mean()) and sigma == pytest.approx(kept.std())
    _, sigma_const = trimmed_stats(np.full(10, 5.0))
    assert sigma_const > 0


def test_patch_histogram_sums_normalised_detectors() -> None:
    ph = PatchHistogram(num_classes=3, size=8, grids=(1, 2))
    labels = torch.randint(0, 3, (2, 8, 8))
    for g in (1, 2):
        ph.set_normalisation(g, mu=1.0, sigma=2.0)
    raw = ph.detector_scores(labels)
    expected = (raw[1] - 1.0) / 2.0 + (raw[2] - 1.0) / 2.0
    torch.testing.assert_close(ph(labels), expected)
