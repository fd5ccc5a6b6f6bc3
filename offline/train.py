"""``lineguard train``: from a folder of good images to a calibrated bundle, resumably.

Five stages, each with a progress bar and each saved when it finishes in a work directory next
to the bundle (``<out>.work/``): pseudo-labels, segmentation, LGST, memory banks, calibration.
Killing the run and starting it again continues after the last finished stage; a work
directory written for different data or settings is refused rather than silently mixed in
(``restart=True`` clears it). Only good images are used: train for fitting, validation for
calibration. Test images are never read here. Every image goes through the frame codec the
line will use (default JPEG at quality 90, as ingest sends) before any stage sees it, and the
bundle records it: the banks and the threshold then describe the pixels the line scores.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file as load_arrays
from safetensors.numpy import save_file as save_arrays
from safetensors.torch import load_file, save_file

from lineguard.engines.bundle import Bundle, load_bundle, save_bundle
from lineguard.engines.codec import DEFAULT_FRAME_CODEC, FrameCodec
from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.engines.fusion import recipe_exclusions
from lineguard.engines.input_size import format_input_size, parse_input_size
from lineguard.engines.model import CSADModel, ModelConfig, resolve_patch_search
from lineguard.offline.banks import (
    BANK_BRANCHES,
    BANK_CODEC_SHARE,
    PATCH_BANK_CAP,
    PATCH_BANK_FRACTION,
    bank_cap,
    coreset_size,
    fit_banks,
)
from lineguard.offline.calibrate import calibrate
from lineguard.offline.components_report import component_stats, contact_sheet, png_bytes
from lineguard.offline.datasets import (
    Dataset,
    input_size_for_aspect,
    load_image,
    median_aspect,
    open_dataset,
)
from lineguard.offline.lgst_train import (
    TEACHER_CACHE_BYTES,
    LGSTTrainConfig,
    fit_teacher_normalisation,
    train_lgst,
)
from lineguard.offline.pseudo_labels import MaskGenerator, PseudoLabelConfig, generate_pseudo_labels
from lineguard.offline.seg_train import SegTrainConfig, train_segmentation

STAGES = ("pseudo_labels", "segmentation", "lgst", "banks", "calibration")
STATE = "state.json"


@dataclass(frozen=True)
class TrainPreset:
    """Step counts and sizes; ``default`` fits the 30-minute budget on a 2-core CPU."""

    seg: SegTrainConfig = field(default_factory=SegTrainConfig)
    lgst: LGSTTrainConfig = field(default_factory=LGSTTrainConfig)
    pseudo: PseudoLabelConfig = field(default_factory=PseudoLabelConfig)
    max_train: int | None = None  # cap on training images (the demo uses a subset)
    # Patch memory bank size; 0 trains CSAD's two branches only; None sizes it by the data:
    # patch_bank_fraction of all training patches, at most patch_bank_cap (offline.banks).
    patch_bank: int | None = None
    patch_bank_fraction: float = PATCH_BANK_FRACTION
    patch_bank_cap: int = PATCH_BANK_CAP
    # training images whose patches also enter the bank after a camera-like JPEG (offline.banks)
    bank_codec_share: float = BANK_CODEC_SHARE
    # The patch banks' descriptor (engines.knn): "mid" (PatchCore's strides 8 + 16), "shallow"
    # (strides 4 + 8) or "auto", decided from the pseudo-labels of the good images: a surface
    # (no component found) gets "mid", an assembly "shallow". Neither wins both: on the real
    # magnetic tiles the patch bank alone scores 0.886 image AUROC with "mid" against 0.782
    # with "shallow"; on the synthetic tray line (seed 1, the selection line) its structural
    # AUROC is 0.797 with "mid" against 0.977 with "shallow", whose finer grid keeps the
    # line's small scratches and specks apart from the good edges.
    patch_descriptor: str = "auto"
    hist_bank: bool = False  # PSAD's class-histogram bank over every training image
    comp_bank: bool = False  # PSAD's composition-embedding bank over every training image
    fewshot_shots: int = 0  # training-free few-shot branch from the first k training images
    # Subtract good parts' mean map per position (see CSADModel). On the seed-1 synthetic line
    # (the selection set; seed 0 is the reported one) it raised the LGST branch's logical AUROC
    # from 0.915 to 0.962 and the fused logical / structural AUROC from 0.950 / 0.944 to
    # 0.957 / 0.949, with the same networks (lineguard refit --position-prior).
    position_prior: bool = True
    # Also divide LGST's map by good parts' relative spread per position. Chosen on the seed-1
    # line with the same networks (lineguard refit --position-scale): fused logical / structural
    # AUROC 0.951 / 0.948 with the prior alone → 0.972 / 0.951 (LGST alone 0.927 → 0.964
    # logical, 0.745 → 0.812 structural).
    position_scale: bool = True
    # Train the LGST student–teacher? None decides from the fusion recipe: a surface's verdict is
    # its patch bank's alone, so there the student is left out of the model (no minutes spent
    # training it, none of the forward pass spent running it). On the magnetic tiles the student
    # (LGST alone 0.767 image AUROC) took 15 of the 20 training minutes for a branch the surface
    # recipe ignores. True trains it whatever the recipe (``--fuse all`` does too).
    student: bool | None = None
    # Divide the patch bank's map by good parts' spread per position as well (ModelConfig)?
    # None: on where the fusion recipe is "surface". Chosen on the magnetic tiles' selection
    # half (test images by a hash of their path; the other half never looked at): patch bank
    # image AUROC 0.919 with the prior alone, 0.950 with the spread (the report half: 0.912,
    # 0.948). On an assembly it stays off: it cost the seed-1 tray line structural AUROC.
    position_scale_knn: bool | None = None


PRESETS: dict[str, TrainPreset] = {
    "demo": TrainPreset(
        seg=SegTrainConfig(steps=150),
        lgst=LGSTTrainConfig(steps=250),
        max_train=120,
        patch_bank=2048,
    ),
    "default": TrainPreset(),
    # For GPUs: closer to the papers' schedules (EfficientAD trains 70 000 steps).
    "paper": TrainPreset(
        seg=SegTrainConfig(steps=6000, batch_labelled=8, batch_unlabelled=8),
        lgst=LGSTTrainConfig(steps=60_000, batch_size=8, lr=2e-4, schedule="step"),
    ),
}


class WorkDirMismatchError(LineguardError):
    """The work directory belongs to a run with other data or settings."""


class TrainingError(LineguardError):
    """A training stage cannot proceed with this data."""


# Below this many training images the networks cannot learn what "good" looks like; below
# RECOMMENDED_TRAIN the run is allowed but warned about (MVTec-style sets have 200-400).
MIN_TRAIN_IMAGES = 2
RECOMMENDED_TRAIN_IMAGES = 50


def _fingerprint(samples: list, config: dict[str, Any]) -> str:
    """What a run's finished stages depend on: the settings and these files (size, mtime).

    Training (stages 1-4) and calibration (stage 5) are fingerprinted apart: fixing a
    validation image redoes the calibration only, not the hours of training before it."""
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for sample in samples:
        stat = sample.path.stat()
        digest.update(f"{sample.path}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def _check_counts(dataset: Dataset, note: Callable[[str], None]) -> None:
    """Refuse data that cannot train, warn about data that will train poorly, up front."""
    n_train, n_val = len(dataset.train), len(dataset.validation)
    if n_train < MIN_TRAIN_IMAGES:
        raise TrainingError(
            f"{dataset.root} has {n_train} training image(s); lineguard needs at least "
            f"{MIN_TRAIN_IMAGES}, and {RECOMMENDED_TRAIN_IMAGES} or more to learn a product well"
        )
    if n_val == 0:
        raise TrainingError(
            f"{dataset.root} has no validation images to calibrate the threshold on: add good "
            "images to validation/good (LOCO), or more to train/good so some can be carved out"
        )
    if n_train < RECOMMENDED_TRAIN_IMAGES:
        note(
            f"warning: only {n_train} training images; {RECOMMENDED_TRAIN_IMAGES} or more "
            "are recommended (the networks and banks learn what good looks like from them, "
            "and too few make good parts look anomalous)"
        )


def _load_images(
    samples: list,
    size: tuple[int, int],
    limit: int | None,
    note: Callable[[str], None],
    codec: FrameCodec,
) -> np.ndarray:
    """The images as the line will deliver them: resized, then through the bus's codec."""
    chosen = samples if limit is None or len(samples) <= limit else samples[:limit]
    how = "" if codec.lossless else f" (as the line sends them: {codec.spec})"
    note(f"reading {len(chosen)} images{how}")
    return np.stack([load_image(s.path, size, codec) for s in chosen])


def _user_labels(
    label_dir: Path, samples: list, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """PSAD's few-shot mode: a handful of label maps drawn by a user, matched by file stem."""
    import cv2

    labels = np.zeros((len(samples), *size), np.uint8)
    labelled = np.zeros(len(samples), bool)
    for i, sample in enumerate(samples):
        path = label_dir / f"{sample.path.stem}.png"
        if path.is_file():
            m = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
            if m is None:
                raise TrainingError(f"label map {path} cannot be read as a grayscale PNG")
            labels[i] = cv2.resize(m, size[::-1], interpolation=cv2.INTER_NEAREST)
            labelled[i] = True
    if not labelled.any():
        raise TrainingError(
            f"no label map in {label_dir} matches a training image name (expected <stem>.png)"
        )
    names_file = label_dir / "classes.json"
    count = int(labels.max()) + 1
    names = (
        tuple(json.loads(names_file.read_text()))
        if names_file.is_file()
        else ("background", *(f"class_{k}" for k in range(1, count)))
    )
    if len(names) < count:
        raise TrainingError(f"{names_file} names {len(names)} classes but the maps use {count}")
    return labels, labelled, names


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, unit="step", dynamic_ncols=True)


def train_bundle(
    data_dir: Path | str,
    out: Path | str,
    *,
    backbone: str = "efficientnet_lite0",
    profile: str = "lite",
    device: str = "cpu",
    preset: str | TrainPreset = "default",
    input_size: int | str | tuple[int, int] = "auto",
    target_frr: float = 0.01,
    normalisation: str = "trimmed_z",
    fusion: str = "max",
    fusion_recipe: str = "auto",
    labels_dir: Path | str | None = None,
    mask_generator: MaskGenerator | None = None,
    patch_bank: int | None = None,
    hist_bank: bool | None = None,
    comp_bank: bool | None = None,
    fewshot_shots: int | None = None,
    position_prior: bool | None = None,
    position_scale: bool | None = None,
    patch_descriptor: str | None = None,
    student: bool | None = None,
    patch_search: str = "auto",
    frame_codec: str = DEFAULT_FRAME_CODEC,
    progress: bool = True,
    restart: bool = False,
    log: Callable[[str], None] | None = None,
) -> Bundle:
    """Train and calibrate a bundle for the product in ``data_dir``; see the module docstring."""
    note = log or (lambda msg: print(msg, flush=True) if progress else None)
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    overrides: dict[str, Any] = {
        "patch_bank": patch_bank,
        "hist_bank": hist_bank,
        "comp_bank": comp_bank,
        "fewshot_shots": fewshot_shots,
        "position_prior": position_prior,
        "position_scale": position_scale,
        "patch_descriptor": patch_descriptor,
        "student": student,
    }
    preset = replace(preset, **{k: v for k, v in overrides.items() if v is not None})
    scale = ModelConfig.position_scale_for(
        preset.position_prior, position_scale, preset.position_scale
    )
    preset = replace(preset, position_scale=scale)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {device!r} asked for but torch sees no CUDA GPU: use --device cpu"
        )
    codec = FrameCodec.parse(frame_codec)
    out = Path(out)
    work = out.with_name(out.name + ".work")
    dataset = open_dataset(data_dir)
    if input_size == "auto":
        aspect = median_aspect(dataset.train)
        size = input_size_for_aspect(aspect)
        note(f"input size {format_input_size(size)} (training images' median aspect {aspect:.2f})")
    else:
        size = parse_input_size(input_size)
    settings = {
        "backbone": backbone,
        "profile": profile,
        # one number for a square, as before non-square inputs: resumable work dirs stay valid
        "input_size": size[0] if size[0] == size[1] else list(size),
        "preset": asdict(preset),
        "labels_dir": str(labels_dir) if labels_dir else None,
        "patch_search": patch_search,
        "frame_codec": codec.spec,
        "mask_generator": type(mask_generator).__name__ if mask_generator else None,
    }
    _check_counts(dataset, note)
    fingerprint = _fingerprint(dataset.train, settings)
    val_fingerprint = _fingerprint(dataset.validation, {"frame_codec": codec.spec})
    if restart and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    state_path = work / STATE
    state: dict[str, Any] = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state and state.get("fingerprint") != fingerprint:
        raise WorkDirMismatchError(
            f"{work} holds a run for other data or settings: pass --restart to start over, or "
            "choose another --out"
        )
    state.setdefault("fingerprint", fingerprint)
    state.setdefault("done", [])
    state.setdefault("seconds", {})
    if state.get("val_fingerprint", val_fingerprint) != val_fingerprint:
        note("the validation images changed: calibrating again (training stages are kept)")
        state["done"] = [s for s in state["done"] if s != "calibration"]
    state["val_fingerprint"] = val_fingerprint

    def finish(stage: str, seconds: float, **extra: Any) -> None:
        state["done"].append(stage)
        state["seconds"][stage] = round(seconds, 1)
        state.update(extra)
        state_path.write_text(json.dumps(state, indent=2))

    torch.manual_seed(0)
    # every image is read (and checked) now, validation too: a corrupt file is found in
    # seconds, not at stage 5 after the networks have trained
    train_images = _load_images(dataset.train, size, preset.max_train, note, codec)
    val_images = _load_images(dataset.validation, size, None, note, codec)
    # --- 1. pseudo-labels -------------------------------------------------------------------
    labels_file = work / "pseudo_labels.safetensors"
    if "pseudo_labels" not in state["done"]:
        t0 = time.perf_counter()
        if labels_dir is not None:
            note("stage 1/5: user label maps (few-shot mode)")
            labels, labelled, names = _user_labels(
                Path(labels_dir), dataset.train[: len(train_images)], size
            )
            stats: dict[str, float] = {"labelled_fraction": float(labelled.mean())}
        else:
            note("stage 1/5: pseudo-labels")
            from lineguard.engines.backbones import create_backbone

            pl = generate_pseudo_labels(
                create_backbone(backbone),
                train_images,
                preset.pseudo,
                mask_generator,
                progress=lambda msg: note(f"  {msg}"),
            )
            labels, labelled, names, stats = pl.labels, pl.labelled, pl.class_names, pl.stats
        if len(names) < 2:
            # A plain surface (a tile, a sheet) has no components to count: the histogram
            # branch then sees one constant class and contributes nothing, while LGST and the
            # patch bank still inspect the surface. User label maps (--labels) can add classes.
            note("  no component classes found: the Patch Histogram branch will be inert")
            names = ("background", "foreground")
            labelled = np.ones(len(labels), dtype=bool)
        save_arrays({"labels": labels, "labelled": labelled.astype(np.uint8)}, str(labels_file))
        finish(
            "pseudo_labels", time.perf_counter() - t0, class_names=list(names), pseudo_stats=stats
        )
    arrays = load_arrays(str(labels_file))
    labels, labelled = arrays["labels"], arrays["labelled"].astype(bool)
    config = ModelConfig(
        backbone=backbone,
        input_size=size,
        profile=profile,
        class_names=tuple(state["class_names"]),
        patch_bank=0,
        hist_bank=len(train_images) if preset.hist_bank else 0,
        comp_bank=len(train_images) if preset.comp_bank else 0,
        fewshot_shots=preset.fewshot_shots,
        patch_search="graph",  # resolved with the bank size below
        position_prior=preset.position_prior,
        position_scale=preset.position_scale,
        frame_codec=codec.spec,
    )
    descriptor = preset.patch_descriptor
    if descriptor == "auto":
        descriptor = "shallow" if labels.any() else "mid"
        kind = "components found: an assembly" if labels.any() else "no components: a surface"
        note(f"  patch descriptor: {descriptor} ({kind})")
    config = replace(config, patch_descriptor=descriptor)
    bank_size = preset.patch_bank
    if bank_size is None:
        patches = len(train_images) * config.patch_count
        cap = bank_cap(config, preset.patch_bank_cap)
        bank_size = coreset_size(patches, preset.patch_bank_fraction, cap)
        note(f"  patch bank: {bank_size} of {patches} training patches")
    config = replace(
        config,
        patch_bank=bank_size,
        patch_search=resolve_patch_search(patch_search, bank_size),
    )
    applied, unfused = recipe_exclusions(fusion_recipe, config.branches, bool(labels.any()))
    with_student = preset.student
    if with_student is None:
        with_student = "lgst" not in unfused
        if not with_student:
            note("  no LGST student: a surface's verdict is its patch bank's (--student trains it)")
    knn_spread = preset.position_scale_knn
    if knn_spread is None:
        knn_spread = applied == "surface" and preset.position_prior
    config = replace(
        config, student=with_student, position_scale_knn=bool(knn_spread and bank_size)
    )
    if preset.fewshot_shots > len(train_images):
        raise ConfigError(
            f"the few-shot branch wants {preset.fewshot_shots} images; there are "
            f"{len(train_images)} training images"
        )
    model = CSADModel(config, backbone_weights="imagenet").to(device).eval()

    def stage(name: str, title: str, module: torch.nn.Module, run: Callable[[], dict]) -> None:
        """Run a stage once, keep its weights in the work dir, and reload them on resume."""
        path = work / f"{name}.safetensors"
        if name not in state["done"]:
            note(title)
            t0 = time.perf_counter()
            info = run()
            save_file(_cpu(module.state_dict()), str(path))
            finish(name, time.perf_counter() - t0, **{f"{name}_info": info})
        module.load_state_dict(load_file(str(path), device=device))

    def with_bar(steps: int, desc: str, fit: Callable[[Callable], dict]) -> dict:
        with _progress(steps, desc, progress) as bar:
            return fit(
                lambda _step, losses: (bar.update(1), bar.set_postfix(loss=f"{losses['loss']:.3f}"))
            )

    # --- 2. segmentation --------------------------------------------------------------------
    if not labels.any():
        stage(
            "segmentation",
            "stage 2/5: segmentation skipped: no component classes to learn",
            model.segmenter,
            lambda: (model.segmenter.predict_background_only(), {})[1],
        )
    stage(
        "segmentation",
        "stage 2/5: segmentation",
        model.segmenter,
        lambda: with_bar(
            preset.seg.steps,
            "segmentation",
            lambda cb: train_segmentation(
                model, train_images, labels, labelled, preset.seg, device=device, on_step=cb
            ),
        ),
    )

    # --- 3. LGST ------------------------------------------------------------------------------
    def fit_lgst() -> dict:
        targets = fit_teacher_normalisation(
            model, train_images, device=device, keep_bytes=TEACHER_CACHE_BYTES
        )
        return with_bar(
            preset.lgst.steps,
            "lgst",
            lambda cb: train_lgst(
                model, train_images, preset.lgst, device=device, on_step=cb, targets=targets
            ),
        )

    if model.lgst is None:
        note("stage 3/5: LGST skipped: no student in this model")
    else:
        stage("lgst", "stage 3/5: LGST", model.lgst, fit_lgst)

    # --- 4. memory banks (no training: good patches and vectors, kept) ----------------------
    banks = torch.nn.ModuleDict(
        {name: module for name in BANK_BRANCHES if (module := getattr(model, name)) is not None}
    )

    if len(banks):
        stage(
            "banks",
            "stage 4/5: memory banks",
            banks,
            lambda: fit_banks(
                model, train_images, progress=progress, codec_share=preset.bank_codec_share
            ),
        )
    if "calibration" in state["done"] and (out / "manifest.json").exists():
        note(f"all stages done: {out} is up to date (pass --restart to train again)")
        return load_bundle(out)
    # --- 5. calibration -----------------------------------------------------------------------
    note("stage 5/5: calibration on validation goods")
    t0 = time.perf_counter()
    model = model.cpu().eval()
    calibration, _ = calibrate(
        model,
        train_images,
        val_images,
        target_frr=target_frr,
        method=normalisation,
        combine=fusion,
        bank_loo=state.get("banks_info", {}).get("loo"),
        recipe=fusion_recipe,
        has_components=bool(labels.any()),
    )
    left_out = calibration.left_out()
    note(
        f"  fusion recipe {calibration.recipe}: fuses {', '.join(calibration.active)}"
        + (f"; left out: {', '.join(left_out)}" if left_out else "")
    )
    extra = {
        "dataset": str(Path(data_dir).resolve()),
        "layout": dataset.layout,
        "n_train": len(train_images),
        "n_validation": len(val_images),
        "pseudo_labels": state.get("pseudo_stats", {}),
        "components": component_stats(labels, state["class_names"]),
        "seconds": state["seconds"],
    }
    sheet = contact_sheet(train_images[: len(labels)], labels, state["class_names"])
    bundle = save_bundle(
        model,
        out,
        calibration,
        overwrite=True,
        extra=extra,
        report={"components.png": png_bytes(sheet)},
    )
    finish("calibration", time.perf_counter() - t0)
    note(f"bundle {bundle.path} (model {bundle.version}), threshold {calibration.threshold:.3f}")
    if warning := calibration.thin_evidence():
        note(f"warning: {warning}")
    return bundle


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def preset_with(name: str, **changes: Any) -> TrainPreset:
    """A named preset with some fields replaced (e.g. fewer LGST steps for a quick check)."""
    return replace(PRESETS[name], **changes)
