"""Where built TensorRT engines are kept, and how two workers avoid building one twice.

An engine is specific to the ONNX graph, the TensorRT version, the GPU model, the precision and
the batch profile, and building one takes minutes, so engines are cached in the bundle's
``engines/`` directory under a name derived from all of those (``EngineKey``). Writes are atomic
(temporary file + ``os.replace``) and builds take a file lock, so two workers starting together
on one GPU build once and never read a half-written engine.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lineguard.engines.errors import ConfigError

# Bump when the way engines are built changes (flags, pinning, fp16 conversion), so that engines
# cached by an older lineguard are not reused.
ENGINE_RECIPE = 1

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchProfile:
    """One TensorRT optimisation profile on the batch axis (H, W, C are fixed)."""

    min: int
    opt: int
    max: int

    def shapes(self, size: tuple[int, int]) -> tuple[list[int], list[int], list[int]]:
        """Input shapes ``[B, H, W, 3]`` for min, opt and max."""
        h, w = size
        return ([self.min, h, w, 3], [self.opt, h, w, 3], [self.max, h, w, 3])


def default_opt_batch(max_batch: int) -> int:
    """The largest power of two ≤ ``max_batch / 2`` (at least 1): the typical busy-line batch.

    The dynamic batcher ships a batch when it is full *or* when ``max_delay_ms`` expires, so
    most batches are well below ``max_batch``; tuning for half of it serves both cases.
    """
    opt = 1
    while opt * 4 <= max_batch:
        opt *= 2
    return opt


def choose_profile(max_batch: int, opt_batch: int | None = None) -> BatchProfile:
    """min 1, opt ``opt_batch`` (default ``default_opt_batch``), max ``max_batch``."""
    if max_batch < 1:
        raise ConfigError(f"max_batch must be at least 1, got {max_batch}")
    opt = default_opt_batch(max_batch) if opt_batch is None else opt_batch
    if not 1 <= opt <= max_batch:
        raise ConfigError(f"opt_batch must be between 1 and max_batch={max_batch}, got {opt}")
    return BatchProfile(1, opt, max_batch)


def _slug(text: str, limit: int = 40) -> str:
    """A filesystem-safe fragment: ASCII letters, digits and dots; never empty or hidden."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("._")[:limit].strip("._")
    return slug or "unknown"


@dataclass(frozen=True)
class EngineKey:
    """Everything a serialized engine depends on; ``filename()`` names its cache file."""

    onnx_sha256: str
    trt_version: str
    gpu_name: str
    compute_capability: tuple[int, int]
    precision: str
    profile: BatchProfile
    graph: str = "export"  # "export", or "fp16-vN" when converted by convert_onnx_to_fp16
    recipe: int = ENGINE_RECIPE

    def digest(self) -> str:
        fields = {
            "onnx_sha256": self.onnx_sha256,
            "trt_version": self.trt_version,
            "gpu_name": self.gpu_name,
            "compute_capability": list(self.compute_capability),
            "precision": self.precision,
            "profile": [self.profile.min, self.profile.opt, self.profile.max],
            "graph": self.graph,
            "recipe": self.recipe,
        }
        canonical = json.dumps(fields, sort_keys=True, ensure_ascii=True)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def filename(self) -> str:
        """Readable prefix for operators, full digest suffix for uniqueness."""
        major, minor = self.compute_capability
        p = self.profile
        return (
            f"{_slug(self.gpu_name)}-sm{major}{minor}-trt{_slug(self.trt_version)}-"
            f"{_slug(self.precision)}-b{p.min}-{p.opt}-{p.max}-{self.digest()[:24]}.engine"
        )


def timing_cache_filename(
    trt_version: str, gpu_name: str, compute_capability: tuple[int, int]
) -> str:
    """Timing caches are valid for one TensorRT version on one GPU model, whatever the graph."""
    major, minor = compute_capability
    return f"timing-{_slug(gpu_name)}-sm{major}{minor}-trt{_slug(trt_version)}.cache"


def atomic_write(path: Path, data: bytes | memoryview) -> bool:
    """Write ``data`` to ``path`` via a temporary file and ``os.replace``; False if not writable.

    A reader sees the old file or the new one, never a partial one. A bundle mounted read-only
    still runs: the engine is used from memory and rebuilt on the next start.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return True
    except OSError as exc:
        log.warning("could not write %s (%s): it will be rebuilt on the next start", path, exc)
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        return False


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """An exclusive lock next to ``path`` so concurrent workers build an engine only once."""
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic writes alone keep readers safe
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path.with_name(path.name + ".lock"), "a+b")  # noqa: SIM115 (held across yield)
    except OSError:
        yield
        return
    with fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
