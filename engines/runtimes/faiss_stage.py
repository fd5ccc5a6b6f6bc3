"""The patch-bank search right after the engine, for banks too large for a matrix product.

A bundle trained with ``patch_search`` = ``faiss-flat|ivf|hnsw`` exports a graph that hands out
the patch descriptors (``patch_features``) instead of searching the bank itself; the bank stays
in ``model.safetensors`` and out of the ONNX file. ``open_runtime`` wraps such a bundle's
executor in ``FaissSearchRuntime``, which searches every descriptor with faiss and fills the
``patch_knn`` column and map exactly as the in-graph branch would (same distance, same
quantile normalisation), so the infer and decide workers see the usual three outputs. Where
the crossover lies on a given machine is what ``lineguard bench knn`` measures.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lineguard.engines.bundle import Bundle
from lineguard.engines.errors import BundleError, ConfigError
from lineguard.engines.knn import normalise, to_map
from lineguard.engines.model import CSADModel, ModelConfig, Outputs

KINDS = ("flat", "ivf", "hnsw")


class FaissSearch:
    """A faiss index over a bank ``[M, D]``; ``nearest(q)`` gives Euclidean distances ``[N]``.

    ``flat`` is exact; ``ivf`` (``4·√M`` lists, ``nprobe`` of them searched) and ``hnsw``
    (32 links, ``ef_search``) are approximate: ``lineguard bench knn`` reports their recall.
    """

    def __init__(
        self,
        bank: np.ndarray,
        kind: str = "flat",
        *,
        nprobe: int = 8,
        ef_search: int = 64,
        threads: int | None = None,
    ):
        import faiss

        if kind not in KINDS:
            raise ConfigError(f"unknown faiss index {kind!r}; use one of {KINDS}")
        x = np.ascontiguousarray(bank, dtype=np.float32)
        if x.ndim != 2 or x.shape[0] < 1:
            raise ConfigError(f"a bank must be [M ≥ 1, D], got {x.shape}")
        if threads is not None:
            faiss.omp_set_num_threads(threads)
        m, d = x.shape
        self.kind = kind
        self.index: Any
        if kind == "flat":
            self.index = faiss.IndexFlatL2(d)
        elif kind == "ivf":
            nlist = max(1, min(int(4 * math.sqrt(m)), m // 39 or 1))  # ≥ 39 points per list
            quantizer = faiss.IndexFlatL2(d)
            self.index = faiss.IndexIVFFlat(quantizer, d, nlist)
            self.index.train(x)
            self.index.nprobe = min(nprobe, nlist)
            self._quantizer = quantizer  # the IVF index does not own it
        else:
            self.index = faiss.IndexHNSWFlat(d, 32)
            self.index.hnsw.efSearch = ef_search
        self.index.add(x)

    def nearest(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        distances, _ = self.index.search(q, 1)
        return np.sqrt(np.clip(distances[:, 0], 0.0, None))


class FaissStage:
    """Fills ``patch_knn`` from ``patch_features`` with a faiss index over the bank."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor]):
        if not config.patch_bank or config.patch_search == "graph":
            raise BundleError("this model searches its patch bank in the graph: no faiss stage")
        try:
            bank = state["patch_knn.bank"].float().cpu().numpy()
            self.q_a = float(state["patch_knn.q_a"])
            self.q_b = float(state["patch_knn.q_b"])
        except KeyError as exc:
            raise BundleError(f"the model weights lack the patch bank tensor {exc}") from exc
        # the same per-position prior the in-graph branch subtracts (zero when it is off)
        prior = state.get("prior_knn")
        self.prior = 0.0 if prior is None else prior.float().cpu().numpy()
        spread = state.get("prior_scale_knn")  # and the spread it divides by (one when off)
        self.spread = 1.0 if spread is None else spread.float().cpu().numpy()
        self.search = FaissSearch(bank, config.patch_search.removeprefix("faiss-"))
        self.column = config.branches.index("patch_knn")
        self.grid = config.patch_grid
        self.map_size = config.map_size

    @classmethod
    def for_model(cls, model: CSADModel) -> FaissStage | None:
        """The stage a model needs after its forward, or ``None`` when it searches in-graph."""
        if model.patch_knn is None or model.config.patch_search == "graph":
            return None
        return cls(model.config, dict(model.state_dict()))

    def apply(self, out: Outputs) -> Outputs:
        features = out.patch_features
        if features is None:
            raise BundleError("the engine returned no patch_features for the faiss stage")
        b, _, d = features.shape
        gh, gw = self.grid
        distances = self.search.nearest(features.reshape(-1, d)).reshape(b, 1, gh, gw)
        knn_map = (normalise(distances, self.q_a, self.q_b) - self.prior) / self.spread
        knn_map = knn_map.astype(np.float32)
        scores = np.array(out.scores, dtype=np.float32, copy=True)
        # the score on the descriptor grid, the map resampled as in the graph (engines.knn)
        scores[:, self.column] = knn_map.max(axis=(1, 2, 3))
        if out.anomaly_map is None:  # a runtime asked for scores only
            return Outputs(scores, None, out.segmentation)
        shown = to_map(torch.from_numpy(knn_map), self.map_size).numpy()
        return Outputs(scores, out.anomaly_map + shown, out.segmentation)


class FaissSearchRuntime:
    """An executor followed by the faiss stage; otherwise it is the executor it wraps."""

    def __init__(self, inner: Any, bundle: Bundle):
        self.inner = inner
        self.stage = FaissStage(bundle.config, bundle.state_dict())

    def run(self, images: np.ndarray) -> Outputs:
        return self.stage.apply(self.inner.run(images))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
