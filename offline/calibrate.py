"""Calibration: every statistic a verdict depends on, from good images only.

Order matters because each statistic normalises the next:

1. histogram Gaussians (mean, regularised inverse covariance) per grid, from the training
   images' predicted segmentations — the "normal composition" of the product;
2. LGST (and patch-bank) map quantiles q_a, q_b (0.9 and 0.995) from validation goods
   (EfficientAD); then, with the position prior, the per-position mean of the normalised maps
   (and LGST's per-position spread), so that branch scores are taken on the adjusted maps;
3. each histogram detector's trimmed μ, σ on validation goods (CSAD sums them normalised);
4. per-branch fusion statistics and the threshold at the target false-reject rate, from the
   validation goods' raw branch scores. The leave-one-out maxima for PSAD's alternative
   normalisation are stored beside them (from the training images for the memory banks).

Test images are never looked at here (the reference CSAD code selects checkpoints on the test
set; we do not).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from lineguard.engines.fusion import Calibration, fit_calibration, recipe_exclusions
from lineguard.engines.histogram import class_histograms, fit_gaussian, trimmed_stats
from lineguard.engines.knn import MAP_SCALE
from lineguard.engines.model import CSADModel
from lineguard.offline.banks import calibrate_bank_quantiles
from lineguard.offline.lgst_train import calibrate_map_quantiles
from lineguard.offline.seg_train import predict_labels


@torch.no_grad()
def raw_scores(model: CSADModel, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Raw branch scores ``[N, K]`` of the fused model (what the infer worker publishes)."""
    from lineguard.engines.runtimes.faiss_stage import FaissStage

    model.eval()
    stage = FaissStage.for_model(model)  # a bank searched after the engine: the same here
    parts = []
    for i in range(0, len(images), batch):
        out = model(torch.from_numpy(images[i : i + batch])).map(lambda t: t.numpy())
        parts.append((stage.apply(out) if stage else out).scores)
    return np.concatenate(parts).astype(np.float64)


def leave_one_out_max(
    model: CSADModel, val_scores: np.ndarray, bank_loo: dict[str, list[float]] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Per-branch ``(max LOO score, offset)`` for PSAD's adaptive scaling ``s / max(LOO)``.

    Memory banks (``*_knn``) use PSAD's own formula: each training image scored against the
    bank without its own entries (``bank_loo``, raw distances from ``offline.banks``). The patch
    bank publishes ``a·d + b`` (its map is quantile-normalised), so the offset ``b`` and scale
    ``a`` come along to make the normalised score exactly ``d / max(LOO)``. Branches without a
    bank (the histogram Mahalanobis, LGST), and the 1-shot few-shot branch, have no training
    leave-one-out; validation goods never took part in training, so each of their scores
    already is a held-out score and their maximum stands in.
    """
    scores = np.asarray(val_scores, dtype=np.float64)
    maxima = scores.max(axis=0)
    offsets = np.zeros(len(model.config.branches))
    for k, name in enumerate(model.config.branches):
        values = (bank_loo or {}).get(name) or []
        if not values:
            continue
        raw = float(np.max(values))
        if name == "patch_knn" and model.patch_knn is not None:
            qa, qb = float(model.patch_knn.q_a), float(model.patch_knn.q_b)
            a = MAP_SCALE / (qb - qa)
            offsets[k], maxima[k] = -a * qa, a * raw
        else:
            maxima[k] = raw
    return maxima, offsets


def fit_histogram_statistics(
    model: CSADModel, train_images: np.ndarray, val_images: np.ndarray
) -> None:
    ph = model.patch_hist
    size = model.config.input_size
    train_labels = torch.from_numpy(predict_labels(model, train_images).astype(np.int64))
    for g in ph.grids:
        hist = class_histograms(train_labels, ph.num_classes, g, size).numpy()
        mean, inv_cov = fit_gaussian(hist)
        ph.set_gaussian(g, mean, inv_cov)
    val_labels = torch.from_numpy(predict_labels(model, val_images).astype(np.int64))
    for g, scores in ph.detector_scores(val_labels).items():
        mu, sigma = trimmed_stats(scores.numpy())
        ph.set_normalisation(g, mu, sigma)


@torch.no_grad()
def fit_position_prior(
    model: CSADModel, images: np.ndarray, batch: int = 16
) -> dict[str, torch.Tensor]:
    """Per-position mean of the normalised maps (and, with ``position_scale``, LGST's spread).

    Taken after the map quantiles, with the prior at zero, and blurred 5×5 so that a
    position's prior is not just the noise of a hundred images. The spread is divided by its
    median over positions, so a typical position keeps its scale and the map quantiles keep
    their meaning; it is floored at a quarter of that median so that a position where every
    good part happened to agree cannot turn small noise into a large score.

    Returns every image's maps before the prior (``{"lgst": [N, 1, h, w], "knn": ...}``), from
    which ``held_out_prior_scores`` scores each image against a prior it did not shape.
    """

    model.prior_lgst.zero_()
    model.prior_knn.zero_()
    if model.config.position_scale:
        model.prior_scale_lgst.fill_(1.0)
    if model.config.position_scale_knn and model.patch_knn is not None:
        model.prior_scale_knn.fill_(1.0)
    maps: dict[str, list[torch.Tensor]] = {"lgst": [], "knn": []}
    for i in range(0, len(images), batch):
        x = model.preprocess(torch.from_numpy(images[i : i + batch]))
        f = model.backbone(x)
        if model.lgst is not None:
            maps["lgst"].append(model.lgst(x, f).float())
        if model.patch_knn is not None:
            maps["knn"].append(model.patch_knn(model.describe_patches(f)).float())
    stacked = {name: torch.cat(parts) for name, parts in maps.items() if parts}
    if "knn" in stacked:
        knn = stacked["knn"]
        model.prior_knn.copy_(_blur(knn.mean(dim=0, keepdim=True)))
        if model.config.position_scale_knn:
            model.prior_scale_knn.copy_(_relative_spread(_variance(knn)))
    if "lgst" not in stacked:  # no student (a surface): its column stays zero
        return stacked
    lgst = stacked["lgst"]
    model.prior_lgst.copy_(_blur(lgst.mean(dim=0, keepdim=True)))
    if model.config.position_scale:
        model.prior_scale_lgst.copy_(_relative_spread(_variance(lgst)))
    return stacked


def _blur(t: torch.Tensor) -> torch.Tensor:
    from torch.nn import functional as F

    return F.avg_pool2d(t, 5, stride=1, padding=2, count_include_pad=False)


def _variance(maps: torch.Tensor) -> torch.Tensor:
    """Per-position variance ``[1, 1, h, w]`` of a stack of maps ``[N, 1, h, w]``."""
    return maps.square().mean(dim=0, keepdim=True) - maps.mean(dim=0, keepdim=True) ** 2


def _relative_spread(variance: torch.Tensor) -> torch.Tensor:
    """LGST's per-position spread over its median, floored at a quarter (``[B, 1, h, w]``)."""
    spread = _blur(variance.clamp_min(0.0).sqrt())
    median = spread.flatten(1).median(dim=1).values.clamp_min(1e-6).view(-1, 1, 1, 1)
    return (spread / median).clamp_min(0.25)


def held_out_prior_scores(model: CSADModel, maps: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Each validation image's ``lgst`` and ``patch_knn`` score under a position prior (and
    spread) fitted on the other validation images only.

    The prior is the mean map of the validation goods, the spread their deviation; scored
    against statistics it helped make, an image that responded strongly somewhere has that
    response partly subtracted (by 1/N of it) and, worse, divided by the spread it inflated
    itself. Its score then reads lower than a test image's would, and a threshold set on such
    scores rejects more good parts on the line than the target (the fewer the validation goods,
    the more). Leaving the image out makes each score a held-out one, as a test image's is.
    """
    out: dict[str, np.ndarray] = {}
    if not maps:
        return out
    n = next(iter(maps.values())).shape[0]
    if n < 2:
        return out
    config = model.config
    for name, stack in maps.items():
        scores = []
        total, squares = stack.sum(dim=0, keepdim=True), stack.square().sum(dim=0, keepdim=True)
        for i in range(0, n, 64):
            own = stack[i : i + 64]
            rest_mean = (total - own) / (n - 1)
            adjusted = own - _blur(rest_mean)
            if config.position_scale if name == "lgst" else config.position_scale_knn:
                rest_var = (squares - own.square()) / (n - 1) - rest_mean.square()
                adjusted = adjusted / _relative_spread(rest_var)
            scores.append(adjusted.amax(dim=(1, 2, 3)))
        out["lgst" if name == "lgst" else "patch_knn"] = torch.cat(scores).double().numpy()
    return out


def calibrate(
    model: CSADModel,
    train_images: np.ndarray,
    val_images: np.ndarray,
    *,
    target_frr: float = 0.01,
    method: str = "trimmed_z",
    combine: str = "max",
    bank_loo: dict[str, list[float]] | None = None,
    recipe: str = "auto",
    has_components: bool = True,
) -> tuple[Calibration, np.ndarray]:
    """Fill the model's statistic buffers and return the fusion calibration and val scores.

    ``recipe`` chooses the fused branches (``engines.fusion.recipe_exclusions``);
    ``has_components`` is what the pseudo-labels found, which ``auto`` decides by."""
    model.eval()
    fit_histogram_statistics(model, train_images, val_images)
    calibrate_map_quantiles(model, val_images)
    calibrate_bank_quantiles(model, val_images)
    held_out: dict[str, np.ndarray] = {}
    if model.config.position_prior:
        held_out = held_out_prior_scores(model, fit_position_prior(model, val_images))
    val_scores = raw_scores(model, val_images)
    # the fusion statistics and the threshold see each image as the line will: held out
    for name, column in held_out.items():  # "lgst", and "patch_knn" when the model has it
        val_scores[:, model.config.branches.index(name)] = column
    loo, offsets = leave_one_out_max(model, val_scores, bank_loo)
    applied, excluded = recipe_exclusions(recipe, model.config.branches, has_components)
    calibration = fit_calibration(
        model.config.branches,
        val_scores,
        target_frr=target_frr,
        method=method,
        loo_max=loo,
        combine=combine,
        loo_offset=offsets,
        recipe=applied,
        excluded=excluded,
    )
    extra = dict(
        calibration.extra,
        components_found=has_components,
        loo_max=[float(v) for v in loo],
        loo_offset=[float(v) for v in offsets],
    )
    return replace(calibration, extra=extra), val_scores
