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

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lineguard.engines.banks import class_shares, composition, fewshot_descriptors
from lineguard.engines.model import CSADModel
from lineguard.offline.lgst_train import batched

BANK_BRANCHES = ("patch_knn", "hist_knn", "comp_knn", "fewshot_knn")


# The patch bank's size follows the data: PatchCore keeps a fixed share of all training
# patches (10 %), which grows with the product's variety; the cap keeps the in-graph search
# within the CPU budget (``lineguard bench model``, ONNX Runtime, batch 8 ≥ 8 images/s on two
# cores) and the greedy selection within minutes. PatchCore reports 1 % coresets within a few
# tenths of a point of 10 % on MVTec AD, so the cap costs little where it binds.
PATCH_BANK_FRACTION = 0.1
PATCH_BANK_CAP = 16_384
PATCH_BANK_MIN = 256  # a handful of images still gets a bank that covers their patches
PROJECTION_DIM = 128  # PatchCore's random projection for the selection distances
# Every training patch is a coreset candidate (PatchCore) while they fit in this much memory;
# beyond it (wide descriptors, thousands of images) they are thinned at random, evenly per
# image. 2 GiB holds every lite0 patch of 3 000 images at 256 px (D = 152).
CANDIDATE_BYTES = 2 << 30


def coreset_size(
    total_patches: int, fraction: float = PATCH_BANK_FRACTION, cap: int = PATCH_BANK_CAP
) -> int:
    """Bank entries for ``total_patches`` training patches: ``fraction`` of them, at most ``cap``.

    Never more than there are patches, never fewer than ``PATCH_BANK_MIN`` (or all patches
    when there are fewer than that).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the patch bank fraction must be in (0, 1], got {fraction}")
    if cap < 1:
        raise ValueError(f"the patch bank cap must be ≥ 1, got {cap}")
    wanted = max(math.ceil(fraction * total_patches), min(PATCH_BANK_MIN, cap))
    return max(1, min(wanted, cap, total_patches))


def greedy_coreset(
    patches: torch.Tensor,
    size: int,
    *,
    projection_dim: int = PROJECTION_DIM,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``size`` patches chosen by greedy k-center selection (exact).

    Each step picks the patch farthest from everything picked so far and lowers every
    patch's distance to its nearest pick. Done naively that touches every candidate at every
    step (hours on a CPU for 10⁴ picks out of 10⁵–10⁶ patches), so candidates are grouped
    into ≈√N clusters with a centre and radius: a cluster whose every member is already
    closer to its nearest pick than the triangle inequality allows the new pick to be is
    skipped. That changes nothing in the result, only which distances are computed, and once
    the bank covers the data most clusters are skipped at every step.
    """
    n = patches.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = patches.to(torch.float32)
    if x.shape[1] > projection_dim:
        proj = torch.randn(x.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        x = x @ proj
    blocks = _Clusters(x, generator)
    x, sq, block = blocks.x, blocks.sq, blocks.block
    nearest = torch.full((n,), float("inf"))
    block_max = torch.full((blocks.count,), float("inf"))  # largest ``nearest`` per cluster
    chosen = torch.empty(size, dtype=torch.long)
    pick = int(torch.randint(n, (1,), generator=generator))
    for i in range(size):
        chosen[i] = pick
        q = x[pick]
        to_centre = ((blocks.centres - q) ** 2).sum(dim=1).sqrt()
        near = ((to_centre - blocks.radius) < block_max.sqrt()).nonzero().squeeze(1)
        if near.numel() > blocks.count // 4:  # most clusters: one pass over everything
            d = torch.addmv(sq + sq[pick], x, q, alpha=-2.0)
            torch.minimum(nearest, d, out=nearest)
            block_max = torch.full_like(block_max, -float("inf"))
            block_max.scatter_reduce_(0, block, nearest, "amax")
        else:
            idx = blocks.members(near)
            d = torch.addmv(sq[idx] + sq[pick], x[idx], q, alpha=-2.0)
            lowered = torch.minimum(nearest[idx], d)
            nearest[idx] = lowered
            block_max[near] = -float("inf")
            block_max.scatter_reduce_(0, block[idx], lowered, "amax")
        far = int(block_max.argmax())
        first = int(blocks.offsets[far])
        pick = first + int(nearest[first : first + int(blocks.sizes[far])].argmax())
        if on_progress is not None and i % 256 == 0:
            on_progress(i)
    return blocks.order[chosen]


class _Clusters:
    """Candidates sorted into ≈√N clusters (a few Lloyd steps from random centres), with each
    cluster's centre, radius and contiguous slice of the sorted rows."""

    def __init__(self, x: torch.Tensor, generator: torch.Generator, steps: int = 3):
        n = x.shape[0]
        self.count = max(1, math.isqrt(n))
        centres = x[torch.randperm(n, generator=generator)[: self.count]].clone()
        assign = torch.zeros(n, dtype=torch.long)
        for _ in range(steps):
            c_sq = (centres * centres).sum(dim=1)
            assign = torch.cat(
                [(c_sq - 2.0 * part @ centres.T).argmin(dim=1) for part in x.split(65_536)]
            )
            counts = torch.bincount(assign, minlength=self.count).clamp_min(1)
            centres = torch.zeros_like(centres).index_add_(0, assign, x) / counts[:, None]
        self.order = torch.argsort(assign)
        self.x = x[self.order]
        self.sq = (self.x * self.x).sum(dim=1)
        self.block = assign[self.order]
        self.sizes = torch.bincount(self.block, minlength=self.count)
        self.offsets = torch.cumsum(self.sizes, 0) - self.sizes
        self.centres = centres
        spread = ((self.x - centres[self.block]) ** 2).sum(dim=1).sqrt()
        self.radius = torch.zeros(self.count).scatter_reduce_(0, self.block, spread, "amax")

    def members(self, clusters: torch.Tensor) -> torch.Tensor:
        """Row indices of the given clusters, concatenated."""
        lengths = self.sizes[clusters]
        starts = self.offsets[clusters] - (torch.cumsum(lengths, 0) - lengths)
        return torch.arange(int(lengths.sum())) + torch.repeat_interleave(starts, lengths)


@torch.no_grad()
def collect_patches(
    model: CSADModel, images: np.ndarray, max_patches: int | None = None, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch descriptors of good images, and the index of the image each one came from.

    Every patch is a candidate (PatchCore), unless ``max_patches`` asks for a random thinning
    to at most that many, spread evenly over the images.
    """
    assert model.patch_knn is not None
    rng = np.random.default_rng(seed)
    grid = model.config.patch_grid
    per_image = grid * grid
    if max_patches is not None:
        per_image = max(1, min(per_image, max_patches // max(len(images), 1)))
    parts: list[torch.Tensor] = []
    owners: list[torch.Tensor] = []
    for chunk in batched(images, str(model.pixel_mean.device)):
        f = model.backbone(model.preprocess(chunk))
        desc = model.describe_patches(f).float().cpu()
        b, d, h, w = desc.shape
        flat = desc.permute(0, 2, 3, 1).reshape(b, h * w, d)
        for row in flat:
            if per_image >= h * w:
                owners.append(torch.full((h * w,), len(parts), dtype=torch.long))
                parts.append(row)
                continue
            keep = rng.choice(h * w, size=per_image, replace=False)
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
        desc = model.describe_patches(f).float().cpu()
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
    candidates: int | None = None,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, float | list[float]]:
    """Fill ``model.patch_knn`` with a coreset of the training images' patches."""
    bank = model.patch_knn
    if bank is None:
        raise ValueError("this model has no patch bank (ModelConfig.patch_bank = 0)")
    if candidates is None:
        candidates = CANDIDATE_BYTES // (4 * bank.bank.shape[1])
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
        desc = model.describe_patches(f)
        cell = config.input_size // config.patch_grid
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
        values.append(bank.distances(model.describe_patches(f)).flatten().cpu())
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
