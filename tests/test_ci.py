"""`.ci/run` runs exactly the README's install and test commands, read from the README."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_block(marker: str) -> str:
    text = (ROOT / "README.md").read_text()
    found = re.search(rf"<!-- {marker} -->\n```[a-z]*\n(.*?)\n```", text, re.S)
    assert found, f"README has no code block after <!-- {marker} -->"
    return found.group(1)


def test_ci_runs_the_readme_commands() -> None:
    out = subprocess.run(
        ["bash", str(ROOT / ".ci" / "run"), "--print"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    assert out == f"install: {readme_block('ci:install')}\ntest: {readme_block('ci:test')}\n"
    assert readme_block("ci:test") == "pytest -q"
