"""The demo and the end-to-end benchmark, on tiny inputs (an untrained 64-px bundle)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from lineguard.engines.bundle import Bundle, save_bundle
from lineguard.engines.fusion import Calibration
from lineguard.stream.bus import Bus
from lineguard.stream.tools.bench_e2e import bench_e2e, result_table, synthetic_images
from lineguard.stream.tools.demo import contact_sheet, labelled_images, run_demo
from tests.conftest import tiny_model
from tests.stream.pipeline_helpers import settings_for, split_bundle

COUNTS = {"n_train": 2, "n_val": 2, "n_test_good": 4, "n_test_logical": 3, "n_test_structural": 3}


def untrained(_data: Path, out: Path) -> Bundle:
    """Stands in for lineguard.offline.train.train_bundle (which the demo calls for real)."""
    model = tiny_model()
    return save_bundle(model, out, Calibration.neutral(model.config.branches, threshold=1.0))


def test_demo_runs_reports_and_reuses_its_cache(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(bus, redis_url)
    out = io.StringIO()
    console = Console(file=out, width=120)
    trained: list[Path] = []

    def trainer(data: Path, dest: Path) -> Bundle:
        trained.append(dest)
        return untrained(data, dest)

    result = run_demo(
        tmp_path, settings=settings, live=False, console=console, trainer=trainer,
        counts=COUNTS, size=64,
    )  # fmt: skip
    assert result.ok
    s = result.summary
    assert s["frames"] == 10 and s["events"] == 10 and s["missing"] == 0
    assert sum(s["verdicts"].values()) == 10
    acc = s["accuracy"]
    assert acc["judged"] == 10 and acc["by_label"]["good"]["n"] == 4
    assert 0.0 <= acc["accuracy"] <= 1.0
    report = json.loads((result.report_dir / "report.json").read_text())
    assert len(report["frames"]) == 10
    assert {r["label"] for r in report["frames"]} == {"good", "logical", "structural"}
    assert (result.report_dir / "rejects.png").stat().st_size > 0
    assert "Rejected parts" in (result.report_dir / "report.html").read_text()
    assert "accuracy" in out.getvalue()
    # the second run reuses the line and the bundle
    again = run_demo(
        tmp_path, settings=settings, live=False, console=console, trainer=trainer,
        counts=COUNTS, size=64,
    )  # fmt: skip
    assert again.ok and len(trained) == 1
    assert bus.client.keys("lineguard-demo-*") == []  # its private keys were removed


def test_labels_come_from_the_folders(tmp_path: Path) -> None:
    from lineguard.offline.synth import make_line

    make_line(tmp_path, n_train=1, n_val=1, n_test_good=2, n_test_logical=1,
              n_test_structural=1, size=48)  # fmt: skip
    items = labelled_images(tmp_path)
    assert sorted(i.label for i in items) == ["good", "good", "logical", "structural"]
    assert labelled_images(tmp_path) == items  # a fixed order


def test_contact_sheet_shape() -> None:
    import numpy as np

    img = np.zeros((64, 64, 3), np.uint8)
    sheet = contact_sheet([(img, np.random.rand(16, 16), "a"), (img, None, "b")], tile=32, cols=2)
    assert sheet.shape == (32 + 18, 2 * 64, 3)


def test_bench_e2e_reports_every_stage(bus: Bus, redis_url: str) -> None:
    settings = settings_for(bus, redis_url, **{"ingest.encoding": "jpeg"})
    result = bench_e2e(settings, frames=12, bundle=split_bundle().path, warmup=2)
    assert result["frames"] == 12 and result["frames_per_s"] > 0
    assert result["runtime"] == "onnxruntime"
    assert set(result["latency_ms"]) == {"ingest", "queue", "infer", "handoff", "decide", "total"}
    total = result["latency_ms"]["total"]
    assert total["p50"] <= total["p99"]
    assert sum(result["verdicts"].values()) == 12 and result["duplicates"] == 0
    assert 1 <= result["mean_batch"] <= settings.infer.max_batch
    json.dumps(result)
    Console(file=io.StringIO()).print(result_table(result))
    # the benchmark ran under its own key prefix and cleaned up after itself
    assert bus.client.keys("lineguard-bench-*") == []


def test_bench_e2e_with_the_dashboard_open(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(bus, redis_url)
    strict = split_bundle(tmp_path / "strict", threshold_shift=-1000.0).path  # everything fails
    result = bench_e2e(settings, frames=8, bundle=strict, warmup=2, dashboard=True)
    assert result["verdicts"]["fail"] == 8 and result["duplicates"] == 0
    page = result["dashboard"]
    assert page["errors"] == [] and page["updates"] >= 1
    assert 1 <= page["thumbnails"] <= 10  # the simulated tab loaded reject pictures
    text = io.StringIO()
    Console(file=text, width=200).print(result_table(result))
    assert "dashboard open" in text.getvalue()


@pytest.mark.parametrize("size", [64, 256])
def test_synthetic_images_are_smooth(size: int) -> None:
    imgs = synthetic_images(2, size)
    assert imgs[0].shape == (size, size, 3) and not (imgs[0] == imgs[1]).all()
