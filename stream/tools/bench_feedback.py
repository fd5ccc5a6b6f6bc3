"""``lineguard bench feedback``: does correcting the model from the line work?

A line meets a kind of good part its bundle never saw (here a lighting change: the test goods
made brighter by ``shift`` grey levels), so the bundle rejects many of them. The operators
mark some of those rejects "good part" and some real rejects "confirmed defect"; the marks and
the pictures go through the history as the line's would (rows, archive, marks, then
``collect_feedback``), and ``refit_bundle(extra_good=…, check_bad=…)`` builds the next version.
Reported, before and after, for each N (a fresh history and refit per N): the false-reject
rate on the *other* new-lighting goods (never fed back), on the usual goods, the share of
defects rejected (usual and new lighting), and how many of the confirmed defects and of the
fed-back frames themselves the new bundle rejects.

Scoring goes through the bundle's frame codec, as ``lineguard evaluate`` and the line do.
Training code is imported inside the function (tools may use it; the line never does).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from lineguard.engines.bundle import load_bundle
from lineguard.engines.runtimes import open_runtime
from lineguard.stream.history.archive import ImageArchive
from lineguard.stream.history.feedback import collect_feedback
from lineguard.stream.history.rows import row_from_event
from lineguard.stream.history.store import HistoryStore
from lineguard.stream.protocol import Event, make_frame


def _brighter(img: np.ndarray, shift: int) -> np.ndarray:
    return np.clip(img.astype(np.int16) + shift, 0, 255).astype(np.uint8)


def _score(bundle_dir: Path, images: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
    """Fused scores per image group, and the bundle's threshold."""
    bundle = load_bundle(bundle_dir)
    rt = open_runtime(bundle, kind="torch", max_batch=16)
    out: dict[str, np.ndarray] = {}
    try:
        for name, arr in images.items():
            parts = [rt.run(arr[i : i + 16]).scores for i in range(0, len(arr), 16)]
            raw = np.concatenate(parts).astype(np.float64)
            out[name] = bundle.calibration.fuse(raw)
    finally:
        rt.close()
    return out, float(bundle.calibration.threshold)


def _rates(fused: dict[str, np.ndarray], thr: float) -> dict[str, float]:
    return {k: round(float((v > thr).mean()), 4) for k, v in fused.items()}


def feedback_bench(
    data_dir: Path,
    bundle_dir: Path,
    work_dir: Path,
    *,
    n_feedback: tuple[int, ...] = (4, 8, 16),
    n_defects: int = 10,
    shift: int = 35,
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    from lineguard.offline.datasets import load_image, open_dataset

    bundle = load_bundle(bundle_dir)
    size, codec = bundle.config.input_size, bundle.config.codec
    dataset = open_dataset(data_dir)
    goods = [s for s in dataset.test if s.label == 0]
    bads = [s for s in dataset.test if s.label != 0]
    half = len(goods) // 2
    if half < max(n_feedback) or not bads:
        raise ValueError(f"{data_dir} needs ≥ {2 * max(n_feedback)} test goods and some defects")
    raw_goods = [load_image(s.path, size) for s in goods]
    raw_bads = [load_image(s.path, size) for s in bads]
    variant_dir = work_dir / "variant"
    variant_dir.mkdir(parents=True, exist_ok=True)

    def as_line(imgs: list[np.ndarray], tag: str) -> np.ndarray:
        paths = []
        for i, img in enumerate(imgs):
            p = variant_dir / f"{tag}-{i:03d}.png"
            cv2.imwrite(str(p), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
            paths.append(p)
        return np.stack([load_image(p, size, codec) for p in paths])

    groups = {
        "new_lighting_goods_fed": as_line([_brighter(g, shift) for g in raw_goods[:half]], "gf"),
        "new_lighting_goods_held_out": as_line(
            [_brighter(g, shift) for g in raw_goods[half:]], "gh"
        ),
        "usual_goods": as_line(raw_goods, "g"),
        "defects": as_line(raw_bads, "d"),
        "new_lighting_defects": as_line([_brighter(b, shift) for b in raw_bads], "db"),
    }
    t0 = time.perf_counter()
    before, thr0 = _score(bundle_dir, groups)
    say(f"first bundle scored in {time.perf_counter() - t0:.1f} s")

    rows_out = []
    for n in n_feedback:
        rows_out.append(
            _one_round(
                n, n_defects, data_dir, bundle_dir, work_dir / f"n{n}", groups, before, thr0,
                bundle.version, codec, say,
            )
        )  # fmt: skip
    return {
        "bundle": bundle.version,
        "shift": shift,
        "images": {k: len(v) for k, v in groups.items()},
        "threshold_before": round(thr0, 4),
        "rejected_before": _rates(before, thr0),
        "rounds": rows_out,
    }


def _one_round(
    n: int,
    n_defects: int,
    data_dir: Path,
    bundle_dir: Path,
    work: Path,
    groups: dict[str, np.ndarray],
    before: dict[str, np.ndarray],
    thr0: float,
    version: str,
    codec: Any,
    say: Callable[[str], None],
) -> dict[str, Any]:
    """Mark ``n`` false rejects good and ``n_defects`` rejects defect in a fresh history,
    refit from it, and score everything with the new bundle."""
    from lineguard.offline.refit import refit_bundle

    store = HistoryStore(None, directory=work / "history", table_prefix="bench")
    store.drop()
    archive = ImageArchive(work / "history" / "images", max_days=365, max_bytes=1 << 40)
    fed_rejects = np.flatnonzero(before["new_lighting_goods_fed"] > thr0)[:n]
    defect_rejects = np.flatnonzero(before["defects"] > thr0)[:n_defects]
    rows = []
    marks: list[tuple[str, str]] = []
    now = time.time()
    seq = 0
    for group, idx, mark in (
        ("new_lighting_goods_fed", fed_rejects, "good"),
        ("defects", defect_rejects, "defect"),
    ):
        for i in idx:
            img = groups[group][int(i)]
            frame = make_frame(
                "bench", "cam0", seq, img, encoding=codec.encoding,
                jpeg_quality=codec.jpeg_quality, t_capture=now,
            )  # fmt: skip
            ev = Event("bench", "cam0", seq, "fail", float(before[group][int(i)]), thr0, {},
                       version, {"total": 0.0}, "", now, now)  # fmt: skip
            rows.append(row_from_event(ev, image=archive.save_frame(frame)))
            marks.append((ev.key, mark))
            seq += 1
    store.insert(rows)
    for key, mark in marks:
        store.mark(key, mark, source="bench")
    fb = collect_feedback(store, archive.root)
    store.close()
    say(f"N={n}: feedback {len(fb.good)} good, {len(fb.defects)} defect; refitting")
    t1 = time.perf_counter()
    new_dir = work / "bundle"
    refit_bundle(bundle_dir, data_dir, new_dir, extra_good=fb.good, check_bad=fb.defects)
    refit_s = time.perf_counter() - t1
    after, thr1 = _score(new_dir, groups)
    return {
        "n_feedback_good": len(fb.good),
        "n_feedback_defects": len(fb.defects),
        "refit_bundle": load_bundle(new_dir).version,
        "threshold_after": round(thr1, 4),
        "rejected_after": _rates(after, thr1),
        "fed_frames_rejected_after": int(
            (after["new_lighting_goods_fed"][fed_rejects] > thr1).sum()
        ),
        "confirmed_defects_rejected_after": int((after["defects"][defect_rejects] > thr1).sum()),
        "refit_s": round(refit_s, 1),
    }
