"""``lineguard refit``: new memory banks and calibration for a trained bundle, without training.

The banks need no gradient steps — good patches and vectors, kept — so switching one on, resizing
the patch bank, re-filling the banks after new good images were collected, or changing the
normalisation takes minutes, while retraining the segmentation and LGST takes half an hour. The
networks' weights are copied unchanged; every bank and every calibration statistic is fitted
again from the dataset's good images, as ``lineguard train`` does in its last two stages.

**Feedback from the line** (``extra_good``, ``check_bad``): frames the operators confirmed as
good parts that the bundle had rejected join the training images — so they enter the memory
banks and the histogram statistics — while calibration stays on the dataset's validation goods,
so the threshold is still set on images the banks never saw. Frames they confirmed as defects
are scored by the new bundle afterwards and the result says how many it still rejects: a
confirmed defect that would now pass is a reason not to roll the new version out.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np

from lineguard.engines.bundle import Bundle, load_bundle, save_bundle
from lineguard.engines.errors import BundleError, ConfigError
from lineguard.engines.model import CSADModel, ModelConfig, resolve_patch_search
from lineguard.offline.banks import (
    BANK_BRANCHES,
    BANK_CODEC_SHARE,
    bank_cap,
    coreset_size,
    fit_banks,
)
from lineguard.offline.calibrate import calibrate, raw_scores
from lineguard.offline.datasets import load_image, open_dataset


def refit_bundle(
    bundle_dir: Path | str,
    data_dir: Path | str,
    out: Path | str,
    *,
    patch_bank: int | Literal["auto"] | None = None,
    patch_descriptor: str | None = None,
    hist_bank: bool | None = None,
    comp_bank: bool | None = None,
    fewshot_shots: int | None = None,
    patch_search: str | None = None,
    position_prior: bool | None = None,
    position_scale: bool | None = None,
    hist_grids: tuple[int, ...] | None = None,
    normalisation: str | None = None,
    fusion: str | None = None,
    fusion_recipe: str | None = None,
    target_frr: float | None = None,
    max_train: int | None = None,
    bank_codec_share: float = BANK_CODEC_SHARE,
    extra_good: Sequence[Path | str] = (),
    check_bad: Sequence[Path | str] = (),
    progress: bool = False,
    log: Callable[[str], None] = lambda _m: None,
) -> Bundle:
    """A copy of the bundle at ``out`` with the banks and calibration fitted again.

    ``None`` keeps the bundle's current setting; ``hist_bank``/``comp_bank`` hold every training
    image (up to ``max_train``) when switched on. ``patch_bank="auto"`` sizes the patch bank by
    the data as ``lineguard train`` does (a share of all training patches, capped), and so does
    ``None`` when ``patch_descriptor`` changes the descriptor (the old size was chosen for
    another descriptor grid). The patch descriptors are always recomputed from the images
    through the backbone, so a new descriptor needs no retraining. ``fusion_recipe`` (``auto``,
    ``assembly``, ``surface``, ``all`` or branch names) chooses the fused branches; ``None``
    keeps the bundle's recipe, so a refit scores the way its source did. ``hist_grids`` changes
    the Patch Histogram's grids: its Gaussians are fitted on the segmentation's labels, so they
    too need no retraining.

    ``extra_good`` are images of confirmed good parts from the line (already in the line's
    encoding, so read without another codec round trip) added to the training images;
    ``check_bad`` are confirmed defects, scored by the new bundle. The manifest's
    ``extra.feedback`` records both counts and how many defects the new bundle rejects.
    """
    source = load_bundle(bundle_dir)
    if Path(out).resolve() == source.path.resolve():
        raise ConfigError("refit writes a new bundle: choose an --out other than the source")
    dataset = open_dataset(data_dir)
    size = source.config.input_size
    train = dataset.train if max_train is None else dataset.train[:max_train]
    log(f"reading {len(train)} training and {len(dataset.validation)} validation images")
    codec = source.config.codec  # the round trip the bundle was trained and calibrated for
    train_images = np.stack([load_image(s.path, size, codec) for s in train])
    if extra_good:
        log(f"adding {len(extra_good)} confirmed good frame(s) from the line to the banks")
        fed = np.stack([load_image(p, size) for p in extra_good])
        train_images = np.concatenate([train_images, fed])
    val_images = np.stack([load_image(s.path, size, codec) for s in dataset.validation])
    old = source.config

    def images_if(on: bool | None, current: int) -> int:
        return len(train_images) if (bool(current) if on is None else on) else 0

    prior = old.position_prior if position_prior is None else position_prior
    descriptor = patch_descriptor or old.patch_descriptor
    if patch_bank is None and descriptor != old.patch_descriptor and old.patch_bank:
        patch_bank = "auto"
    if patch_bank == "auto":
        target = replace(old, patch_descriptor=descriptor)
        patches = len(train_images) * target.patch_count
        patch_bank = coreset_size(patches, cap=bank_cap(target))
        log(f"patch bank: {patch_bank} of {patches} training patches")
    config = replace(
        old,
        patch_descriptor=descriptor,
        patch_bank=old.patch_bank if patch_bank is None else patch_bank,
        hist_bank=images_if(hist_bank, old.hist_bank),
        comp_bank=images_if(comp_bank, old.comp_bank),
        fewshot_shots=old.fewshot_shots if fewshot_shots is None else fewshot_shots,
        patch_search=resolve_patch_search(
            patch_search or old.patch_search,
            old.patch_bank if patch_bank is None else patch_bank,
        ),
        position_prior=prior,
        position_scale=ModelConfig.position_scale_for(prior, position_scale, old.position_scale),
        hist_grids=old.hist_grids if hist_grids is None else tuple(hist_grids),
    )
    if config.fewshot_shots > len(train_images):
        raise ConfigError(
            f"the few-shot branch wants {config.fewshot_shots} images; the dataset has "
            f"{len(train_images)} training images"
        )
    model = CSADModel(config, backbone_weights=None)
    networks = {k: v for k, v in source.state_dict().items() if not _refitted(k)}
    result = model.load_state_dict(networks, strict=False)
    stray = [k for k in result.missing_keys if not _refitted(k)]
    if stray or result.unexpected_keys:
        raise BundleError(
            f"{source.path} does not match its config: missing {stray[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    model.eval()
    log(f"fitting memory banks: {', '.join(b for b in config.branches if b in BANK_BRANCHES)}")
    info = fit_banks(model, train_images, progress=progress, codec_share=bank_codec_share)
    log("calibrating on validation goods")
    previous = source.calibration
    calibration, _ = calibrate(
        model,
        train_images,
        val_images,
        target_frr=target_frr if target_frr is not None else previous.target_frr or 0.01,
        method=normalisation or previous.method,
        combine=fusion or previous.combine,
        bank_loo=info["loo"],
        recipe=fusion_recipe or previous.recipe,
        # a bundle from before recipes: train names the one class "foreground" on a surface
        has_components=bool(
            previous.extra.get(
                "components_found", source.config.class_names != ("background", "foreground")
            )
        ),
    )
    if warning := calibration.thin_evidence():
        log(f"warning: {warning}")
    extra = dict(source.manifest.get("extra", {}))
    extra.update(refit_from=source.version, n_train=len(train_images), n_validation=len(val_images))
    if extra_good or check_bad:
        extra["feedback"] = {"good": len(extra_good), "defects": len(check_bad)}
    if check_bad:
        bad = np.stack([load_image(p, size) for p in check_bad])
        fused = calibration.fuse(raw_scores(model, bad))
        still = int((fused > calibration.threshold).sum())
        extra["feedback"]["defects_rejected"] = still
        note = "" if still == len(bad) else " (check the ones that now pass before rolling out)"
        log(f"confirmed defects: the new bundle rejects {still} of {len(bad)}{note}")
    return save_bundle(model, out, calibration, overwrite=True, extra=extra)


def _refitted(key: str) -> bool:
    """Tensors that refit computes afresh: the banks, the position prior, the histograms'
    Gaussians (calibration fits them again, whatever the grids)."""
    head = key.split(".")[0]
    return head in BANK_BRANCHES or head == "patch_hist" or key.startswith("prior_")
