"""Scenes by (seed, split, index), and the writer of a whole line in the MVTec LOCO layout.

Every image is a pure function of ``(seed, split, index)``: the same seed gives byte-identical
PNGs, and a test image does not change when the training split grows.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from lineguard.engines.errors import ConfigError
from lineguard.offline.synth.defects import apply_structural
from lineguard.offline.synth.products import product_of
from lineguard.offline.synth.render import render, render_masks
from lineguard.offline.synth.scene import (
    FORMAT_VERSION,
    MIN_SIZE,
    SPLIT_IDS,
    STRUCTURAL_SUBTYPES,
    Scene,
    SynthSummary,
)


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one image; independent of how many images other splits have."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], index]))


def sample_good(kind: str, rng: np.random.Generator) -> Scene:
    """A defect-free scene of product ``kind``."""
    return product_of(kind).sample_good(rng)


def apply_anomaly(
    kind: str, scene: Scene, anomaly_type: str, subtype: str, rng: np.random.Generator
) -> Scene:
    """Edit a good scene into a ``logical`` or ``structural`` anomaly of the given subtype."""
    product = product_of(kind)
    if anomaly_type == "logical":
        return product.apply_logical(scene, subtype, rng)
    if anomaly_type == "structural":
        return apply_structural(product, scene, subtype, rng)
    raise ConfigError(f"unknown anomaly type {anomaly_type!r}: use 'logical' or 'structural'")


def make_scene(kind: str, seed: int, split: str, index: int) -> Scene:
    """The scene of image ``index`` of ``split``; anomaly subtypes cycle so counts stay balanced."""
    rng = scene_rng(seed, split, index)
    scene = sample_good(kind, rng)
    if split == "test_logical":
        subtypes = product_of(kind).logical_subtypes
        return apply_anomaly(kind, scene, "logical", subtypes[index % len(subtypes)], rng)
    if split == "test_structural":
        return apply_anomaly(kind, scene, "structural", STRUCTURAL_SUBTYPES[index % 3], rng)
    return scene


_FOLDERS = {
    "train": "train/good",
    "validation": "validation/good",
    "test_good": "test/good",
    "test_logical": "test/logical_anomalies",
    "test_structural": "test/structural_anomalies",
}


def _write_png(path: Path, img: np.ndarray) -> None:
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ConfigError(f"could not encode {path} as PNG: check that OpenCV has PNG support")
    path.write_bytes(buf.tobytes())


def _check_args(out_dir: Path, seed: int, counts: dict[str, int], size: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}: pass e.g. seed=0")
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n_{name} must be a non-negative integer, got {n!r}")
    if not isinstance(size, int) or size < MIN_SIZE:
        raise ConfigError(
            f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}: use e.g. 256"
        )
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output path {out_dir} exists and is not a folder: pass a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "meta.json").is_file():
        raise ConfigError(
            f"output folder {out_dir} is not empty and holds no synthetic line (no meta.json): "
            "pass an empty or new folder, so nothing of yours is overwritten"
        )


def make_line(
    out_dir: Path | str,
    seed: int = 0,
    n_train: int = 200,
    n_val: int = 100,
    n_test_good: int = 100,
    n_test_logical: int = 100,
    n_test_structural: int = 100,
    size: int = 256,
    kind: str = "tray",
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic product line in the MVTec LOCO AD layout under ``out_dir``.

    An existing line in ``out_dir`` (one with a ``meta.json``) is replaced; any other non-empty
    folder is refused so that a typo cannot wipe unrelated files.
    """
    t0 = time.perf_counter()
    out = Path(out_dir)
    counts = {
        "train": n_train,
        "validation": n_val,
        "test_good": n_test_good,
        "test_logical": n_test_logical,
        "test_structural": n_test_structural,
    }
    _check_args(out, seed, counts, size)
    product = product_of(kind)
    for sub in ("train", "validation", "test", "ground_truth"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for split, n in counts.items():
        if n:
            (out / _FOLDERS[split]).mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "format": "lineguard-synth",
        "version": FORMAT_VERSION,
        "complete": False,  # marks the folder as ours even if this run is interrupted
        "kind": kind,
        "seed": seed,
        "size": [size, size],
        "counts": counts,
        "subtypes": {
            "logical": list(product.logical_subtypes),
            "structural": list(STRUCTURAL_SUBTYPES),
        },
        "images": [],
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    jobs = [(split, i) for split, n in counts.items() for i in range(n)]
    bar = _progress(len(jobs), progress, f"synth {kind}")
    records = []
    for split, i in jobs:
        scene = make_scene(kind, seed, split, i)
        name = _name(i, counts[split])
        rel = f"{_FOLDERS[split]}/{name}.png"
        _write_png(out / rel, render(scene, size))
        if split.startswith("test"):
            mask_files = []
            if scene.regions:
                gt = Path("ground_truth") / _FOLDERS[split].split("/")[1] / name
                (out / gt).mkdir(parents=True, exist_ok=True)
                for j, mask in enumerate(render_masks(scene, size)):
                    _write_png(out / gt / f"{j:03d}.png", mask)
                    mask_files.append(f"{gt.as_posix()}/{j:03d}.png")
            records.append(
                {
                    "path": rel,
                    "anomaly_type": scene.anomaly_type,
                    "subtype": scene.subtype,
                    "detail": scene.detail,
                    "masks": mask_files,
                }
            )
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    meta.update(complete=True, images=records)
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return SynthSummary(out, kind, seed, size, dict(counts), seconds)


def _name(i: int, n: int) -> str:
    """Zero-padded so that name order is index order (000.png like LOCO, wider past 999)."""
    return f"{i:0{max(3, len(str(n - 1)))}d}"


class _Bar(Protocol):
    """The part of a tqdm progress bar that is used here."""

    def update(self, n: int) -> object: ...

    def close(self) -> None: ...


def _progress(total: int, enabled: bool, desc: str) -> _Bar | None:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a nicety; tqdm is not a dependency
        return None
    return tqdm(total=total, desc=desc, unit="img")  # type: ignore[no-any-return]


def summary_dict(summary: SynthSummary) -> dict[str, object]:
    """A JSON-friendly view of a :class:`SynthSummary` (for CLIs and logs)."""
    d = asdict(summary)
    d["root"] = str(summary.root)
    return d
