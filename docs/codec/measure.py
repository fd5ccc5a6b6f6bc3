"""Is a bundle robust to a camera's own JPEG? An A/B of training with and without the codec
augmentation (``offline.augment.codec_jitter``), on a synthetic line that the reported
numbers never use.

    python docs/codec/measure.py WORKDIR [--seed 1] [--preset demo] --json OUT.json
    python docs/codec/measure.py WORKDIR --refit --json OUT.json

``--refit`` takes the bundle trained with the augmentation and refits its banks and
calibration twice, without and with compressed copies in the patch bank
(``offline.banks.BANK_CODEC_SHARE``), then scores both the same four ways, and the good parts of
``WORKDIR/line<seed>-big`` (many test goods, for the false-reject rate) if that line exists.

For each arm it trains a bundle on the same line (unchanged defaults otherwise: frames seen
as JPEG 90, the line's default), then scores the test split four ways: as the line sends the
files (the bundle's codec), and as it sends frames that a camera had already compressed at
quality 85, 70 or 50 (the test files are JPEG round-tripped at that quality first, then go
through the bundle's codec, as ingest would re-encode them). It prints a table of false-reject
rate at the calibrated threshold and image AUROC per anomaly type.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import cv2

from lineguard.offline.evaluate import evaluate_bundle
from lineguard.offline.synth import make_line
from lineguard.offline.train import PRESETS, train_bundle
from lineguard.stream.tools.demo import DEMO_COUNTS

CAMERA_QUALITIES = (85, 70, 50)


def camera_copy(line: Path, quality: int, out: Path) -> Path:
    """The line with every test image as a camera at JPEG ``quality`` would have sent it."""
    if out.exists():
        return out
    shutil.copytree(line, out)
    for path in (out / "test").rglob("*.png"):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        assert ok
        cv2.imwrite(str(path), cv2.imdecode(buf, cv2.IMREAD_COLOR))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--refit", action="store_true")
    args = ap.parse_args()
    work: Path = args.workdir
    line = work / f"line{args.seed}"
    if not line.exists():
        make_line(line, seed=args.seed, size=256, **DEMO_COUNTS)
    cameras = {
        q: camera_copy(line, q, work / f"line{args.seed}-camera{q}") for q in CAMERA_QUALITIES
    }
    if args.refit:
        return refit_arms(work, line, cameras, args)
    base = PRESETS[args.preset]
    arms = {
        "without": replace(
            base,
            seg=replace(base.seg, codec_probability=0.0),
            lgst=replace(base.lgst, codec_probability=0.0),
        ),
        "with": base,
    }
    rows = []
    for arm, preset in arms.items():
        out = work / f"bundle-{arm}"
        t0 = time.perf_counter()
        train_bundle(line, out, preset=preset, progress=False, log=lambda _m: None)
        minutes = (time.perf_counter() - t0) / 60
        sources = [("as sent", line), *((f"camera JPEG {q}", d) for q, d in cameras.items())]
        rows += score_rows(arm, out, sources, work / f"eval-{arm}", "train_min", minutes)
    args.json.write_text(
        json.dumps({"seed": args.seed, "preset": args.preset, "rows": rows}, indent=2)
    )
    print_table(rows)


def score_rows(
    arm: str,
    bundle: Path,
    sources: list[tuple[str, Path]],
    eval_prefix: Path,
    time_key: str,
    minutes: float,
) -> list[dict]:
    """One row per test source: false-reject rate and AUROC of ``bundle`` on it (printed as
    they come, so a long run shows progress)."""
    rows = []
    for source, data in sources:
        out_dir = Path(f"{eval_prefix}-{source.replace(' ', '_')}")
        m = evaluate_bundle(bundle, data, out_dir=out_dir).metrics
        row = {
            "arm": arm,
            "test images": source,
            "frr": m["false_reject_rate"],
            "overall": m["overall"]["auroc"],
            **{t: b["auroc"] for t, b in m["by_type"].items()},
            time_key: round(minutes, 1),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    keys = [k for k in rows[0] if k not in ("arm", "test images")]
    print("| arm | test images | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 2) + "|")
    for r in rows:
        vals = [f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]) for k in keys]
        print(f"| {r['arm']} | {r['test images']} | " + " | ".join(vals) + " |")


def refit_arms(work: Path, line: Path, cameras: dict[int, Path], args: argparse.Namespace) -> None:
    from lineguard.offline.refit import refit_bundle

    big = work.parent / f"line{args.seed}-big"
    rows = []
    for arm, share in (("bank without copies", 0.0), ("bank with copies", 0.5)):
        out = work / f"refit-{arm.replace(' ', '_')}"
        t0 = time.perf_counter()
        refit_bundle(work / "bundle-with", line, out, bank_codec_share=share)
        minutes = (time.perf_counter() - t0) / 60
        sources = [("as sent", line), *((f"camera JPEG {q}", d) for q, d in cameras.items())]
        if big.exists():
            sources.append(("as sent, 300 goods", big))
        rows += score_rows(arm, out, sources, work / f"eval-{out.name}", "refit_min", minutes)
    args.json.write_text(json.dumps({"seed": args.seed, "refit": True, "rows": rows}, indent=2))
    print_table(rows)


if __name__ == "__main__":
    main()
