"""``lineguard evaluate``: how good is a bundle on labelled test images, and where does it fail.

Numbers as the papers report them — image AUROC overall, per anomaly type (LOCO: logical and
structural separately) and per branch, F1-max — plus what a plant cares about: at the
calibrated threshold, how many good parts are rejected (false-reject rate) and how many
defective ones pass (escape rate). The report shows the worst misses and false alarms as image,
anomaly map and segmentation side by side, because that is what tells an engineer whether the
model or the data is at fault.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.engines.bundle import Bundle, load_bundle
from lineguard.engines.codec import FrameCodec
from lineguard.engines.errors import LineguardError
from lineguard.engines.runtimes import open_runtime
from lineguard.offline.datasets import Sample, load_image, load_mask, open_dataset


class EvaluationError(LineguardError):
    """The dataset cannot be evaluated (no test split, only one class, ...)."""


@dataclass
class Evaluation:
    metrics: dict[str, Any]
    samples: list[Sample]
    scores: np.ndarray  # raw [N, K]
    fused: np.ndarray  # [N]
    report_dir: Path | None = None
    files: list[Path] = field(default_factory=list)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve, or None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return None
    return float(roc_auc_score(labels, scores))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float | None:
    from sklearn.metrics import precision_recall_curve

    if labels.min() == labels.max():
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    return float(f1.max())


def compute_metrics(
    samples: list[Sample],
    scores: np.ndarray,
    fused: np.ndarray,
    branches: tuple[str, ...],
    threshold: float,
) -> dict[str, Any]:
    """All metrics from per-image scores; pure, so it is tested without any model."""
    y = np.array([s.label for s in samples])
    types = np.array([s.anomaly_type for s in samples])
    defects = np.array([s.defect or s.anomaly_type for s in samples])
    good = y == 0
    fail = fused > threshold

    def block(mask: np.ndarray) -> dict[str, Any]:
        sel = good | mask
        out: dict[str, Any] = {
            "n": int(mask.sum()),
            "auroc": auroc(y[sel], fused[sel]),
            "escape_rate": float(np.mean(~fail[mask])) if mask.any() else None,
            "branches": {b: auroc(y[sel], scores[sel, k]) for k, b in enumerate(branches)},
        }
        return out

    anomaly_types = sorted(set(types[~good]))
    return {
        "n_images": len(samples),
        "n_good": int(good.sum()),
        "n_defective": int((~good).sum()),
        "threshold": threshold,
        "overall": block(~good) | {"f1_max": f1_max(y, fused)},
        "false_reject_rate": float(np.mean(fail[good])) if good.any() else None,
        "by_type": {t: block(types == t) for t in anomaly_types},
        "by_defect": {d: block((defects == d) & ~good) for d in sorted(set(defects[~good]))},
    }


def _overlay(image: np.ndarray, amap: np.ndarray, vmax: float) -> np.ndarray:
    heat = cv2.resize(amap.astype(np.float32), image.shape[1::-1], interpolation=cv2.INTER_LINEAR)
    heat8 = (255 * np.clip(heat / max(vmax, 1e-6), 0, 1)).astype(np.uint8)
    coloured = cv2.cvtColor(cv2.applyColorMap(heat8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    return (0.55 * image + 0.45 * coloured).astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    pal = rng.integers(40, 255, (max(n, 2), 3)).astype(np.uint8)
    pal[0] = 0
    return pal


def _tile(
    sample: Sample,
    image: np.ndarray,
    amap: np.ndarray,
    seg: np.ndarray,
    vmax: float,
    n_classes: int,
) -> np.ndarray:
    shown = image.copy()
    if sample.label:
        try:
            mask = load_mask(sample, image.shape[:2])
            contours, _ = cv2.findContours(
                mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE
            )
            cv2.drawContours(shown, contours, -1, (0, 255, 0), 1)
        except LineguardError:
            pass  # no ground truth for this image: show it without the outline
    seg_rgb = _palette(n_classes)[np.clip(seg, 0, n_classes - 1)]
    return np.concatenate([shown, _overlay(image, amap, vmax), seg_rgb], axis=1)


def _png_b64(image: np.ndarray) -> str:
    ok, buf = cv2.imencode(".png", cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return base64.b64encode(buf.tobytes()).decode() if ok else ""


def write_report(
    evaluation: Evaluation,
    bundle: Bundle,
    images: np.ndarray,
    maps: np.ndarray,
    segs: np.ndarray,
    out_dir: Path,
    worst: int = 8,
) -> list[Path]:
    """``metrics.json``, ``report.html`` and PNG sheets of the worst misses and false alarms."""
    out_dir.mkdir(parents=True, exist_ok=True)
    samples, fused = evaluation.samples, evaluation.fused
    y = np.array([s.label for s in samples])
    vmax = float(np.quantile(maps, 0.999)) if maps.size else 1.0
    misses = [i for i in np.argsort(fused) if y[i] == 1][:worst]
    alarms = [i for i in np.argsort(-fused) if y[i] == 0][:worst]
    n_classes = bundle.config.num_classes
    files = []
    sections = []
    for title, picks, name in (
        ("Worst misses (defective, lowest scores)", misses, "misses.png"),
        ("Worst false alarms (good, highest scores)", alarms, "false_alarms.png"),
    ):
        tiles = [_tile(samples[i], images[i], maps[i, 0], segs[i], vmax, n_classes) for i in picks]
        rows = []
        for i, tile in zip(picks, tiles, strict=True):
            s = samples[i]
            caption = (
                f"{html.escape(s.path.name)} — {html.escape(s.defect or s.anomaly_type)} — "
                f"fused {fused[i]:.2f} (threshold {bundle.calibration.threshold:.2f})"
            )
            img = f'<img src="data:image/png;base64,{_png_b64(tile)}">'
            rows.append(f"<figure>{img}<figcaption>{caption}</figcaption></figure>")
        if tiles:
            sheet = np.concatenate(tiles, axis=0)
            cv2.imwrite(str(out_dir / name), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
            files.append(out_dir / name)
        sections.append(f"<h2>{title}</h2>{''.join(rows) or '<p>none</p>'}")
    metrics_path = out_dir / "metrics.json"
    metrics_path.write_text(json.dumps(evaluation.metrics, indent=2))
    files.append(metrics_path)
    m = evaluation.metrics
    table = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v['n']}</td><td>{_fmt(v['auroc'])}</td>"
        f"<td>{_fmt(v['escape_rate'])}</td>"
        + "".join(f"<td>{_fmt(a)}</td>" for a in v["branches"].values())
        + "</tr>"
        for k, v in [("all defects", m["overall"]), *m["by_type"].items(), *m["by_defect"].items()]
    )
    head = "".join(f"<th>AUROC {html.escape(b)}</th>" for b in bundle.branches)
    page = f"""<!doctype html><meta charset="utf-8"><title>lineguard evaluation</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:2px 8px;text-align:right}}
figure{{display:inline-block;margin:6px}}img{{max-width:100%}}</style>
<h1>lineguard evaluation</h1>
<p>bundle {html.escape(bundle.version)} on {m["n_images"]} test images ({m["n_good"]} good,
{m["n_defective"]} defective); tiles show image with ground truth in green, anomaly map,
segmentation.</p>
<p>false-reject rate on good parts at the calibrated threshold: {_fmt(m["false_reject_rate"])};
F1-max {_fmt(m["overall"]["f1_max"])}</p>
<table><tr><th>set</th><th>n</th><th>AUROC fused</th><th>escape rate</th>{head}</tr>{table}</table>
{"".join(sections)}"""
    report = out_dir / "report.html"
    report.write_text(page)
    files.append(report)
    return files


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3f}"


def per_image(
    samples: list[Sample], raw: np.ndarray, fused: np.ndarray, branches: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Every test image's raw branch scores and fused score, so anyone can recompute the
    metrics or compare one file's score with what the line gave it."""
    return [
        {
            "path": str(s.path),
            "label": s.label,
            "type": s.anomaly_type,
            "defect": s.defect,
            "scores": {b: float(v) for b, v in zip(branches, row, strict=True)},
            "fused": float(f),
        }
        for s, row, f in zip(samples, raw, fused, strict=True)
    ]


def evaluate_bundle(
    bundle_dir: Path | str,
    data_dir: Path | str,
    *,
    runtime: str = "onnxruntime",
    out_dir: Path | str | None = None,
    batch: int = 16,
    progress: Callable[[int, int], None] | None = None,
    frame_codec: str | None = None,
) -> Evaluation:
    """Score every test image of ``data_dir`` with the bundle and write metrics and a report.

    Each file goes through ``frame_codec`` (default: the bundle's, which is what ingest sends
    by default) so the scores are the line's; pass another to see what a camera sending
    ``raw``/``png``/``jpeg:Q`` would get."""
    bundle = load_bundle(bundle_dir)
    codec = bundle.config.codec if frame_codec is None else FrameCodec.parse(frame_codec)
    dataset = open_dataset(data_dir)
    samples = list(dataset.test)
    if not samples:
        raise EvaluationError(
            f"{data_dir} has no test split: evaluation needs labelled test images"
        )
    size = bundle.config.input_size
    rt = open_runtime(bundle, kind=runtime, max_batch=batch)
    images = np.stack([load_image(s.path, size, codec) for s in samples])
    scores, maps, segs = [], [], []
    for i in range(0, len(samples), batch):
        out = rt.run(images[i : i + batch])
        scores.append(out.scores)
        maps.append(out.anomaly_map)
        segs.append(out.segmentation)
        if progress:
            progress(min(i + batch, len(samples)), len(samples))
    rt.close()
    raw = np.concatenate(scores).astype(np.float64)
    fused = bundle.calibration.fuse(raw)
    metrics = compute_metrics(samples, raw, fused, bundle.branches, bundle.calibration.threshold)
    metrics["bundle"] = bundle.version
    metrics["frame_codec"] = codec.spec
    metrics["fusion"] = bundle.calibration.combine
    metrics["fused_branches"] = list(bundle.calibration.active)
    metrics["inert_branches"] = list(bundle.calibration.inert)
    metrics["fusion_recipe"] = bundle.calibration.recipe
    metrics["left_out"] = bundle.calibration.left_out()
    metrics["dataset"] = str(Path(data_dir).resolve())
    metrics["images"] = per_image(samples, raw, fused, bundle.branches)
    evaluation = Evaluation(metrics, samples, raw, fused)
    target = (
        Path(out_dir)
        if out_dir is not None
        else Path(bundle_dir).with_name(Path(bundle_dir).name + ".eval")
    )
    evaluation.files = write_report(
        evaluation, bundle, images, np.concatenate(maps), np.concatenate(segs), target
    )
    evaluation.report_dir = target
    return evaluation
