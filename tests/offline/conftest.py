"""Shared fixtures for the offline tests: one tiny synthetic line, generated once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from lineguard.offline.synth import SynthSummary, make_line

# Images per split of the tiny line: every anomaly subtype exactly once.
TINY_COUNTS = {
    "train": 4,
    "validation": 2,
    "test_good": 2,
    "test_logical": 6,
    "test_structural": 3,
}


def make_tiny(out: Path, seed: int = 3) -> SynthSummary:
    """A 64 px tray line with :data:`TINY_COUNTS` images."""
    c = TINY_COUNTS
    return make_line(
        out,
        seed=seed,
        n_train=c["train"],
        n_val=c["validation"],
        n_test_good=c["test_good"],
        n_test_logical=c["test_logical"],
        n_test_structural=c["test_structural"],
        size=64,
    )


@pytest.fixture(scope="session")
def tiny_line(tmp_path_factory: pytest.TempPathFactory) -> SynthSummary:
    """The tiny line with seed 3 (shared: tests copy it before changing anything)."""
    return make_tiny(tmp_path_factory.mktemp("synth") / "tray")
