"""The ``Runtime`` protocol and what all executors share: input checks and batch buckets.

Engines with static shapes (CUDA graphs, TensorRT profiles) run fastest at a few fixed batch
sizes, so a batch of n images is zero-padded up to the smallest bucket ≥ n and the padding rows
are dropped from the outputs. Buckets are powers of two up to ``max_batch`` (plus ``max_batch``
itself), which bounds the padding waste below 50 %.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lineguard.engines.bundle import Bundle, load_bundle
from lineguard.engines.errors import ConfigError, InputError
from lineguard.engines.model import Outputs

RUNTIME_KINDS = {
    "torch": "lineguard.engines.runtimes.torch_rt:TorchRuntime",
    "onnxruntime": "lineguard.engines.runtimes.onnx_rt:OnnxRuntime",
    "tensorrt": "lineguard.engines.runtimes.tensorrt_rt:TensorRTRuntime",
}
PRECISIONS = ("fp32", "fp16")


@runtime_checkable
class Runtime(Protocol):
    """Scores uint8 image batches with one bundle on one device."""

    kind: str
    device: str
    precision: str
    bundle: Bundle
    max_batch: int

    def run(self, images: np.ndarray) -> Outputs:
        """``images`` uint8 ``[B, S, S, 3]`` RGB → numpy ``Outputs`` with B rows."""
        ...

    def close(self) -> None:
        """Release device memory and sessions."""
        ...


def open_runtime(
    bundle: Bundle | str | Path,
    kind: str = "torch",
    device: str = "cpu",
    precision: str = "fp32",
    max_batch: int = 32,
    **options: object,
) -> Runtime:
    """Open ``bundle`` on the executor ``kind``; unknown names list the known ones."""
    if kind not in RUNTIME_KINDS:
        raise ConfigError(f"unknown runtime {kind!r}; known: {', '.join(RUNTIME_KINDS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    if not isinstance(bundle, Bundle):
        bundle = load_bundle(bundle)
    module_name, class_name = RUNTIME_KINDS[kind].split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    runtime = cls(bundle, device=device, precision=precision, max_batch=max_batch, **options)
    if bundle.config.patch_bank and bundle.config.patch_search != "graph":
        from lineguard.engines.runtimes.faiss_stage import FaissSearchRuntime

        return FaissSearchRuntime(runtime, bundle)  # type: ignore[return-value]
    return runtime


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below ``max_batch``, then ``max_batch``: 1, 2, 4, …, max_batch."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    sizes = []
    b = 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    sizes.append(max_batch)
    return tuple(sizes)


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds ``n`` images."""
    for b in buckets:
        if b >= n:
            return b
    raise InputError(f"batch of {n} exceeds the largest bucket {buckets[-1]}: split it")


def check_images(images: object, size: tuple[int, int]) -> np.ndarray:
    """Validate a batch before it reaches a device: dtype, rank, (H, W), channel count."""
    if not isinstance(images, np.ndarray):
        raise InputError(f"images must be a numpy array, got {type(images).__name__}")
    if images.dtype != np.uint8:
        raise InputError(f"images must be uint8, got {images.dtype}")
    h, w = size
    if images.ndim != 4 or images.shape[1:] != (h, w, 3) or images.shape[0] < 1:
        raise InputError(
            f"images must have shape [B≥1, {h}, {w}, 3] (the bundle's input height and "
            f"width), got {images.shape}"
        )
    return np.ascontiguousarray(images)


def pad_to(images: np.ndarray, rows: int) -> np.ndarray:
    """Zero-pad a batch to ``rows`` images (the padding rows are discarded after the run)."""
    n = images.shape[0]
    if n == rows:
        return images
    padded = np.zeros((rows, *images.shape[1:]), dtype=images.dtype)
    padded[:n] = images
    return padded


def split_batches(images: np.ndarray, max_batch: int) -> list[np.ndarray]:
    return [images[i : i + max_batch] for i in range(0, images.shape[0], max_batch)]


def concat_outputs(parts: list[Outputs]) -> Outputs:
    if len(parts) == 1:
        return parts[0]
    return Outputs(
        *(
            None if field[0] is None else np.concatenate(field, axis=0)
            for field in zip(*parts, strict=True)
        )
    )
