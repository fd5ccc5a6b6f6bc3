"""An fp16 copy of an fp32 ONNX graph, for TensorRT's strongly typed networks.

TensorRT 11 removed weakly typed networks and the FP16 builder flag: a network computes in the
types its graph declares, so an fp16 engine needs an fp16 graph. ``convert_onnx_to_fp16`` makes
one from the bundle's fp32 export, keeping in fp32 what must stay there: the graph's inputs and
outputs, shape arithmetic, inputs that an operator only accepts as float (Resize scales), and the
Patch Histogram / Mahalanobis branch (its inverse covariance can have entries far beyond fp16's
range). Pure ONNX: no TensorRT here, so it is unit-tested with ONNX Runtime on any machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from lineguard.engines.errors import ConfigError

# The Patch Histogram branch (histograms → Mahalanobis → normalisation) stays fp32 in fp16
# engines. TorchScript export names nodes after the module path ("/patch_hist/MatMul") and
# initialisers after the state-dict key ("patch_hist.inv_cov_g1"); either identifies it.
KEEP_FP32_NODE_PREFIXES: tuple[str, ...] = ("/patch_hist/",)

if TYPE_CHECKING:
    import onnx


KEEP_FP32_INITIALIZER_PREFIXES: tuple[str, ...] = ("patch_hist.",)


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
