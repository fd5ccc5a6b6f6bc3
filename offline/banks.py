"""Filling the memory banks from good images, and their leave-one-out training scores.

Patch bank: greedy coreset subsampling of good patches (PatchCore/PSAD).

A random subset of patches under-represents rare but normal appearances (a component's edge,
a specular highlight), which then score as anomalies. The greedy k-center coreset picks, one at
a time, the patch farthest from everything picked so far, so the bank covers the whole normal
patch distribution with few entries. Distances are taken in a random low-dimensional projection
(Johnson–Lindenstrauss), as PatchCore does, to keep the selection fast on a CPU.

Every bank also returns PSAD's leave-one-out training scores — each good image scored against
the bank without its own entries — whose maximum is the adaptive scaling ``s / max(LOO)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lineguard.engines.banks import class_shares, composition, fewshot_descriptors
from lineguard.engines.knn import patch_descriptors
from lineguard.engines.model import CSADModel
from lineguard.offline.lgst_train import batched

BANK_BRANCHES = ("patch_knn", "hist_knn", "comp_knn", "fewshot_knn")


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch descriptors of good images, randomly thinned to at most ``max_patches`` candidates,
    and the index of the image each one came from."""
    assert model.patch_knn is not None
    rng = np.random.default_rng(seed)
    per_image = max(1, max_patches // max(len(images), 1))
    parts: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    for chunk in batched(images, str(model.pixel_mean.device)):
        f = model.backbone(model.preprocess(chunk))
        desc = model.patch_knn.describe(f[0], f[1]).float().cpu()
        b, d, h, w = desc.shape
        flat = desc.permute(0, 2, 3, 1).reshape(b, h * w, d)
        for row in flat:
            keep = rng.choice(h * w, size=min(per_image, h * w), replace=False)
            owners.append(torch.full((len(keep),), len(parts), dtype=torch.long))
            parts.append(row[torch.from_numpy(keep)])
    return torch.cat(parts), torch.cat(owners)


@torch.no_grad()
def patch_leave_one_out(model: CSADModel, images: np.ndarray, owners: torch.Tensor) -> np.ndarray:
    """PSAD's patch-bank training score per image: the largest distance of any of its patches to
    the bank entries that came from *other* images (raw distances, before map normalisation)."""
    bank = model.patch_knn
    assert bank is not None
    entries = bank.bank.float().cpu()
    scores = []
    for start, chunk in zip(range(0, len(images), 16), batched(images, "cpu"), strict=True):
        f = model.backbone(model.preprocess(chunk.to(model.pixel_mean.device)))
        desc = bank.describe(f[0], f[1]).float().cpu()
        q = desc.permute(0, 2, 3, 1).reshape(desc.shape[0], -1, desc.shape[1])
        for i, patches in enumerate(q):
            others = entries[owners != start + i]
            nearest = torch.cdist(patches, others).amin(dim=1)
            scores.append(float(nearest.max()))
    return np.asarray(scores)


def fit_patch_bank(
    model: CSADModel,
    images: np.ndarray,
    *,
    candidates: int = 200_000,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, float | list[float]]:
    """Fill ``model.patch_knn`` with a coreset of the training images' patches."""
    bank = model.patch_knn
    if bank is None:
        raise ValueError("this model has no patch bank (ModelConfig.patch_bank = 0)")
    patches, owners = collect_patches(model, images, candidates, seed)
    size = bank.bank.shape[0]
    if patches.shape[0] < size:
        raise ValueError(
            f"only {patches.shape[0]} patches for a bank of {size}: "
            "use more images or a smaller bank"
        )
    chosen = greedy_coreset(patches, size, seed=seed, on_progress=on_progress)
    bank.set_bank(patches[chosen].to(bank.bank.device))
    loo = patch_leave_one_out(model, images, owners[chosen])
    return {"candidates": float(patches.shape[0]), "bank": float(size), "loo": loo.tolist()}


@torch.no_grad()
def image_vectors(model: CSADModel, images: np.ndarray) -> dict[str, np.ndarray]:
    """The vectors the image banks compare: class shares and composition, one row per image."""
    config = model.config
    shares, comps = [], []
    for chunk in batched(images, str(model.pixel_mean.device)):
        x = model.preprocess(chunk)
        f = model.backbone(x)
        labels = model.segment(f).argmax(dim=1)
        shares.append(class_shares(labels, config.num_classes, x.shape[-1]).cpu())
        desc = patch_descriptors(f[0], f[1], config.map_size)
        cell = config.input_size // config.map_size
        comps.append(composition(desc, labels, config.num_classes, cell).cpu())
    return {
        "hist_knn": torch.cat(shares).double().numpy(),
        "comp_knn": torch.cat(comps).double().numpy(),
    }


def fit_image_banks(model: CSADModel, images: np.ndarray) -> dict[str, list[float]]:
    """Fill the class-histogram and composition banks (PSAD) from good images.

    A bank holds ``ModelConfig.hist_bank`` / ``comp_bank`` images; with more training images
    than that, an evenly spaced subset is kept. Returns each bank's leave-one-out scores.
    """
    banks = {"hist_knn": model.hist_knn, "comp_knn": model.comp_knn}
    if all(b is None for b in banks.values()):
        return {}
    vectors = image_vectors(model, images)
    loo = {}
    for name, bank in banks.items():
        if bank is None:
            continue
        size = bank.bank.shape[0]
        if len(images) < size:
            raise ValueError(f"{name} holds {size} images but only {len(images)} were given")
        keep = np.linspace(0, len(images) - 1, size).round().astype(int)
        loo[name] = bank.fit(vectors[name][keep]).tolist()
    return loo


@torch.no_grad()
def fit_fewshot_bank(model: CSADModel, shots: np.ndarray) -> dict[str, float | list[float]]:
    """The training-free branch from k good images: their patches, the background mask, and the
    k-shot leave-one-out scores (paper 002's fusion weights; none for k = 1)."""
    bank = model.fewshot_knn
    if bank is None:
        raise ValueError("this model has no few-shot branch (ModelConfig.fewshot_shots = 0)")
    if len(shots) != bank.shots:
        raise ValueError(f"the few-shot branch needs {bank.shots} images, got {len(shots)}")
    f = model.backbone(model.preprocess(torch.from_numpy(shots).to(model.pixel_mean.device)))
    desc = fewshot_descriptors(f[1], f[2]).cpu()
    info: dict[str, float | list[float]] = dict(bank.fit(desc.to(bank.bank.device)))
    info["loo"] = bank.leave_one_out(desc.to(bank.bank.device)).tolist()
    return info


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
        values.append(bank.distances(bank.describe(f[0], f[1])).flatten().cpu())
    qa, qb = np.quantile(torch.cat(values).numpy().astype(np.float64), [low, high])
    bank.q_a.fill_(float(qa))
    bank.q_b.fill_(float(max(qb, qa + 1e-6)))


def fit_banks(
    model: CSADModel, train_images: np.ndarray, *, progress: bool = False
) -> dict[str, Any]:
    """Fill every memory bank the model has; ``loo`` holds each bank's leave-one-out scores."""
    from tqdm import tqdm

    loo: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    if model.patch_knn is not None:
        size = model.patch_knn.bank.shape[0]
        with tqdm(total=size, desc="coreset", disable=not progress, dynamic_ncols=True) as bar:
            patch = fit_patch_bank(model, train_images, on_progress=lambda i: bar.update(i - bar.n))
            bar.update(size - bar.n)
        loo["patch_knn"] = patch.pop("loo")  # type: ignore[assignment]
        info["patch_knn"] = patch
    loo.update(fit_image_banks(model, train_images))
    if model.fewshot_knn is not None:
        shots = fit_fewshot_bank(model, train_images[: model.fewshot_knn.shots])
        loo["fewshot_knn"] = shots.pop("loo")  # type: ignore[assignment]
        info["fewshot_knn"] = shots
    return {**info, "loo": loo}
