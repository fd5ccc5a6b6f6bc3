"""Ctrl-C on ``lineguard run``: a terminal sends SIGINT to the whole foreground process group,
so the test does exactly that (the run in a process group of its own, signalled with killpg).
The line must drain what was sent, print its summary, write its JSON and exit 0; the embedded
Valkey and worker processes sit in sessions of their own and are stopped by ``run``, last.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.stream.pipeline_helpers import split_bundle, write_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("workers", ["threads", "processes"])
def test_ctrl_c_on_run_drains_and_reports(tmp_path: Path, workers: str) -> None:
    folder = tmp_path / "frames"
    write_folder(folder, lambda i: i % 4 == 1, 8)
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env["LINEGUARD_LOG__FORMAT"] = "json"
    cmd = [sys.executable, "-m", "lineguard.stream.cli", "run", "--bundle",
           str(split_bundle().path), "--source", str(folder), "--loop", "--rate", "20",
           "--runtime", "onnxruntime", "--workers", workers, "--show", "none",
           "--json", str(out)]  # fmt: skip
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        start_new_session=True, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        assert proc.stderr is not None
        for line in proc.stderr:  # wait until the workers are up and frames flow
            if "workers ready" in line or time.monotonic() > deadline:
                break
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "ConnectionError" not in stderr
    assert "lineguard run" in stdout  # the summary table
    data = json.loads(out.read_text())
    assert data["sent"] > 0 and data["missing"] == 0 and data["duplicates"] == 0
    assert sum(data["verdicts"].values()) == data["sent"]
    assert data["verdicts"]["fail"] > 0
