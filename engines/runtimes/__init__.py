"""Runtimes: one interface, several executors of the same bundle.

``open_runtime(bundle, kind, device)`` returns an object with ``run(images) -> Outputs`` for
``kind`` in ``torch`` (CPU, or CUDA with fp16 and CUDA graphs), ``onnxruntime`` and
``tensorrt``. Each executor imports its library only when it is opened, so a worker that runs
TensorRT never imports onnxruntime and vice versa.
"""

from lineguard.engines.runtimes.base import (
    RUNTIME_KINDS,
    Runtime,
    batch_buckets,
    bucket_for,
    check_images,
    open_runtime,
)

__all__ = [
    "RUNTIME_KINDS",
    "Runtime",
    "batch_buckets",
    "bucket_for",
    "check_images",
    "open_runtime",
]
