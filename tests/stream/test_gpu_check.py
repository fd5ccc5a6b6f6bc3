"""The prepared GPU check: its CPU dry run exercises every part, from a bare checkout.

``.ci/gpu-check`` is what runs on a lent GPU machine, where lineguard is not installed; here it
runs with ``--device cpu`` (64 px, batches 1 and 2, eight e2e frames) and must produce the
whole JSON. Without a GPU, ``lineguard bench gpu`` must refuse with a message that says why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lineguard.stream.cli import app

ROOT = Path(__file__).resolve().parents[2]


def test_the_dry_run_from_a_bare_checkout_writes_every_part(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    proc = subprocess.run(
        [str(ROOT / ".ci" / "gpu-check"), str(out), "--device", "cpu"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["ok"] and result["peak_tflops"]["value"] > 0
    assert [(r["precision"], r["cuda_graphs"]) for r in result["parity"]] == [("fp32", False)]
    assert result["parity"][0]["scores_rel"] == 0.0  # the CPU against itself
    rows = result["sweep"]
    assert [r["batch"] for r in rows] == [1, 2] and all(r["images_per_s"] > 0 for r in rows)
    assert all(r["fraction_of_peak"] > 0 and r["p50_ms"] <= r["p99_ms"] for r in rows)
    e2e = result["e2e"]
    assert "skipped" not in e2e, e2e
    assert e2e["device"] == "cpu" and e2e["runtime"] == "torch"
    assert e2e["verdicts"]["error"] == 0 and sum(e2e["verdicts"].values()) == 8
    assert result["e2e_vs_model"] > 0
    assert "sweep lite fp32 b2:" in proc.stdout and "e2e:" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run")
def test_without_a_gpu_the_check_says_so() -> None:
    result = CliRunner().invoke(app, ["bench", "gpu"])
    assert result.exit_code == 1
    assert "no CUDA GPU is visible to torch" in result.output
    assert "--device cpu" in result.output
