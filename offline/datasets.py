"""Reading anomaly-detection datasets into one shape.

Training, calibration and evaluation should not care whether a product's images came as MVTec
LOCO AD, MVTec AD or a plain folder of good parts from the line. :func:`open_dataset` finds the
layout, lists every image once in a sorted, deterministic order, and hands back a
:class:`Dataset` of :class:`Sample` records; pixels are only read by :func:`load_image` and
:func:`load_mask`, so opening a large dataset is cheap.

Layouts without a validation split (MVTec AD, plain folders) get one carved out of the good
training images with a seeded shuffle: the same seed gives the same split on every machine, and
no image is ever in both.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from lineguard.engines.codec import FrameCodec
from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.engines.input_size import resize_frame

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
LAYOUTS = ("auto", "loco", "mvtec", "folder")
Layout = Literal["auto", "loco", "mvtec", "folder"]
Size = int | tuple[int, int] | None

LOCO_TYPES = {"logical_anomalies": "logical", "structural_anomalies": "structural"}


class DatasetError(LineguardError):
    """A dataset cannot be read as asked: see the message for what is missing and the fix."""


class DatasetNotFoundError(DatasetError):
    """The dataset path does not exist or is not a folder."""


class MissingSplitError(DatasetError):
    """A folder the layout requires (e.g. ``train/good``) is absent."""


class EmptySplitError(DatasetError):
    """A folder that should hold images holds none."""


class ImageReadError(DatasetError):
    """An image or mask file is missing, unreadable or corrupt."""


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and what is known about it.

    ``anomaly_type`` is ``"good"``, ``"logical"`` or ``"structural"`` (MVTec AD defects are
    structural); ``defect`` names the defect more precisely: the MVTec AD folder name, the
    subtype from a synthetic line's ``meta.json`` (e.g. ``"swapped"``), or the LOCO folder name.
    ``masks`` lists the ground-truth files to merge; it is empty for goods and for anomalies
    whose ground truth is missing.
    """

    path: Path
    label: int
    anomaly_type: str
    defect: str
    masks: tuple[Path, ...] = ()

    @property
    def mask_paths(self) -> tuple[Path, ...] | None:
        """The ground-truth files, or ``None`` when there are none."""
        return self.masks or None


@dataclass(frozen=True)
class Dataset:
    """The splits of one product's dataset, each sorted by path."""

    root: Path
    layout: str
    train: list[Sample] = field(default_factory=list)
    validation: list[Sample] = field(default_factory=list)
    test: list[Sample] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Images per split and, for the test split, per defect (handy for logs and checks)."""
        out = {"train": len(self.train), "validation": len(self.validation)}
        for s in self.test:
            key = f"test/{s.defect}"
            out[key] = out.get(key, 0) + 1
        return out


# --------------------------------------------------------------------------------------------
# Listing
# --------------------------------------------------------------------------------------------


def _images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name."""
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _require_images(folder: Path, what: str) -> list[Path]:
    if not folder.is_dir():
        raise MissingSplitError(
            f"{what}: folder {folder} is missing; create it with the images (layouts: MVTec "
            "LOCO AD train/good + validation/good, MVTec AD train/good, or a plain folder "
            "of good images)"
        )
    files = _images(folder)
    if not files:
        raise EmptySplitError(
            f"{what}: folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
            "put the images there or point at the right folder"
        )
    return files


def _goods(files: list[Path]) -> list[Sample]:
    return [Sample(p, 0, "good", "good") for p in files]


def _carve(goods: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split goods into (train, validation) by a seeded shuffle; both keep path order."""
    if fraction == 0.0 or len(goods) < 2:
        return list(goods), []
    n_val = min(len(goods) - 1, max(1, math.floor(fraction * len(goods) + 0.5)))
    order = np.random.default_rng(seed).permutation(len(goods))
    picked = set(order[:n_val].tolist())
    train = [s for i, s in enumerate(goods) if i not in picked]
    val = [s for i, s in enumerate(goods) if i in picked]
    return train, val


def _synth_subtypes(root: Path) -> dict[str, str]:
    """Subtypes recorded by :mod:`offline.synth` in ``meta.json`` (empty for real datasets)."""
    meta = root / "meta.json"
    if not meta.is_file():
        return {}
    try:
        data = json.loads(meta.read_text())
        return {
            r["path"]: r["subtype"] for r in data.get("images", []) if r.get("subtype") is not None
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return {}  # someone else's meta.json: the folder names still say enough


def _open_loco(root: Path) -> Dataset:
    train = _goods(_require_images(root / "train" / "good", "MVTec LOCO AD training split"))
    val = _goods(_require_images(root / "validation" / "good", "MVTec LOCO AD validation split"))
    subtypes = _synth_subtypes(root)
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for folder in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for img in _images(folder):
                if folder.name == "good":
                    test.append(Sample(img, 0, "good", "good"))
                    continue
                gt = root / "ground_truth" / folder.name / img.stem
                masks = tuple(_images(gt)) if gt.is_dir() else ()
                rel = img.relative_to(root).as_posix()
                kind = LOCO_TYPES.get(folder.name, "structural")
                test.append(Sample(img, 1, kind, subtypes.get(rel, folder.name), masks))
    return Dataset(root, "loco", train, val, test)


def _mvtec_mask(root: Path, defect: str, img: Path) -> tuple[Path, ...]:
    folder = root / "ground_truth" / defect
    for stem in (f"{img.stem}_mask", img.stem):
        for ext in IMAGE_EXTENSIONS:
            p = folder / f"{stem}{ext}"
            if p.is_file():
                return (p,)
    return ()


def _open_mvtec(root: Path, fraction: float, seed: int) -> Dataset:
    goods = _goods(_require_images(root / "train" / "good", "MVTec AD training split"))
    train, val = _carve(goods, fraction, seed)
    test: list[Sample] = []
    test_dir = root / "test"
    if test_dir.is_dir():
        for folder in sorted(p for p in test_dir.iterdir() if p.is_dir()):
            for img in _images(folder):
                if folder.name == "good":
                    test.append(Sample(img, 0, "good", "good"))
                else:
                    masks = _mvtec_mask(root, folder.name, img)
                    test.append(Sample(img, 1, "structural", folder.name, masks))
    return Dataset(root, "mvtec", train, val, test)


def _open_folder(root: Path, fraction: float, seed: int) -> Dataset:
    goods = _goods(_require_images(root, "plain image folder"))
    train, val = _carve(goods, fraction, seed)
    return Dataset(root, "folder", train, val, [])


def detect_layout(root: Path) -> str:
    """Tell MVTec LOCO AD, MVTec AD and a plain folder apart by the folders present."""
    if (root / "validation" / "good").is_dir() or (root / "test" / "logical_anomalies").is_dir():
        return "loco"
    if (root / "train").is_dir():
        return "mvtec"
    if _images(root):
        return "folder"
    raise EmptySplitError(
        f"cannot tell the layout of {root}: it has no train/ folder (MVTec AD), no "
        "validation/good (MVTec LOCO AD) and no images of its own (plain folder); point at the "
        "dataset's root folder"
    )


def open_dataset(
    path: Path | str,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    layout: Layout | str = "auto",
) -> Dataset:
    """List a dataset's images by split; ``layout="auto"`` detects the layout from its folders.

    ``val_fraction`` and ``seed`` only matter where the layout has no validation split of its
    own (MVTec AD, plain folder): that fraction of the good training images is moved to
    validation, chosen by a shuffle seeded with ``seed``.
    """
    root = Path(path)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown dataset layout {layout!r}: use one of {', '.join(LAYOUTS)}")
    if not isinstance(val_fraction, (int, float)) or not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction must be in [0, 1), got {val_fraction!r}: use e.g. 0.2 "
            "(a fifth of the good training images become the validation split)"
        )
    if not root.exists():
        raise DatasetNotFoundError(f"dataset path {root} does not exist: check the path")
    if not root.is_dir():
        raise DatasetNotFoundError(
            f"dataset path {root} is a file, not a folder: pass the dataset's root folder"
        )
    kind = detect_layout(root) if layout == "auto" else layout
    if kind == "loco":
        return _open_loco(root)
    if kind == "mvtec":
        return _open_mvtec(root, float(val_fraction), seed)
    return _open_folder(root, float(val_fraction), seed)


# --------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------


def _read(path: Path) -> np.ndarray:
    """Decode a file as stored (any depth, any channels); bytes are read by Python so that
    non-ASCII paths work on every platform."""
    try:
        data = np.frombuffer(Path(path).read_bytes(), dtype=np.uint8)
    except OSError as e:
        raise ImageReadError(
            f"cannot read image file {path}: {e.strerror or e}; check it exists"
        ) from e
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if img is None:
        raise ImageReadError(
            f"image file {path} is corrupt or not an image OpenCV can decode "
            f"({len(data)} bytes): replace or delete it"
        )
    return img


def _to_uint8(img: np.ndarray, path: Path) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    if img.dtype == np.uint16:
        return (img.astype(np.uint32) * 255 // 65535).astype(np.uint8)
    if img.dtype.kind == "f":
        top = 1.0 if float(np.nanmax(img)) <= 1.0 else 255.0
        return np.clip(np.nan_to_num(img) * (255.0 / top), 0, 255).round().astype(np.uint8)
    raise ImageReadError(
        f"image file {path} has pixel type {img.dtype}, which lineguard does not read: "
        "save it as 8- or 16-bit PNG"
    )


def _target(size: Size) -> tuple[int, int] | None:
    """``size`` as (height, width)."""
    if size is None:
        return None
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(v, int) and v > 0 for v in hw):
        raise ConfigError(f"size must be a positive int or (height, width), got {size!r}")
    return hw[0], hw[1]


def _resize(img: np.ndarray, hw: tuple[int, int] | None, nearest: bool = False) -> np.ndarray:
    return img if hw is None else resize_frame(img, hw, nearest=nearest)


# The automatic input size: as many pixels as the square 256 px default (so CPU speed stays in
# budget), shaped like the training images. Near-square parts are resized to a square as CSAD
# and PatchCore do (MVTec LOCO's 1600×1100 frames stay 256×256); from an aspect of 1.5 on,
# squashing would thin a crack across the short side, so the input takes the parts' aspect.
AUTO_PIXELS = 256 * 256
AUTO_SQUARE_BELOW = 1.5
AUTO_MAX_ASPECT = 4.0
AUTO_SAMPLE = 32  # training images whose size is read to find the median aspect


def input_size_for_aspect(aspect: float, pixels: int = AUTO_PIXELS) -> tuple[int, int]:
    """(height, width), multiples of 32, of about ``pixels`` pixels, for width / height =
    ``aspect``; square when the aspect is within ``AUTO_SQUARE_BELOW`` of one."""
    if not math.isfinite(aspect) or aspect <= 0:
        raise ConfigError(f"aspect ratio must be positive, got {aspect}")
    if max(aspect, 1 / aspect) < AUTO_SQUARE_BELOW:
        side = max(32, 32 * round(math.sqrt(pixels) / 32))
        return (side, side)
    aspect = min(max(aspect, 1 / AUTO_MAX_ASPECT), AUTO_MAX_ASPECT)
    h = max(32, 32 * math.floor(math.sqrt(pixels / aspect) / 32 + 0.5))
    w = max(32, 32 * math.floor(h * aspect / 32 + 0.5))
    return (h, w)


def median_aspect(samples: list[Sample], limit: int = AUTO_SAMPLE) -> float:
    """Median width / height over up to ``limit`` evenly spread samples (read in full: OpenCV
    has no header-only read, and ``limit`` keeps that to a few dozen files)."""
    if not samples:
        raise ConfigError("no images to take the aspect ratio from")
    step = max(1, len(samples) // limit)
    aspects = []
    for s in samples[::step][:limit]:
        img = _read(s.path)
        aspects.append(img.shape[1] / img.shape[0])
    return float(np.median(aspects))


def load_image(path: Path | str, size: Size = None, codec: FrameCodec | None = None) -> np.ndarray:
    """An image as uint8 ``H x W x 3`` RGB, resized to ``size`` (int or (height, width)), then
    through ``codec``'s round trip if given: the pixels the line's model sees for this file.

    Grayscale is replicated to three channels, 16-bit and float images are scaled to 8 bits,
    alpha is dropped. Shrinking uses area averaging (no aliasing), enlarging bilinear — as
    ingest resizes before it encodes.
    """
    p = Path(path)
    hw = _target(size)
    img = _to_uint8(_read(p), p)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    elif img.shape[2] == 4:
        img = cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    elif img.shape[2] == 3:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        raise ImageReadError(f"image file {p} has {img.shape[2]} channels: save it as RGB or gray")
    out = np.ascontiguousarray(_resize(img, hw))
    return out if codec is None else codec.round_trip(out)


def _read_mask(path: Path) -> np.ndarray:
    m = _read(path)
    if m.ndim == 3:
        m = m.max(axis=2)
    return (m > 0).astype(np.uint8)


def load_mask(sample: Sample, size: Size = None) -> np.ndarray:
    """The sample's ground truth as uint8 ``H x W`` in {0, 1}; all masks merged by union.

    Goods get zeros. Without ``size`` the mask has the image's own size. Resizing is
    nearest-neighbour so that the mask stays binary.
    """
    hw = _target(size)
    if not sample.masks:
        if sample.label:
            raise ImageReadError(
                f"anomalous image {sample.path} has no ground-truth mask: add it under "
                "ground_truth/ or evaluate this dataset without pixel metrics"
            )
        if hw is None:
            hw = _read(sample.path).shape[:2]
        return np.zeros(hw, np.uint8)
    if hw is None:
        hw = _read(sample.path).shape[:2]
    out = np.zeros(hw, np.uint8)
    for p in sample.masks:
        out |= _resize(_read_mask(p), hw, nearest=True)
    return out
