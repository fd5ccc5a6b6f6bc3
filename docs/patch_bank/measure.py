"""Patch bank measurements for issue 15 part 2: refit a trained bundle's banks, evaluate, time.

Usage (each step one heavy job; run under ``nice`` on a shared machine)::

    python docs/patch_bank/measure.py refit SRC DATA OUT [--descriptor mid] [--bank N|auto]
        [--search graph|faiss-flat|faiss-ivf|faiss-hnsw]
    python docs/patch_bank/measure.py evaluate BUNDLE DATA JSON

``refit`` prints and records its wall time (banks and calibration; the networks are copied).
``evaluate`` writes image AUROC overall, per branch and per defect type as JSON. Speed comes
from ``lineguard bench model --bundle B --runtime onnxruntime --batch 8``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("refit")
    r.add_argument("src")
    r.add_argument("data")
    r.add_argument("out")
    r.add_argument("--descriptor", default=None)
    r.add_argument("--bank", default=None)
    r.add_argument("--search", default=None)
    e = sub.add_parser("evaluate")
    e.add_argument("bundle")
    e.add_argument("data")
    e.add_argument("json")
    args = parser.parse_args()
    if args.cmd == "refit":
        from lineguard.offline.refit import refit_bundle

        bank = None if args.bank is None else ("auto" if args.bank == "auto" else int(args.bank))
        t0 = time.perf_counter()
        out = refit_bundle(
            args.src,
            args.data,
            args.out,
            patch_bank=bank,
            patch_descriptor=args.descriptor,
            patch_search=args.search,
            progress=True,
            log=lambda m: print(m, flush=True),
        )
        seconds = time.perf_counter() - t0
        record = {
            "bundle": str(out.path),
            "refit_s": round(seconds, 1),
            "patch_bank": out.config.patch_bank,
            "patch_descriptor": out.config.patch_descriptor,
            "patch_search": out.config.patch_search,
        }
        print(json.dumps(record), flush=True)
        Path(args.out).with_suffix(".refit.json").write_text(json.dumps(record, indent=2))
    else:
        from lineguard.offline.evaluate import evaluate_bundle

        t0 = time.perf_counter()
        result = evaluate_bundle(args.bundle, args.data)
        m = result.metrics
        record = {
            "bundle": args.bundle,
            "evaluate_s": round(time.perf_counter() - t0, 1),
            "fused": m["overall"].get("auroc"),
            "branches": m["overall"]["branches"],
            "by_type": {t: v.get("auroc") for t, v in m["by_type"].items()},
            "by_type_branches": {t: v["branches"] for t, v in m["by_type"].items()},
            "by_defect": {d: v.get("auroc") for d, v in m["by_defect"].items()},
            "by_defect_branches": {d: v["branches"] for d, v in m["by_defect"].items()},
            "false_reject_rate": m.get("false_reject_rate"),
        }
        print(json.dumps(record, indent=2), flush=True)
        Path(args.json).write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
