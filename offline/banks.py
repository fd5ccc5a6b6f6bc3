"""Filling the patch memory bank: greedy coreset subsampling of good patches (PatchCore/PSAD).

A random subset of patches under-represents rare but normal appearances (a component's edge,
a specular highlight), which then score as anomalies. The greedy k-center coreset picks, one at
a time, the patch farthest from everything picked so far, so the bank covers the whole normal
patch distribution with few entries. Distances are taken in a random low-dimensional projection
(Johnson–Lindenstrauss), as PatchCore does, to keep the selection fast on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from engines.model import CSADModel
from offline.lgst_train import batched


def greedy_coreset(
    patches: torch.Tensor,
    size: int,
    *,
    projection_dim: int = 32,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``size`` patches chosen by greedy k-center selection."""
    n = patches.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = patches.to(torch.float32)
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = x @ proj
    chosen = torch.empty(size, dtype=torch.long)
    chosen[0] = int(torch.randint(n, (1,), generator=generator))
    nearest = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for i in range(1, size):
        pick = int(nearest.argmax())
        chosen[i] = pick
        nearest = torch.minimum(nearest, ((x - x[pick]) ** 2).sum(dim=1))
        if on_progress is not None and i % 256 == 0:
            on_progress(i)
    return chosen


@torch.no_grad()
def collect_patches(
    model: CSADModel, images: np.ndarray, max_patches: int, seed: int = 0
) -> torch.Tensor:
    """Patch descriptors of good images, randomly thinned to at most ``max_patches`` candidates."""
    assert model.patch_knn is not None
    rng = np.random.default_rng(seed)
    per_image = max(1, max_patches // max(len(images), 1))
    parts = []
    for chunk in batched(images, str(model.pixel_mean.device)):
        f = model.backbone(model.preprocess(chunk))
        desc = model.patch_knn.describe(f[0], f[1]).float().cpu()
        b, d, h, w = desc.shape
        flat = desc.permute(0, 2, 3, 1).reshape(b, h * w, d)
        for row in flat:
            keep = rng.choice(h * w, size=min(per_image, h * w), replace=False)
            parts.append(row[torch.from_numpy(keep)])
    return torch.cat(parts)


def fit_patch_bank(
    model: CSADModel,
    images: np.ndarray,
    *,
    candidates: int = 200_000,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Fill ``model.patch_knn`` with a coreset of the training images' patches."""
    bank = model.patch_knn
    if bank is None:
        raise ValueError("this model has no patch bank (ModelConfig.patch_bank = 0)")
    patches = collect_patches(model, images, candidates, seed)
    size = bank.bank.shape[0]
    if patches.shape[0] < size:
        raise ValueError(
            f"only {patches.shape[0]} patches for a bank of {size}: "
            "use more images or a smaller bank"
        )
    chosen = greedy_coreset(patches, size, seed=seed, on_progress=on_progress)
    bank.set_bank(patches[chosen].to(bank.bank.device))
    return {"candidates": float(patches.shape[0]), "bank": float(size)}


@torch.no_grad()
def calibrate_bank_quantiles(
    model: CSADModel, images: np.ndarray, low: float = 0.9, high: float = 0.995
) -> None:
    """q_a, q_b of the nearest-neighbour maps on validation goods (as for the LGST maps)."""
    bank = model.patch_knn
    if bank is None:
        return
    values = []
    for chunk in batched(images, str(model.pixel_mean.device)):
        f = model.backbone(model.preprocess(chunk))
        values.append(bank.distances(f[0], f[1]).flatten().cpu())
    qa, qb = np.quantile(torch.cat(values).numpy().astype(np.float64), [low, high])
    bank.q_a.fill_(float(qa))
    bank.q_b.fill_(float(max(qb, qa + 1e-6)))
