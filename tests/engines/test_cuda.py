"""The torch runtime on CUDA against the CPU: every output, graphs vs eager, fp16, batches.

These run wherever ``torch.cuda.is_available()``; elsewhere they are skipped with the reason.
Tolerances (relative to the largest reference value):

- fp32 on the GPU vs the CPU: 1e-2 for scores and maps (cuDNN convolutions may run in TF32,
  torch's default), segmentation equal on ≥ 99.5 % of pixels (flips at near-ties only);
- CUDA graphs vs eager, same precision: 1e-5, segmentation identical (same kernels);
- fp16 vs the CPU: 5e-2, segmentation ≥ 98 %;
- a row's result does not depend on its batch (batch of 8 vs alone, padded buckets with stale
  rows from an earlier batch): 1e-4.

The outputs selection (``outputs="maps"|"scores"``) is checked on the CPU too, so this module
always runs something here.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lineguard.engines.bundle import Bundle
from lineguard.engines.model import Outputs
from lineguard.engines.runtimes.torch_rt import TorchRuntime, select_outputs
from tests.conftest import random_images

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(
    not CUDA,
    reason=f"needs a CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none",
)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a64 - b64).max() / max(np.abs(b64).max(), 1e-12))


def assert_close(out: Outputs, ref: Outputs, tol: float, seg_agree: float) -> None:
    assert out.scores.shape == ref.scores.shape and out.scores.dtype == np.float32
    assert out.anomaly_map.shape == ref.anomaly_map.shape
    assert out.segmentation.shape == ref.segmentation.shape
    assert out.segmentation.dtype == np.uint8
    assert rel(out.scores, ref.scores) <= tol
    assert rel(out.anomaly_map, ref.anomaly_map) <= tol
    assert float(np.mean(out.segmentation == ref.segmentation)) >= seg_agree


@pytest.fixture(scope="module")
def cpu_ref(tiny_bundle: Bundle) -> tuple[np.ndarray, Outputs]:
    images = random_images(5, seed=11)
    rt = TorchRuntime(tiny_bundle, device="cpu", max_batch=8)
    out = rt.run(images)
    rt.close()
    return images, out


def test_outputs_selection_on_the_cpu(tiny_bundle: Bundle, cpu_ref: tuple) -> None:
    images, full = cpu_ref
    maps = TorchRuntime(tiny_bundle, device="cpu", outputs="maps").run(images)
    np.testing.assert_array_equal(maps.scores, full.scores)
    np.testing.assert_array_equal(maps.anomaly_map, full.anomaly_map)
    h, w = full.anomaly_map.shape[-2:]
    assert maps.segmentation.shape == (5, h, w)
    np.testing.assert_array_equal(maps.segmentation, full.segmentation[:, ::4, ::4])
    only = TorchRuntime(tiny_bundle, device="cpu", outputs="scores").run(images)
    assert only.anomaly_map is None and only.segmentation is None
    np.testing.assert_array_equal(only.scores, full.scores)
    same = select_outputs(full, "all")
    assert same is full


@needs_cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_fp32_on_cuda_matches_the_cpu_for_every_output(
    tiny_bundle: Bundle, cpu_ref: tuple, graphs: bool
) -> None:
    images, ref = cpu_ref
    rt = TorchRuntime(tiny_bundle, device="cuda", max_batch=8, cuda_graphs=graphs)
    assert_close(rt.run(images), ref, 1e-2, 0.995)
    rt.close()


@needs_cuda
def test_every_bucket_is_captured_at_open_and_graphs_match_eager(
    tiny_bundle: Bundle, cpu_ref: tuple
) -> None:
    images, _ref = cpu_ref
    graphed = TorchRuntime(tiny_bundle, device="cuda", max_batch=8, cuda_graphs=True)
    assert set(graphed._graphs) == set(graphed.buckets) == {1, 2, 4, 8}
    eager = TorchRuntime(tiny_bundle, device="cuda", max_batch=8, cuda_graphs=False)
    a, b = graphed.run(images), eager.run(images)
    assert rel(a.scores, b.scores) <= 1e-5 and rel(a.anomaly_map, b.anomaly_map) <= 1e-5
    np.testing.assert_array_equal(a.segmentation, b.segmentation)
    graphed.close()
    eager.close()


@needs_cuda
@pytest.mark.parametrize("graphs", [True, False], ids=["graphs", "eager"])
def test_fp16_stays_within_its_tolerance(tiny_bundle: Bundle, cpu_ref: tuple, graphs: bool) -> None:
    images, ref = cpu_ref
    rt = TorchRuntime(tiny_bundle, device="cuda", precision="fp16", cuda_graphs=graphs)
    out = rt.run(images)
    assert np.isfinite(out.scores).all() and np.isfinite(out.anomaly_map).all()
    assert_close(out, ref, 5e-2, 0.98)
    rt.close()


@needs_cuda
def test_a_rows_result_does_not_depend_on_its_batch(tiny_bundle: Bundle) -> None:
    images = random_images(8, seed=12)
    rt = TorchRuntime(tiny_bundle, device="cuda", max_batch=8)
    together = rt.run(images)
    rt.run(random_images(8, seed=13))  # leaves other pixels in the padding rows
    three = rt.run(images[:3])  # bucket 4: one stale row
    alone = [rt.run(images[i : i + 1]) for i in range(8)]
    for i in range(8):
        assert rel(alone[i].scores, together.scores[i : i + 1]) <= 1e-4
        assert rel(alone[i].anomaly_map, together.anomaly_map[i : i + 1]) <= 1e-4
    assert rel(three.scores, together.scores[:3]) <= 1e-4
    np.testing.assert_array_equal(three.segmentation, together.segmentation[:3])
    rt.close()


@needs_cuda
def test_pinned_staging_and_selected_outputs_on_cuda(tiny_bundle: Bundle) -> None:
    images = random_images(6, seed=14)
    full = TorchRuntime(tiny_bundle, device="cuda", max_batch=8)
    maps = TorchRuntime(tiny_bundle, device="cuda", max_batch=8, outputs="maps")
    staging = maps.host_batch(8)
    assert torch.from_numpy(staging).is_pinned()
    staging[:6] = images
    got, ref = maps.run(staging[:6]), full.run(images.copy())
    np.testing.assert_array_equal(got.scores, ref.scores)
    np.testing.assert_array_equal(got.segmentation, ref.segmentation[:, ::4, ::4])
    staging[:6] = 0  # the result is a copy, not a view of the staging or pinned buffers
    np.testing.assert_array_equal(got.scores, ref.scores)
    only = TorchRuntime(tiny_bundle, device="cuda", max_batch=8, outputs="scores")
    out = only.run(images)
    assert out.anomaly_map is None and out.segmentation is None
    assert rel(out.scores, ref.scores) <= 1e-5
    for rt in (full, maps, only):
        rt.close()
