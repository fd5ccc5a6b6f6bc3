"""The torch executor: eager on CPU; on CUDA with fp16 autocast, channels-last and CUDA graphs.

On a GPU a 256² CSAD forward is a few milliseconds of kernels but hundreds of kernel launches,
so at small batches launch overhead dominates. Capturing one CUDA graph per batch bucket and
replaying it removes that overhead. Every bucket is captured when the runtime opens (warm-up
and cuDNN autotuning included), so no batch size captures a graph on live traffic.

One batch on CUDA is, all on the runtime's own stream and with one synchronisation at the end:
an asynchronous host→device copy of the uint8 images from page-locked memory (the caller's
``host_batch`` buffer, or the runtime's own pinned buffer the images are first copied into)
into the graph's static input; the replay (rows past the batch keep whatever an earlier batch
left there: every row is computed on its own, and those rows are dropped); and asynchronous
copies of the outputs that are used into preallocated pinned host buffers. ``outputs`` says
which come back: ``all`` (the ``Outputs`` contract), ``maps`` (scores, anomaly map, and the
segmentation at the anomaly map's resolution, which is what the infer worker publishes) or
``scores``. Callers get copies, never views into graph or pinned memory. Histograms and
Mahalanobis stay fp32 under autocast (see ``lineguard.engines.histogram``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    split_batches,
)

OUTPUT_SETS = ("all", "maps", "scores")
_WARMUP_RUNS = 3  # before a capture: cuDNN autotuning and lazy allocations happen here


def select_outputs(out: Outputs, which: str) -> Outputs:
    """The fields of ``out`` that ``which`` keeps (tensors or arrays; see the module doc)."""
    if which == "all":
        return out
    if which == "scores":
        return Outputs(out.scores, None, None, out.patch_features)
    seg, amap = out.segmentation, out.anomaly_map
    if seg is not None and amap is not None:
        sh, sw = seg.shape[-2] // amap.shape[-2], seg.shape[-1] // amap.shape[-1]
        if sh >= 1 and sw >= 1:
            # nearest: the pixel at the top-left of each cell, as cv2 INTER_NEAREST picks it
            seg = seg[:, ::sh, ::sw][:, : amap.shape[-2], : amap.shape[-1]]
    return Outputs(out.scores, amap, seg, out.patch_features)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    outputs: Outputs  # static device tensors the replay writes


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
        outputs: str = "all",
        model: CSADModel | None = None,
    ) -> None:
        if outputs not in OUTPUT_SETS:
            raise ConfigError(f"unknown outputs {outputs!r}; use one of {', '.join(OUTPUT_SETS)}")
        self.bundle = bundle
        self.device = device
        self.precision = precision
        self.max_batch = max_batch
        self.outputs = outputs
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
        self._graphs: dict[int, _Graph] = {}
        self._stream = torch.cuda.Stream(self._torch_device) if is_cuda else None
        self._pinned: list[torch.Tensor] = []  # host buffers handed out by host_batch
        if is_cuda:
            with torch.cuda.device(self._torch_device), torch.inference_mode():
                self._open_cuda()

    # CUDA set-up ----------------------------------------------------------------------

    def _open_cuda(self) -> None:
        """Static device input, pinned host input and output buffers, every bucket's graph."""
        torch.backends.cudnn.benchmark = True  # fixed shapes: autotune once per bucket
        shape = (self.max_batch, *self.size, 3)
        self._dev_in = torch.zeros(shape, dtype=torch.uint8, device=self._torch_device)
        self._host_in = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
        assert self._stream is not None
        self._stream.wait_stream(torch.cuda.current_stream(self._torch_device))
        with torch.cuda.stream(self._stream):
            probe = self._selected(self._dev_in[:1])
        self._host_out = Outputs(
            *(
                None
                if t is None
                else torch.empty((self.max_batch, *t.shape[1:]), dtype=t.dtype, pin_memory=True)
                for t in probe
            )
        )
        if self.use_graphs:
            for rows in self.buckets:  # each graph has its own memory pool
                self._graphs[rows] = self._capture(rows)
        self._stream.synchronize()

    def _forward(self, x: torch.Tensor) -> Outputs:
        if self.precision == "fp16":
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=False):
                return self.model(x)
        return self.model(x)

    def _selected(self, x: torch.Tensor) -> Outputs:
        """The forward with only the requested outputs, each made contiguous (in the graph)."""
        out = select_outputs(self._forward(x), self.outputs)
        return out.map(lambda t: t.contiguous())

    def _capture(self, rows: int) -> _Graph:
        static_in = self._dev_in[:rows]
        assert self._stream is not None
        with torch.cuda.stream(self._stream):
            for _ in range(_WARMUP_RUNS):
                self._selected(static_in)
        self._stream.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a reload captures in a background thread while the old model's
        # forward keeps running (and synchronising) in another; only this thread is checked
        with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
            static_out = self._selected(static_in)
        return _Graph(graph, static_out)

    def host_batch(self, rows: int) -> np.ndarray:
        """A ``[rows, H, W, 3]`` uint8 buffer to decode images into; page-locked on CUDA, so
        ``run`` copies it to the GPU asynchronously without a staging copy."""
        shape = (rows, *self.size, 3)
        if self._stream is None:
            return np.zeros(shape, dtype=np.uint8)
        buf = torch.zeros(shape, dtype=torch.uint8, pin_memory=True)
        self._pinned.append(buf)
        return buf.numpy()

    def _pinned_rows(self, images: np.ndarray) -> torch.Tensor | None:
        """The pinned tensor rows that ``images`` is a view of, when it is the leading rows
        of a ``host_batch`` buffer (checked by address: no CUDA call); else None."""
        start = images.__array_interface__["data"][0]
        for buf in self._pinned:
            same = buf.data_ptr() == start and images.shape[1:] == tuple(buf.shape[1:])
            if same and images.shape[0] <= buf.shape[0] and images.flags.c_contiguous:
                return buf[: images.shape[0]]
        return None

    # running --------------------------------------------------------------------------

    def _run_cuda(self, images: np.ndarray) -> Outputs:
        n = images.shape[0]
        assert self._stream is not None
        src = self._pinned_rows(images)
        if src is None:
            src = self._host_in[:n]
            src.numpy()[...] = images  # one host copy into pinned memory
        with torch.cuda.stream(self._stream):
            self._dev_in[:n].copy_(src, non_blocking=True)
            if self.use_graphs:
                rows = bucket_for(n, self.buckets)
                entry = self._graphs[rows]
                entry.graph.replay()
                dev_out = entry.outputs
            else:
                dev_out = self._selected(self._dev_in[:n])
            for host, dev in zip(self._host_out, dev_out, strict=True):
                if host is not None and dev is not None:
                    host[:n].copy_(dev[:n], non_blocking=True)
        self._stream.synchronize()  # the one wait of the batch
        return Outputs(*(None if h is None else h[:n].numpy().copy() for h in self._host_out))

    def _run_chunk(self, images: np.ndarray) -> Outputs:
        if self._stream is not None:
            return self._run_cuda(images)
        out = select_outputs(self._forward(torch.from_numpy(images)), self.outputs)
        return out.map(lambda t: t.detach().cpu().numpy())

    @torch.inference_mode()
    def run(self, images: np.ndarray) -> Outputs:
        images = check_images(images, self.size)
        if self._stream is not None:
            with torch.cuda.device(self._torch_device):
                parts = [self._run_chunk(c) for c in split_batches(images, self.max_batch)]
        else:
            parts = [self._run_chunk(c) for c in split_batches(images, self.max_batch)]
        return concat_outputs(parts)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._graphs.clear()
        self._pinned.clear()
        if self._torch_device.type == "cuda":
            torch.cuda.empty_cache()
