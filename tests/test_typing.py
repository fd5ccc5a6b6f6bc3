"""mypy is clean over the three packages, checked under their import names (``.ci/mypy``)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(
    shutil.which("mypy") is None, reason="mypy is not installed (pip install -e '.[dev]')"
)
def test_mypy_is_clean() -> None:
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "mypy")], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Success" in proc.stdout
