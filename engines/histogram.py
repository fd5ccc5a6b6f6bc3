"""Patch Histogram branch: component-class histograms compared with good parts by Mahalanobis.

A logical anomaly (a missing, extra or misplaced component) changes how many pixels each
component class covers, in the whole image or in one cell of a grid. CSAD measures that as the
Mahalanobis distance of the histogram vector to the distribution of histograms of good parts.

Everything here is batched tensor algebra (a ``[B,F]×[F,F]`` matmul): the reference exports a
per-image Python loop that tracing unrolls into a batch-1 graph, which is what we must not do.
The distance is computed in fp32 even when the CNN runs in fp16: the inverse covariance can
have large entries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# Covariance regularisation. A component whose area never varies on good parts gives a zero
# variance; the reference's pseudo-inverse then ignores that direction entirely, so the
# component appearing where it never does would score zero. Adding a ridge proportional to the
# average variance keeps every direction (and the distance finite) and scales with the data.
RIDGE_RELATIVE = 1e-2
RIDGE_ABSOLUTE = 1e-6


def class_histograms(
    labels: torch.Tensor, num_classes: int, grid: int, size: int | tuple[int, int]
) -> torch.Tensor:
    """Pixel fraction of each foreground class per grid cell, flattened: ``[B, (C-1)·g·g]``.

    Class 0 is background and is left out, as in CSAD (its share is implied by the others).
    ``labels`` is ``[B, H, W]`` with ``size`` = (H, W) (or one side of a square), both sides
    divisible by ``grid``; a g×g grid on a non-square input has cells of the input's aspect.
    The size is passed as Python ints so the pooling kernel is a constant in the exported graph.
    """
    h, w = (size, size) if isinstance(size, int) else size
    classes = torch.arange(1, num_classes, device=labels.device, dtype=labels.dtype)
    onehot = (labels.unsqueeze(1) == classes.view(1, -1, 1, 1)).to(torch.float32)
    cells = F.avg_pool2d(onehot, kernel_size=(h // grid, w // grid))
    return cells.flatten(1)


def mahalanobis(x: torch.Tensor, mean: torch.Tensor, inv_cov: torch.Tensor) -> torch.Tensor:
    """Row-wise Mahalanobis distance ``sqrt((x-μ)ᵀ Σ⁻¹ (x-μ))`` for ``x`` of shape ``[B, F]``."""
    d = x.to(torch.float32) - mean
    if torch.is_autocast_enabled(d.device.type):
        with torch.autocast(d.device.type, enabled=False):
            return mahalanobis(d, torch.zeros_like(mean), inv_cov)
    # matmul + reduce rather than einsum: every ONNX/TensorRT version handles it
    squared = ((d @ inv_cov) * d).sum(dim=1)
    return torch.sqrt(torch.clamp(squared, min=0.0))


def fit_gaussian(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and regularised inverse covariance of ``samples`` ``[N, F]`` (float64 inside).

    Works for N=1 and for constant features: the ridge makes the covariance positive definite.
    """
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"need samples of shape [N, F] with N ≥ 1, got {x.shape}")
    mean = x.mean(axis=0)
    if x.shape[0] > 1:
        cov = np.atleast_2d(np.cov(x, rowvar=False))
    else:
        cov = np.zeros((x.shape[1], x.shape[1]))
    ridge = RIDGE_RELATIVE * float(np.mean(np.diag(cov))) + RIDGE_ABSOLUTE
    inv = np.linalg.inv(cov + ridge * np.eye(cov.shape[0]))
    inv = 0.5 * (inv + inv.T)  # exactly symmetric, so the quadratic form is real-valued
    return mean.astype(np.float32), inv.astype(np.float32)


def trimmed_stats(values: np.ndarray, low: float = 0.2, high: float = 0.8) -> tuple[float, float]:
    """Mean and std of the values between two quantiles (CSAD's score normalisation).

    Trimming keeps a few odd validation images from setting the scale. The std is floored so a
    branch that is constant on the validation set cannot blow up the fused score.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("no finite values to compute trimmed statistics from")
    lo, hi = np.quantile(v, [low, high])
    kept = v[(v >= lo) & (v <= hi)]
    if kept.size == 0:
        kept = v
    return float(kept.mean()), max(float(kept.std()), 1e-3 * max(abs(float(kept.mean())), 1.0))


class PatchHistogram(nn.Module):
    """Histogram detectors on several grids (CSAD's "256+128" = grids 1 and 2 on a 256 input).

    Each grid has its own Gaussian (mean, inverse covariance) and its own validation statistics
    (μ, σ); the branch score is the sum of the normalised detector scores, as in the paper. All
    of it lives in buffers, so it is saved in the bundle and exported with the graph.
    """

    def __init__(
        self, num_classes: int, size: int | tuple[int, int], grids: tuple[int, ...] = (1, 2)
    ):
        super().__init__()
        self.num_classes = num_classes
        self.size = size
        self.grids = tuple(grids)
        for g in self.grids:
            features = (num_classes - 1) * g * g
            self.register_buffer(f"mean_g{g}", torch.zeros(features))
            self.register_buffer(f"inv_cov_g{g}", torch.eye(features))
            self.register_buffer(f"mu_g{g}", torch.zeros(()))
            self.register_buffer(f"sigma_g{g}", torch.ones(()))

    def histograms(self, labels: torch.Tensor) -> dict[int, torch.Tensor]:
        return {g: class_histograms(labels, self.num_classes, g, self.size) for g in self.grids}

    def detector_scores(self, labels: torch.Tensor) -> dict[int, torch.Tensor]:
        """Raw Mahalanobis distance per grid, before normalisation (used for calibration)."""
        return {
            g: mahalanobis(h, getattr(self, f"mean_g{g}"), getattr(self, f"inv_cov_g{g}"))
            for g, h in self.histograms(labels).items()
        }

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        total = torch.zeros(labels.shape[0], device=labels.device)
        for g, score in self.detector_scores(labels).items():
            total = total + (score - getattr(self, f"mu_g{g}")) / getattr(self, f"sigma_g{g}")
        return total

    def set_gaussian(self, grid: int, mean: np.ndarray, inv_cov: np.ndarray) -> None:
        getattr(self, f"mean_g{grid}").copy_(torch.from_numpy(np.asarray(mean, np.float32)))
        getattr(self, f"inv_cov_g{grid}").copy_(torch.from_numpy(np.asarray(inv_cov, np.float32)))

    def set_normalisation(self, grid: int, mu: float, sigma: float) -> None:
        getattr(self, f"mu_g{grid}").fill_(mu)
        getattr(self, f"sigma_g{grid}").fill_(sigma)
