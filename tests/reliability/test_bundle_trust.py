"""Untrusted bundles at the pipeline level (``tests/engines/test_bundle.py`` proves the loader
itself): infer and decide refuse to start on a tampered bundle with a one-line reason, and a
running line that is handed a tampered, escaping or pickle-carrying replacement logs why and
keeps scoring with the bundle it has."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from lineguard.stream.bus import Bus
from lineguard.stream.decide import DecideStage
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.protocol import ENTRY_FIELD, decode_scores
from tests.reliability.helpers import ROOT, events_now
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for, split_bundle


def flip_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))


def escape_manifest(folder: Path) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../../outside.json"] = manifest["files"]["calibration.json"]
    (folder / "manifest.json").write_text(json.dumps(manifest))


def pickle_as_weights(folder: Path) -> None:
    """A pickle that would leave a marker file if anything ever unpickled it (hand-written
    protocol-0 opcodes: no pickle module involved)."""
    marker = folder.parent / "UNPICKLED"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()
    (folder / "model.safetensors").write_bytes(payload)
    (folder / "model.pkl").write_bytes(payload)


def copy_of(src: Path, dst: Path, spoil: Callable[[Path], None]) -> Path:
    shutil.copytree(src, dst)
    spoil(dst)
    return dst


def start(stage: str, bundle: Path, bus: Bus, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env.update(
        LINEGUARD_REDIS__URL=url,
        LINEGUARD_REDIS__KEY_PREFIX=bus.prefix,
        LINEGUARD_LOG__FORMAT="json",
    )
    return subprocess.run(
        [sys.executable, "-m", "lineguard.stream.cli", stage, "--bundle", str(bundle)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("spoil", "says", "stages"),
    [
        (flip_weights, "model.safetensors does not match its sha256", ("infer", "decide")),
        (escape_manifest, "points outside the bundle directory", ("infer",)),
    ],
    ids=["tampered-weights", "path-traversal"],
)
def test_workers_refuse_to_start_on_an_untrusted_bundle(
    bus: Bus,
    redis_url: str,
    tmp_path: Path,
    spoil: Callable[[Path], None],
    says: str,
    stages: tuple[str, ...],
) -> None:
    bad = copy_of(split_bundle().path, tmp_path / "bundle", spoil)
    for stage in stages:
        proc = start(stage, bad, bus, redis_url)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert says in proc.stderr
        assert "Traceback" not in proc.stderr  # one clear line, not a stack dump
    assert bus.client.keys(f"{bus.prefix}:*health*") == []  # neither ever served


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (flip_weights, "does not match its sha256"),
        (escape_manifest, "points outside the bundle directory"),
        (pickle_as_weights, "does not match its sha256"),
    ],
    ids=["tampered-weights", "path-traversal", "pickle"],
)
def test_an_untrusted_replacement_is_refused_and_the_line_keeps_its_bundle(
    bus: Bus, redis_url: str, tmp_path: Path, spoil: Callable[[Path], None], says: str
) -> None:
    first = split_bundle(tmp_path / "work" / "current")
    path = first.path
    newer = split_bundle(tmp_path / "staging" / "newer", threshold_shift=100.0)
    assert newer.version != first.version
    settings = settings_for(bus, redis_url, **{"infer.block_ms": 50, "decide.block_ms": 50})
    infer = InferStage(
        bus, settings, path, runtime="onnxruntime", consumer="i0", reload_interval_s=0.0
    )
    decide = DecideStage(bus, settings, path, consumer="d0", reload_interval_s=0.0)
    infer.setup()
    decide.setup()
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")

    def run_both() -> None:
        for _ in range(6):
            if infer.step() + decide.step() == 0:
                break
        # replacements load in the background: let them end, and the next steps see how
        assert infer.loading.wait(60) and decide.loading.wait(60)
        infer.step()
        decide.step()

    ing.send(GOOD)
    run_both()
    # the replacement arrives the way save_bundle delivers one: renamed into place
    bad = copy_of(newer.path, tmp_path / "work" / ".incoming", spoil)
    shutil.rmtree(path)
    bad.rename(path)
    with capture_logs() as logs:
        ing.send(BAD)
        ing.send(GOOD)
        run_both()
    refused = {e["event"]: e for e in logs if e["event"].endswith("reload_failed")}
    assert set(refused) == {"infer.reload_failed", "decide.reload_failed"}
    for e in refused.values():
        assert e["log_level"] == "error" and says in e["error"] and e["path"] == str(path)
    rows: Any = bus.client.xrange(bus.key("scores"))
    scores = [decode_scores(f[ENTRY_FIELD]) for _id, f in rows]
    assert [s.model for s in scores] == [first.version] * 3
    events = sorted(events_now(bus), key=lambda e: e.seq)
    assert [(e.verdict, e.model) for e in events] == [
        ("pass", first.version),
        ("fail", first.version),
        ("pass", first.version),
    ]
    assert not (tmp_path / "work" / "UNPICKLED").exists()
    assert infer.counts["reloads"] == 0 and decide.counts["reloads"] == 0
    infer.teardown()
