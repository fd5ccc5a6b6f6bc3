"""Patch memory bank (PSAD's patch bank, PatchCore-style) as a branch inside the fused graph.

Every stride-4 location is described by the backbone's stride-4 and stride-8 features, 3×3
averaged (PatchCore's local aggregation); its score is the distance to the nearest patch of
good training images, kept as a coreset-subsampled bank. Structural defects — a scratch, a
speck of contamination — are patches unlike any good patch, so this branch catches them without
training, which on a CPU is far cheaper than training a student to the same sensitivity.

The nearest-neighbour search is a matrix product and a min over the bank, so it exports to
ONNX/TensorRT with the rest of the model and runs batched. A bank of M patches of dimension D
costs 2·M·D FLOPs per location; the default M=4096 with lite0's D=64 is ~2 GFLOP per 256² image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MAP_SCALE = 0.1  # same map normalisation as LGST, so the two maps can be summed for display
BANK_CHUNK = 512  # bank rows per distance block


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


def patch_descriptors(f4: torch.Tensor, f8: torch.Tensor, map_size: int) -> torch.Tensor:
    """Stride-4 and stride-8 taps at the map resolution, 3×3 averaged: ``[B, D, s, s]``."""
    size = (map_size, map_size)
    a = f4 if f4.shape[-1] == map_size else F.interpolate(f4, size=size, mode="bilinear")
    b = F.interpolate(f8, size=size, mode="bilinear", align_corners=False)
    return F.avg_pool2d(torch.cat([a, b], dim=1), 3, stride=1, padding=1, count_include_pad=False)


class PatchBank(nn.Module):
    """Nearest-neighbour distance of every patch to a bank of good patches."""

    bank: torch.Tensor
    bank_sq: torch.Tensor
    q_a: torch.Tensor
    q_b: torch.Tensor

    def __init__(self, feature_dim: int, bank_size: int, map_size: int):
        super().__init__()
        self.map_size = map_size
        self.register_buffer("bank", torch.zeros(bank_size, feature_dim))
        self.register_buffer("bank_sq", torch.zeros(bank_size))
        self.register_buffer("q_a", torch.tensor(0.0))
        self.register_buffer("q_b", torch.tensor(1.0))

    def describe(self, f4: torch.Tensor, f8: torch.Tensor) -> torch.Tensor:
        """Patch descriptors ``[B, D, s, s]`` at the map resolution."""
        return patch_descriptors(f4, f8, self.map_size)

    def distances(self, descriptors: torch.Tensor) -> torch.Tensor:
        """Raw nearest-neighbour distance map ``[B, 1, s, s]`` of ``describe``'s output."""
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
        """Normalised map ``0.1 · (d − q_a) / (q_b − q_a)`` (quantiles from validation goods).

        Takes the descriptors rather than the backbone taps so the model computes them once
        for every branch that reads them (this one, the composition bank, the faiss stage).
        """
        return MAP_SCALE * (self.distances(descriptors) - self.q_a) / (self.q_b - self.q_a)

    def set_bank(self, patches: torch.Tensor) -> None:
        if patches.shape != self.bank.shape:
            raise ValueError(
                f"bank must have shape {tuple(self.bank.shape)}, got {tuple(patches.shape)}"
            )
        self.bank.copy_(patches)
        self.bank_sq.copy_((patches.to(torch.float32) ** 2).sum(dim=1))
