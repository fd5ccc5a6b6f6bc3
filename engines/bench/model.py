"""``lineguard bench model``: the fused forward on each runtime, batch size and device.

Speed is measured here, never asserted in tests. Each configuration runs a few warm-up
batches, then repeats until ``min_time_s`` has passed (and at least ``min_iters`` times);
latency is the wall time of ``runtime.run`` per batch, which includes host→device copies and
the copy of the outputs back, i.e. what a worker actually waits for.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.engines.bench.machine import machine_info
from lineguard.engines.bundle import Bundle, load_bundle, save_bundle
from lineguard.engines.codec import DEFAULT_FRAME_CODEC
from lineguard.engines.errors import LineguardError
from lineguard.engines.fusion import Calibration
from lineguard.engines.input_size import parse_input_size
from lineguard.engines.model import CSADModel, ModelConfig
from lineguard.engines.runtimes import open_runtime

DEFAULT_PROFILE = {"efficientnet_lite0": "lite", "wide_resnet50_2": "paper"}


@dataclass(frozen=True)
class BenchRow:
    backbone: str
    profile: str
    runtime: str
    device: str
    precision: str
    batch: int
    images_per_s: float
    p50_ms: float
    p99_ms: float
    iters: int
    gflop_per_image: float
    note: str = ""


def flops_per_image(model: CSADModel) -> float:
    """GFLOP of one forward at batch 1, counted by torch (multiply-add = 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *model.config.input_size, 3, dtype=torch.uint8)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def time_runtime(
    run: Callable[[np.ndarray], object],
    images: np.ndarray,
    min_time_s: float,
    min_iters: int,
    warmup: int = 2,
    max_iters: int = 1000,
) -> list[float]:
    for _ in range(warmup):
        run(images)
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < max_iters and (
        len(latencies) < min_iters or time.perf_counter() - start < min_time_s
    ):
        t0 = time.perf_counter()
        run(images)
        latencies.append(time.perf_counter() - t0)
    return latencies


def synthetic_bundle(
    backbone: str, profile: str, input_size: int | tuple[int, int], directory: Path
) -> Bundle:
    """A bundle with real backbone weights where they exist offline (random heads otherwise).

    Speed does not depend on the weight values, so the paper backbone is timed with random
    weights when its ImageNet file cannot be fetched.
    """
    config = ModelConfig(
        backbone=backbone,
        profile=profile,
        input_size=parse_input_size(input_size),
        class_names=("background", "c1", "c2", "c3", "c4", "c5"),
        frame_codec=DEFAULT_FRAME_CODEC,  # what `lineguard train` records by default
    )
    weights: str | None = "imagenet" if backbone == "efficientnet_lite0" else None
    model = CSADModel(config, backbone_weights=weights).eval()
    return save_bundle(
        model, directory / f"{backbone}-{profile}", Calibration.neutral(config.branches)
    )


@dataclass(frozen=True)
class _Setup:
    bundle: Bundle
    runtime: str
    device: str
    precision: str
    gflop: float
    cuda_graphs: bool | None  # None where the option does not apply

    def row(self, batch: int, latencies: np.ndarray | None, note: str = "") -> BenchRow:
        graphs = "" if self.cuda_graphs is None else f"cuda_graphs={self.cuda_graphs}"
        if latencies is None or not len(latencies):
            ips = p50 = p99 = float("nan")
            iters = 0
        else:
            ips = float(batch * len(latencies) / latencies.sum())
            p50 = float(np.percentile(latencies, 50) * 1e3)
            p99 = float(np.percentile(latencies, 99) * 1e3)
            iters = len(latencies)
        return BenchRow(
            backbone=self.bundle.config.backbone,
            profile=self.bundle.config.profile,
            runtime=self.runtime,
            device=self.device,
            precision=self.precision,
            batch=batch,
            images_per_s=ips,
            p50_ms=p50,
            p99_ms=p99,
            iters=iters,
            gflop_per_image=round(self.gflop, 3),
            note="; ".join(n for n in (graphs, note) if n),
        )


def _setups(
    bundle: Bundle,
    runtimes: Iterable[str],
    device: str,
    precisions: Iterable[str],
    cuda_graphs: Iterable[bool],
) -> list[_Setup]:
    gflop = flops_per_image(bundle.build_model())
    out = []
    for kind in runtimes:
        for precision in precisions:
            graph_options: Iterable[bool | None] = (
                cuda_graphs if kind == "torch" and device != "cpu" else (None,)
            )
            out += [_Setup(bundle, kind, device, precision, gflop, g) for g in graph_options]
    return out


def bench_model(
    *,
    backbones: Iterable[str] = ("efficientnet_lite0",),
    runtimes: Iterable[str] = ("torch", "onnxruntime"),
    batches: Iterable[int] = (1, 8, 32),
    device: str = "cpu",
    precisions: Iterable[str] = ("fp32",),
    bundle: str | Path | None = None,
    profile: str | None = None,
    input_size: int = 256,
    min_time_s: float = 3.0,
    min_iters: int = 5,
    cuda_graphs: Iterable[bool] = (True,),
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Time every combination; a combination that cannot run here becomes a row with a note."""
    batches = list(batches)
    rows: list[BenchRow] = []
    with tempfile.TemporaryDirectory(prefix="lineguard-bench-") as tmp:
        if bundle is not None:
            bundles = [load_bundle(bundle)]
        else:
            bundles = [
                synthetic_bundle(
                    b, profile or DEFAULT_PROFILE.get(b, "lite"), input_size, Path(tmp)
                )
                for b in backbones
            ]
        for bnd in bundles:
            for setup in _setups(bnd, runtimes, device, precisions, cuda_graphs):
                options: dict[str, Any] = {}
                if setup.cuda_graphs is not None:
                    options["cuda_graphs"] = setup.cuda_graphs
                try:
                    rt = open_runtime(
                        bnd,
                        kind=setup.runtime,
                        device=device,
                        precision=setup.precision,
                        max_batch=max(batches),
                        **options,
                    )
                except LineguardError as exc:
                    rows += [setup.row(b, None, f"skipped: {exc}") for b in batches]
                    continue
                size = bnd.config.input_size
                for b in batches:
                    if progress:
                        progress(
                            f"{bnd.config.backbone} {setup.runtime} {device} "
                            f"{setup.precision} batch {b}"
                        )
                    images = np.random.default_rng(b).integers(
                        0, 256, (b, *size, 3), dtype=np.uint8
                    )
                    lat = np.asarray(time_runtime(rt.run, images, min_time_s, min_iters))
                    rows.append(setup.row(b, lat))
                rt.close()
    return rows


def rows_to_json(rows: list[BenchRow]) -> dict[str, Any]:
    return {"machine": machine_info(), "rows": [asdict(r) for r in rows]}
