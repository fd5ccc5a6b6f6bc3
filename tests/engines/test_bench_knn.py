"""faiss search against the in-graph matrix-product search, and the benchmark's bookkeeping."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineguard.engines.bench.knn import KnnRow, bench_knn, crossover
from lineguard.engines.errors import ConfigError
from lineguard.engines.knn import nearest_sq
from lineguard.engines.runtimes.faiss_stage import FaissSearch


def test_faiss_flat_matches_the_graph_search_and_approximate_never_undershoots() -> None:
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(2000, 16)).astype(np.float32)
    q = rng.normal(size=(300, 16)).astype(np.float32)
    b = torch.from_numpy(bank)
    exact = nearest_sq(torch.from_numpy(q), b, (b * b).sum(dim=1)).sqrt().numpy()
    brute = np.linalg.norm(q[:, None] - bank[None], axis=2).min(axis=1)
    np.testing.assert_allclose(exact, brute, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(FaissSearch(bank, "flat").nearest(q), brute, rtol=1e-4, atol=1e-4)
    for kind in ("ivf", "hnsw"):
        got = FaissSearch(bank, kind).nearest(q)
        assert (got >= brute - 1e-4).all()  # an approximate search can only miss the nearest
        assert np.mean(np.abs(got - brute) < 1e-4) > 0.5
    with pytest.raises(ConfigError, match="unknown faiss index"):
        FaissSearch(bank, "lsh")


def test_bench_knn_rows_and_crossover() -> None:
    rows = bench_knn([64, 256], dim=8, queries=32, min_time_s=0.0)
    assert {(r.method, r.bank) for r in rows} >= {("faiss-flat", 64), ("graph-torch", 256)}
    for r in rows:
        assert r.ms_per_image > 0
        if r.method in ("graph-torch", "graph-onnxruntime", "faiss-flat"):
            assert r.recall == 1.0
    made = [
        KnnRow("graph-torch", 10, 8, 4, 1.0, 1.0, 0.0, 1.0),
        KnnRow("graph-torch", 100, 8, 4, 5.0, 5.0, 0.0, 1.0),
        KnnRow("faiss-ivf", 10, 8, 4, 2.0, 2.0, 0.0, 1.0),
        KnnRow("faiss-ivf", 100, 8, 4, 3.0, 3.0, 0.0, 0.9),
        KnnRow("faiss-flat", 10, 8, 4, 9.0, 9.0, 0.0, 1.0),
        KnnRow("faiss-flat", 100, 8, 4, 9.0, 9.0, 0.0, 1.0),
    ]
    assert crossover(made) == {"faiss-flat": None, "faiss-ivf": 100}
    with pytest.raises(ConfigError, match="unknown methods"):
        bench_knn([8], methods=("magic",))
