"""The torch executor: eager on CPU; on CUDA with fp16 autocast, channels-last and CUDA graphs.

On a GPU a 256² CSAD forward is a few milliseconds of kernels but hundreds of kernel launches,
so at small batches launch overhead dominates. Capturing one CUDA graph per batch bucket and
replaying it removes that overhead; inputs are copied into the graph's static buffer and the
outputs copied out, so callers never hold references into graph memory. Histograms and
Mahalanobis stay fp32 under autocast (see ``lineguard.engines.histogram``).
"""

from __future__ import annotations

import numpy as np
import torch

from lineguard.engines.bundle import Bundle
from lineguard.engines.errors import ConfigError, RuntimeUnavailableError
from lineguard.engines.model import CSADModel, Outputs
from lineguard.engines.runtimes.base import (
    batch_buckets,
    bucket_for,
    check_images,
    concat_outputs,
    pad_to,
    split_batches,
)


class TorchRuntime:
    kind = "torch"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cpu",
        precision: str = "fp32",
        max_batch: int = 32,
        cuda_graphs: bool = True,
        channels_last: bool | None = None,
        model: CSADModel | None = None,
    ) -> None:
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self._torch_device = torch.device(device)
        is_cuda = self._torch_device.type == "cuda"
        if is_cuda and not torch.cuda.is_available():
            raise RuntimeUnavailableError(
                f"device {device!r} requested but torch sees no CUDA GPU: use device='cpu'"
            )
        if precision == "fp16" and not is_cuda:
            raise ConfigError("fp16 needs a CUDA device; on CPU use precision='fp32'")
        self.size = bundle.config.input_size
        net = model if model is not None else bundle.build_model()
        net = net.eval().to(self._torch_device)
        if channels_last if channels_last is not None else is_cuda:
            net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.model = net
        self.buckets = batch_buckets(max_batch)
        self.use_graphs = is_cuda and cuda_graphs
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]] = {}
        self._stream = torch.cuda.Stream(self._torch_device) if is_cuda else None

    def _forward(self, x: torch.Tensor) -> Outputs:
        if self.precision == "fp16":
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                return self.model(x)
        return self.model(x)

    def _capture(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, Outputs]:
        static_in = torch.zeros((rows, *self.size, 3), dtype=torch.uint8, device=self._torch_device)
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self._torch_device))
        with torch.cuda.stream(self._stream):
            for _ in range(3):  # warm-up: cuDNN autotuning and lazy allocations happen here
                self._forward(static_in)
        torch.cuda.current_stream(self._torch_device).wait_stream(self._stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=self._stream):
            static_out = self._forward(static_in)
        return graph, static_in, static_out

    def _run_chunk(self, images: np.ndarray) -> Outputs:
        n = images.shape[0]
        if self.use_graphs:
            rows = bucket_for(n, self.buckets)
            if rows not in self._graphs:
                self._graphs[rows] = self._capture(rows)
            graph, static_in, static_out = self._graphs[rows]
            static_in.copy_(torch.from_numpy(pad_to(images, rows)), non_blocking=False)
            graph.replay()
            out = static_out.map(lambda t: t[:n])
        else:
            out = self._forward(torch.from_numpy(images).to(self._torch_device))
        return out.map(lambda t: t.detach().cpu().numpy())

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> Outputs:
        images = check_images(images, self.size)
        return concat_outputs([self._run_chunk(c) for c in split_batches(images, self.max_batch)])

    def close(self) -> None:
        self._graphs.clear()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()
