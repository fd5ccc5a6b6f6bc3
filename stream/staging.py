"""Frames decoded by a few threads straight into a reused batch buffer.

The infer worker used to decode a batch frame by frame into fresh arrays and ``np.stack`` them
into a fresh batch: two allocations and a copy per frame, all in the worker's one thread, while
the model sat idle. Here a batch is decoded by a small thread pool (``cv2.imdecode`` and the
resize release the GIL, so the threads really run side by side, and beside a forward pass in
another thread) and every image lands in its row of a ``[max_batch, H, W, 3]`` uint8 buffer
that is allocated once per model. On CUDA that buffer is page-locked (the torch runtime's
optional ``host_batch``), so the host→device copy is an asynchronous DMA straight from it.

Two buffers per model are enough: while the forward pass reads one, the next batch is decoded
into the other, and a buffer is written again only after the forward that read it returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from lineguard.stream.protocol import Frame, ProtocolError, decode_image, resize_to
from lineguard.stream.settings import LimitsSettings

HostBatch = Callable[[int], np.ndarray]


def plain_host_batch(rows: int, height: int, width: int) -> np.ndarray:
    """A pageable ``[rows, H, W, 3]`` uint8 buffer, for runtimes that have no pinned one."""
    return np.empty((rows, height, width, 3), dtype=np.uint8)


class DecodePool:
    """Decodes frames into the rows of a staging buffer with ``threads`` threads.

    A batch of one frame is decoded in the calling thread (a hand-off would cost more than it
    saves). ``close`` stops the threads; the pool is one per worker, not one per model.
    """

    def __init__(self, threads: int, limits: LimitsSettings | None = None) -> None:
        self.threads = max(1, int(threads))
        self.limits = limits
        self._pool = (
            ThreadPoolExecutor(self.threads, thread_name_prefix="infer-decode")
            if self.threads > 1
            else None
        )

    def _one(self, frame: Frame, out: np.ndarray) -> ProtocolError | None:
        """Decode ``frame`` into ``out`` (one row, ``[H, W, 3]``); the error if it failed."""
        try:
            img = decode_image(frame, self.limits)
        except ProtocolError as exc:
            return exc
        if img.shape[:2] != out.shape[:2]:
            img = resize_to(img, (out.shape[0], out.shape[1]))
        np.copyto(out, img)
        return None

    def decode_into(self, frames: Sequence[Frame], out: np.ndarray) -> list[ProtocolError | None]:
        """Frame ``i`` into ``out[i]``; one entry per frame: None, or why it failed (that row
        then holds whatever it held before and must not be scored)."""
        if len(frames) > out.shape[0]:
            raise ValueError(f"{len(frames)} frames for a staging buffer of {out.shape[0]} rows")
        if self._pool is None or len(frames) < 2:
            return [self._one(f, out[i]) for i, f in enumerate(frames)]
        return list(self._pool.map(self._one, frames, [out[i] for i in range(len(frames))]))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
