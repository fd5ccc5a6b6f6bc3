"""``lineguard bench knn``: where faiss starts to beat the in-graph patch-bank search.

The fused graph searches the patch bank with matrix products (``engines.knn``): exact, batched,
exported to ONNX/TensorRT with everything else, and its cost grows linearly with the bank
(2·M·D FLOPs per patch). faiss brings what a matrix product cannot — inverted lists (IVF) and
graphs (HNSW) that look at a small part of a large bank — at the price of running outside the
graph, on descriptors the engine hands over (``engines.runtimes.faiss_stage``). ``bench_knn``
times both on the same queries and bank sizes so the crossover is measured, not guessed.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lineguard.engines.bench.machine import machine_info
from lineguard.engines.errors import ConfigError
from lineguard.engines.knn import nearest_sq
from lineguard.engines.runtimes.faiss_stage import KINDS, FaissSearch

METHODS = ("graph-torch", "graph-onnxruntime", *(f"faiss-{k}" for k in KINDS))


class _GraphSearch(torch.nn.Module):
    """The in-graph search alone (what ``PatchBank`` runs), to time it against faiss."""

    bank: torch.Tensor
    bank_sq: torch.Tensor

    def __init__(self, bank: np.ndarray):
        super().__init__()
        b = torch.from_numpy(np.asarray(bank, dtype=np.float32))
        self.register_buffer("bank", b)
        self.register_buffer("bank_sq", (b * b).sum(dim=1))

    def forward(self, q: torch.Tensor) -> torch.Tensor:
        return nearest_sq(q, self.bank, self.bank_sq).sqrt()


@dataclass(frozen=True)
class KnnRow:
    method: str
    bank: int
    dim: int
    queries: int
    ms_per_image: float  # p50 of one search over one image's patches
    p99_ms: float
    build_s: float
    recall: float  # share of queries whose distance matches the exact one (1.0 for exact)


def _runner(
    method: str, module: _GraphSearch, bank: np.ndarray, q: np.ndarray
) -> Callable[[np.ndarray], np.ndarray]:
    """A function that searches one batch of queries with ``method``, set up and ready."""
    import onnxruntime as ort

    if method == "graph-torch":

        def run_torch(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(torch.from_numpy(x)).numpy()

        return run_torch
    if method == "graph-onnxruntime":
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            path = Path(tmp) / "search.onnx"
            torch.onnx.export(
                module,
                (torch.from_numpy(q[:2]),),
                str(path),
                input_names=["q"],
                output_names=["d"],
                dynamic_axes={"q": {0: "n"}, "d": {0: "n"}},
                opset_version=17,
                dynamo=False,
            )
            session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(["d"], {"q": x})[0]
    return FaissSearch(bank, method.removeprefix("faiss-")).nearest


def _time(run: Any, q: np.ndarray, min_time_s: float) -> np.ndarray:
    run(q)  # warm-up: first-call allocations, ORT graph set-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time_s and len(times) < 200):
        t0 = time.perf_counter()
        run(q)
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def bench_knn(
    sizes: list[int],
    *,
    dim: int = 64,
    queries: int = 4096,
    methods: tuple[str, ...] = METHODS,
    min_time_s: float = 2.0,
    seed: int = 0,
    progress: Any = None,
) -> list[KnnRow]:
    """Time each search method per bank size on one image's worth of patch queries.

    Bank and queries are drawn from the same Gaussian mixture (64 clusters), which is closer
    to real patch descriptors than uniform noise and gives IVF/HNSW realistic structure.
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ConfigError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (64, dim)).astype(np.float32)

    def draw(n: int) -> np.ndarray:
        pick = rng.integers(0, len(centres), n)
        return centres[pick] + 0.3 * rng.normal(0, 1, (n, dim)).astype(np.float32)

    q = draw(queries)
    rows: list[KnnRow] = []
    for size in sizes:
        bank = draw(size)
        module = _GraphSearch(bank).eval()
        with torch.inference_mode():
            exact = module(torch.from_numpy(q)).numpy()
        for method in methods:
            if progress is not None:
                progress(f"{method}, bank {size}")
            t0 = time.perf_counter()
            run = _runner(method, module, bank, q)
            build = time.perf_counter() - t0
            got = run(q)
            recall = float(np.mean(np.abs(got - exact) <= 1e-3 * (1.0 + exact)))
            times = _time(run, q, min_time_s) * 1e3
            rows.append(
                KnnRow(
                    method,
                    size,
                    dim,
                    queries,
                    float(np.median(times)),
                    float(np.percentile(times, 99)),
                    round(build, 3),
                    recall,
                )
            )
    return rows


def crossover(rows: list[KnnRow], exact_only: bool = False) -> dict[str, int | None]:
    """Smallest bank size at which each faiss method beats the best in-graph method."""
    out: dict[str, int | None] = {}
    sizes = sorted({r.bank for r in rows})
    graph = {
        s: min(r.ms_per_image for r in rows if r.bank == s and r.method.startswith("graph"))
        for s in sizes
        if any(r.bank == s and r.method.startswith("graph") for r in rows)
    }
    for method in sorted({r.method for r in rows if r.method.startswith("faiss")}):
        if exact_only and method != "faiss-flat":
            continue
        out[method] = next(
            (
                r.bank
                for r in sorted(rows, key=lambda r: r.bank)
                if r.method == method and r.bank in graph and r.ms_per_image < graph[r.bank]
            ),
            None,
        )
    return out


def rows_to_json(rows: list[KnnRow]) -> dict[str, Any]:

    return {
        "machine": machine_info(),
        "rows": [asdict(r) for r in rows],
        "crossover": crossover(rows),
    }
