"""Training the component segmentation head on (pseudo-)labelled and unlabelled good images.

Losses follow CSAD/PSAD: on labelled images cross-entropy, focal and class-balanced Dice; on
unlabelled images histogram matching (the predicted class fractions should match those of a
random labelled map, because good parts have a stable composition) and pixel entropy (be
decisive). The unlabelled losses switch on after a supervised warm-up, as in both papers.

LSA (label-aware copy-paste) moves components, with their labels, to new places in the image.
Without it the head learns "red things in the top-left are apples" and mislabels an apple that
sits somewhere else — exactly the misplaced-component case the histograms must see correctly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from lineguard.engines.model import CSADModel
from lineguard.offline.augment import codec_jitter, color_jitter


@dataclass(frozen=True)
class SegTrainConfig:
    steps: int = 800
    batch_labelled: int = 4
    batch_unlabelled: int = 4
    lr: float = 1e-3
    weight_decay: float = 1e-5
    supervised_fraction: float = 0.4
    w_ce: float = 0.5
    w_focal: float = 10.0
    w_dice: float = 1.0
    w_hist: float = 10.0
    w_entropy: float = 1.0
    lsa_probability: float = 1.0
    lsa_max_copies: int = 2
    codec_probability: float = 0.5  # images seen after an extra JPEG (augment.codec_jitter)
    seed: int = 0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    return (-(1 - logp.exp()).pow(gamma) * logp).mean()


def dice_loss(probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced soft Dice: every class present in the batch weighs the same."""
    onehot = F.one_hot(target, probs.shape[1]).permute(0, 3, 1, 2).to(probs)
    inter = (probs * onehot).sum(dim=(0, 2, 3))
    denom = probs.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    present = onehot.sum(dim=(0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return dice[present].mean()


def histogram_loss(probs: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of class fractions, predicted (soft) vs a labelled reference."""
    predicted = probs.mean(dim=(2, 3))
    return (predicted - reference).abs().mean()


def entropy_loss(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp_min(1e-8).log()).sum(dim=1).mean()


def label_fractions(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Class fractions ``[N, C]`` of label maps ``[N, H, W]``."""
    counts = np.stack([np.bincount(m.ravel(), minlength=num_classes) for m in labels])
    return counts[:, :num_classes] / labels[0].size


def lsa(
    image: np.ndarray, labels: np.ndarray, rng: np.random.Generator, max_copies: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """Copy up to ``max_copies`` labelled components to random free-ish places in the image."""
    image, labels = image.copy(), labels.copy()
    classes = [c for c in np.unique(labels) if c != 0]
    if not classes:
        return image, labels
    height, width = labels.shape[:2]
    for _ in range(int(rng.integers(1, max_copies + 1))):
        cls = int(rng.choice(classes))
        n, comp = cv2.connectedComponents((labels == cls).astype(np.uint8))
        if n <= 1:
            continue
        mask = comp == int(rng.integers(1, n))
        ys, xs = np.nonzero(mask)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        if h >= height * 0.6 or w >= width * 0.6:
            continue  # a component spanning most of the image has nowhere else to go
        dy = int(rng.integers(0, height - h)) - ys.min()
        dx = int(rng.integers(0, width - w)) - xs.min()
        image[ys + dy, xs + dx] = image[ys, xs]
        labels[ys + dy, xs + dx] = cls
    return image, labels


def train_segmentation(
    model: CSADModel,
    images: np.ndarray,
    labels: np.ndarray,
    labelled: np.ndarray,
    config: SegTrainConfig = SegTrainConfig(),
    on_step: Callable[[int, dict[str, float]], object] | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    """Fit ``model.segmenter`` on ``images[labelled]`` with ``labels`` and the rest unlabelled.

    ``labels`` is ``[N, S, S]`` uint8 (rows of unlabelled images are ignored); ``labelled`` is a
    boolean mask over the N images.
    """
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    num_classes = model.config.num_classes
    lab_idx = np.flatnonzero(labelled)
    unl_idx = np.flatnonzero(~labelled)
    if lab_idx.size == 0:
        raise ValueError("segmentation training needs at least one labelled image")
    reference = torch.from_numpy(label_fractions(labels[lab_idx], num_classes)).float().to(device)
    head = model.segmenter
    optimizer = torch.optim.Adam(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    warmup = int(config.supervised_fraction * config.steps)
    head.train()
    last: dict[str, float] = {}
    for step in range(config.steps):
        pick = rng.choice(lab_idx, config.batch_labelled)
        pairs = [
            lsa(images[i], labels[i], rng, config.lsa_max_copies)
            if rng.random() < config.lsa_probability
            else (images[i], labels[i])
            for i in pick
        ]
        pixels = codec_jitter(np.stack([p[0] for p in pairs]), rng, config.codec_probability)
        x_l = color_jitter(torch.from_numpy(pixels), generator)
        y_l = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        use_unlabelled = step >= warmup and unl_idx.size > 0
        x = x_l
        if use_unlabelled:
            x_u = torch.from_numpy(
                codec_jitter(
                    images[rng.choice(unl_idx, config.batch_unlabelled)],
                    rng,
                    config.codec_probability,
                )
            )
            x = torch.cat([x_l, color_jitter(x_u, generator)])
        xn = model.preprocess(x.to(device))
        y_l = y_l.to(device)
        with torch.no_grad():
            features = model.backbone(xn)
        logits = model.segment(features)
        logits_l = logits[: len(pairs)]
        probs_l = logits_l.softmax(dim=1)
        loss_ce = F.cross_entropy(logits_l, y_l)
        loss_focal = focal_loss(logits_l, y_l)
        loss_dice = dice_loss(probs_l, y_l)
        loss = config.w_ce * loss_ce + config.w_focal * loss_focal + config.w_dice * loss_dice
        last = {"ce": loss_ce.item(), "focal": loss_focal.item(), "dice": loss_dice.item()}
        if use_unlabelled:
            probs_u = logits[len(pairs) :].softmax(dim=1)
            ref = reference[rng.integers(0, len(reference), probs_u.shape[0])]
            loss_hist = histogram_loss(probs_u, ref)
            loss_ent = entropy_loss(probs_u)
            loss = loss + config.w_hist * loss_hist + config.w_entropy * loss_ent
            last |= {"hist": loss_hist.item(), "entropy": loss_ent.item()}
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        last["loss"] = loss.item()
        if on_step is not None:
            on_step(step, last)
    head.eval()
    return last


@torch.no_grad()
def predict_labels(model: CSADModel, images: np.ndarray, batch: int = 16) -> np.ndarray:
    """Argmax class maps ``[N, S, S]`` uint8 for uint8 images."""
    device = model.pixel_mean.device
    out = []
    for i in range(0, len(images), batch):
        x = model.preprocess(torch.from_numpy(images[i : i + batch]).to(device))
        labels = model.segment(model.backbone(x)).argmax(dim=1)
        out.append(labels.to(torch.uint8).cpu().numpy())
    return np.concatenate(out)
