"""The TensorRT executor, as far as a machine without TensorRT or a GPU can check it.

Everything pure runs here: engine cache keys and file names, the batch profile, the precision
plan for TensorRT 10 and 11, dtype mapping, I/O checks and the fp16 ONNX conversion (checked
with onnxruntime). The TensorRT glue is type-checked with mypy against ``tensorrt-stubs``, and
opening the runtime here must fail with a helpful ``RuntimeUnavailableError``. Where TensorRT
and a GPU exist, the last test builds, caches and runs a real engine.
"""

from __future__ import annotations

import ast
import importlib.util
import logging
import re
import shutil
import site
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import lineguard.engines.runtimes.tensorrt_rt as trt_rt
from lineguard.engines.bundle import Bundle
from lineguard.engines.errors import ConfigError, RuntimeUnavailableError
from lineguard.engines.export import INPUT_NAME, OUTPUT_NAMES
from lineguard.engines.runtimes import batch_buckets, open_runtime
from lineguard.engines.runtimes.engine_cache import (
    BatchProfile,
    EngineKey,
    atomic_write,
    build_lock,
    choose_profile,
    default_opt_batch,
    timing_cache_filename,
)
from lineguard.engines.runtimes.fp16_onnx import convert_onnx_to_fp16, fp16_regions
from lineguard.engines.runtimes.tensorrt_rt import (
    EXPECTED_IO,
    PrecisionPlan,
    io_problems,
    plan_precision,
    trt_dtype_to_torch,
    trt_major,
)
from tests.conftest import random_images

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "engines" / "runtimes" / "tensorrt_rt.py"
STUBS_HINT = "pip install --no-deps tensorrt-stubs==10.13.0.35.1"
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _real_tensorrt_and_gpu() -> bool:
    try:
        import tensorrt
    except ImportError:
        return False
    return hasattr(tensorrt, "Builder") and torch.cuda.is_available()


HAVE_TRT_GPU = _real_tensorrt_and_gpu()


# --------------------------------------------------------------------------- tensorrt-stubs


def _stub_roots() -> list[Path]:
    """Directories that hold the installed ``tensorrt`` and ``tensorrt_bindings`` stubs."""
    candidates: list[Path] = []
    try:
        dist = metadata.distribution("tensorrt-stubs")
        for file in dist.files or []:
            if str(file).replace("\\", "/") == "tensorrt/__init__.pyi":
                candidates.append(Path(str(dist.locate_file(file))).parent.parent)
    except metadata.PackageNotFoundError:
        pass
    spec = importlib.util.find_spec("tensorrt")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidates.append(Path(location).parent)
    candidates += [Path(p) for p in (*site.getsitepackages(), site.getusersitepackages())]
    return [
        root
        for root in dict.fromkeys(candidates)
        if (root / "tensorrt" / "__init__.pyi").is_file()
        and (root / "tensorrt_bindings" / "tensorrt.pyi").is_file()
    ]


def _repair(source: str) -> str:
    """Fix the two kinds of syntax errors in tensorrt-stubs 10.13.0.35.1 (generated stubs).

    Five plugin methods name a parameter ``in`` (a keyword) and ``add_scale_nd`` puts a
    parameter without a default after defaulted ones. mypy stops at the first syntax error
    ("errors prevented further checking"), so without this no check would run at all. None
    of the repaired methods is used by lineguard.
    """
    source = re.sub(r"([(,]\s*)in:", r"\1in_:", source)
    return source.replace(
        "power: Weights = None, channel_axis: int)",
        "power: Weights = None, channel_axis: int = ...)",
    )


@pytest.fixture(scope="module")
def trt_stubs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repaired copy of the installed stubs: the directory to put on ``mypy_path``.

    The stubs ship without ``py.typed``, so mypy ignores them in site-packages (PEP 561);
    a copy on ``mypy_path`` is used instead, and outranks the empty ``tensorrt`` namespace
    package that the stubs leave importable.
    """
    roots = _stub_roots()
    if not roots:
        pytest.fail(
            f"tensorrt-stubs is not installed; the TensorRT code is checked against it: "
            f"{STUBS_HINT}"
        )
    dest = tmp_path_factory.mktemp("trt-stubs")
    for package in ("tensorrt", "tensorrt_bindings"):
        # Only the .pyi files: next to a real TensorRT these directories also hold its
        # multi-hundred-MB libraries, which mypy does not need.
        for stub in (roots[0] / package).rglob("*.pyi"):
            target = dest / stub.relative_to(roots[0])
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(stub, target)
    for stub in sorted(dest.rglob("*.pyi")):
        repaired = _repair(stub.read_text())
        try:
            ast.parse(repaired, filename=str(stub))
        except SyntaxError as exc:
            pytest.fail(
                f"tensorrt stubs at {roots[0]} do not parse even after repair ({exc}): {STUBS_HINT}"
            )
        stub.write_text(repaired)
    return dest


def _stub_members(stubs: Path, cls: str) -> set[str]:
    """Enum members declared in the stubs, e.g. every ``DataType.X``."""
    tree = ast.parse((stubs / "tensorrt_bindings" / "tensorrt.pyi").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {
                item.target.id
                for item in node.body
                if isinstance(item, ast.AnnAssign)
                and isinstance(item.target, ast.Name)
                and "ClassVar" in ast.unparse(item.annotation)
                and not item.target.id.startswith("_")
            }
    raise AssertionError(f"class {cls} not found in the stubs")


def _mypy(stubs: Path, target: Path, cache: Path) -> tuple[int, str]:
    from mypy import api

    config = stubs.parent / f"mypy-{stubs.name}.ini"
    config.write_text(
        "[mypy]\n"
        f"mypy_path = {stubs}\n"
        "follow_imports = silent\n"
        "ignore_missing_imports = True\n"
        "strict = True\n"
        # torch's own API has untyped constructors (torch.cuda.Stream); everything else strict.
        "allow_untyped_calls = True\n"
        # Generated stubs: a module-level `bool: DataType` shadows the builtin, and more.
        # Their own errors are not ours; their signatures still check our calls.
        "[mypy-tensorrt.*,tensorrt_bindings.*]\n"
        "ignore_errors = True\n"
    )
    stdout, stderr, status = api.run(
        [
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
            "--no-error-summary",
            "--show-error-codes",
            str(target),
        ]
    )
    return status, stdout + stderr


@pytest.fixture(scope="module")
def mypy_cache(pytestconfig: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent cache (pytest's) saves ~20 s of analysing torch on every later run."""
    cache = getattr(pytestconfig, "cache", None)
    return cache.mkdir("lineguard-mypy") if cache is not None else tmp_path_factory.mktemp("mypy")


def test_stubs_are_really_used_by_mypy(trt_stubs: Path, mypy_cache: Path, tmp_path: Path) -> None:
    """A misuse of the API must be an error: proof that `tensorrt` resolves to the stubs."""
    bad = tmp_path / "misuse.py"
    bad.write_text("import tensorrt as trt\n\ntrt.Builder(1, 2, 3)\n")
    status, output = _mypy(trt_stubs, bad, mypy_cache)
    assert status == 1, output
    assert 'Too many arguments for "Builder"' in output, output
    assert "misuse.py:3" in output and "Cannot find implementation" not in output, output


def test_module_type_checks_against_tensorrt_stubs(trt_stubs: Path, mypy_cache: Path) -> None:
    status, output = _mypy(trt_stubs, MODULE, mypy_cache)
    assert status == 0, f"mypy found errors in {MODULE.name}:\n{output}"


# --------------------------------------------------------------------------- pure parts


def test_dtype_mapping_covers_every_stub_datatype(trt_stubs: Path) -> None:
    members = _stub_members(trt_stubs, "DataType")
    assert {"FLOAT", "HALF", "INT8", "INT32", "INT64", "BOOL", "UINT8", "BF16"} <= members
    sizes = {
        "FLOAT": 4,
        "HALF": 2,
        "BF16": 2,
        "INT8": 1,
        "INT32": 4,
        "INT64": 8,
        "BOOL": 1,
        "UINT8": 1,
        "FP8": 1,
    }
    refused = {"INT4", "FP4", "E8M0"}  # packed / scale-only types: no torch buffer to bind
    for name in members:
        if name in refused:
            with pytest.raises(ConfigError, match="supported"):
                trt_dtype_to_torch(name)
        else:
            dtype = trt_dtype_to_torch(name)
            assert torch.empty(0, dtype=dtype).element_size() == sizes[name], name
    assert trt_dtype_to_torch("FLOAT") is torch.float32
    assert trt_dtype_to_torch("HALF") is torch.float16
    assert trt_dtype_to_torch("UINT8") is torch.uint8
    assert trt_dtype_to_torch("BOOL") is torch.bool
    with pytest.raises(ConfigError, match="NOPE"):
        trt_dtype_to_torch("NOPE")


def test_expected_io_are_members_of_the_stub_enums(trt_stubs: Path) -> None:
    assert set(EXPECTED_IO) == {INPUT_NAME, *OUTPUT_NAMES}
    modes, dtypes = _stub_members(trt_stubs, "TensorIOMode"), _stub_members(trt_stubs, "DataType")
    assert all(mode in modes and dtype in dtypes for mode, dtype in EXPECTED_IO.values())


def test_trt_version_tuple() -> None:
    assert trt_rt.trt_version_tuple("10.13.0.35") == (10, 13)
    assert trt_rt.trt_version_tuple("11.0") == (11, 0)
    assert trt_rt.trt_version_tuple("10") == (10, 0)


def test_trt_major() -> None:
    assert trt_major("10.13.0.35") == 10
    assert trt_major("11.0.0") == 11
    assert trt_major("12") == 12
    with pytest.raises(RuntimeUnavailableError, match="version"):
        trt_major("unknown")


@pytest.mark.parametrize(
    ("max_batch", "opt"), [(1, 1), (2, 1), (3, 1), (4, 2), (7, 2), (8, 4), (32, 16), (33, 16)]
)
def test_default_opt_batch(max_batch: int, opt: int) -> None:
    assert default_opt_batch(max_batch) == opt
    assert choose_profile(max_batch) == BatchProfile(1, opt, max_batch)


def test_default_opt_is_the_largest_power_of_two_within_half_and_a_bucket() -> None:
    for max_batch in range(1, 300):
        opt = default_opt_batch(max_batch)
        assert opt & (opt - 1) == 0 and opt in batch_buckets(max_batch)
        assert opt == 1 or (opt <= max_batch / 2 < 2 * opt)


def test_profile_choice_and_shapes() -> None:
    assert choose_profile(8, opt_batch=8) == BatchProfile(1, 8, 8)
    assert choose_profile(8, opt_batch=3).shapes((64, 64)) == (
        [1, 64, 64, 3],
        [3, 64, 64, 3],
        [8, 64, 64, 3],
    )
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="opt_batch"):
            choose_profile(8, opt_batch=bad)
    with pytest.raises(ConfigError, match="max_batch"):
        choose_profile(0)


def test_precision_plan_for_tensorrt_10_and_11(trt_stubs: Path) -> None:
    weak_fp16 = plan_precision(10, "fp16")
    assert weak_fp16 == PrecisionPlan(
        strongly_typed=False,
        builder_flags=("FP16", "PREFER_PRECISION_CONSTRAINTS"),
        needs_fp16_onnx=False,
        pin_fp32_layers=True,
    )
    assert plan_precision(10, "fp32") == PrecisionPlan(False, (), False, False)
    assert plan_precision(11, "fp32") == PrecisionPlan(True, (), False, False)
    assert plan_precision(11, "fp16") == PrecisionPlan(True, (), True, False)
    assert plan_precision(12, "fp16") == plan_precision(11, "fp16")
    # weak typing is deprecated from 10.12: strongly typed there, with the fp16 graph
    assert plan_precision((10, 11), "fp16") == weak_fp16
    assert plan_precision((10, 12), "fp16") == plan_precision(11, "fp16")
    assert plan_precision((10, 13), "fp32") == PrecisionPlan(True, (), False, False)
    assert "STRONGLY_TYPED" in _stub_members(trt_stubs, "NetworkDefinitionCreationFlag")
    # The TensorRT 10 flags exist in the 10.x API the stubs describe.
    assert set(weak_fp16.builder_flags) <= _stub_members(trt_stubs, "BuilderFlag")
    with pytest.raises(RuntimeUnavailableError, match="TensorRT 8 is too old"):
        plan_precision(8, "fp32")
    with pytest.raises(ConfigError, match="int8"):
        plan_precision(10, "int8")


BASE_KEY = EngineKey(
    onnx_sha256="ab" * 32,
    trt_version="10.13.0.35",
    gpu_name="NVIDIA H100 80GB HBM3",
    compute_capability=(9, 0),
    precision="fp16",
    profile=BatchProfile(1, 16, 32),
)


def test_engine_filename_is_stable() -> None:
    # A change here invalidates every engine cached in the field: bump ENGINE_RECIPE instead
    # when the build changes, and only update this string on purpose.
    assert BASE_KEY.filename() == (
        "NVIDIA_H100_80GB_HBM3-sm90-trt10.13.0.35-fp16-b1-16-32-7507eabc4fda281f32d383c5.engine"
    )
    again = EngineKey(
        "ab" * 32, "10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0), "fp16", BatchProfile(1, 16, 32)
    )
    assert again.filename() == BASE_KEY.filename() and again.digest() == BASE_KEY.digest()


@pytest.mark.parametrize(
    "change",
    [
        {"onnx_sha256": "cd" * 32},
        {"trt_version": "10.13.0.36"},
        {"trt_version": "11.0.0.1"},
        {"gpu_name": "NVIDIA H200"},
        {"gpu_name": "NVIDIA H100 80GB HBM3 "},  # same slug, still a different GPU string
        {"compute_capability": (8, 9)},
        {"compute_capability": (9, 1)},
        {"precision": "fp32"},
        {"profile": BatchProfile(2, 16, 32)},
        {"profile": BatchProfile(1, 8, 32)},
        {"profile": BatchProfile(1, 16, 64)},
        {"graph": "fp16-v1"},
        {"recipe": 2},
    ],
)
def test_engine_filename_changes_with_every_component(change: dict[str, object]) -> None:
    fields = {**BASE_KEY.__dict__, **change}
    other = EngineKey(**fields)  # type: ignore[arg-type]
    assert other.digest() != BASE_KEY.digest()
    assert other.filename() != BASE_KEY.filename()


@pytest.mark.parametrize(
    "gpu",
    [
        "../../etc/passwd",
        'RTX 4090 / \\ : * ? " < > |',
        "",
        ".hidden",
        "Ŧesla ∞",
        "x" * 500,
        "\x00",
    ],
)
def test_file_names_are_filesystem_safe(gpu: str, tmp_path: Path) -> None:
    key = EngineKey("ab" * 32, "10.13.0.35", gpu, (9, 0), "fp32", BatchProfile(1, 4, 8))
    for name in (key.filename(), timing_cache_filename("10.13.0.35", gpu, (9, 0))):
        assert SAFE_NAME.match(name) and len(name) <= 128, name
        (tmp_path / name).write_bytes(b"x")  # creatable, and inside tmp_path
        assert (tmp_path / name).parent == tmp_path


def test_timing_cache_is_per_gpu_and_version_not_per_graph() -> None:
    name = timing_cache_filename("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))
    assert name == "timing-NVIDIA_H100_80GB_HBM3-sm90-trt10.13.0.35.cache"
    others = {
        timing_cache_filename("10.13.0.36", "NVIDIA H100 80GB HBM3", (9, 0)),
        timing_cache_filename("10.13.0.35", "NVIDIA L4", (8, 9)),
        timing_cache_filename("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 1)),
    }
    assert name not in others and len(others) == 3


def test_io_problems() -> None:
    good = dict(EXPECTED_IO)
    assert io_problems(good) == []
    missing = {k: v for k, v in good.items() if k != "scores"}
    assert io_problems(missing) == ["missing output 'scores'"]
    wrong = {**good, "anomaly_map": ("OUTPUT", "HALF"), INPUT_NAME: ("OUTPUT", "UINT8")}
    problems = io_problems({**wrong, "extra": ("OUTPUT", "FLOAT")})
    assert "'anomaly_map' is OUTPUT HALF, expected OUTPUT FLOAT" in problems
    assert "'images' is OUTPUT UINT8, expected INPUT UINT8" in problems
    assert "unexpected tensor 'extra'" in problems


def testatomic_write_replaces_without_leftovers(tmp_path: Path) -> None:
    target = tmp_path / "cache" / "x.engine"
    assert atomic_write(target, b"first")
    assert atomic_write(target, memoryview(b"second"))
    assert target.read_bytes() == b"second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.engine"]
    with build_lock(target):  # the lock file sits next to the engine
        assert (target.parent / "x.engine.lock").exists()


# --------------------------------------------------------------------------- fp16 ONNX


def _tiny_graph(big_weight: float = 1.0) -> onnx.ModelProto:
    """uint8 images → fp32 trunk, a "/patch_hist/" branch, and the three lineguard outputs."""
    rng = np.random.default_rng(0)

    def init(name: str, values: np.ndarray) -> TensorProto:
        return numpy_helper.from_array(values.astype(np.float32), name)

    nodes = [
        helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT, name="/Cast"),
        helper.make_node("Div", ["x", "scale"], ["xs"], name="/Div"),
        helper.make_node("MatMul", ["xs", "w"], ["h0"], name="/trunk/MatMul"),
        helper.make_node("Add", ["h0", "b"], ["h1"], name="/trunk/Add"),
        helper.make_node("Relu", ["h1"], ["h"], name="/trunk/Relu"),
        # shape arithmetic: stays fp32, and Shape reads the fp16 tensor without a Cast
        helper.make_node("Shape", ["h"], ["hs"], name="/Shape"),
        helper.make_node("Cast", ["hs"], ["hsf"], to=TensorProto.FLOAT, name="/Cast_shape"),
        helper.make_node("Mul", ["hsf", "one"], ["hsf2"], name="/Mul_shape"),
        helper.make_node("Cast", ["hsf2"], ["hs2"], to=TensorProto.INT64, name="/Cast_back"),
        helper.make_node("Reshape", ["h", "hs2"], ["hr"], name="/Reshape"),
        # LGST-like branch in fp16
        helper.make_node("ReduceSum", ["hr", "axis1"], ["m"], keepdims=1, name="/ReduceSum"),
        # Patch-Histogram-like branch kept in fp32 (large inverse covariance)
        helper.make_node("Sub", ["hr", "patch_hist.mean"], ["d"], name="/patch_hist/Sub"),
        helper.make_node("MatMul", ["d", "patch_hist.inv_cov"], ["dm"], name="/patch_hist/MatMul"),
        helper.make_node("Mul", ["dm", "d"], ["dd"], name="/patch_hist/Mul"),
        helper.make_node(
            "ReduceSum", ["dd", "axis1"], ["p"], keepdims=1, name="/patch_hist/ReduceSum"
        ),
        helper.make_node("Concat", ["p", "m"], ["scores"], axis=1, name="/Concat"),
        helper.make_node("Unsqueeze", ["hr", "axis1"], ["anomaly_map"], name="/Unsqueeze"),
        helper.make_node("ArgMax", ["hr"], ["am"], axis=1, keepdims=0, name="/ArgMax"),
        helper.make_node("Cast", ["am"], ["segmentation"], to=TensorProto.UINT8, name="/Cast_seg"),
    ]
    inv_cov = rng.normal(size=(8, 8))
    inits = [
        init("scale", np.array(255.0)),
        init("w", rng.normal(size=(4, 8)) * big_weight),
        init("b", rng.normal(size=8)),
        init("one", np.array(1.0)),
        init("patch_hist.mean", rng.uniform(size=8)),
        init("patch_hist.inv_cov", 1000.0 * (inv_cov @ inv_cov.T + np.eye(8))),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 4])],
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["batch", 1, 8]),
            helper.make_tensor_value_info("segmentation", TensorProto.UINT8, ["batch"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _io_types(model: onnx.ModelProto) -> list[tuple[str, int]]:
    g = model.graph
    return [(vi.name, vi.type.tensor_type.elem_type) for vi in (*g.input, *g.output)]


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    return list(session.run(None, feeds))


def test_fp16_conversion_of_a_tiny_graph() -> None:
    model = _tiny_graph()
    half = convert_onnx_to_fp16(model)
    onnx.checker.check_model(half, full_check=True)
    assert _io_types(half) == _io_types(model)
    inits = {i.name: i.data_type for i in half.graph.initializer}
    assert inits["w"] == inits["b"] == inits["scale"] == TensorProto.FLOAT16
    assert inits["patch_hist.inv_cov"] == inits["patch_hist.mean"] == TensorProto.FLOAT
    assert inits["one"] == TensorProto.FLOAT  # shape arithmetic stays fp32
    inferred = onnx.shape_inference.infer_shapes(half, strict_mode=True).graph
    types = {vi.name: vi.type.tensor_type.elem_type for vi in inferred.value_info}
    assert types["h"] == types["m"] == TensorProto.FLOAT16
    assert types["dm"] == types["p"] == types["hsf2"] == TensorProto.FLOAT
    casts = [n for n in half.graph.node if n.op_type == "Cast"]
    assert not any(n.input[0] == "h" for n in casts), "Shape must read fp16 without a Cast"
    assert model.graph.initializer[1].data_type == TensorProto.FLOAT, "input model untouched"

    images = np.random.default_rng(1).integers(0, 256, (5, 4), dtype=np.uint8)
    want, got = _run(model, {"images": images}), _run(half, {"images": images})
    for a, b, name in zip(want, got, OUTPUT_NAMES, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_allclose(got[0], want[0], rtol=2e-2)  # scores: fp16 trunk, fp32 branch
    np.testing.assert_allclose(got[1], want[1], rtol=1e-2, atol=1e-2)
    assert np.mean(got[2] == want[2]) >= 0.8  # argmax ties may flip in fp16


def test_fp16_regions_keep_the_histogram_branch_and_what_follows() -> None:
    model = _tiny_graph()
    regions = fp16_regions(model)
    names = {i: n.name for i, n in enumerate(model.graph.node)}
    kept = {names[i] for i in regions.kept_fp32}
    half = {names[i] for i in regions.half}
    assert {"/patch_hist/Sub", "/patch_hist/MatMul", "/patch_hist/ReduceSum", "/Concat"} <= kept
    assert {"/Cast", "/trunk/MatMul", "/ReduceSum", "/ArgMax", "/Unsqueeze"} <= half
    assert not {"/Shape", "/Cast_shape", "/Mul_shape"} & (kept | half)  # shape arithmetic


def test_fp16_conversion_refuses_what_it_cannot_do_safely() -> None:
    with pytest.raises(ConfigError, match="fp16 range"):
        convert_onnx_to_fp16(_tiny_graph(big_weight=1e6))
    model = _tiny_graph()
    branch = helper.make_graph(
        [helper.make_node("Identity", ["h"], ["y"])],
        "b",
        [],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    cond = helper.make_node("If", ["c"], ["z"], then_branch=branch, else_branch=branch, name="/If")
    model.graph.node.append(cond)
    with pytest.raises(ConfigError, match="control flow"):
        convert_onnx_to_fp16(model)


def test_fp16_conversion_of_the_real_export(tiny_bundle: Bundle) -> None:
    assert tiny_bundle.onnx_path is not None
    model = onnx.load(str(tiny_bundle.onnx_path))
    half = convert_onnx_to_fp16(model)
    assert _io_types(half) == _io_types(model)
    regions = fp16_regions(model)
    kept = regions.kept_names(model)
    hist = {n.name for n in model.graph.node if n.name.startswith("/patch_hist/")}
    data_hist = {
        n.name
        for i, n in enumerate(model.graph.node)
        if n.name.startswith("/patch_hist/") and i in regions.kept_fp32 | regions.half
    }
    assert (
        hist
        and data_hist <= kept
        and not data_hist & {model.graph.node[i].name for i in regions.half}
    )
    inits = {i.name: i.data_type for i in half.graph.initializer}
    assert all(inits[n] == TensorProto.FLOAT for n in inits if n.startswith("patch_hist."))
    assert sum(t == TensorProto.FLOAT16 for t in inits.values()) > len(inits) / 2
    extra_casts = [n.name for n in half.graph.node if n.name.endswith(("__to_fp16", "__to_fp32"))]
    assert len(extra_casts) <= 4, extra_casts  # boundaries only, not one per weight

    images = random_images(3, seed=4)
    want, got = _run(model, {INPUT_NAME: images}), _run(half, {INPUT_NAME: images})
    for a, b in zip(want, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and np.isfinite(b.astype(float)).all()
    np.testing.assert_allclose(got[1], want[1], rtol=5e-2, atol=5e-2 * np.abs(want[1]).max())
    assert np.mean(got[2] == want[2]) >= 0.95


# --------------------------------------------------------------------------- this machine


def test_importing_the_module_does_not_import_tensorrt() -> None:
    code = (
        "import sys, lineguard.engines.runtimes.tensorrt_rt; assert 'tensorrt' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


@pytest.mark.skipif(HAVE_TRT_GPU, reason="TensorRT and a GPU are present: see the GPU test")
def test_opening_without_tensorrt_or_gpu_says_what_to_install(tiny_bundle: Bundle) -> None:
    with pytest.raises(RuntimeUnavailableError) as info:
        open_runtime(tiny_bundle, kind="tensorrt", device="cuda", max_batch=4)
    message = str(info.value)
    assert "lineguard[gpu]" in message or "CUDA GPU" in message, message
    assert "TensorRT" in message


def test_bad_arguments_are_config_errors(tiny_bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="precision"):
        trt_rt.TensorRTRuntime(tiny_bundle, device="cuda", precision="int8")
    with pytest.raises(ConfigError, match="CUDA device"):
        trt_rt.TensorRTRuntime(tiny_bundle, device="cpu")
    with pytest.raises(ConfigError, match="opt_batch"):
        trt_rt.TensorRTRuntime(tiny_bundle, device="cuda", max_batch=4, opt_batch=5)


# --------------------------------------------------------------------------- real TensorRT


@pytest.mark.skipif(not HAVE_TRT_GPU, reason="needs TensorRT and a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_caches_and_matches_onnxruntime(
    tiny_bundle: Bundle, tmp_path: Path, precision: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "engines"

    def open_trt() -> trt_rt.TensorRTRuntime:
        rt = open_runtime(
            tiny_bundle,
            kind="tensorrt",
            device="cuda",
            precision=precision,
            max_batch=4,
            cache_dir=cache,
        )
        assert isinstance(rt, trt_rt.TensorRTRuntime) and rt.kind == "tensorrt"
        return rt

    rt = open_trt()
    engine_path = rt.engine_path
    assert engine_path.is_file() and engine_path.parent == cache
    images = random_images(6, seed=3)  # more than max_batch, then a partial batch
    out = rt.run(images)
    ref = open_runtime(tiny_bundle, kind="onnxruntime").run(images)
    tol = 1e-3 if precision == "fp32" else 5e-2
    np.testing.assert_allclose(
        out.anomaly_map, ref.anomaly_map, rtol=tol, atol=tol * float(np.abs(ref.anomaly_map).max())
    )
    assert out.scores.shape == (6, 2) and out.scores.dtype == np.float32
    np.testing.assert_allclose(
        out.scores, ref.scores, rtol=tol, atol=tol * float(np.abs(ref.scores).max())
    )
    assert out.segmentation.shape == (6, 64, 64) and out.segmentation.dtype == np.uint8
    # class ids, not a cast of garbage: agree with ONNX Runtime except at near-ties
    agree = float(np.mean(out.segmentation == ref.segmentation))
    assert agree >= (0.999 if precision == "fp32" else 0.98), agree
    rt.close()

    built = engine_path.stat().st_mtime_ns
    open_trt().close()
    assert engine_path.stat().st_mtime_ns == built  # loaded from the cache, not rebuilt

    engine_path.write_bytes(b"not an engine")
    with caplog.at_level(logging.WARNING, logger=trt_rt.__name__):
        rebuilt = open_trt()
    assert "rebuilding" in caplog.text and engine_path.stat().st_size > 100
    assert rebuilt.run(images[:1]).segmentation.shape == (1, 64, 64)
    rebuilt.close()
    with pytest.raises(RuntimeUnavailableError, match="closed"):
        rebuilt.run(images)
