"""``lineguard bench soak``: its judgement (memory slope, accounting) on made-up series, and a
short real run of the command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lineguard.stream.tools.soak import Tally, _judge, growth_mib_per_min
from tests.reliability.helpers import ROOT
from tests.stream.pipeline_helpers import split_bundle


def test_growth_is_the_slope_of_the_second_half() -> None:
    t = np.arange(0, 1200, 5.0)  # 20 minutes, a sample every 5 s
    warm_then_flat = np.where(t < 300, 200 + t / 10, 230) + np.sin(t) * 0.5
    assert abs(growth_mib_per_min(list(zip(t, warm_then_flat, strict=True))) or 0) < 0.05
    leaking = 200 + t / 60 * 3.0  # 3 MiB per minute, all the way
    assert growth_mib_per_min(list(zip(t, leaking, strict=True))) == pytest.approx(3.0)
    assert growth_mib_per_min([(0.0, 1.0), (30.0, 2.0)]) is None  # too short to judge


def test_tally_counts_each_seq_once_in_bounded_memory() -> None:
    tally = Tally()
    for seq in [1, 0, 2, 2, 5, 3, 4, 0]:
        tally.add(seq, "pass", 10.0)
    assert tally.events == 6 and tally.duplicates == 2
    assert tally.has_all_below(6) and not tally.above  # the watermark swallowed them all
    assert tally.take_window_p99() == pytest.approx(10.0)
    assert tally.take_window_p99() is None


def result(sent: int, verdicts: dict[str, int], growth: float | None, **kw: int) -> dict:
    rss = {"start": 300.0, "end": 310.0, "max": 311.0, "growth_mib_per_min": growth}
    return {
        "sent": sent,
        "verdicts": verdicts,
        "missing": kw.get("missing", 0),
        "duplicates": kw.get("duplicates", 0),
        "rss_mib": {"ingest": rss, "infer": rss, "decide": rss},
    }


def test_judgement() -> None:
    good = {"pass": 90, "fail": 5, "uninspected": 4, "error": 1}
    assert _judge(result(100, good, 0.1), 1.0)["ok"]
    leak = _judge(result(100, good, 2.5), 1.0)
    assert not leak["ok"] and "grows 2.50 MiB/min" in leak["problems"][0]
    short = _judge(result(99, good, None), 1.0)
    assert not short["ok"] and "accounting" in short["problems"][0]
    dup = _judge(result(100, good, 0.0, duplicates=1), 1.0)
    assert not dup["ok"] and "more than one event" in dup["problems"][0]


@pytest.mark.slow
def test_a_short_soak_reports_and_passes(tmp_path: Path) -> None:
    bundle = split_bundle(tmp_path / "bundle").path
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    proc = subprocess.run(
        [sys.executable, "-m", "lineguard.stream.cli", "bench", "soak", "--minutes", "0.15",
         "--rate", "10", "--report-s", "2.5", "--sample-s", "1", "--bundle", str(bundle), "--json",
         str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    progress = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(progress) >= 3
    assert "RSS MiB ingest" in progress[0] and "p99" in progress[0] and "lag" in progress[0]
    data = json.loads(out.read_text())
    assert data["ok"] and data["missing"] == 0 and data["duplicates"] == 0
    assert data["sent"] == sum(data["verdicts"].values()) > 50
    assert set(data["rss_mib"]) == {"ingest", "infer", "decide"}
    assert all(r["start"] > 10 for r in data["rss_mib"].values())
