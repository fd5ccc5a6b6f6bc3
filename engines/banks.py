"""PSAD's image-level memory banks and a training-free few-shot branch, inside the fused graph.

- **Class-histogram bank** (``hist_knn``): the share of the image each component class covers,
  background included, one vector per good training image. A missing or extra part moves the
  vector away from every good one. Where CSAD's Patch Histogram models good histograms as one
  Gaussian, the bank keeps every good image, so a product with several valid layouts (two
  sub-types, an optional part) is not averaged into a layout that never occurs.
- **Composition bank** (``comp_knn``): per component class, the mean patch descriptor over the
  pixels of that class, concatenated over classes. A part of the wrong colour or kind keeps the
  histogram and changes this vector.
- **Few-shot bank** (``fewshot_knn``, paper 002 without SAM/DINOv2): every patch of k good
  images; a test patch scores one minus its best cosine similarity to the bank, background
  patches are masked out, and the image score is the mean of the top 2 % of patch scores. It
  needs no training at all, only the backbone and k images.

All nearest-neighbour searches are matrix products with a min/max over the bank, so they export
to ONNX/TensorRT and run batched. Vectors are z-scored per dimension with the training images'
statistics before the distance (as PSAD's code does), so a dimension with a large range does
not drown the rest. Distances are Euclidean, not squared: PSAD's paper writes the square, its
code takes the root; the root keeps scores on the scale of the features.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lineguard.engines.histogram import class_histograms
from lineguard.engines.knn import nearest_sq

STD_FLOOR = 1e-3  # a dimension constant over the good images must not divide by ~0
FOREGROUND_TOP = 0.02  # paper 002: mean of the top 2 % patch dissimilarities
FOREGROUND_SIMILARITY = 0.5  # a foreground patch's best cosine similarity to the background


def class_shares(
    labels: torch.Tensor, num_classes: int, size: int | tuple[int, int]
) -> torch.Tensor:
    """Share of the image per class, background first: ``[B, C]`` (rows sum to 1)."""
    fg = class_histograms(labels, num_classes, 1, size)
    return torch.cat([1.0 - fg.sum(dim=1, keepdim=True), fg], dim=1)


def composition(
    descriptors: torch.Tensor, labels: torch.Tensor, num_classes: int, cell: int
) -> torch.Tensor:
    """Mean descriptor per foreground class, concatenated: ``[B, (C-1)·D]``.

    ``descriptors`` ``[B, D, h, w]``, ``labels`` ``[B, H, W]`` with ``H = cell·h``, ``W = cell·w``
    (``cell`` a Python int, so the pooling is a constant in the exported graph). A class that
    is absent contributes a zero vector, which is itself informative (a missing part).
    """
    classes = torch.arange(1, num_classes, device=labels.device, dtype=labels.dtype)
    onehot = (labels.unsqueeze(1) == classes.view(1, -1, 1, 1)).to(torch.float32)
    weights = F.avg_pool2d(onehot, kernel_size=cell).flatten(2)  # [B, C-1, h·w]
    feats = descriptors.to(torch.float32).flatten(2).transpose(1, 2)  # [B, h·w, D]
    sums = torch.bmm(weights, feats)  # [B, C-1, D]
    means = sums / weights.sum(dim=2, keepdim=True).clamp_min(1e-6)
    return means.flatten(1)


def leave_one_out(vectors: np.ndarray) -> np.ndarray:
    """PSAD's training scores: each vector's distance to its nearest *other* vector."""
    x = np.asarray(vectors, dtype=np.float64)
    sq = (x * x).sum(axis=1)
    d2 = sq[:, None] - 2.0 * x @ x.T + sq[None, :]
    np.fill_diagonal(d2, np.inf)
    return np.sqrt(np.clip(d2.min(axis=1), 0.0, None))


class ImageBank(nn.Module):
    """One vector per good image; a test vector scores its distance to the nearest of them."""

    bank: torch.Tensor
    bank_sq: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.register_buffer("bank", torch.zeros(size, dim))
        self.register_buffer("bank_sq", torch.zeros(size))
        self.register_buffer("center", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))

    def standardise(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(torch.float32) - self.center) / self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.forward(x.float())
        return nearest_sq(self.standardise(x), self.bank, self.bank_sq).sqrt()

    def fit(self, vectors: np.ndarray) -> np.ndarray:
        """Store the good images' vectors; returns their leave-one-out distances."""
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or x.shape != tuple(self.bank.shape):
            raise ValueError(f"bank needs vectors {tuple(self.bank.shape)}, got {x.shape}")
        center = x.mean(axis=0)
        scale = np.maximum(x.std(axis=0), STD_FLOOR)
        z = (x - center) / scale
        self.center.copy_(torch.from_numpy(center.astype(np.float32)))
        self.scale.copy_(torch.from_numpy(scale.astype(np.float32)))
        bank = torch.from_numpy(z.astype(np.float32))
        self.bank.copy_(bank)
        self.bank_sq.copy_((bank * bank).sum(dim=1))
        return leave_one_out(z) if len(z) > 1 else np.zeros(1)


def _best_similarity(q: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """Best cosine similarity of unit rows ``q`` ``[..., D]`` to unit ``memory`` rows.

    For unit vectors ‖q − m‖² = 2 − 2 q·m, so this is the nearest-neighbour search every bank
    uses, read as a similarity.
    """
    ones = torch.ones(memory.shape[0], dtype=memory.dtype, device=memory.device)
    flat = q.reshape(-1, q.shape[-1])
    return (1.0 - 0.5 * nearest_sq(flat, memory, ones)).reshape(q.shape[:-1])


def fewshot_descriptors(f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
    """Unit-length patch descriptors ``[B, h·w, D]`` on the stride-8 grid (h, w = H/8, W/8).

    Stride-8 and stride-16 taps together, 3×3 averaged: deeper than the patch bank's taps, so
    cosine similarity compares parts by what they are more than by their exact edges, which is
    what matching against only a few good images needs.
    """
    up = F.interpolate(f16, size=tuple(f8.shape[-2:]), mode="bilinear", align_corners=False)
    x = torch.cat([f8, up], dim=1).to(torch.float32)
    x = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return F.normalize(x.flatten(2).transpose(1, 2), dim=2)


def border_cells(grid: tuple[int, int], width: int = 2) -> torch.Tensor:
    """Flat indices of the cells of a (rows, columns) grid within ``width`` of the image edge."""
    rows, cols = torch.arange(grid[0]), torch.arange(grid[1])
    edge_r = (rows < width) | (rows >= grid[0] - width)
    edge_c = (cols < width) | (cols >= grid[1] - width)
    return torch.nonzero((edge_r[:, None] | edge_c[None, :]).flatten()).flatten()


class FewShotBank(nn.Module):
    """Training-free branch: cosine kNN of foreground patches against k good images.

    Background: paper 002 drops SAM masks that touch two image edges. Without SAM, the
    background is whatever looks like the image border of the good images — a patch is
    foreground when its best cosine similarity to those border patches is below a threshold
    fitted on the good images. When the product fills the frame (a tile, a sheet), the border
    *is* the product; masking is then switched off (``masking = 0``) and every patch counts.
    """

    bank: torch.Tensor
    border: torch.Tensor
    fg_threshold: torch.Tensor
    masking: torch.Tensor

    def __init__(self, dim: int, shots: int, grid: int | tuple[int, int]):
        super().__init__()
        self.shots = shots
        self.grid: tuple[int, int] = (grid, grid) if isinstance(grid, int) else (grid[0], grid[1])
        self.cells = self.grid[0] * self.grid[1]
        self.top = max(1, math.ceil(FOREGROUND_TOP * self.cells))
        n_border = int(border_cells(self.grid).numel())
        self.register_buffer("bank", torch.zeros(shots * self.cells, dim))
        self.register_buffer("border", torch.zeros(shots * n_border, dim))
        self.register_buffer("fg_threshold", torch.tensor(0.0))
        self.register_buffer("masking", torch.tensor(0.0))

    def _score(self, q: torch.Tensor, memory: torch.Tensor, border: torch.Tensor) -> torch.Tensor:
        """Masked cosine dissimilarity per patch ``[B, n]`` of unit descriptors ``[B, n, D]``."""
        dissimilarity = 1.0 - _best_similarity(q, memory)
        foreground = (_best_similarity(q, border) < self.fg_threshold).to(torch.float32)
        keep = torch.maximum(foreground, 1.0 - self.masking)
        return dissimilarity.clamp_min(0) * keep

    def patch_scores(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        """Masked cosine dissimilarity per patch ``[B, g·g]`` (0 on background patches)."""
        return self._score(fewshot_descriptors(f8, f16), self.bank, self.border)

    def forward(self, f8: torch.Tensor, f16: torch.Tensor) -> torch.Tensor:
        if torch.is_autocast_enabled(f8.device.type):
            with torch.autocast(f8.device.type, enabled=False):
                return self.forward(f8.float(), f16.float())
        return self.patch_scores(f8, f16).topk(self.top, dim=1).values.mean(dim=1)

    def fit(self, descriptors: torch.Tensor) -> dict[str, float]:
        """Fill the bank from the k shots' descriptors ``[k, g·g, D]`` and fit the mask."""
        k, n, d = descriptors.shape
        if k != self.shots or n != self.cells:
            raise ValueError(
                f"few-shot bank needs [{self.shots}, {self.cells}, D] descriptors, got "
                f"{tuple(descriptors.shape)}"
            )
        desc = descriptors.to(torch.float32)
        self.bank.copy_(desc.reshape(-1, d))
        cells = border_cells(self.grid)
        border = desc[:, cells].reshape(-1, d)
        self.border.copy_(border)
        # How similar is a background patch to the *rest* of the background? The 5 % quantile of
        # border patches' best similarity to border cells elsewhere is the edge of "looks like
        # background"; patches less similar than that, with a margin, are the product. Cells
        # within two of each other share pixels through the 3×3 averaging, so they do not count.
        rows, cols = cells // self.grid[1], cells % self.grid[1]
        shot = torch.arange(k).repeat_interleave(len(cells))
        r, c = rows.repeat(k), cols.repeat(k)
        near = (
            (shot[:, None] == shot[None, :])
            & ((r[:, None] - r[None, :]).abs() <= 2)
            & ((c[:, None] - c[None, :]).abs() <= 2)
        )
        sim = (border @ border.T).masked_fill(near, -1.0)
        # Receptive fields that reach the zero padding make border cells differ from interior
        # cells of the very same texture (cosine ≈ 0.65 for lite0 at 256 px), so a patch must
        # also be clearly unlike the background, below FOREGROUND_SIMILARITY, to count.
        quantile = float(torch.quantile(sim.amax(dim=1), 0.05)) - 0.05
        threshold = min(quantile, FOREGROUND_SIMILARITY)
        self.fg_threshold.fill_(threshold)
        fg = (_best_similarity(desc.reshape(-1, d), border) < threshold).float().mean()
        # A product that fills the frame leaves almost nothing "unlike the border": mask off.
        masked = 0.05 <= float(fg) <= 0.95
        self.masking.fill_(1.0 if masked else 0.0)
        return {"foreground_fraction": float(fg), "masking": float(masked)}

    def leave_one_out(self, descriptors: torch.Tensor) -> np.ndarray:
        """Paper 002's fusion weights: each shot scored against the other k − 1 (k ≥ 2)."""
        k = descriptors.shape[0]
        if k < 2:
            return np.zeros(0)
        scores = []
        cells = border_cells(self.grid)
        for i in range(k):
            others = torch.cat([descriptors[:i], descriptors[i + 1 :]]).to(torch.float32)
            d = others.shape[-1]
            q = descriptors[i : i + 1].to(torch.float32)
            masked = self._score(q, others.reshape(-1, d), others[:, cells].reshape(-1, d))
            scores.append(float(masked.topk(self.top, dim=1).values.mean()))
        return np.asarray(scores)
