"""The chaos run, short: SIGKILLs of ingest, infer, decide and the server (AOF always) in
shuffled rounds while frames flow; every frame ingest numbered has exactly one verdict.
``lineguard bench chaos --minutes 3`` is the long version (figures in the README)."""

from __future__ import annotations

import pytest

from lineguard.stream.settings import Settings
from lineguard.stream.tools.chaos import VICTIMS, chaos


@pytest.mark.slow
def test_random_sigkills_of_every_part_lose_and_double_no_verdict() -> None:
    result = chaos(Settings.load({}, env_file=None), minutes=0.4, rate=8, interval_s=2.5, seed=1)
    assert set(result["faults"]) == set(VICTIMS), result["faults"]  # one round at least
    assert result["sent"] > 50
    assert result["lost"] == 0 and result["duplicates"] == 0 and result["phantoms"] == 0
    assert sum(result["verdicts"].values()) == result["sent"]
    assert result["ok"], result
