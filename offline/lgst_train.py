"""Training the LGST branch: EfficientAD-style student–teacher and autoencoder losses.

Per step, on a batch of good images (colour-jittered half of the time):

- local student vs teacher: squared error with hard-feature mining — only the elements above
  the 99.9 % quantile count, so the student spends its capacity where it is still wrong;
- penalty: the local head's output on out-of-distribution images is pushed towards zero, so
  the student does not become a general teacher imitator (see ``lineguard.offline.augment``);
- autoencoder vs teacher, and the student's global head vs the (detached) autoencoder output.

One backbone pass and one student pass per step serve all three losses (EfficientAD runs a
second student pass on a separately augmented image); on a CPU that halves the step time.
The backbone is frozen, so for the steps that see images unjittered the teacher's targets are
read from a cache that ``fit_teacher_normalisation`` fills on its pass instead of recomputed:
the same numbers without the backbone pass (~200 ms of a ~900 ms step at 256 px on 2 CPU
cores, timed alone).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from lineguard.engines.lgst import LGST
from lineguard.engines.model import CSADModel
from lineguard.offline.augment import codec_jitter, color_jitter, procedural_images

PENALTY_MODES = ("procedural", "folder", "off")
# Up to this many bytes of teacher targets are kept for the unjittered steps: 2 GiB holds ~1000
# images at 256 px with the lite profile (2 MiB each); a larger training set is served uncached.
TEACHER_CACHE_BYTES = 2 * 2**30


@dataclass(frozen=True)
class LGSTTrainConfig:
    """Defaults fit a CPU budget: a short cosine schedule at a higher learning rate than the
    papers' (2e-4 over 60–70k steps) converges much further in ~1000 steps (measured on the
    synthetic tray: structural AUROC of the local map 0.71 at lr 2e-4 vs 0.77 at 1e-3).

    1200 steps with the hard-negative penalty every third step (was 1500 and every second)
    take ~24 % less time (0.92 s/step at every second, 0.79 at every fourth; 256 px, batch 8):
    a whole default tray ``train`` measured 16–18 min on one 2-core machine and is estimated
    at ≈ 28 min on one that took 33 min before; on the tray's selection seed the fused score held (logical 0.996 → 0.999,
    structural 0.974 → 0.973) while the LGST branch alone lost some (0.973/0.877 →
    0.921/0.829), which the patch bank and the histograms cover in the fusion."""

    steps: int = 1200
    batch_size: int = 8
    lr: float = 1e-3
    schedule: str = "cosine"  # or "step": ×0.1 at 95 % of the steps, as CSAD/EfficientAD
    weight_decay: float = 1e-5
    hard_quantile: float = 0.999
    penalty: str = "procedural"
    penalty_dir: Path | None = None
    penalty_every: int = 3
    jitter_probability: float = 0.5
    # of the jittered steps, the share whose images also get an extra JPEG (codec_jitter); on
    # jittered steps only, so the cached teacher targets of the plain steps stay valid
    codec_probability: float = 0.5
    seed: int = 0


def batched(images: np.ndarray, device: str = "cpu", batch: int = 16) -> list[torch.Tensor]:
    return [
        torch.from_numpy(images[i : i + batch]).to(device) for i in range(0, len(images), batch)
    ]


def student_branch(model: CSADModel) -> LGST:
    """The model's LGST branch; a model built without the student (a surface) has none."""
    if model.lgst is None:
        raise ValueError("this model has no LGST student (ModelConfig.student = False)")
    return model.lgst


@torch.no_grad()
def fit_teacher_normalisation(
    model: CSADModel, images: np.ndarray, device: str = "cpu", keep_bytes: int = 0
) -> torch.Tensor | None:
    """Per-channel mean and std of the projected teacher features over the training images.

    Returns the normalised teacher output of every image (the targets ``train_lgst`` reuses on
    its unjittered steps) when it fits in ``keep_bytes``, so the backbone runs over the training
    set once for both; None otherwise.
    """
    teacher = student_branch(model).teacher
    fh, fw = teacher.feat_size
    keep = len(images) * teacher.proj.out_channels * fh * fw * 4 <= keep_bytes
    kept: list[torch.Tensor] = []
    total = sq = None
    count = 0
    for chunk in batched(images, device):
        raw = teacher.raw(model.backbone(model.preprocess(chunk)))
        if keep:
            kept.append(raw)
        t = raw.to(torch.float64)
        s, s2 = t.sum(dim=(0, 2, 3)), t.pow(2).sum(dim=(0, 2, 3))
        total = s if total is None else total + s
        sq = s2 if sq is None else sq + s2
        count += t.shape[0] * t.shape[2] * t.shape[3]
    assert total is not None and sq is not None
    mean = total / count
    std = (sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
    teacher.mean.copy_(mean.float())
    teacher.std.copy_(std.float().clamp_min(1e-6))
    if not keep:
        return None
    return torch.cat([teacher.normalise(raw) for raw in kept])


def hard_mse(target: torch.Tensor, output: torch.Tensor, quantile: float) -> torch.Tensor:
    """Mean squared error over the elements whose error is at or above its ``quantile``
    (hard-feature mining).

    The elements are chosen without autograd and only they are differenced again with it: the
    backward pass then touches a 0.1 % slice instead of three full-size tensors (a [8, 128, 64, 64]
    map per step on a CPU).
    """
    with torch.no_grad():
        diff2 = (target - output).pow_(2).flatten()
        k = max(int(diff2.numel() * quantile), 1)
        hard = (diff2 >= diff2.kthvalue(k).values).nonzero().squeeze(1)
    return (target.flatten()[hard] - output.flatten()[hard]).pow(2).mean()


def penalty_source(
    config: LGSTTrainConfig, size: tuple[int, int]
) -> Callable[[int], np.ndarray] | None:
    if config.penalty == "off":
        return None
    rng = np.random.default_rng(config.seed + 1)
    if config.penalty == "procedural":
        return lambda n: procedural_images(n, size, rng)
    if config.penalty == "folder":
        from lineguard.offline.datasets import IMAGE_EXTENSIONS, load_image

        if config.penalty_dir is None:
            raise ValueError("penalty='folder' needs penalty_dir")
        files = sorted(
            p for p in Path(config.penalty_dir).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise ValueError(f"no images in penalty folder {config.penalty_dir}")
        return lambda n: np.stack(
            [load_image(files[i], size) for i in rng.integers(0, len(files), n)]
        )
    raise ValueError(f"unknown penalty {config.penalty!r}; use one of {PENALTY_MODES}")


def train_lgst(
    model: CSADModel,
    images: np.ndarray,
    config: LGSTTrainConfig = LGSTTrainConfig(),
    on_step: Callable[[int, dict[str, float]], object] | None = None,
    device: str = "cpu",
    targets: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fit the local student and autoencoder on good ``images`` (uint8 ``[N, S, S, 3]``);
    ``targets``, from ``fit_teacher_normalisation``, stand in for the teacher when unjittered."""
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    lgst = student_branch(model)
    student, autoencoder = lgst.student, lgst.autoencoder
    params = list(student.parameters()) + list(autoencoder.parameters())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler: torch.optim.lr_scheduler.LRScheduler
    if config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
    else:
        step_size = max(int(0.95 * config.steps), 1)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=0.1)
    penalty = penalty_source(config, model.config.input_size)
    student.train()
    autoencoder.train()
    last: dict[str, float] = {}
    for step in range(config.steps):
        picked = rng.integers(0, len(images), config.batch_size)
        jittered = bool(torch.rand((), generator=generator) < config.jitter_probability)
        if jittered:
            pixels = codec_jitter(images[picked], rng, config.codec_probability)
            batch = color_jitter(torch.from_numpy(pixels), generator)
        else:
            batch = torch.from_numpy(images[picked])
        x = model.preprocess(batch.to(device))
        if targets is not None and not jittered:
            teacher = targets[torch.from_numpy(picked).to(targets.device)]
        else:
            with torch.no_grad():
                teacher = lgst.teacher(model.backbone(x))
        local, global_ = student(x)
        loss_st = hard_mse(teacher, local, config.hard_quantile)
        ae = autoencoder(x)
        loss_ae = F.mse_loss(ae, teacher)  # one fused kernel each way, unlike (a - b).pow(2).mean()
        loss_stae = F.mse_loss(global_, ae.detach())
        loss = loss_st + loss_ae + loss_stae
        if penalty is not None and step % config.penalty_every == 0:
            odd = model.preprocess(torch.from_numpy(penalty(config.batch_size)).to(device))
            loss_penalty = student(odd)[0].pow(2).mean()
            loss = loss + loss_penalty
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        last = {
            "loss": loss.item(),
            "st": loss_st.item(),
            "ae": loss_ae.item(),
            "stae": loss_stae.item(),
        }
        if on_step is not None:
            on_step(step, last)
    student.eval()
    autoencoder.eval()
    return last


@torch.no_grad()
def calibrate_map_quantiles(
    model: CSADModel, images: np.ndarray, low: float = 0.9, high: float = 0.995, device: str = "cpu"
) -> None:
    """Set q_a, q_b of the local and global maps from good validation images (EfficientAD);
    nothing to set on a model without the student."""
    if model.lgst is None:
        return
    local_maps, global_maps = [], []
    for chunk in batched(images, device):
        x = model.preprocess(chunk)
        f = model.backbone(x)
        lm, gm = model.lgst.raw_maps(x, f)
        local_maps.append(lm.flatten().cpu())
        global_maps.append(gm.flatten().cpu())
    lgst = model.lgst
    for maps, a, b in (
        (local_maps, lgst.q_local_a, lgst.q_local_b),
        (global_maps, lgst.q_global_a, lgst.q_global_b),
    ):
        values = torch.cat(maps).numpy().astype(np.float64)
        qa, qb = np.quantile(values, [low, high])
        a.fill_(float(qa))
        b.fill_(float(max(qb, qa + 1e-6)))
