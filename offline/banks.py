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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from lineguard.engines.backbones import backbone_spec
from lineguard.engines.banks import class_shares, composition, fewshot_descriptors
from lineguard.engines.knn import descriptor_kind
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.offline.augment import codec_jitter
from lineguard.offline.lgst_train import batched

BANK_BRANCHES = ("patch_knn", "hist_knn", "comp_knn", "fewshot_knn")


# The patch bank's size follows the data: PatchCore keeps a fixed share of all training
# patches (10 %), which grows with the product's variety; the cap keeps the in-graph search
# within the CPU budget (``lineguard bench model``, ONNX Runtime, batch 8 ≥ 8 images/s on two
# cores) and the greedy selection within minutes. What the cap costs in AUROC where it binds
# (on the magnetic tiles: 16 384 of 545 792 patches, 3 %) is measured in docs/patch_bank/.
PATCH_BANK_FRACTION = 0.1
PATCH_BANK_CAP = 16_384
# The in-graph search's cost per image (multiply-adds) at the cap with lite0's mid descriptor
# (1024 patches of 152-d at 256 px). A descriptor with more patches or dimensions gets fewer
# entries for the same time: the stride-4 descriptor (4096 patches of 64-d) 9 728 entries. Its
# 16 384-entry bank ran at 9.3 and 6.8 images/s in two runs of bench model, against 8.
SEARCH_MACS = PATCH_BANK_CAP * 1024 * 152
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


POOL_PER_ENTRY = 4  # candidates per bank entry the global greedy chooses from


@contextmanager
def _one_thread() -> Iterator[None]:
    """Run a loop of many small tensor operations on one thread.

    Each greedy step is one matrix-vector product and a few vector operations; with several
    threads every step pays a synchronisation, and on a busy two-core machine (the training
    box shares its cores with other work) that made a step 20–60× slower (measured on 136k
    tile candidates in 128 dimensions: 7.8 ms per step on one thread, 24 ms on two).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _project(x: torch.Tensor, dim: int, generator: torch.Generator) -> torch.Tensor:
    """A random projection to ``dim`` dimensions (Johnson–Lindenstrauss), as PatchCore does
    for its selection distances; the bank itself keeps the full descriptors."""
    x = x.to(torch.float32)
    if x.shape[-1] <= dim:
        return x
    proj = torch.randn(x.shape[-1], dim, generator=generator) / dim**0.5
    return x @ proj


def bank_cap(config: ModelConfig, cap: int = PATCH_BANK_CAP) -> int:
    """The most entries this model's patch bank gets: ``cap``, or fewer where its descriptor
    makes each entry dearer to search than lite0's mid descriptor at 256 px."""
    dim = descriptor_kind(config.patch_descriptor).dim(backbone_spec(config.backbone).channels)
    per_entry = config.patch_count * dim
    return max(min(PATCH_BANK_MIN, cap), min(cap, SEARCH_MACS // per_entry))


def greedy_coreset(
    patches: torch.Tensor,
    size: int,
    *,
    projection_dim: int = PROJECTION_DIM,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of ``size`` patches chosen by greedy k-center selection.

    Each step picks the patch farthest from everything picked so far (the first at random),
    so the bank covers the whole normal patch distribution with few entries.
    """
    n = patches.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = _project(patches, projection_dim, generator).contiguous()
    chosen = torch.empty(size, dtype=torch.long)
    pick = int(torch.randint(n, (1,), generator=generator))
    with _one_thread():
        sq = (x * x).sum(dim=1)
        nearest = torch.full((n,), float("inf"))
        d = torch.empty(n)
        for i in range(size):
            chosen[i] = pick
            # ‖x − p‖² = ‖x‖² − 2 x·p + ‖p‖²: one matrix-vector product per step
            torch.mv(x, x[pick], out=d)
            d.mul_(-2.0).add_(sq).add_(sq[pick])
            torch.minimum(nearest, d, out=nearest)
            pick = int(nearest.argmax())
            if on_progress is not None and i % 256 == 0:
                on_progress(i)
    return chosen


def local_coreset(patches: torch.Tensor, keep: int) -> torch.Tensor:
    """Per image, the ``keep`` patches a greedy k-center over that image's own patches picks.

    ``patches`` ``[images, P, D]`` → flat indices into ``patches.reshape(-1, D)``, run for all
    images at once (one batched product per step). A patch close to another patch of its own
    image (a repeated texture) is dropped, a patch unlike the rest of its image (a rare edge, a
    highlight) survives: every dropped patch lies within its image's covering radius of a kept
    one, so the global greedy that follows covers every training patch within its own radius
    plus that one. Thinning at random instead can lose exactly the rare patches a bank is for.
    """
    images, per_image, _ = patches.shape
    if keep >= per_image:
        return torch.arange(images * per_image)
    x = patches.to(torch.float32)
    sq = (x * x).sum(dim=2)
    nearest = torch.full((images, per_image), float("inf"))
    chosen = torch.empty(images, keep, dtype=torch.long)
    pick = torch.zeros(images, dtype=torch.long)  # each image's first patch: deterministic
    rows = torch.arange(images)
    for i in range(keep):
        chosen[:, i] = pick
        q = x[rows, pick]  # [images, D]
        d = sq - 2.0 * torch.bmm(x, q.unsqueeze(2)).squeeze(2) + sq[rows, pick].unsqueeze(1)
        torch.minimum(nearest, d, out=nearest)
        pick = nearest.argmax(dim=1)
    return (chosen + rows.unsqueeze(1) * per_image).flatten()


def bank_coreset(
    patches: torch.Tensor,
    owners: torch.Tensor,
    size: int,
    *,
    projection_dim: int = PROJECTION_DIM,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Indices of the ``size`` patches the bank keeps: PatchCore's greedy coreset, in two stages.

    One greedy over every training patch touches every patch at every step: 10¹² operations
    for 16 384 entries out of the tiles' 545 792 patches in 128 dimensions, most of an hour on
    two CPU cores. With more than ``POOL_PER_ENTRY`` patches per entry, a per-image greedy
    (``local_coreset``) first keeps each image's most diverse patches, so that the global
    greedy chooses from about ``POOL_PER_ENTRY · size`` candidates (minutes).
    """
    n = patches.shape[0]
    if size >= n:
        return torch.arange(n)
    generator = torch.Generator().manual_seed(seed)
    x = _project(patches, projection_dim, generator)
    counts = torch.bincount(owners)
    counts = counts[counts > 0]
    images = len(counts)
    pool = torch.arange(n)
    if n > POOL_PER_ENTRY * size and bool((counts == counts[0]).all()):
        per_image = int(counts[0])  # every image gave all its patches: stage 1 applies
        keep = max(1, math.ceil(POOL_PER_ENTRY * size / images))
        order = torch.argsort(owners, stable=True)
        with _one_thread():
            local = local_coreset(x[order].reshape(images, per_image, -1), keep)
        pool = order[local]
    chosen = greedy_coreset(
        x[pool], size, projection_dim=x.shape[1], seed=seed, on_progress=on_progress
    )
    return pool[chosen]


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
    per_image = model.config.patch_count
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


# Share of the training images whose patches also enter the bank's candidates after an extra
# JPEG round trip (offline.augment.codec_jitter): without them a camera's own compression reads
# as a defect to the bank alone. On the seed-1 synthetic line with a camera at JPEG 70, the
# networks trained with the codec augmentation had good parts' median z near 0.4, the bank
# 6.1 (docs/codec/README.md).
BANK_CODEC_SHARE = 0.5


def fit_patch_bank(
    model: CSADModel,
    images: np.ndarray,
    *,
    candidates: int | None = None,
    seed: int = 0,
    on_progress: Callable[[int], None] | None = None,
    codec_share: float = BANK_CODEC_SHARE,
) -> dict[str, float | list[float]]:
    """Fill ``model.patch_knn`` with a coreset of the training images' patches (and of a
    ``codec_share`` of them once more after a camera-like JPEG)."""
    bank = model.patch_knn
    if bank is None:
        raise ValueError("this model has no patch bank (ModelConfig.patch_bank = 0)")
    if candidates is None:
        candidates = CANDIDATE_BYTES // (4 * bank.bank.shape[1])
    n = len(images)
    rng = np.random.default_rng(seed + 7)
    copied = np.flatnonzero(rng.random(n) < codec_share) if codec_share > 0 else np.array([], int)
    sources = np.concatenate([np.arange(n), copied]).astype(np.int64)
    if len(copied):
        images = np.concatenate([images, codec_jitter(images[copied], rng, 1.0)])
    # each copy is its own image for the coreset (equal patch counts per owner), and its
    # source's for the leave-one-out, which must not find an image's twin in the bank
    patches, owners = collect_patches(model, images, candidates, seed)
    size = bank.bank.shape[0]
    if patches.shape[0] < size:
        raise ValueError(
            f"only {patches.shape[0]} patches for a bank of {size}: "
            "use more images or a smaller bank"
        )
    chosen = bank_coreset(patches, owners, size, seed=seed, on_progress=on_progress)
    bank.set_bank(patches[chosen].to(bank.bank.device))
    loo = patch_leave_one_out(model, images[:n], torch.from_numpy(sources)[owners[chosen]])
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
        shares.append(class_shares(labels, config.num_classes, config.input_size).cpu())
        desc = model.describe_patches(f)
        cell = config.height // config.patch_grid[0]
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
    model: CSADModel,
    train_images: np.ndarray,
    *,
    progress: bool = False,
    codec_share: float = BANK_CODEC_SHARE,
) -> dict[str, Any]:
    """Fill every memory bank the model has; ``loo`` holds each bank's leave-one-out scores."""
    from tqdm import tqdm

    loo: dict[str, list[float]] = {}
    info: dict[str, Any] = {}
    if model.patch_knn is not None:
        size = model.patch_knn.bank.shape[0]
        with tqdm(total=size, desc="coreset", disable=not progress, dynamic_ncols=True) as bar:
            patch = fit_patch_bank(
                model,
                train_images,
                on_progress=lambda i: bar.update(i - bar.n),
                codec_share=codec_share,
            )
            bar.update(size - bar.n)
        loo["patch_knn"] = patch.pop("loo")  # type: ignore[assignment]
        info["patch_knn"] = patch
    loo.update(fit_image_banks(model, train_images))
    if model.fewshot_knn is not None:
        shots = fit_fewshot_bank(model, train_images[: model.fewshot_knn.shots])
        loo["fewshot_knn"] = shots.pop("loo")  # type: ignore[assignment]
        info["fewshot_knn"] = shots
    return {**info, "loo": loo}
