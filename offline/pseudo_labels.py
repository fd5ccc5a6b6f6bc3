"""Semantic pseudo-labels without human labels (CSAD §3.1), with tools that run on a CPU.

CSAD gets component masks from SAM/GroundingDINO, which are not available offline. We keep its
structure and replace only the mask proposer:

1. **Masks.** Pixels of all training images are described by colour (Lab) and frozen backbone
   features and clustered jointly with k-means (an over-segmentation shared by all images);
   the connected regions of each cluster in each image are that image's component masks.
   Regions that are tiny or cover a large part of the frame (tray, background) are dropped.
   A SAM-style generator can be plugged in instead (``MaskGenerator``).
2. **Component features.** Each mask is cropped, rotated by 0/90/180/270°, passed through the
   backbone and average-pooled inside the mask; the four are averaged, so a component's class
   does not depend on its orientation. Mean colour, log-area and shape (elongation, fill)
   are appended.
3. **Classes.** MeanShift clusters the component features; a cluster present in fewer than α
   (default 0.5) of the images is dropped (it is noise or a rare variant, not a component of
   the product).
4. **Filtering.** HDBSCAN on the per-image class histograms keeps the label maps of the
   largest cluster; the others are unreliable and become unlabelled images for training.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from lineguard.engines.backbones import Backbone

MIN_AREA_FRACTION = 0.0015
MAX_AREA_FRACTION = 0.2


class MaskGenerator(Protocol):
    """Proposes component masks for each image (bool ``[H, W]`` arrays); SAM fits this."""

    def __call__(self, images: np.ndarray) -> list[list[np.ndarray]]: ...


@dataclass(frozen=True)
class PseudoLabelConfig:
    clusters: int = 16  # k-means clusters of the pixel over-segmentation
    feature_size: int = 128  # resolution at which pixels are clustered
    deep_weight: float = 0.5  # weight of backbone features against colour in the clustering
    max_objects: int = 60  # per image, largest first
    min_thickness: float = 3.0  # pixels at 128 px: thinner regions are edges, not components
    alpha: float = 0.5  # a class must appear in at least this fraction of images
    bandwidth_quantile: float = 0.05
    hdbscan_min_fraction: float = 0.1
    max_classes: int = 12
    # None: every component feature column standardised alike, then PCA (the default); or the
    # share of each cue in the clustering, deep, colour, size, shape (balance_blocks)
    block_weights: tuple[float, float, float, float] | None = None
    seed: int = 0


@dataclass
class PseudoLabels:
    labels: np.ndarray  # [N, S, S] uint8, 0 = background
    labelled: np.ndarray  # [N] bool: kept by the histogram filter
    class_names: tuple[str, ...]
    stats: dict[str, float] = field(default_factory=dict)


def _normalise(images: np.ndarray, backbone: Backbone) -> torch.Tensor:
    spec = backbone.spec
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std).view(1, 3, 1, 1) * 255
    return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std


def feature_grid(image_hw: tuple[int, int], side: int) -> tuple[int, int]:
    """The (rows, columns) at which pixels are clustered: ``side``² cells in all, shaped like
    the image, so a long part keeps its proportions and is not squeezed before clustering."""
    h, w = image_hw
    if h == w:
        return (side, side)
    aspect = w / h
    return (max(8, round(side / aspect**0.5)), max(8, round(side * aspect**0.5)))


def _pixel_features(
    backbone: Backbone, images: np.ndarray, size: tuple[int, int], blur: float = 1.5
) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel Lab colour ``[N, h, w, 3]`` and stride-4/8 backbone features ``[N, h, w, D]``
    on the clustering grid ``size`` = (h, w)."""
    colour, deep = [], []
    for i in range(0, len(images), 16):
        chunk = images[i : i + 16]
        with torch.no_grad():
            f4, f8, _ = backbone(_normalise(chunk, backbone))
        d = torch.cat([F.interpolate(f, size=size, mode="bilinear") for f in (f4, f8)], 1)
        deep.append(d.permute(0, 2, 3, 1).numpy())
        small = [cv2.resize(im, size[::-1], interpolation=cv2.INTER_AREA) for im in chunk]
        # A light blur turns fine texture (granules on a bed) into the region's mean colour, so
        # a textured component is one region and not a salt-and-pepper of two colour clusters.
        lab = [cv2.GaussianBlur(cv2.cvtColor(im, cv2.COLOR_RGB2LAB), (0, 0), blur) for im in small]
        colour.append(np.stack(lab))
    return np.concatenate(colour).astype(np.float32), np.concatenate(deep)


def oversegment(
    backbone: Backbone, images: np.ndarray, config: PseudoLabelConfig
) -> list[list[np.ndarray]]:
    """Region masks per image from a k-means over-segmentation shared by all images.

    Pixels are clustered on (lightly blurred) colour plus a few principal components of the
    backbone features: colour separates most components, the deep features separate textures
    of one colour. Each connected region of a cluster is a candidate mask; regions that are
    tiny, thin (edges, walls, shadows) or span most of the frame (the background) are dropped.
    Regions of the container itself (compartment floors) survive as classes of their own,
    which is harmless: their area changes consistently when a component is missing.
    """
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.decomposition import PCA

    grid = feature_grid(images.shape[1:3], config.feature_size)
    # lengths below are relative to the grid's mean side: the square grid's side when square
    size = (grid[0] * grid[1]) ** 0.5
    colour, deep = _pixel_features(backbone, images, grid)
    n = len(images)
    rng = np.random.default_rng(config.seed)
    deep_flat = deep.reshape(-1, deep.shape[-1])
    sample = rng.choice(len(deep_flat), min(len(deep_flat), 100_000), replace=False)
    pca = PCA(n_components=8, random_state=config.seed).fit(deep_flat[sample])
    dp = pca.transform(deep_flat)
    colour_flat = colour.reshape(-1, 3)
    x = np.concatenate(
        [colour_flat / colour_flat.std(axis=0).clip(1e-6), config.deep_weight * dp / dp.std()],
        axis=1,
    ).astype(np.float32)
    sample = rng.choice(len(x), min(len(x), 200_000), replace=False)
    kmeans = MiniBatchKMeans(config.clusters, random_state=config.seed, n_init=3, batch_size=4096)
    clusters = kmeans.fit(x[sample]).predict(x).reshape(n, *grid)
    full_hw = images.shape[1:3]
    masks: list[list[np.ndarray]] = []
    for cmap in clusters:
        cmap = cv2.medianBlur(cmap.astype(np.uint8), 3)
        found = []
        for c in np.unique(cmap):
            count, comp, stats, _ = cv2.connectedComponentsWithStats((cmap == c).astype(np.uint8))
            for k in range(1, count):
                area = stats[k, cv2.CC_STAT_AREA] / cmap.size
                longest = max(stats[k, cv2.CC_STAT_WIDTH], stats[k, cv2.CC_STAT_HEIGHT])
                # Mean thickness in pixels: edges, walls and shadows are long and thin.
                thickness = stats[k, cv2.CC_STAT_AREA] / longest
                # share of the frame's extent along each axis: a region spanning most of
                # the frame in either direction is background, whatever the aspect
                span = max(
                    stats[k, cv2.CC_STAT_WIDTH] / grid[1], stats[k, cv2.CC_STAT_HEIGHT] / grid[0]
                )
                if (
                    MIN_AREA_FRACTION <= area <= MAX_AREA_FRACTION
                    and span <= 0.6
                    and thickness >= config.min_thickness * size / 128
                ):
                    region = (comp == k).astype(np.uint8)
                    up = cv2.resize(
                        region, (full_hw[1], full_hw[0]), interpolation=cv2.INTER_LINEAR
                    )
                    found.append(up.astype(bool))
        found.sort(key=lambda m: -int(m.sum()))
        masks.append(found[: config.max_objects])
    return masks


def _shape_features(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    area = len(ys)
    cov = np.cov(np.stack([ys, xs]).astype(np.float64)) if area > 2 else np.eye(2)
    eig = np.sort(np.linalg.eigvalsh(cov + 1e-6 * np.eye(2)))
    elongation = np.sqrt(eig[1] / eig[0])
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return np.array([np.log(area / mask.size), np.log(elongation), area / box])


@torch.no_grad()
def component_features(
    backbone: Backbone, images: np.ndarray, masks: Sequence[Sequence[np.ndarray]], crop: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Rotation-averaged features per component, and the image index of each component."""
    crops, crop_masks, extra, owner = [], [], [], []
    for i, (img, image_masks) in enumerate(zip(images, masks, strict=True)):
        lab = cv2.cvtColor(img, cv2.COLOR_RGB2LAB).astype(np.float32) / 255.0
        for m in image_masks:
            ys, xs = np.nonzero(m)
            y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
            pad = max(2, (max(y1 - y0, x1 - x0)) // 8)
            y0, x0 = max(y0 - pad, 0), max(x0 - pad, 0)
            y1, x1 = min(y1 + pad, m.shape[0]), min(x1 + pad, m.shape[1])
            crops.append(
                cv2.resize(img[y0:y1, x0:x1], (crop, crop), interpolation=cv2.INTER_LINEAR)
            )
            crop_masks.append(
                cv2.resize(
                    m[y0:y1, x0:x1].astype(np.uint8), (crop, crop), interpolation=cv2.INTER_NEAREST
                )
            )
            extra.append(np.concatenate([3.0 * lab[m].mean(axis=0), _shape_features(m)]))
            owner.append(i)
    if not crops:
        return np.zeros((0, 1), np.float32), np.zeros(0, np.int64)
    x = _normalise(np.stack(crops), backbone)
    mk = torch.from_numpy(np.stack(crop_masks)).float().unsqueeze(1)
    pooled = torch.zeros(len(crops), 0)
    for k in range(4):  # rotation averaging: 0, 90, 180, 270 degrees
        xr, mr = torch.rot90(x, k, dims=(2, 3)), torch.rot90(mk, k, dims=(2, 3))
        outs = []
        for j in range(0, len(crops), 128):
            f = backbone(xr[j : j + 128])[-1]
            weight = F.interpolate(mr[j : j + 128], size=f.shape[2:], mode="area")
            pooled_k = (f * weight).sum(dim=(2, 3)) / weight.sum(dim=(2, 3)).clamp_min(1e-6)
            outs.append(pooled_k)
        feats = torch.cat(outs)
        pooled = feats if k == 0 else pooled + feats
    deep = (pooled / 4).numpy()
    deep = deep / np.linalg.norm(deep, axis=1, keepdims=True).clip(1e-6)
    return np.concatenate([deep, np.stack(extra)], axis=1).astype(np.float32), np.asarray(owner)


# component_features' columns after the pooled deep features: mean Lab colour (3), then
# log-area (1), then shape (log-elongation, fill: 2).
EXTRA_BLOCKS = (3, 1, 2)


def balance_blocks(
    features: np.ndarray, weights: tuple[float, float, float, float], seed: int = 0
) -> np.ndarray:
    """Component features with each cue (deep, colour, size, shape) given a set share.

    Standardising every column alike hands the few hundred deep columns almost all of the
    variance, so the three colour columns vanish from the principal components; yet colour is
    what tells a red cable from a blue one. Here the deep block is reduced to its leading
    principal components, each block's columns are standardised, and each block is scaled to
    a root-mean-square norm equal to its weight. A block without structure is scaled up like
    any other, which is why this is not yet the default (docs/families/README.md, "What the
    pseudo-labels find": it separates the connectors' cable colours, and costs the tray's
    class purity).
    """
    from sklearn.decomposition import PCA

    n_extra = sum(EXTRA_BLOCKS)
    deep_dims = features.shape[1] - n_extra
    deep = features[:, :deep_dims].astype(np.float64)
    deep = deep - deep.mean(axis=0)
    k = min(8, deep_dims, max(1, len(features) - 1))
    blocks = [PCA(n_components=k, random_state=seed).fit_transform(deep)]
    start = deep_dims
    for width in EXTRA_BLOCKS:
        b = features[:, start : start + width].astype(np.float64)
        b = b - b.mean(axis=0)
        blocks.append(b / b.std(axis=0).clip(1e-9))
        start += width
    out = []
    for b, w in zip(blocks, weights, strict=True):
        rms = float(np.sqrt((b**2).sum(axis=1).mean()))
        out.append(w * b / max(rms, 1e-9))
    return np.concatenate(out, axis=1)


def cluster_components(
    features: np.ndarray, owner: np.ndarray, n_images: int, config: PseudoLabelConfig
) -> np.ndarray:
    """Class per component (−1 = dropped) from MeanShift, keeping classes in ≥ α of images."""
    from sklearn.cluster import MeanShift, estimate_bandwidth
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    if config.block_weights is None:
        z = StandardScaler().fit_transform(features)
        z = PCA(n_components=min(16, z.shape[1], len(z)), random_state=config.seed).fit_transform(z)
    else:
        z = balance_blocks(features, config.block_weights, config.seed)
    bandwidth = estimate_bandwidth(
        z, quantile=config.bandwidth_quantile, random_state=config.seed, n_samples=min(len(z), 2000)
    )
    assign = MeanShift(bandwidth=max(bandwidth, 1e-3), bin_seeding=True).fit_predict(z)
    keep = []
    for c in np.unique(assign):
        presence = len(np.unique(owner[assign == c])) / n_images
        if presence >= config.alpha:
            keep.append(c)
    # Largest-presence classes first, so class ids are stable across runs of the same data.
    keep.sort(key=lambda c: (-np.sum(assign == c), c))
    keep = keep[: config.max_classes]
    remap = {c: i + 1 for i, c in enumerate(keep)}
    return np.array([remap.get(c, -1) for c in assign])


def filter_by_histogram(
    labels: np.ndarray, num_classes: int, config: PseudoLabelConfig
) -> np.ndarray:
    """Keep the label maps whose class histogram falls in the largest HDBSCAN cluster."""
    from sklearn.cluster import HDBSCAN

    n = len(labels)
    if n < 5:
        return np.ones(n, dtype=bool)
    hist = np.stack([np.bincount(m.ravel(), minlength=num_classes)[1:num_classes] for m in labels])
    hist = hist / labels[0].size
    min_size = max(2, int(config.hdbscan_min_fraction * n))
    assign = HDBSCAN(min_cluster_size=min_size, copy=True).fit_predict(hist)
    if (assign < 0).all():
        return np.ones(n, dtype=bool)
    largest = np.bincount(assign[assign >= 0]).argmax()
    return assign == largest


def generate_pseudo_labels(
    backbone: Backbone,
    images: np.ndarray,
    config: PseudoLabelConfig = PseudoLabelConfig(),
    mask_generator: MaskGenerator | None = None,
    progress: Callable[[str], None] | None = None,
) -> PseudoLabels:
    """Label maps for good ``images`` (uint8 ``[N, S, S, 3]``) and which of them to trust."""
    note = progress or (lambda _msg: None)
    note("proposing component masks")
    masks = mask_generator(images) if mask_generator else oversegment(backbone, images, config)
    note("describing components")
    feats, owner = component_features(backbone, images, masks)
    if len(feats) < 2:
        # A plain surface (a tile, a sheet of metal): nothing to count. The caller decides
        # what to do with a product that has no component classes.
        empty = np.zeros(images.shape[:3], dtype=np.uint8)
        return PseudoLabels(empty, np.ones(len(images), bool), ("background",), {"masks": 0.0})
    note("clustering components")
    classes = cluster_components(feats, owner, len(images), config)
    num_classes = int(classes.max()) + 1 if (classes > 0).any() else 1
    labels = np.zeros(images.shape[:3], dtype=np.uint8)
    flat_masks = [m for image_masks in masks for m in image_masks]
    # Paint larger components first so a small one inside a large one stays visible.
    order = sorted(range(len(flat_masks)), key=lambda j: -flat_masks[j].sum())
    for j in order:
        if classes[j] > 0:
            labels[owner[j]][flat_masks[j]] = classes[j]
    note("filtering label maps")
    labelled = filter_by_histogram(labels, num_classes, config)
    names = ("background", *(f"component_{k}" for k in range(1, num_classes)))
    stats = {
        "masks": float(len(flat_masks)),
        "classes": float(num_classes - 1),
        "labelled_fraction": float(labelled.mean()),
    }
    return PseudoLabels(labels, labelled, names, stats)
