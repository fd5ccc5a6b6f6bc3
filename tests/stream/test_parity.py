"""One image, one score, whatever the path: the fused score the line gives a file equals the
one ``lineguard evaluate`` gives it, for every frame encoding the bus carries.

Files go through ingest (resize, encode), Redis, infer and decide on a real server; the same
files go through ``evaluate_bundle`` with the same codec. The model has ImageNet backbone
weights so its scores depend on the pixels (a JPEG round trip moves them), and the images are
larger than the input so both paths also resize. A long part (an input of 64×128 from 88×200
files) goes through the same comparison: every stage of both paths handles height ≠ width.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from lineguard.engines.bundle import Bundle, save_bundle
from lineguard.engines.codec import FrameCodec
from lineguard.engines.fusion import Calibration
from lineguard.offline.evaluate import evaluate_bundle
from lineguard.stream.bus import Bus
from lineguard.stream.feed import send_source, wait_for_events
from lineguard.stream.ingest import bundle_frame_codec
from lineguard.stream.run import LocalPipeline
from lineguard.stream.sources import open_source
from tests.conftest import TINY, tiny_model
from tests.stream.pipeline_helpers import settings_for

N_TEST = 6
SOURCE_SIDE = 88  # larger than the 64-px input: ingest and load_image both shrink
# ONNX Runtime on both paths; batches of different sizes may round differently in the last bits
TOLERANCE = 1e-3


LONG_SOURCE = (88, 200)  # height, width of the long part's files
LONG_INPUT = (64, 128)


def _texture(
    rng: np.random.Generator, hw: tuple[int, int] = (SOURCE_SIDE, SOURCE_SIDE)
) -> np.ndarray:
    """A smooth, photo-like RGB image: JPEG changes it a little, as it would a real part."""
    low = rng.integers(0, 256, (11, 11, 3)).astype(np.uint8)
    img = cv2.resize(low, (hw[1], hw[0]), interpolation=cv2.INTER_CUBIC)
    noise = rng.normal(0, 12, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8)


def _write_product(root: Path, hw: tuple[int, int]) -> Path:
    rng = np.random.default_rng(7)
    for folder, n in (("train/good", 4), ("test/good", N_TEST // 2), ("test/scratch", N_TEST // 2)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            bgr = cv2.cvtColor(_texture(rng, hw), cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(root / folder / f"{i:03d}.png"), bgr)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_product(tmp_path_factory.mktemp("parity") / "product", (SOURCE_SIDE,) * 2)


def _calibrated_bundle(root: Path, dataset: Path, input_size: tuple[int, int]) -> Bundle:
    """Calibrated like a real bundle (μ, σ of each branch over the images), so fused scores
    are in σ units and the tolerance means the same for every branch."""
    from dataclasses import replace

    from lineguard.engines.runtimes import open_runtime
    from lineguard.offline.datasets import load_image

    config = replace(TINY, frame_codec="jpeg:90", input_size=input_size)
    model = tiny_model(config=config, weights="imagenet")
    neutral = save_bundle(model, root / "neutral", Calibration.neutral(config.branches))
    images = np.stack([load_image(p, input_size) for p in sorted(dataset.rglob("*.png"))])
    rt = open_runtime(neutral, kind="onnxruntime")
    raw = np.asarray(rt.run(images).scores, dtype=np.float64)
    rt.close()
    mu, sigma = raw.mean(axis=0), raw.std(axis=0) + 1e-9
    cal = Calibration(config.branches, tuple(map(float, mu)), tuple(map(float, sigma)), 1.0)
    return save_bundle(model, root / "b", cal)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, dataset: Path) -> Bundle:
    return _calibrated_bundle(tmp_path_factory.mktemp("parity-bundle"), dataset, TINY.input_size)


def _stream_scores(bus: Bus, url: str, bundle: Bundle, files: Path, spec: str) -> dict[str, float]:
    codec = FrameCodec.parse(spec)
    settings = settings_for(
        bus, url, **{"ingest.encoding": codec.encoding, "ingest.jpeg_quality": codec.jpeg_quality}
    )
    with LocalPipeline(settings, url, bundle.path, runtime="onnxruntime"):
        with open_source(str(files)) as source:
            sent = send_source(bus, settings, source, size=bundle.config.input_size)
        events, _ = wait_for_events(
            bus, sent.camera, sent.seqs, since=sent.events_from, timeout_s=60
        )
    out = {}
    for seq, name in sent.names.items():
        assert events[seq].score is not None, events[seq]
        out[Path(name).name] = float(events[seq].score)
    return out


@pytest.mark.parametrize("spec", ["raw", "png", "jpeg:90", "jpeg:60"])
def test_the_line_scores_a_file_as_evaluate_does(
    spec: str, bus: Bus, redis_url: str, bundle: Bundle, dataset: Path, tmp_path: Path
) -> None:
    _compare(spec, bus, redis_url, bundle, dataset, tmp_path)


@pytest.mark.parametrize("spec", ["raw", "jpeg:90"])
def test_a_long_part_scores_the_same_on_both_paths(
    spec: str, bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    data = _write_product(tmp_path / "long", LONG_SOURCE)
    bundle = _calibrated_bundle(tmp_path / "long-bundle", data, LONG_INPUT)
    assert bundle.config.input_size == LONG_INPUT
    _compare(spec, bus, redis_url, bundle, data, tmp_path)


def _compare(
    spec: str, bus: Bus, redis_url: str, bundle: Bundle, dataset: Path, tmp_path: Path
) -> None:
    expected = evaluate_bundle(bundle.path, dataset, out_dir=tmp_path / "eval", frame_codec=spec)
    by_file = {Path(r["path"]).name: r["fused"] for r in expected.metrics["images"]}
    assert len(by_file) == N_TEST // 2  # names repeat across the two folders: use one
    streamed = _stream_scores(bus, redis_url, bundle, dataset / "test" / "scratch", spec)
    scratch = {
        Path(r["path"]).name: r["fused"]
        for r in expected.metrics["images"]
        if r["defect"] == "scratch"
    }
    assert set(streamed) == set(scratch)
    for name, score in streamed.items():
        assert score == pytest.approx(scratch[name], abs=TOLERANCE), (spec, name)


def test_the_codec_matters_so_the_comparison_can_fail(
    bundle: Bundle, dataset: Path, tmp_path: Path
) -> None:
    """Without this, equal scores above could mean the model ignores the pixels."""
    lossless = evaluate_bundle(bundle.path, dataset, out_dir=tmp_path / "a", frame_codec="raw")
    jpeg = evaluate_bundle(bundle.path, dataset, out_dir=tmp_path / "b", frame_codec="jpeg:60")
    gaps = np.abs(lossless.fused - jpeg.fused)
    assert gaps.max() > 20 * TOLERANCE, gaps
    # evaluate's default is the bundle's codec, which ingest also sends by default
    default = evaluate_bundle(bundle.path, dataset, out_dir=tmp_path / "c")
    assert default.metrics["frame_codec"] == "jpeg:90" == bundle_frame_codec(bundle.path).spec
