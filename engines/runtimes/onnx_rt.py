"""The ONNX Runtime executor, from the bundle's ONNX export.

On CPU-only lines this is usually the fastest portable choice; with ``device="cuda"`` it uses
the CUDA execution provider when the installed onnxruntime has one and says so when it hasn't.
"""

from __future__ import annotations

import os

import numpy as np

from lineguard.engines.bundle import Bundle
from lineguard.engines.errors import BundleError, ConfigError, RuntimeUnavailableError
from lineguard.engines.export import INPUT_NAME, OUTPUT_NAMES
from lineguard.engines.model import Outputs
from lineguard.engines.runtimes.base import check_images, concat_outputs, split_batches


class OnnxRuntime:
    kind = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 32,
        threads: int | None = None,
        spin_threads: bool = False,
    ) -> None:
        import onnxruntime as ort

        if precision != "fp32":
            raise ConfigError("the onnxruntime executor runs the fp32 export; use precision='fp32'")
        if bundle.onnx_path is None:
            raise BundleError(
                f"bundle {bundle.path} has no ONNX export: re-save it with export_onnx=True"
            )
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise RuntimeUnavailableError(
                    "this onnxruntime has no CUDA provider: install onnxruntime-gpu or use "
                    "device='cpu'"
                )
            providers.insert(0, "CUDAExecutionProvider")
        elif device != "cpu":
            raise ConfigError(f"unknown device {device!r} for onnxruntime; use 'cpu' or 'cuda'")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        # Idle intra-op threads busy-wait by default. A line's infer worker is idle between
        # frames and shares the box with ingest, decide and the dashboard: measured at 5 frames/s
        # with the lite0 bundle, spinning took 71–77 % of a core against 42–44 % without, and
        # back-to-back batches of 1 and 8 ran equally fast (within 2 %) either way.
        options.add_session_config_entry(
            "session.intra_op.allow_spinning", "1" if spin_threads else "0"
        )
        options.log_severity_level = 3  # warnings about unused initialisers are not for operators
        self.session: ort.InferenceSession | None = ort.InferenceSession(
            str(bundle.onnx_path), options, providers=providers
        )
        self._outputs = [o.name for o in self.session.get_outputs()]
        if tuple(self._outputs[:3]) != OUTPUT_NAMES:
            raise BundleError(
                f"{bundle.onnx_path} has outputs {self._outputs}, expected {OUTPUT_NAMES} first"
            )
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.size = bundle.config.input_size

    def run(self, images: np.ndarray) -> Outputs:
        if self.session is None:
            raise RuntimeUnavailableError("this onnxruntime executor was closed: open a new one")
        images = check_images(images, self.size)
        parts = []
        for chunk in split_batches(images, self.max_batch):
            values = self.session.run(self._outputs, {INPUT_NAME: chunk})
            parts.append(Outputs(*values))
        return concat_outputs(parts)

    def close(self) -> None:
        self.session = None
