"""The TensorRT executor: engines built from the bundle's ONNX on the GPU that runs them.

Engines are built once per (ONNX graph, TensorRT version, GPU, precision, batch profile) and
cached in the bundle (``engine_cache``); a cached engine that TensorRT refuses (wrong version,
corrupt file) is rebuilt with a warning.

One optimisation profile covers batch sizes 1…``max_batch``, tuned for ``opt`` (by default the
largest power of two ≤ ``max_batch / 2``). Each batch runs at its exact size: a dynamic profile
needs no padding, and padding would only add work (up to 2×) because nothing here is captured as
a CUDA graph. I/O buffers are torch CUDA tensors allocated once for ``max_batch`` and bound by
name on every call; kernels run on a torch-owned, non-default CUDA stream, so no pycuda and no
second CUDA context are involved.

Precision (``plan_precision``): TensorRT 10 before 10.12 builds weakly typed networks and fp16
comes from ``BuilderFlag.FP16``, with the Patch Histogram / Mahalanobis layers pinned to fp32
(the inverse covariance can have large entries). TensorRT 10.12 deprecated weak typing and
TensorRT 11 removed it with the precision builder flags, so from 10.12 on every network is
built strongly typed (``NetworkDefinitionCreationFlag.STRONGLY_TYPED``, which 11 accepts and
ignores): fp16 then needs an fp16 graph, which ``fp16_onnx`` makes from the fp32 export.

Types at the edges follow what TensorRT documents for UINT8: it converts only to and from
FLOAT/HALF. So the exported graph casts the uint8 images to float before any other layer
(``CSADModel.preprocess``) and takes the class map to uint8 through float
(``CSADModel.forward``), never through int32 or int64.

TensorRT is imported inside functions only (ruff TID253): importing this module works on any
machine, and opening the runtime without TensorRT or a GPU raises ``RuntimeUnavailableError``.
Type-checked against ``tensorrt-stubs`` (see ``tests/engines/test_tensorrt_rt.py``).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from lineguard.engines.bundle import Bundle, sha256_file
from lineguard.engines.errors import BundleError, ConfigError, RuntimeUnavailableError
from lineguard.engines.export import INPUT_NAME, OUTPUT_NAMES
from lineguard.engines.model import Outputs
from lineguard.engines.runtimes.base import PRECISIONS, check_images, concat_outputs, split_batches
from lineguard.engines.runtimes.engine_cache import (
    BatchProfile,
    EngineKey,
    atomic_write,
    build_lock,
    choose_profile,
    timing_cache_filename,
)
from lineguard.engines.runtimes.fp16_onnx import (
    FP16_CONVERTER_VERSION,
    KEEP_FP32_NODE_PREFIXES,
    convert_onnx_to_fp16,
    fp16_regions,
)

if TYPE_CHECKING:
    import onnx
    import tensorrt as trt


log = logging.getLogger(__name__)


INSTALL_HINT = (
    "install lineguard[gpu] (pip install 'lineguard[gpu]') on a machine with an NVIDIA GPU, "
    "its driver and TensorRT ≥ 10, or use --runtime torch / onnxruntime"
)


MIN_TRT_MAJOR = 10


STRONG_TYPING_ONLY_MAJOR = 11  # TensorRT 11 removed weakly typed networks and BuilderFlag.FP16
STRONG_TYPING_FROM = (10, 12)  # weak typing deprecated: build strongly typed from here on


_OUTPUT_DTYPES = {"scores": "FLOAT", "anomaly_map": "FLOAT", "segmentation": "UINT8"}


# name → (TensorIOMode name, DataType name) that every engine must expose. Built from
# OUTPUT_NAMES so that a new Outputs field fails here (KeyError) instead of binding silently.
EXPECTED_IO: dict[str, tuple[str, str]] = {
    INPUT_NAME: ("INPUT", "UINT8"),
    **{name: ("OUTPUT", _OUTPUT_DTYPES[name]) for name in OUTPUT_NAMES},
}


_TORCH_DTYPES: dict[str, torch.dtype] = {
    "FLOAT": torch.float32,
    "HALF": torch.float16,
    "BF16": torch.bfloat16,
    "INT8": torch.int8,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "FP8": torch.float8_e4m3fn,  # TensorRT's FP8 is E4M3
}


def trt_dtype_to_torch(name: str) -> torch.dtype:
    """The torch dtype for a TensorRT ``DataType`` name (``DataType.name``), e.g. FLOAT → float32.

    Packed sub-byte types (INT4, FP4) and scale types (E8M0) have no torch tensor equivalent
    that could back a binding, so they are refused.
    """
    try:
        return _TORCH_DTYPES[name]
    except KeyError:
        raise ConfigError(
            f"TensorRT data type {name!r} cannot back a torch I/O buffer; supported: "
            f"{', '.join(_TORCH_DTYPES)}"
        ) from None


def trt_major(version: str) -> int:
    """The major version of a TensorRT version string such as ``"10.13.0.35"``."""
    match = re.match(r"\s*(\d+)\.", version + ".")
    if match is None:
        raise RuntimeUnavailableError(
            f"cannot read the TensorRT version {version!r}: reinstall TensorRT ({INSTALL_HINT})"
        )
    return int(match.group(1))


def trt_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a TensorRT version string such as ``"10.13.0.35"``."""
    major = trt_major(version)
    match = re.match(r"\s*\d+\.(\d+)", version)
    return major, int(match.group(1)) if match else 0


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build an engine at a precision with one TensorRT major version.

    - ``strongly_typed``: the network takes its types from the graph (TensorRT ≥ 10.12;
      ``create_network`` gets the ``STRONGLY_TYPED`` flag; ``EXPLICIT_BATCH`` is implied
      from 10 on);
    - ``builder_flags``: ``BuilderFlag`` member names to set on the builder config;
    - ``needs_fp16_onnx``: the ONNX must be converted to fp16 before parsing;
    - ``pin_fp32_layers``: pin the Patch Histogram layers to fp32 (weakly typed fp16 only).
    """

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    needs_fp16_onnx: bool
    pin_fp32_layers: bool


def plan_precision(version: int | tuple[int, int], precision: str) -> PrecisionPlan:
    """Decide the build strategy for ``precision`` on TensorRT ``version`` ((major, minor);
    a bare major means its ``.0``)."""
    major, minor = (version, 0) if isinstance(version, int) else version
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if major < MIN_TRT_MAJOR:
        raise RuntimeUnavailableError(
            f"TensorRT {major} is too old: lineguard needs TensorRT ≥ {MIN_TRT_MAJOR} "
            f"(named I/O tensors, execute_async_v3); {INSTALL_HINT}"
        )
    fp16 = precision == "fp16"
    if (major, minor) >= STRONG_TYPING_FROM:
        return PrecisionPlan(True, (), needs_fp16_onnx=fp16, pin_fp32_layers=False)
    if fp16:
        return PrecisionPlan(
            False,
            ("FP16", "PREFER_PRECISION_CONSTRAINTS"),
            needs_fp16_onnx=False,
            pin_fp32_layers=True,
        )
    return PrecisionPlan(False, (), needs_fp16_onnx=False, pin_fp32_layers=False)


def io_problems(found: Mapping[str, tuple[str, str]]) -> list[str]:
    """Differences between an engine's I/O tensors (name → (mode, dtype)) and ``EXPECTED_IO``."""
    problems = []
    for name, (mode, dtype) in EXPECTED_IO.items():
        if name not in found:
            problems.append(f"missing {mode.lower()} {name!r}")
        elif found[name] != (mode, dtype):
            got_mode, got_dtype = found[name]
            problems.append(f"{name!r} is {got_mode} {got_dtype}, expected {mode} {dtype}")
    problems += [f"unexpected tensor {name!r}" for name in found if name not in EXPECTED_IO]
    return problems


def _require_tensorrt() -> str:
    """Import TensorRT and return its version, or say what to install."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:  # OSError: the wheel is there, its libraries are not
        raise RuntimeUnavailableError(
            f"TensorRT cannot be imported ({exc}): {INSTALL_HINT}"
        ) from exc
    version = getattr(trt, "__version__", None)
    # `tensorrt-stubs`, or the PyPI `tensorrt` placeholder whose download failed, leave an
    # importable but empty `tensorrt` package behind.
    if not hasattr(trt, "Builder") or not isinstance(version, str):
        location = getattr(trt, "__file__", None) or ", ".join(getattr(trt, "__path__", []))
        raise RuntimeUnavailableError(
            f"the importable `tensorrt` package at {location} is not a TensorRT installation "
            f"(type stubs or an unfinished install): {INSTALL_HINT}"
        )
    return version


def _make_logger() -> trt.ILogger:
    """A TensorRT logger that forwards to Python logging (INFO and VERBOSE become DEBUG)."""
    import tensorrt as trt

    levels = {
        "INTERNAL_ERROR": logging.CRITICAL,
        "ERROR": logging.ERROR,
        "WARNING": logging.WARNING,
        "INFO": logging.DEBUG,
        "VERBOSE": logging.DEBUG,
    }

    class _Bridge(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: trt.ILogger.Severity, msg: str) -> None:
            level = levels.get(severity.name, logging.INFO)
            if log.isEnabledFor(level):
                log.log(level, "TensorRT: %s", msg)

    return _Bridge()


def _load_engine(runtime: trt.Runtime, path: Path) -> trt.ICudaEngine | None:
    """A cached engine, or None when there is none or TensorRT refuses it (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        blob = path.read_bytes()
        engine: trt.ICudaEngine | None = runtime.deserialize_cuda_engine(blob)
    except (OSError, RuntimeError, TypeError) as exc:
        log.warning("cached TensorRT engine %s is unreadable (%s): rebuilding it", path, exc)
        return None
    if engine is None:
        log.warning(
            "cached TensorRT engine %s was refused (corrupt, or from another TensorRT or GPU): "
            "rebuilding it",
            path,
        )
    return engine


def _pin_fp32_layers(network: trt.INetworkDefinition, names: frozenset[str]) -> int:
    """Ask TensorRT to keep the layers of the kept-fp32 ONNX nodes in fp32; returns how many.

    The ONNX parser names layers after their nodes (helper layers get suffixes), so layers
    match by exact name or by the kept prefixes.
    """
    import tensorrt as trt

    float_types = (trt.DataType.FLOAT, trt.DataType.HALF)
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name not in names and not layer.name.startswith(KEEP_FP32_NODE_PREFIXES):
            continue
        outputs = range(layer.num_outputs)
        if not all(layer.get_output(j).dtype in float_types for j in outputs):
            continue  # shape/index layers have no precision to pin
        layer.precision = trt.DataType.FLOAT
        for j in outputs:
            layer.set_output_type(j, trt.DataType.FLOAT)
        pinned += 1
    return pinned


def _dims(values: Sequence[int]) -> trt.Dims:
    import tensorrt as trt

    return trt.Dims(list(values))


def _as_list(dims: trt.Dims) -> list[int]:
    return [int(dims[i]) for i in range(len(dims))]


def _build_engine(
    onnx_path: Path,
    plan: PrecisionPlan,
    profile: BatchProfile,
    size: tuple[int, int],
    timing_cache: Path,
    logger: trt.ILogger,
    workspace_bytes: int | None,
) -> bytes:
    """Parse the ONNX, build a serialized engine, update the timing cache file."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    flags = 0  # explicit batch is implied from TensorRT 10 on
    if plan.strongly_typed:
        strong = trt.NetworkDefinitionCreationFlag.__members__.get("STRONGLY_TYPED")
        if strong is not None:  # a TensorRT that dropped the flag types every network strongly
            flags |= 1 << int(strong)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    model: onnx.ModelProto | None = None
    if plan.needs_fp16_onnx or plan.pin_fp32_layers:
        import onnx

        model = onnx.load(str(onnx_path))
    if plan.needs_fp16_onnx and model is not None:
        ok = parser.parse(convert_onnx_to_fp16(model).SerializeToString())
    else:
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BundleError(
            f"TensorRT could not parse {onnx_path}: {errors or 'no details'}; re-export the "
            "bundle's ONNX with this lineguard"
        )
    config = builder.create_builder_config()
    for name in plan.builder_flags:
        flag = trt.BuilderFlag.__members__.get(name)
        if flag is None:
            raise RuntimeUnavailableError(
                f"this TensorRT has no BuilderFlag.{name} needed for this precision; {INSTALL_HINT}"
            )
        config.set_flag(flag)
    if plan.pin_fp32_layers and model is not None:
        pinned = _pin_fp32_layers(network, fp16_regions(model).kept_names(model))
        if not pinned:
            log.warning("no Patch Histogram layers found to keep in fp32 in %s", onnx_path)
    if workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    optimisation = builder.create_optimization_profile()
    low, opt, high = profile.shapes(size)
    optimisation.set_shape(INPUT_NAME, _dims(low), _dims(opt), _dims(high))
    if config.add_optimization_profile(optimisation) < 0:
        raise ConfigError(f"TensorRT refused the batch profile {profile} for input {INPUT_NAME!r}")

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        log.warning(
            "timing cache %s does not match this GPU/TensorRT: starting afresh", timing_cache
        )
        config.set_timing_cache(config.create_timing_cache(b""), False)

    log.info("building TensorRT engine from %s (%s, profile %s)", onnx_path, plan, profile)
    serialized: trt.IHostMemory | None = builder.build_serialized_network(network, config)
    if serialized is None:  # the stubs say IHostMemory; TensorRT returns None on failure
        raise RuntimeUnavailableError(
            f"TensorRT failed to build an engine from {onnx_path} (the TensorRT log above says "
            "why); try precision='fp32' or a smaller max_batch / workspace"
        )
    atomic_write(timing_cache, memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized))


def _parse_device(device: str) -> torch.device:
    try:
        parsed = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"unknown device {device!r}: use 'cuda' or 'cuda:N'") from exc
    if parsed.type != "cuda":
        raise ConfigError(
            f"the tensorrt runtime runs on a CUDA device, not {device!r}: use device='cuda' "
            "(or the torch / onnxruntime runtimes on a CPU)"
        )
    return parsed


class TensorRTRuntime:
    """Runs a bundle with a TensorRT engine built (or loaded from cache) for this GPU.

    Options beyond the Runtime protocol: ``opt_batch`` (profile opt), ``cache_dir`` (default
    the bundle's ``engines/``), ``workspace_bytes`` (builder workspace limit) and ``rebuild``
    (ignore a cached engine). ``run`` is serialised by a lock: one runtime, one stream.
    """

    kind = "tensorrt"

    def __init__(
        self,
        bundle: Bundle,
        *,
        device: str = "cuda",
        precision: str = "fp32",
        max_batch: int = 32,
        opt_batch: int | None = None,
        cache_dir: str | Path | None = None,
        workspace_bytes: int | None = None,
        rebuild: bool = False,
    ) -> None:
        if precision not in PRECISIONS:
            raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
        if bundle.config.patch_search != "graph":
            raise ConfigError(
                f"bundle {bundle.path} searches its patch bank with {bundle.config.patch_search} "
                "after the engine; the TensorRT executor runs graph-searched bundles only: use "
                "runtime onnxruntime or torch, or refit with --patch-search graph"
            )
        profile = choose_profile(max_batch, opt_batch)
        torch_device = _parse_device(device)
        trt_version = _require_tensorrt()
        if not torch.cuda.is_available():
            raise RuntimeUnavailableError(
                f"TensorRT {trt_version} is installed but torch sees no CUDA GPU: run on a machine "
                "with an NVIDIA GPU and driver, with a CUDA build of torch"
            )
        index = (
            torch_device.index if torch_device.index is not None else torch.cuda.current_device()
        )
        if index >= torch.cuda.device_count():
            raise ConfigError(
                f"device {device!r} does not exist: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
        plan = plan_precision(trt_version_tuple(trt_version), precision)
        onnx_path = bundle.onnx_path
        if onnx_path is None:
            raise BundleError(
                f"bundle {bundle.path} has no ONNX export to build a TensorRT engine from: "
                "re-save it with export_onnx=True"
            )
        self.bundle = bundle
        self.device = f"cuda:{index}"
        self.precision = precision
        self.max_batch = max_batch
        self.size = bundle.config.input_size
        self.profile = profile
        self._device_index = index
        self._lock = threading.Lock()

        gpu_name = torch.cuda.get_device_name(index)
        capability = torch.cuda.get_device_capability(index)
        self.key = EngineKey(
            onnx_sha256=sha256_file(onnx_path),
            trt_version=trt_version,
            gpu_name=gpu_name,
            compute_capability=(int(capability[0]), int(capability[1])),
            precision=precision,
            profile=profile,
            graph=f"fp16-v{FP16_CONVERTER_VERSION}" if plan.needs_fp16_onnx else "export",
        )
        cache = Path(cache_dir) if cache_dir is not None else bundle.engine_cache
        self.engine_path = cache / self.key.filename()
        timing_cache = cache / timing_cache_filename(
            trt_version, gpu_name, self.key.compute_capability
        )

        import tensorrt as trt

        with torch.cuda.device(index):
            self._logger = _make_logger()
            self._runtime: trt.Runtime | None = trt.Runtime(self._logger)
            engine = None if rebuild else _load_engine(self._runtime, self.engine_path)
            if engine is None:
                with build_lock(self.engine_path):
                    # Another worker may have finished the same build while we waited.
                    engine = None if rebuild else _load_engine(self._runtime, self.engine_path)
                    if engine is None:
                        blob = _build_engine(
                            onnx_path,
                            plan,
                            profile,
                            self.size,
                            timing_cache,
                            self._logger,
                            workspace_bytes,
                        )
                        if atomic_write(self.engine_path, blob):
                            log.info("cached TensorRT engine at %s", self.engine_path)
                        engine = self._runtime.deserialize_cuda_engine(blob)
                        if engine is None:
                            raise RuntimeUnavailableError(
                                "TensorRT could not load the engine it just built: check the "
                                "TensorRT log and that torch and TensorRT use the same CUDA"
                            )
            self._engine: trt.ICudaEngine | None = engine
            self._check_engine(engine)
            self._context: trt.IExecutionContext | None = engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=index)
            self._device_buffers: dict[str, torch.Tensor] = {}
            self._host_buffers: dict[str, torch.Tensor] = {}
            self._allocate(engine, self._context)

    def _check_engine(self, engine: trt.ICudaEngine) -> None:
        """The engine must expose our tensors by name and cover the batch profile."""
        import tensorrt as trt

        found = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            found[name] = (engine.get_tensor_mode(name).name, engine.get_tensor_dtype(name).name)
        problems = io_problems(found)
        if engine.num_optimization_profiles < 1:
            problems.append("no optimisation profile")
        elif INPUT_NAME in found and found[INPUT_NAME][0] == trt.TensorIOMode.INPUT.name:
            shapes = [_as_list(d) for d in engine.get_tensor_profile_shape(INPUT_NAME, 0)]
            wanted = list(self.profile.shapes(self.size))
            if shapes != wanted:
                problems.append(f"input profile {shapes}, expected {wanted}")
        if problems:
            raise BundleError(
                f"TensorRT engine {self.engine_path} does not match this bundle: "
                f"{'; '.join(problems)}; delete it (or pass rebuild=True) to build it again"
            )

    def _allocate(self, engine: trt.ICudaEngine, context: trt.IExecutionContext) -> None:
        """Device buffers for ``max_batch`` rows and pinned host mirrors; each device buffer's
        address is bound once, here: rows ``[:n]`` of a contiguous buffer start at its base,
        so a smaller batch only changes the input shape."""
        if not context.set_input_shape(INPUT_NAME, _dims(self.profile.shapes(self.size)[2])):
            raise BundleError(f"engine {self.engine_path} refused batch {self.max_batch}")
        device = torch.device("cuda", self._device_index)
        for name in (INPUT_NAME, *OUTPUT_NAMES):
            shape = _as_list(context.get_tensor_shape(name))
            if not shape or shape[0] != self.max_batch or min(shape) < 0:
                raise BundleError(
                    f"engine tensor {name!r} has shape {shape} at batch {self.max_batch}"
                )
            dtype = trt_dtype_to_torch(engine.get_tensor_dtype(name).name)
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._device_buffers[name] = buffer
            self._host_buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=True)
            if not context.set_tensor_address(name, buffer.data_ptr()):
                raise BundleError(f"TensorRT refused the address of tensor {name!r}")

    def _run_chunk(self, images: np.ndarray) -> Outputs:
        context = self._context
        if context is None:
            raise RuntimeUnavailableError("this TensorRT runtime is closed: open a new one")
        n = images.shape[0]
        host, dev = self._host_buffers, self._device_buffers
        host[INPUT_NAME][:n].copy_(torch.from_numpy(images))
        with torch.cuda.stream(self._stream):
            dev[INPUT_NAME][:n].copy_(host[INPUT_NAME][:n], non_blocking=True)
            if not context.set_input_shape(INPUT_NAME, _dims([n, *self.size, 3])):
                raise RuntimeUnavailableError(f"TensorRT refused batch size {n}")
            if not context.execute_async_v3(self._stream.cuda_stream):
                raise RuntimeUnavailableError(
                    f"TensorRT failed to run a batch of {n} (see the TensorRT log)"
                )
            for name in OUTPUT_NAMES:
                host[name][:n].copy_(dev[name][:n], non_blocking=True)
        self._stream.synchronize()
        # Copies: the pinned buffers are reused by the next call.
        return Outputs(*(host[name][:n].numpy().copy() for name in OUTPUT_NAMES))

    def run(self, images: np.ndarray) -> Outputs:
        images = check_images(images, self.size)
        with self._lock, torch.cuda.device(self._device_index):
            parts = [self._run_chunk(c) for c in split_batches(images, self.max_batch)]
        return concat_outputs(parts)

    def close(self) -> None:
        with self._lock:
            if self._context is None:
                return
            self._stream.synchronize()
            self._context = None
            self._engine = None
            self._runtime = None
            self._device_buffers.clear()
            self._host_buffers.clear()
            torch.cuda.empty_cache()
