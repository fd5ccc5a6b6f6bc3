"""``lineguard bench gpu``: one prepared check of the GPU infer path, for any NVIDIA machine.

A GPU is lent to this project rarely and briefly, so everything worth knowing about the torch
CUDA path is gathered by one command that builds what it needs on the spot:

1. **peak**: the fp16 matrix-multiply rate this GPU reaches (measured, not a datasheet value),
   the yardstick for the "fraction of peak" columns;
2. **parity**: a lite bundle built on the spot (ImageNet backbone weights where they exist
   offline, random otherwise) run by the torch runtime on the GPU in fp32 and fp16, with and
   without CUDA graphs, against the CPU: scores, anomaly maps and segmentation;
3. **sweep**: lite and paper profiles (random weights: speed does not depend on them) at batch
   1, 2, 4, … ``max_batch`` in fp16 with graphs, fed from the runtime's pinned staging buffer
   as the infer worker feeds it: images/s, p50/p99 ms per batch, peak GPU memory, fraction of
   the measured fp16 peak;
4. **e2e**: ``bench e2e`` with the torch infer worker on the GPU through an embedded Valkey.

It needs only torch, numpy and safetensors for parts 1-3; part 4 needs the stream stack
(redis, msgpack, OpenCV, a valkey/redis-server binary) and says so when any is missing rather
than failing the check. On a machine without a CUDA GPU it refuses with a clear message;
``device="cpu"`` runs the same code on tiny settings as a dry run (what the tests do).
Without an install, run it from a checkout with ``.ci/gpu-check OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.engines.bench.machine import machine_info
from lineguard.engines.bench.model import flops_per_image, time_runtime
from lineguard.engines.bundle import Bundle, save_bundle
from lineguard.engines.codec import DEFAULT_FRAME_CODEC
from lineguard.engines.errors import LineguardError, RuntimeUnavailableError
from lineguard.engines.fusion import Calibration
from lineguard.engines.model import CSADModel, ModelConfig, Outputs
from lineguard.engines.runtimes.base import batch_buckets
from lineguard.engines.runtimes.torch_rt import TorchRuntime

BACKBONES = {"lite": "efficientnet_lite0", "paper": "wide_resnet50_2"}
# Parity limits, relative to the largest reference value: fp32 convolutions on a GPU may run
# in TF32 (torch's cuDNN default, 10-bit mantissa), fp16 rounds every activation to 11 bits;
# the segmentation may flip only at near-ties.
PARITY_LIMITS = {
    "fp32": {"scores_rel": 1e-2, "map_rel": 1e-2, "seg_agree": 0.995},
    "fp16": {"scores_rel": 5e-2, "map_rel": 5e-2, "seg_agree": 0.98},
}


@dataclass
class GpuCheckPlan:
    """What to run; ``for_device`` gives the real plan on CUDA and a tiny one on the CPU."""

    device: str = "cuda"
    input_size: int = 256
    max_batch: int = 256
    profiles: tuple[str, ...] = ("lite", "paper")
    precisions: tuple[str, ...] = ("fp16",)
    min_time_s: float = 1.0
    parity_batch: int = 8
    e2e_frames: int = 2000
    e2e_max_batch: int = 64
    budget_s: float = 420.0  # stop starting sweep rows past this (the check must end < 8 min)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def for_device(cls, device: str, **overrides: Any) -> GpuCheckPlan:
        if device == "cpu":
            base: dict[str, Any] = {
                "device": "cpu",
                "input_size": 64,
                "max_batch": 2,
                "profiles": ("lite",),
                "precisions": ("fp32",),
                "min_time_s": 0.05,
                "parity_batch": 2,
                "e2e_frames": 8,
                "e2e_max_batch": 2,
                "budget_s": 60.0,
            }
        else:
            base = {"device": device}
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**base)

    @property
    def batches(self) -> list[int]:
        return list(batch_buckets(self.max_batch))


def require_device(device: str) -> None:
    """Refuse a CUDA device that torch cannot see, saying what there is instead."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        built = torch.version.cuda or "none (a CPU-only torch build)"
        raise RuntimeUnavailableError(
            f"no CUDA GPU is visible to torch {torch.__version__} (CUDA {built}): run this on a "
            "machine with an NVIDIA GPU and driver, or pass --device cpu for a dry run"
        )


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` smooth uint8 scenes (blocky colour fields with some noise), numpy only."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(30, 220, (n, 8, 8, 3)).astype(np.float32)
    k = max(1, size // 8)
    field_ = np.repeat(np.repeat(cells, k, axis=1), k, axis=2)[:, :size, :size]
    noisy = field_ + rng.normal(0, 6, field_.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def build_bundle(profile: str, size: int, folder: Path, *, pretrained: bool) -> Bundle:
    """A bundle of ``profile`` at ``size`` px; ImageNet backbone weights when asked and found
    offline (else random: speed and parity do not need trained weights)."""
    config = ModelConfig(
        backbone=BACKBONES[profile],
        profile=profile,
        input_size=(size, size),
        class_names=("background", "c1", "c2", "c3", "c4", "c5"),
        frame_codec=DEFAULT_FRAME_CODEC,
    )
    model = None
    if pretrained:
        try:
            model = CSADModel(config, backbone_weights="imagenet")
        except (LineguardError, OSError):
            model = None
    if model is None:
        torch.manual_seed(0)
        model = CSADModel(config, backbone_weights=None)
    return save_bundle(
        model.eval(),
        folder / f"{profile}-{size}",
        Calibration.neutral(config.branches),
        export_onnx=False,
    )


def measured_peak_tflops(device: str) -> float:
    """The best fp16 (CUDA) or fp32 (CPU) matmul rate over a few runs, in TFLOP/s."""
    n = 8192 if device != "cpu" else 512
    dtype = torch.float16 if device != "cpu" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(6):
        if device != "cpu":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def compare(out: Outputs, ref: Outputs) -> dict[str, float]:
    """How far ``out`` is from ``ref``: relative max differences and segmentation agreement."""
    s, rs = np.asarray(out.scores, np.float64), np.asarray(ref.scores, np.float64)
    m, rm = np.asarray(out.anomaly_map, np.float64), np.asarray(ref.anomaly_map, np.float64)
    return {
        "scores_rel": float(np.abs(s - rs).max() / max(np.abs(rs).max(), 1e-12)),
        "map_rel": float(np.abs(m - rm).max() / max(np.abs(rm).max(), 1e-12)),
        "seg_agree": float(np.mean(np.asarray(out.segmentation) == np.asarray(ref.segmentation))),
    }


def parity(bundle: Bundle, plan: GpuCheckPlan) -> list[dict[str, Any]]:
    """The GPU runtime in each precision, graphs on and off, against the CPU runtime."""
    images = smooth_images(plan.parity_batch, plan.input_size, seed=3)
    cpu = TorchRuntime(bundle, device="cpu", max_batch=plan.parity_batch)
    ref = cpu.run(images)
    cpu.close()
    rows = []
    graph_options = (True, False) if plan.device != "cpu" else (False,)
    precisions = ("fp32", "fp16") if plan.device != "cpu" else ("fp32",)
    for precision in precisions:
        for graphs in graph_options:
            rt = TorchRuntime(
                bundle,
                device=plan.device,
                precision=precision,
                max_batch=plan.parity_batch,
                cuda_graphs=graphs,
            )
            got = compare(rt.run(images), ref)
            rt.close()
            limits = PARITY_LIMITS[precision]
            ok = (
                got["scores_rel"] <= limits["scores_rel"]
                and got["map_rel"] <= limits["map_rel"]
                and got["seg_agree"] >= limits["seg_agree"]
            )
            rows.append(
                {"precision": precision, "cuda_graphs": graphs, **got, "limits": limits, "ok": ok}
            )
    return rows


def _stats(lat: np.ndarray, batch: int) -> dict[str, float]:
    return {
        "images_per_s": float(batch * len(lat) / lat.sum()),
        "p50_ms": float(np.percentile(lat, 50) * 1e3),
        "p99_ms": float(np.percentile(lat, 99) * 1e3),
        "iters": len(lat),
    }


def sweep(
    bundle: Bundle,
    plan: GpuCheckPlan,
    peak_tflops: float,
    deadline: float,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Model-only speed per batch size, fed from pinned staging like the infer worker."""
    gflop = flops_per_image(bundle.build_model())
    rows: list[dict[str, Any]] = []
    cuda = plan.device != "cpu"
    for precision in plan.precisions:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_open = time.perf_counter()
        rt = TorchRuntime(bundle, device=plan.device, precision=precision, max_batch=plan.max_batch)
        open_s = time.perf_counter() - t_open
        staging = rt.host_batch(plan.max_batch)
        staging[...] = smooth_images(plan.max_batch, plan.input_size, seed=5)
        for b in plan.batches:
            row: dict[str, Any] = {
                "profile": bundle.config.profile,
                "backbone": bundle.config.backbone,
                "precision": precision,
                "cuda_graphs": cuda,
                "batch": b,
                "gflop_per_image": round(gflop, 3),
                "open_s": round(open_s, 2),
            }
            if time.monotonic() > deadline:
                rows.append({**row, "skipped": "time budget spent"})
                continue
            say(f"sweep {bundle.config.profile} {precision} batch {b}")
            lat = np.asarray(time_runtime(rt.run, staging[:b], plan.min_time_s, 5, max_iters=2000))
            row.update(_stats(lat, b))
            row["fraction_of_peak"] = row["images_per_s"] * gflop / (peak_tflops * 1e3)
            if cuda:
                row["gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
            rows.append(row)
        rt.close()
    return rows


def e2e(bundle: Bundle, plan: GpuCheckPlan, say: Callable[[str], None]) -> dict[str, Any]:
    """``bench e2e`` with the torch infer worker on ``plan.device``; skipped with the reason
    when the stream stack is not importable or no server can be started here."""
    try:
        from lineguard.stream.settings import Settings
        from lineguard.stream.tools.bench_e2e import bench_e2e
    except ImportError as exc:
        return {"skipped": f"the stream stack is not importable here: {exc}"}
    try:
        settings = Settings.load(
            {
                "infer.max_batch": plan.e2e_max_batch,
                "infer.batch_buckets": batch_buckets(plan.e2e_max_batch),
            },
            env_file=None,
        )
        return bench_e2e(
            settings,
            frames=plan.e2e_frames,
            rate=None,
            bundle=bundle.path,
            runtime="torch",
            device=plan.device,
            warmup=min(64, plan.e2e_frames),
            progress=say,
        )
    except (ImportError, LineguardError, OSError) as exc:
        return {"skipped": f"{type(exc).__name__}: {exc}"}


def run_check(plan: GpuCheckPlan, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every part of the check; returns one JSON-ready dict."""
    require_device(plan.device)
    started = time.monotonic()
    deadline = started + plan.budget_s
    result: dict[str, Any] = {"plan": {**plan.__dict__, "batches": plan.batches}}
    result["machine"] = machine_info()
    if plan.device != "cpu":
        props = torch.cuda.get_device_properties(torch.device(plan.device))
        result["machine"]["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        result["machine"]["capability"] = f"{props.major}.{props.minor}"
    say("measuring the matmul peak")
    peak = measured_peak_tflops(plan.device)
    result["peak_tflops"] = {"value": round(peak, 3), "how": "best of 6 square matmuls"}
    with tempfile.TemporaryDirectory(prefix="lineguard-gpu-check-") as tmp:
        folder = Path(tmp)
        say("building the lite bundle")
        lite = build_bundle("lite", plan.input_size, folder, pretrained=True)
        say("parity against the CPU")
        result["parity"] = parity(lite, plan)
        result["sweep"] = []
        for profile in plan.profiles:
            bundle = lite if profile == "lite" else build_bundle(
                profile, plan.input_size, folder, pretrained=False
            )  # fmt: skip
            result["sweep"] += sweep(bundle, plan, peak, deadline, say)
        say("bench e2e through an embedded server")
        result["e2e"] = e2e(lite, plan, say)
    lite_rows = [r for r in result["sweep"] if r["profile"] == "lite" and "images_per_s" in r]
    fps = result["e2e"].get("frames_per_s")
    if lite_rows and fps is not None:
        at = [r for r in lite_rows if r["batch"] == plan.e2e_max_batch] or lite_rows
        result["e2e_vs_model"] = round(fps / max(r["images_per_s"] for r in at), 3)
    result["ok"] = all(r["ok"] for r in result["parity"])
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The check as plain text lines (what the CLI prints as tables, for a bare terminal)."""
    lines = [f"peak {result['peak_tflops']['value']} TFLOP/s ({result['peak_tflops']['how']})"]
    for r in result["parity"]:
        lines.append(
            f"parity {r['precision']} graphs={r['cuda_graphs']}: scores {r['scores_rel']:.2e} "
            f"map {r['map_rel']:.2e} seg {r['seg_agree']:.4f} {'ok' if r['ok'] else 'FAIL'}"
        )
    for r in result["sweep"]:
        if "images_per_s" not in r:
            lines.append(f"sweep {r['profile']} {r['precision']} b{r['batch']}: {r['skipped']}")
            continue
        lines.append(
            f"sweep {r['profile']} {r['precision']} b{r['batch']}: {r['images_per_s']:.1f} img/s "
            f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} ms, {r['fraction_of_peak']:.1%} of peak"
            + (f", {r['gpu_mem_gib']} GiB" if "gpu_mem_gib" in r else "")
        )
    e = result["e2e"]
    lines.append(
        f"e2e: {e['skipped']}"
        if "skipped" in e
        else f"e2e: {e['frames_per_s']} frames/s, capture→event p99 "
        f"{e['latency_ms']['total'].get('p99')} ms, {result.get('e2e_vs_model')} of model-only"
    )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lineguard.stream.tools.gpu_check``: the check without the CLI's dependencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, metavar="PATH")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-batch", type=int, default=None)
    args = parser.parse_args(argv)
    try:
        result = run_check(GpuCheckPlan.for_device(args.device, max_batch=args.max_batch))
    except LineguardError as exc:
        print(f"error: {exc}")
        return 1
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print("\n".join(summary_lines(result)))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
