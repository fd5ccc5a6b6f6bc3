"""One contract over the runtimes that run on this machine, plus the shared batch helpers."""

from __future__ import annotations

import numpy as np
import pytest

from lineguard.engines.bundle import Bundle
from lineguard.engines.errors import ConfigError, InputError
from lineguard.engines.runtimes import batch_buckets, bucket_for, open_runtime
from tests.conftest import random_images

CPU_RUNTIMES = ["torch", "onnxruntime"]


@pytest.mark.parametrize("kind", CPU_RUNTIMES)
def test_runtime_contract(tiny_bundle: Bundle, kind: str) -> None:
    rt = open_runtime(tiny_bundle, kind=kind, max_batch=4)
    images = random_images(6, seed=2)  # more than max_batch: split into chunks
    out = rt.run(images)
    assert out.scores.shape == (6, 2) and out.scores.dtype == np.float32
    assert out.anomaly_map.shape == (6, 1, 16, 16)
    assert out.segmentation.shape == (6, 64, 64) and out.segmentation.dtype == np.uint8
    singles = np.concatenate([rt.run(images[i : i + 1]).scores for i in range(6)])
    np.testing.assert_allclose(out.scores, singles, atol=1e-4)
    rt.close()


def test_torch_and_onnxruntime_agree(tiny_bundle: Bundle) -> None:
    images = random_images(5, seed=9)
    a = open_runtime(tiny_bundle, kind="torch").run(images)
    b = open_runtime(tiny_bundle, kind="onnxruntime").run(images)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(a.anomaly_map, b.anomaly_map, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", CPU_RUNTIMES)
def test_bad_batches_are_refused(tiny_bundle: Bundle, kind: str) -> None:
    rt = open_runtime(tiny_bundle, kind=kind)
    with pytest.raises(InputError, match="uint8"):
        rt.run(np.zeros((1, 64, 64, 3), dtype=np.float32))
    with pytest.raises(InputError, match=r"\[B≥1, 64, 64, 3\]"):
        rt.run(np.zeros((1, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="shape"):
        rt.run(np.zeros((0, 64, 64, 3), dtype=np.uint8))
    with pytest.raises(InputError, match="numpy"):
        rt.run([[1, 2, 3]])


def test_open_runtime_validates_arguments(tiny_bundle: Bundle) -> None:
    with pytest.raises(ConfigError, match="known: torch"):
        open_runtime(tiny_bundle, kind="tflite")
    with pytest.raises(ConfigError, match="precision"):
        open_runtime(tiny_bundle, precision="int4")
    with pytest.raises(ConfigError, match="fp16 needs a CUDA"):
        open_runtime(tiny_bundle, kind="torch", precision="fp16")


def test_batch_buckets() -> None:
    assert batch_buckets(1) == (1,)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)
    assert batch_buckets(24) == (1, 2, 4, 8, 16, 24)
    assert bucket_for(3, batch_buckets(32)) == 4
    assert bucket_for(17, batch_buckets(24)) == 24
    with pytest.raises(InputError, match="split"):
        bucket_for(33, batch_buckets(32))


def test_onnxruntime_threads_sleep_when_idle(tiny_bundle: Bundle) -> None:
    # an idle infer worker must not busy-wait on cores that ingest and decide share
    rt = open_runtime(tiny_bundle, kind="onnxruntime")
    options = rt.session.get_session_options()  # type: ignore[attr-defined]
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
