"""Patch memory bank (PatchCore, PSAD's patch bank) as a branch inside the fused graph.

Every patch of the image has a descriptor of backbone features, and its score is the distance
to the nearest patch of good training images, kept as a coreset-subsampled bank; the image
score is the largest patch distance. Structural defects — a scratch, a speck of contamination —
are patches unlike any good patch, so this branch catches them without training, which on a
CPU is far cheaper than training a student to the same sensitivity.

Two descriptors. ``mid`` is PatchCore's: the stride-8 and stride-16 taps (lite0's blocks 2 and
4, wide_resnet50_2's layers 2 and 3), each 3×3 averaged so a descriptor sees its neighbourhood,
the coarse tap upsampled to the stride-8 grid and the two concatenated; mid-level features are
specific enough to tell a texture's defect from its variation (on the real magnetic tiles the
bank alone scores 0.886 image AUROC with it, 0.782 with ``shallow``). ``shallow`` takes the
stride-4 and stride-8 taps on the stride-4 grid: four times the patches, each seeing less, which
keeps small defects on an assembly apart from the good parts' edges (structural AUROC 0.977
against 0.797 on the synthetic selection line). ``offline.train`` chooses per product.

The nearest-neighbour search is a matrix product and a min over the bank, so it exports to
ONNX/TensorRT with the rest of the model and runs batched. A bank of M patches of dimension D
costs 2·M·D FLOPs per patch; lite0's mid descriptor (D = 152, 1024 patches per 256² image)
with M = 16 384 is ~5 GFLOP per image. Larger banks are searched after the engine with faiss
(``runtimes.faiss_stage``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from lineguard.engines.errors import ConfigError

MAP_SCALE = 0.1  # same map normalisation as LGST, so the two maps can be summed for display
BANK_CHUNK = 512  # bank rows per distance block
TAP_STRIDES = (4, 8, 16)  # what every backbone hands out, in this order (engines.backbones)
_Map = TypeVar("_Map", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class DescriptorKind:
    """Which backbone taps make a patch descriptor, and the grid it lives on."""

    taps: tuple[int, ...]  # output strides of the taps, finest first; the finest sets the grid
    pool_first: bool  # 3×3-average each tap before resampling (PatchCore) or after the concat

    @property
    def stride(self) -> int:
        return self.taps[0]

    def dim(self, channels: dict[int, int]) -> int:
        return sum(channels[s] for s in self.taps)


PATCH_DESCRIPTORS: dict[str, DescriptorKind] = {
    # PatchCore: mid-level taps on the stride-8 grid (1024 patches per 256² image)
    "mid": DescriptorKind(taps=(8, 16), pool_first=True),
    # stride-4 and stride-8 taps on the stride-4 grid (4096 patches), upsampled then averaged
    # in that order as every bundle before the choice existed was fitted
    "shallow": DescriptorKind(taps=(4, 8), pool_first=False),
}


def descriptor_kind(name: str) -> DescriptorKind:
    try:
        return PATCH_DESCRIPTORS[name]
    except KeyError:
        raise ConfigError(
            f"unknown patch descriptor {name!r}; use one of {sorted(PATCH_DESCRIPTORS)}"
        ) from None


def nearest_sq(
    q: torch.Tensor, bank: torch.Tensor, bank_sq: torch.Tensor, chunk: int = BANK_CHUNK
) -> torch.Tensor:
    """Squared Euclidean distance of each row of ``q`` ``[N, D]`` to its nearest bank row.

    ‖q − m‖² = ‖q‖² − 2 q·m + ‖m‖²: minimise ‖m‖² − 2 q·m over the bank with one fused
    multiply-add (Gemm in ONNX) per bank chunk, then add ‖q‖². Chunks bound the memory of the
    distance matrix (8 MB per 256² image at 512 rows) and their count is fixed by the bank
    size, not by the batch, so the exported graph keeps its dynamic batch axis.
    """
    best: torch.Tensor | None = None
    for start in range(0, bank.shape[0], chunk):
        part = torch.addmm(
            bank_sq[start : start + chunk], q, bank[start : start + chunk].T, alpha=-2.0
        ).amin(dim=1)
        best = part if best is None else torch.minimum(best, part)
    assert best is not None
    return (best + (q * q).sum(dim=1)).clamp_min(0)


def _pool(x: torch.Tensor) -> torch.Tensor:
    """3×3 local average (stride 1): padding cells do not count, so border patches keep their
    scale instead of being pulled towards zero."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def patch_descriptors(
    features: tuple[torch.Tensor, ...] | list[torch.Tensor], kind: str = "mid"
) -> torch.Tensor:
    """Patch descriptors ``[B, D, gh, gw]`` from the backbone taps at strides 4, 8, 16.

    ``(gh, gw)`` is the grid of the descriptor's finest tap (input height and width over its
    stride). Coarser taps are bilinearly upsampled onto it; the only sizes used are the taps'
    own, so the exported graph has no data-dependent shape and keeps its dynamic batch axis.
    """
    spec = descriptor_kind(kind)
    taps = [features[TAP_STRIDES.index(s)] for s in spec.taps]
    grid = tuple(taps[0].shape[-2:])
    if spec.pool_first:
        taps = [_pool(t) for t in taps]

    def onto_grid(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[-2:]) == grid:
            return t
        return F.interpolate(t, size=grid, mode="bilinear", align_corners=False)

    out = torch.cat([onto_grid(t) for t in taps], dim=1)
    return out if spec.pool_first else _pool(out)


class PatchBank(nn.Module):
    """Nearest-neighbour distance of every patch to a bank of good patches."""

    bank: torch.Tensor
    bank_sq: torch.Tensor
    q_a: torch.Tensor
    q_b: torch.Tensor

    def __init__(self, feature_dim: int, bank_size: int, grid: tuple[int, int], kind: str = "mid"):
        super().__init__()
        descriptor_kind(kind)
        self.grid = grid
        self.kind = kind
        self.register_buffer("bank", torch.zeros(bank_size, feature_dim))
        self.register_buffer("bank_sq", torch.zeros(bank_size))
        self.register_buffer("q_a", torch.tensor(0.0))
        self.register_buffer("q_b", torch.tensor(1.0))

    def describe(self, features: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Patch descriptors ``[B, D, g, g]`` of the backbone taps (strides 4, 8, 16)."""
        return patch_descriptors(features, self.kind)

    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Raw nearest-neighbour distance map ``[B, 1, g, g]`` of ``describe``'s output."""
        if torch.is_autocast_enabled(descriptors.device.type):
            # fp16 would cancel catastrophically in ‖q‖² − 2q·m + ‖m‖²: keep this part fp32.
            with torch.autocast(descriptors.device.type, enabled=False):
                return self.distances(descriptors.float())
        x = descriptors.to(torch.float32)
        b, d, h, w = x.shape
        q = x.permute(0, 2, 3, 1).reshape(-1, d)
        nearest = nearest_sq(q, self.bank, self.bank_sq).sqrt()
        return nearest.reshape(b, 1, h, w)

    def forward(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Normalised map ``0.1 · (d − q_a) / (q_b − q_a)`` (quantiles from validation goods)
        on the descriptor grid; ``to_map`` brings it to the anomaly map's size.

        Takes the descriptors rather than the backbone taps so the model computes them once
        for every branch that reads them (this one, the composition bank, the faiss stage).
        """
        return normalise(self.distances(descriptors), self.q_a, self.q_b)

    def set_bank(self, patches: torch.Tensor) -> None:
        if patches.shape != self.bank.shape:
            raise ValueError(
                f"bank must have shape {tuple(self.bank.shape)}, got {tuple(patches.shape)}"
            )
        self.bank.copy_(patches)
        self.bank_sq.copy_((patches.to(torch.float32) ** 2).sum(dim=1))


def normalise(distances: _Map, q_a: torch.Tensor | float, q_b: torch.Tensor | float) -> _Map:
    """The bank's map normalisation; the faiss stage applies the very same."""
    return MAP_SCALE * (distances - q_a) / (q_b - q_a)


def to_map(knn_map: torch.Tensor, map_size: tuple[int, int]) -> torch.Tensor:
    """The bank's map ``[B, 1, gh, gw]`` at the anomaly map's size ``[B, 1, h, w]`` (bilinear).

    For display and for the summed map only: the branch's score is taken on the descriptor
    grid before this, so it is PatchCore's image score — the largest patch distance — and not
    a value smoothed by the resampling.
    """
    if tuple(knn_map.shape[-2:]) == tuple(map_size):
        return knn_map
    return F.interpolate(knn_map, size=tuple(map_size), mode="bilinear", align_corners=False)
