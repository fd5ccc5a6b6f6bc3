#!/usr/bin/env python3
"""Init step for an infer worker: open the bundle exactly as ``lineguard infer`` will, once.

With ``--runtime tensorrt`` this builds the TensorRT engine for this GPU, precision and batch
profile (``LINEGUARD_INFER__MAX_BATCH``) into the bundle's ``engines/`` cache, so the worker
that starts next finds it there and is ready in seconds instead of minutes. Concurrent
prepares and workers on the same cache build each engine once (the runtime holds a file lock
while building). With any other runtime it verifies the bundle (schema, hashes) and runs one
warm-up batch: a broken bundle fails the init step, not the worker.

It calls the infer stage's own ``lineguard.stream.infer.open_model`` with the same settings, so the
engine key (ONNX hash, TensorRT version, GPU, precision, batch profile) is the one the worker
computes. ``lineguard`` has no CLI command for this yet; see the README's Deploy section.

Usage (installed as ``lineguard-prepare`` in the images)::

    lineguard-prepare --bundle /var/lib/lineguard/bundles/current \\
        --runtime tensorrt --device cuda:0 --precision fp16

Exit status 0 when the model opened and ran a warm-up batch, 1 with a one-line reason
otherwise (e.g. TensorRT missing, no GPU, a bundle that fails verification).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="lineguard-prepare",
        description="Open a bundle like `lineguard infer` does (builds TensorRT engines).",
    )
    parser.add_argument("--bundle", "-b", required=True, type=Path, help="bundle directory")
    parser.add_argument(
        "--runtime", default="auto", help="auto, torch, onnxruntime or tensorrt (as infer)"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (as infer)")
    parser.add_argument("--precision", default="fp32", help="fp32 or fp16 (as infer)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Imported here so --help works without the lineguard packages installed.
    from lineguard.engines.errors import LineguardError
    from lineguard.stream.infer import open_model, resolve_runtime
    from lineguard.stream.settings import Settings

    try:
        settings = Settings.load()
        started = time.monotonic()
        model = open_model(
            args.bundle,
            runtime=args.runtime,
            device=args.device,
            precision=args.precision,
            max_batch=settings.infer.max_batch,
        )
        try:
            kind = resolve_runtime(args.runtime, args.device, model.bundle)
            seconds = time.monotonic() - started
            print(
                f"prepared bundle {model.bundle.path} (model {model.version}) on {kind} "
                f"{args.device} {args.precision}, max batch {settings.infer.max_batch}, "
                f"in {seconds:.1f} s"
            )
            if kind == "tensorrt":
                engines = sorted(p.name for p in model.bundle.engine_cache.glob("*.engine"))
                print(f"engine cache {model.bundle.engine_cache}: {', '.join(engines) or '-'}")
        finally:
            model.close()
    except LineguardError as exc:
        print(f"lineguard-prepare: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
