"""A bundle replaced while the line runs: never a verdict from a half-loaded or mixed bundle,
and every event names the model that scored it.

Two bundles with *different weights and calibrations* take turns at one path. Because the
test model is deterministic, the raw scores of each image under each model are known, so
every ``Scores`` and every event can be checked against the model version it carries: a
mixture (one bundle's version with the other's weights or calibration) would not match.
``save_bundle(..., overwrite=True)`` swaps directories with two renames, so the path briefly
does not exist and, for a reader in the middle of a load, changes underneath it; the
deterministic tests put a swap exactly inside the load.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import lineguard.engines.bundle as bundle_mod
import lineguard.stream.infer as infer_mod
from lineguard.engines.bundle import Bundle, load_bundle, save_bundle
from lineguard.engines.fusion import Calibration
from lineguard.engines.runtimes import open_runtime
from lineguard.stream.bus import Bus, connect
from lineguard.stream.decide import DecideStage
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.protocol import ENTRY_FIELD, Scores, decode_scores
from lineguard.stream.worker import StopFlag, run_worker
from tests.conftest import tiny_model
from tests.reliability.helpers import wait_for_every_seq, wait_until
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for

IMAGES = {"good": GOOD, "bad": BAD}


@dataclass(frozen=True)
class Version:
    name: str  # "a" or "b"
    source: Path  # a pristine copy to swap in
    version: str
    calibration: Calibration
    raw: dict[str, np.ndarray]  # image kind -> raw branch scores

    def fused(self, kind: str) -> float:
        c = self.calibration
        return float(c.combined(c.contributions(self.raw[kind][None].astype(np.float64)))[0])


def _build(name: str, seed: int, folder: Path) -> Version:
    model = tiny_model(seed=seed)
    branches = model.config.branches
    neutral = save_bundle(model, folder / f"{name}-neutral", Calibration.neutral(branches))
    rt = open_runtime(neutral, kind="onnxruntime")
    out = np.asarray(rt.run(np.stack([GOOD, BAD])).scores, dtype=np.float64)
    rt.close()
    # normalise with the good image's scores; A fails the bad image, B fails everything
    cal = Calibration(branches, tuple(out[0]), (1.0,) * len(branches), 1e-9 if seed == 0 else -1)
    saved = save_bundle(model, folder / name, cal)
    return Version(name, saved.path, saved.version, cal, {"good": out[0], "bad": out[1]})


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Version]:
    folder = tmp_path_factory.mktemp("two-models")
    a, b = _build("a", 0, folder), _build("b", 1, folder)
    assert a.version != b.version
    gap = max(float(np.abs(a.raw[k] - b.raw[k]).max()) for k in IMAGES)
    assert gap > 1e-3, "the two models must score differently for the checks to mean anything"
    return {a.version: a, b.version: b}


def swap_in(src: Path, path: Path) -> None:
    """What ``save_bundle(overwrite=True)`` does at the end: stage, rename away, rename in."""
    staging = path.with_name(f".{path.name}.staging")
    shutil.copytree(src, staging)
    retired = path.with_name(f".{path.name}.retired")
    path.rename(retired)
    staging.rename(path)
    shutil.rmtree(retired)


def by_name(versions: dict[str, Version], name: str) -> Version:
    return next(v for v in versions.values() if v.name == name)


def check_scores(s: Scores, versions: dict[str, Version], kind: str) -> None:
    v = versions[s.model]
    got = np.asarray([s.raw[b] for b in v.calibration.branches])
    assert np.allclose(got, v.raw[kind], rtol=1e-5, atol=1e-6), (
        f"scores labelled {v.name} ({s.model}) are not model {v.name}'s: {got} vs {v.raw[kind]}"
    )


# ------------------------------------------------------------------------ deterministic races


def test_a_swap_during_load_never_gives_a_mixed_bundle(
    versions: dict[str, Version], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap lands after the files were hashed: the loaded bundle must still be A's
    throughout (manifest, version and calibration), and know it is no longer current."""
    a, b = by_name(versions, "a"), by_name(versions, "b")
    path = tmp_path / "current"
    shutil.copytree(a.source, path)
    real = bundle_mod.sha256_file
    swapped: list[bool] = []

    def hash_then_swap(p: Path) -> str:
        digest = real(p)
        if p.name == bundle_mod.ONNX and not swapped:  # the last file hashed
            swap_in(b.source, path)
            swapped.append(True)
        return digest

    monkeypatch.setattr(bundle_mod, "sha256_file", hash_then_swap)
    loaded = load_bundle(path)
    assert swapped
    assert loaded.version == a.version
    assert loaded.calibration == a.calibration, "calibration read from the swapped-in bundle"
    assert not loaded.is_current()
    monkeypatch.undo()
    again = load_bundle(path)
    assert again.version == b.version and again.calibration == b.calibration
    assert again.is_current()


def test_infer_never_scores_with_weights_swapped_in_while_it_opened_the_runtime(
    versions: dict[str, Version],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    bus: Bus,
    redis_url: str,
) -> None:
    """A reload verifies bundle B, then C is swapped in before the runtime reads the weights:
    infer must not label C's weights with B's version (it retries and gets C)."""
    a, b = by_name(versions, "a"), by_name(versions, "b")
    path = tmp_path / "current"
    shutil.copytree(a.source, path)
    settings = settings_for(bus, redis_url, **{"infer.block_ms": 100})
    stage = InferStage(
        bus, settings, path, runtime="onnxruntime", consumer="t", reload_interval_s=0.0
    )
    stage.setup()
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    swap_in(b.source, path)  # the new bundle arrives: the next step reloads it ...
    real_open = infer_mod.open_runtime
    calls: list[str] = []

    def swap_then_open(bnd: Bundle, **kw: Any) -> Any:
        if not calls:  # ... and is replaced by A again between verification and opening
            swap_in(a.source, path)
        calls.append(bnd.version)
        return real_open(bnd, **kw)

    monkeypatch.setattr(infer_mod, "open_runtime", swap_then_open)
    ing.send(GOOD)
    for _ in range(5):
        if stage.step() == 0:
            break
    # the replacement loads in the background: let it end, swap it in, score once more
    assert stage.loading.wait(60)
    stage.step()
    ing.send(GOOD)
    for _ in range(5):
        if stage.step() == 0:
            break
    rows: Any = bus.client.xrange(bus.key("scores"))
    scores = [decode_scores(f[ENTRY_FIELD]) for _id, f in rows]
    assert len(scores) == 2
    for s in scores:  # whichever model scored, its version names the weights it used
        check_scores(s, versions, "good")
    assert calls and calls[0] == b.version
    stage.teardown()


# ------------------------------------------------------------------------ a running line


@contextmanager
def running(*stages: InferStage | DecideStage) -> Iterator[None]:
    """Each stage in a thread through ``run_worker`` (as ``lineguard run`` does)."""
    stop = StopFlag()
    threads = [
        threading.Thread(
            target=run_worker,
            args=(s, s.bus),
            kwargs={"stop": stop, "handle_signals": False},
            daemon=True,
        )
        for s in stages
    ]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        for s in stages:
            s.bus.client.close()


@pytest.mark.slow
def test_bundle_replaced_again_and_again_while_frames_flow(
    versions: dict[str, Version], tmp_path: Path, bus: Bus, redis_url: str
) -> None:
    """save_bundle(overwrite=True) alternates A and B at the path the workers watch (every
    20 ms) while 150 frames stream through: one event each, no errors, and every score and
    verdict is exactly what the model and calibration named in it produce."""
    a, b = by_name(versions, "a"), by_name(versions, "b")
    path = tmp_path / "current"
    shutil.copytree(a.source, path)
    settings = settings_for(bus, redis_url)

    def own_bus() -> Bus:
        return Bus.from_settings(connect(settings), settings)

    infer = InferStage(
        own_bus(), settings, path, runtime="onnxruntime", consumer="i0", reload_interval_s=0.02
    )
    decide = DecideStage(own_bus(), settings, path, consumer="d0", reload_interval_s=0.02)
    models = {v.name: (tiny_model(seed=0 if v.name == "a" else 1), v) for v in (a, b)}
    done = threading.Event()
    swaps: list[str] = []

    def swapper() -> None:
        while not done.is_set():
            for name in ("b", "a"):
                model, v = models[name]
                save_bundle(model, path, v.calibration, overwrite=True)
                swaps.append(name)
                time.sleep(0.05)

    kinds = ["good", "bad", "good"]
    n = 150
    with running(infer, decide):
        wait_until(lambda: infer.model is not None and decide.current is not None, 60, "ready")
        t = threading.Thread(target=swapper, daemon=True)
        t.start()
        try:
            ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
            for i in range(n):
                ing.send(IMAGES[kinds[i % 3]])
                time.sleep(0.03)
            events = wait_for_every_seq(bus, "cam0", n, 60)
        finally:
            done.set()
            t.join(30)
    assert len(swaps) >= 4
    assert Counter(e.seq for e in events).most_common(1)[0][1] == 1
    assert [e for e in events if e.verdict not in ("pass", "fail")] == []
    for e in events:
        v = versions[e.model]
        kind = kinds[e.seq % 3]
        assert e.score == pytest.approx(v.fused(kind), abs=1e-4), (e.seq, v.name, e.score)
        assert e.threshold == v.calibration.threshold
        assert e.verdict == ("fail" if v.fused(kind) > v.calibration.threshold else "pass")
    assert {versions[e.model].name for e in events} == {"a", "b"}, "the swaps never took effect"
    rows: Any = bus.client.xrange(bus.key("scores"))
    for _id, fields in rows:
        s = decode_scores(fields[ENTRY_FIELD])
        check_scores(s, versions, kinds[s.seq % 3])
