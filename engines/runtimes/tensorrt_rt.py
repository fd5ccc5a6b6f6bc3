"""The TensorRT executor: engines built from the bundle's ONNX on the GPU that runs them.

An engine is specific to the ONNX graph, the TensorRT version, the GPU model and the batch
profile, and building one takes minutes, so engines are cached in the bundle's ``engines/``
directory under a name derived from all of those (``EngineKey``). Writes are atomic (temporary
file + ``os.replace``) and builds take a file lock, so two workers starting together on one GPU
build once and never read a half-written engine. A cached engine that TensorRT refuses (wrong
version, corrupt file) is rebuilt with a warning.

One optimisation profile covers batch sizes 1…``max_batch``, tuned for ``opt`` (by default the
largest power of two ≤ ``max_batch / 2``). Each batch runs at its exact size: a dynamic profile
needs no padding, and padding would only add work (up to 2×) because nothing here is captured as
a CUDA graph. I/O buffers are torch CUDA tensors allocated once for ``max_batch`` and bound by
name on every call; kernels run on a torch-owned, non-default CUDA stream, so no pycuda and no
second CUDA context are involved.

Precision (``plan_precision``): TensorRT 10 builds weakly typed networks and fp16 comes from
``BuilderFlag.FP16``, with the Patch Histogram / Mahalanobis layers pinned to fp32 (the inverse
covariance can have large entries). TensorRT 11 removed weak typing and the precision builder
flags: every network is strongly typed, so fp16 needs an fp16 graph; ``convert_onnx_to_fp16``
makes one from the fp32 export, keeping the graph's inputs and outputs, shape arithmetic and the
Patch Histogram branch in fp32.

TensorRT is imported inside functions only (ruff TID253): importing this module works on any
machine, and opening the runtime without TensorRT or a GPU raises ``RuntimeUnavailableError``.
Type-checked against ``tensorrt-stubs`` (see ``tests/engines/test_tensorrt_rt.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engines.bundle import Bundle, sha256_file
from engines.errors import BundleError, ConfigError, RuntimeUnavailableError
from engines.export import INPUT_NAME, OUTPUT_NAMES
from engines.model import Outputs
from engines.runtimes.base import PRECISIONS, check_images, concat_outputs, split_batches

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
# Bump when the way engines are built changes (flags, pinning, fp16 conversion), so that engines
# cached by an older lineguard are not reused.
ENGINE_RECIPE = 1
# The Patch Histogram branch (histograms → Mahalanobis → normalisation) stays fp32 in fp16
# engines. TorchScript export names nodes after the module path ("/patch_hist/MatMul") and
# initialisers after the state-dict key ("patch_hist.inv_cov_g1"); either identifies it.
KEEP_FP32_NODE_PREFIXES: tuple[str, ...] = ("/patch_hist/",)
KEEP_FP32_INITIALIZER_PREFIXES: tuple[str, ...] = ("patch_hist.",)

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


# --------------------------------------------------------------------------- pure helpers


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


@dataclass(frozen=True)
class BatchProfile:
    """One TensorRT optimisation profile on the batch axis (H, W, C are fixed)."""

    min: int
    opt: int
    max: int

    def shapes(self, size: int) -> tuple[list[int], list[int], list[int]]:
        """Input shapes ``[B, S, S, 3]`` for min, opt and max."""
        return ([self.min, size, size, 3], [self.opt, size, size, 3], [self.max, size, size, 3])


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


@dataclass(frozen=True)
class PrecisionPlan:
    """How to build an engine at a precision with one TensorRT major version.

    - ``strongly_typed``: the network takes its types from the graph (TensorRT ≥ 11 always;
      ``create_network()`` with no flags, since ``EXPLICIT_BATCH`` is implied from 10 on);
    - ``builder_flags``: ``BuilderFlag`` member names to set on the builder config;
    - ``needs_fp16_onnx``: the ONNX must be converted to fp16 before parsing;
    - ``pin_fp32_layers``: pin the Patch Histogram layers to fp32 (weakly typed fp16 only).
    """

    strongly_typed: bool
    builder_flags: tuple[str, ...]
    needs_fp16_onnx: bool
    pin_fp32_layers: bool


def plan_precision(major: int, precision: str) -> PrecisionPlan:
    """Decide the build strategy for ``precision`` on TensorRT ``major``."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PRECISIONS)}")
    if major < MIN_TRT_MAJOR:
        raise RuntimeUnavailableError(
            f"TensorRT {major} is too old: lineguard needs TensorRT ≥ {MIN_TRT_MAJOR} "
            f"(named I/O tensors, execute_async_v3); {INSTALL_HINT}"
        )
    fp16 = precision == "fp16"
    if major >= STRONG_TYPING_ONLY_MAJOR:
        return PrecisionPlan(True, (), needs_fp16_onnx=fp16, pin_fp32_layers=False)
    if fp16:
        return PrecisionPlan(
            False,
            ("FP16", "PREFER_PRECISION_CONSTRAINTS"),
            needs_fp16_onnx=False,
            pin_fp32_layers=True,
        )
    return PrecisionPlan(False, (), needs_fp16_onnx=False, pin_fp32_layers=False)


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


# --------------------------------------------------------------------------- fp16 ONNX

_FLOAT = 1  # onnx.TensorProto.FLOAT
_FLOAT16 = 10  # onnx.TensorProto.FLOAT16
_FP16_MAX = float(np.finfo(np.float16).max)
FP16_CONVERTER_VERSION = 1
# Inputs whose type is tensor(float) whatever the op computes in (they may not become fp16).
_FP32_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (1, 2), "Upsample": (1,)}
# Nodes whose outputs carry shapes or sizes, not image data; they read inputs of any type.
_SHAPE_OPS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class Fp16Regions:
    """Which nodes of a graph compute in fp16 (indices into ``graph.node``)."""

    half: frozenset[int]
    kept_fp32: frozenset[int]  # data nodes deliberately kept in fp32 (the histogram branch)

    def kept_names(self, model: onnx.ModelProto) -> frozenset[str]:
        return frozenset(model.graph.node[i].name for i in self.kept_fp32)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor in the main graph, from ONNX shape inference."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    except Exception as exc:  # onnx raises several InferenceError flavours
        raise ConfigError(
            f"cannot convert the ONNX graph to fp16: type inference failed ({exc}); export the "
            "bundle's ONNX again, or use precision='fp32'"
        ) from exc
    graph = inferred.graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in graph.value_info}
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in graph.input})
    types.update({vi.name: vi.type.tensor_type.elem_type for vi in graph.output})
    types.update({init.name: init.data_type for init in graph.initializer})
    return types


def fp16_regions(
    model: onnx.ModelProto,
    *,
    keep_node_prefixes: Sequence[str] = KEEP_FP32_NODE_PREFIXES,
    keep_initializer_prefixes: Sequence[str] = KEEP_FP32_INITIALIZER_PREFIXES,
) -> Fp16Regions:
    """Split a graph into the part that may run in fp16 and the part that must stay fp32.

    Data nodes (those that depend on a graph input other than through ``Shape``) run in fp16,
    except the kept ones: nodes named with ``keep_node_prefixes``, nodes that read an initialiser
    named with ``keep_initializer_prefixes``, and every data node downstream of those (a value
    computed in fp32 for a reason is not squeezed through fp16 later). Shape arithmetic and
    constants stay fp32.
    """
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    data = {vi.name for vi in graph.input if vi.name not in initializers}
    kept_tensors: set[str] = set()
    half: set[int] = set()
    kept: set[int] = set()
    for idx, node in enumerate(graph.node):
        inputs = [name for name in node.input if name]
        if node.op_type in _SHAPE_OPS or not any(name in data for name in inputs):
            continue
        data.update(name for name in node.output if name)
        seeded = node.name.startswith(tuple(keep_node_prefixes)) or any(
            name in initializers and name.startswith(tuple(keep_initializer_prefixes))
            for name in inputs
        )
        if seeded or any(name in kept_tensors for name in inputs):
            kept.add(idx)
            kept_tensors.update(name for name in node.output if name)
        else:
            half.add(idx)
    return Fp16Regions(frozenset(half), frozenset(kept))


def convert_onnx_to_fp16(
    model: onnx.ModelProto,
    *,
    keep_node_prefixes: Sequence[str] = KEEP_FP32_NODE_PREFIXES,
    keep_initializer_prefixes: Sequence[str] = KEEP_FP32_INITIALIZER_PREFIXES,
) -> onnx.ModelProto:
    """An fp16 copy of an fp32 graph for strongly typed TensorRT (≥ 11) fp16 engines.

    Data nodes outside the kept region (see ``fp16_regions``) compute in fp16: their float
    initialisers and constants become fp16, ``Cast(to=FLOAT)`` becomes ``Cast(to=FLOAT16)``,
    and Cast nodes are inserted wherever a float tensor crosses between the fp16 and the fp32
    parts. Graph inputs and outputs keep their types. The result is re-inferred and checked;
    anything this pass cannot convert safely (control flow, custom domains, weights beyond the
    fp16 range, an op whose outputs do not follow its inputs) raises ``ConfigError``.
    """
    import onnx
    from onnx import helper, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    refuse = "use precision='fp32', or build on TensorRT 10 where fp16 is a builder flag"
    for node in graph.node:
        if any(
            a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
            for a in node.attribute
        ):
            raise ConfigError(
                f"cannot convert node {node.name!r} ({node.op_type}) to fp16: control flow "
                f"subgraphs are not supported; {refuse}"
            )
        if node.domain not in ("", "ai.onnx"):
            raise ConfigError(
                f"cannot convert node {node.name!r} of custom domain {node.domain!r} to fp16; "
                f"{refuse}"
            )
    _materialize_identities(graph)
    types = _tensor_types(out)
    untyped = [o for node in graph.node for o in node.output if o and o not in types]
    if untyped:
        raise ConfigError(f"cannot convert to fp16: no type inferred for {untyped[:3]}; {refuse}")
    regions = fp16_regions(
        out,
        keep_node_prefixes=keep_node_prefixes,
        keep_initializer_prefixes=keep_initializer_prefixes,
    )

    def is_float(name: str) -> bool:
        return bool(name) and types.get(name) == _FLOAT

    def wants_half(node_idx: int, op_type: str, pos: int) -> bool:
        return node_idx in regions.half and pos not in _FP32_ONLY_INPUTS.get(op_type, ())

    def any_type(op_type: str) -> bool:
        return op_type in _SHAPE_OPS

    consumers: dict[str, list[tuple[int, int]]] = {}
    for idx, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            if is_float(name) and not any_type(node.op_type):
                consumers.setdefault(name, []).append((idx, pos))

    half_tensors = {
        name for idx in regions.half for name in graph.node[idx].output if is_float(name)
    }

    def all_consumers_half(name: str) -> bool:
        uses = consumers.get(name, [])
        return bool(uses) and all(wants_half(i, graph.node[i].op_type, p) for i, p in uses)

    # Constants read only by fp16 nodes are stored as fp16 (no Cast in front of every weight).
    graph_inputs = {vi.name for vi in graph.input}
    for init in graph.initializer:
        if (
            init.data_type == _FLOAT
            and init.name not in graph_inputs
            and all_consumers_half(init.name)
        ):
            values = numpy_helper.to_array(init)
            if values.size and float(np.abs(values).max()) > _FP16_MAX:
                raise ConfigError(
                    f"initialiser {init.name!r} holds values beyond the fp16 range; keep its "
                    f"layer in fp32 (keep_node_prefixes) or {refuse}"
                )
            init.CopyFrom(numpy_helper.from_array(values.astype(np.float16), init.name))
            half_tensors.add(init.name)
    for idx, node in enumerate(graph.node):
        if idx in regions.half or not node.output or not all_consumers_half(node.output[0]):
            continue
        if node.op_type in ("Constant", "ConstantOfShape") and _retype_constant(node):
            half_tensors.add(node.output[0])

    # Graph outputs keep their type: an fp16 producer writes to a renamed tensor, cast back.
    graph_outputs = {vi.name for vi in graph.output}
    tail: list[onnx.NodeProto] = []
    for name in sorted(graph_outputs & half_tensors):
        inner = f"{name}__fp16"
        for node in graph.node:
            node.output[:] = [inner if o == name else o for o in node.output]
            node.input[:] = [inner if i == name else i for i in node.input]
        half_tensors.discard(name)
        half_tensors.add(inner)
        types[inner] = _FLOAT
        tail.append(helper.make_node("Cast", [inner], [name], to=_FLOAT, name=f"{name}__to_fp32"))

    nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for idx, node in enumerate(graph.node):
        for pos, name in enumerate(node.input):
            if not is_float(name) or any_type(node.op_type):
                continue
            want = wants_half(idx, node.op_type, pos)
            if want != (name in half_tensors):
                to = _FLOAT16 if want else _FLOAT
                if (name, to) not in casts:
                    suffix = "fp16" if want else "fp32"
                    cast_name = f"{name}__to_{suffix}"
                    nodes.append(
                        helper.make_node("Cast", [name], [cast_name], to=to, name=cast_name)
                    )
                    casts[(name, to)] = cast_name
                node.input[pos] = casts[(name, to)]
        if idx in regions.half:
            _retype_attributes(node)
            if node.op_type == "ConstantOfShape":  # data-dependent shape, float fill value
                _retype_constant(node)
        nodes.append(node)
    graph.ClearField("node")
    graph.node.extend([*nodes, *tail])
    graph.ClearField("value_info")
    _check_fp16(model, out, half_tensors | {c for (_, to), c in casts.items() if to == _FLOAT16})
    return out


def _materialize_identities(graph: onnx.GraphProto) -> None:
    """Replace ``Identity(initialiser)`` nodes by initialisers of their own.

    TorchScript export shares equal-valued parameters through Identity nodes (an LGST quantile
    may read the Patch Histogram's μ). A shared tensor could not be fp16 for one reader and fp32
    for another without a Cast on the hot path; a private copy can.
    """
    initializers = {init.name: init for init in graph.initializer}
    outputs = {vi.name for vi in graph.output}
    kept = []
    for node in graph.node:
        source = initializers.get(node.input[0]) if node.op_type == "Identity" else None
        if source is None or node.output[0] in outputs:
            kept.append(node)
            continue
        copy = graph.initializer.add()
        copy.CopyFrom(source)
        copy.name = node.output[0]
    graph.ClearField("node")
    graph.node.extend(kept)


def _retype_constant(node: onnx.NodeProto) -> bool:
    """Make a float ``Constant`` / ``ConstantOfShape`` produce fp16; False if it is not float.

    Values beyond the fp16 range raise: a Cast in front of the reader would turn them into inf.
    """
    import onnx
    from onnx import numpy_helper

    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            if attr.t.data_type != _FLOAT:
                return False
            values = numpy_helper.to_array(attr.t)
            if values.size and float(np.abs(values).max()) > _FP16_MAX:
                raise ConfigError(
                    f"constant {node.output[0]!r} holds values beyond the fp16 range: keep its "
                    "readers in fp32 (keep_node_prefixes), or use precision='fp32'"
                )
            attr.t.CopyFrom(numpy_helper.from_array(values.astype(np.float16), attr.t.name))
            return True
    if node.op_type == "ConstantOfShape":  # no value: a float32 zero by definition
        zero = numpy_helper.from_array(np.zeros(1, dtype=np.float16))
        node.attribute.append(onnx.helper.make_attribute("value", zero))
        return True
    return False  # value_float(s) and friends stay fp32 and are cast where needed


def _retype_attributes(node: onnx.NodeProto) -> None:
    """In an fp16 node, attributes that request float32 outputs request float16 instead."""
    for attr in node.attribute:
        if attr.name in ("to", "dtype") and attr.i == _FLOAT:
            attr.i = _FLOAT16


def _check_fp16(original: onnx.ModelProto, converted: onnx.ModelProto, half: set[str]) -> None:
    """Re-infer the converted graph and refuse it unless every type is what the pass intended."""
    import onnx

    refuse = "use precision='fp32', or re-export the bundle with an fp16 ONNX"
    try:
        onnx.checker.check_model(converted)
    except onnx.checker.ValidationError as exc:
        raise ConfigError(f"fp16 conversion produced an invalid graph ({exc}); {refuse}") from exc
    types = _tensor_types(converted)
    wrong = sorted(name for name in half if name in types and types[name] != _FLOAT16)
    if wrong:
        raise ConfigError(
            f"fp16 conversion left {len(wrong)} tensors in another type (e.g. {wrong[:3]}): an "
            f"op does not follow its inputs' type; {refuse}"
        )

    def io(model: onnx.ModelProto) -> list[tuple[str, int]]:
        g = model.graph
        return [(vi.name, vi.type.tensor_type.elem_type) for vi in (*g.input, *g.output)]

    if io(original) != io(converted):
        raise ConfigError(f"fp16 conversion changed the graph's inputs or outputs; {refuse}")


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes | memoryview) -> bool:
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
def _build_lock(path: Path) -> Iterator[None]:
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


# --------------------------------------------------------------------------- TensorRT glue


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
    size: int,
    timing_cache: Path,
    logger: trt.ILogger,
    workspace_bytes: int | None,
) -> bytes:
    """Parse the ONNX, build a serialized engine, update the timing cache file."""
    import tensorrt as trt

    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is implied from TensorRT 10 on
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
    _atomic_write(timing_cache, memoryview(config.get_timing_cache().serialize()))
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


# --------------------------------------------------------------------------- the runtime


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
        plan = plan_precision(trt_major(trt_version), precision)
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
                with _build_lock(self.engine_path):
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
                        if _atomic_write(self.engine_path, blob):
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
        """Device buffers for ``max_batch`` rows (bound by name) and pinned host mirrors."""
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
            self._device_buffers[name] = torch.empty(shape, dtype=dtype, device=device)
            self._host_buffers[name] = torch.empty(shape, dtype=dtype, pin_memory=True)

    def _run_chunk(self, images: np.ndarray) -> Outputs:
        context = self._context
        if context is None:
            raise RuntimeUnavailableError("this TensorRT runtime is closed: open a new one")
        n = images.shape[0]
        host, dev = self._host_buffers, self._device_buffers
        host[INPUT_NAME][:n].copy_(torch.from_numpy(images))
        with torch.cuda.stream(self._stream):
            dev[INPUT_NAME][:n].copy_(host[INPUT_NAME][:n], non_blocking=True)
            if not context.set_input_shape(INPUT_NAME, _dims([n, self.size, self.size, 3])):
                raise RuntimeUnavailableError(f"TensorRT refused batch size {n}")
            for name, buffer in dev.items():  # rows [:n] of a contiguous buffer start at its base
                context.set_tensor_address(name, buffer.data_ptr())
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
