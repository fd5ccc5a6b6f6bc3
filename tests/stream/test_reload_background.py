"""Reloads off the hot path: a slow bundle open neither stops scoring nor the heartbeat.

The slow replacement is real, not a mock: a bundle whose patch bank is searched with faiss
HNSW builds its index when the runtime opens, which takes seconds for a bank of some ten
thousand descriptors. While it builds, the running worker (``run_worker`` in a thread, as in
``lineguard run``) must keep scoring frames with the old model, and its heartbeat, with a TTL
shorter than the build, must never expire and must say it is loading.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lineguard.engines.bundle import save_bundle
from lineguard.engines.fusion import Calibration
from lineguard.engines.model import ModelConfig
from lineguard.stream.bus import Bus
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.protocol import ENTRY_FIELD, Scores, decode_scores
from lineguard.stream.worker import (
    BackgroundLoad,
    Heartbeat,
    HeartbeatThread,
    StopFlag,
    line_key,
    run_worker,
)
from tests.conftest import TINY, tiny_model
from tests.stream.pipeline_helpers import GOOD, SIZE, settings_for, split_bundle

SLOW_BANK = 40_000  # HNSW build of this many descriptors: seconds on a CI core
TTL_S = 1


def scores_now(bus: Bus) -> list[Scores]:
    rows: Any = bus.client.xrange(bus.key("scores"))
    return [decode_scores(f[ENTRY_FIELD]) for _id, f in rows]


def slow_bundle(path: Path) -> str:
    """A bundle whose runtime takes seconds to open (its faiss index is built on open)."""
    config = ModelConfig(
        **{**TINY.to_json(), "patch_bank": SLOW_BANK, "patch_search": "faiss-hnsw"}
    )
    model = tiny_model(config=config)
    assert model.patch_knn is not None
    with torch.no_grad():
        model.patch_knn.bank.normal_(generator=torch.Generator().manual_seed(1))
        model.patch_knn.bank_sq.copy_(model.patch_knn.bank.square().sum(1))
    return save_bundle(
        model, path, Calibration.neutral(config.branches, threshold=1.0), overwrite=True
    ).version


@contextmanager
def worker(stage: InferStage) -> Iterator[threading.Thread]:
    stop = StopFlag()
    thread = threading.Thread(
        target=run_worker,
        args=(stage, stage.bus),
        kwargs={
            "stop": stop,
            "handle_signals": False,
            "heartbeat_interval_s": 0.2,
            "heartbeat_ttl_s": TTL_S,
        },
        daemon=True,
    )
    thread.start()
    try:
        yield thread
    finally:
        stop.set()
        thread.join(60)
        assert not thread.is_alive()


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_slow_reload_keeps_the_old_model_scoring_and_the_heartbeat_alive(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    first = split_bundle(tmp_path / "bundle")
    settings = settings_for(bus, redis_url, **{"infer.block_ms": 50})
    stage = InferStage(
        bus, settings, first.path, runtime="onnxruntime", consumer="i0", reload_interval_s=0.05
    )
    key = line_key(bus, "health", "infer", "i0")
    ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
    with worker(stage):
        wait_for(lambda: bus.client.exists(key), 60, "the first heartbeat")
        new_version = slow_bundle(tmp_path / "bundle")  # replaced in place, by rename
        wait_for(lambda: stage.loading.busy, 10, "the reload to start")
        started = time.monotonic()
        health: list[dict[str, Any]] = []
        sent = 0
        while stage.loading.busy:
            raw = bus.client.get(key)
            assert raw is not None, "the heartbeat expired while the new bundle was loading"
            health.append(json.loads(raw))
            if sent < 3:
                ing.send(GOOD)
                sent += 1
                wait_for(lambda n=sent: len(scores_now(bus)) == n, 20, "a frame scored mid-reload")
                assert stage.loading.busy, "the reload ended too soon to prove anything"
            time.sleep(0.1)
        load_s = time.monotonic() - started
        assert load_s > 1.5 * TTL_S, f"the slow open took only {load_s:.1f} s"
        assert sent == 3
        assert [s.model for s in scores_now(bus)] == [first.version] * 3
        assert all(s.error is None for s in scores_now(bus))
        assert any(str(h.get("reload", "")).startswith("loading since ") for h in health)
        wait_for(lambda: stage.counts["reloads"] == 1, 10, "the swap between two batches")
        ing.send(GOOD)
        wait_for(lambda: len(scores_now(bus)) == 4, 30, "the first frame of the new model")
        assert scores_now(bus)[-1].model == new_version
        wait_for(lambda: "reload" not in json.loads(bus.client.get(key) or "{}"), 5, "a plain beat")


def test_background_load_hands_over_its_result_or_error_once() -> None:
    load: BackgroundLoad[int] = BackgroundLoad("t")
    assert load.take() is None and load.status() is None
    gate = threading.Event()
    assert load.start(lambda: gate.wait(10) and 7)
    assert not load.start(lambda: 8)  # one at a time
    assert load.busy and str(load.status()).startswith("loading since ")
    gate.set()
    assert load.wait(10)
    assert load.take() == (7, None) and load.take() is None
    assert load.start(lambda: 1 // 0)
    assert load.wait(10)
    done = load.take()
    assert done is not None and done[0] is None and isinstance(done[1], ZeroDivisionError)


def test_heartbeat_thread_beats_on_its_own_and_stops_when_the_loop_stalls(bus: Bus) -> None:
    class Stage:
        name, consumer = "infer", "hb-test"

        def status(self) -> dict[str, object]:
            return {"model": "m"}

    beat = Heartbeat(bus, Stage(), interval_s=0.05, ttl_s=TTL_S)  # type: ignore[arg-type]
    thread = HeartbeatThread(beat, stall_s=0.5)
    thread.start()
    try:
        wait_for(lambda: bus.client.exists(beat.key), 5, "a beat from the thread")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 0.4:  # the loop makes progress: beats keep coming
            thread.progress()
            time.sleep(0.05)
        assert bus.client.exists(beat.key)
        # no progress from now on: the beats stop and the key expires with its TTL
        wait_for(lambda: not bus.client.exists(beat.key), 0.5 + TTL_S + 3, "the key to expire")
    finally:
        thread.stop()
        beat.clear()


@pytest.mark.parametrize("threads", [1, 3])
def test_decode_pool_fills_the_staging_rows_and_reports_bad_frames(threads: int) -> None:
    import cv2
    import numpy as np

    from lineguard.stream.protocol import Frame
    from lineguard.stream.staging import DecodePool

    ok, png = cv2.imencode(".png", GOOD)
    assert ok
    good = Frame("line1", "cam0", 0, time.time(), "png", (SIZE, SIZE, 3), png.tobytes())
    bad = Frame("line1", "cam0", 1, time.time(), "png", (SIZE, SIZE, 3), png.tobytes()[:60])
    big = cv2.resize(GOOD, (2 * SIZE, 2 * SIZE))
    ok, png2 = cv2.imencode(".png", big)
    resized = Frame("line1", "cam0", 2, time.time(), "png", (2 * SIZE, 2 * SIZE, 3), png2.tobytes())
    pool = DecodePool(threads)
    staging = np.full((4, SIZE, SIZE, 3), 7, dtype=np.uint8)
    try:
        errors = pool.decode_into([good, bad, resized], staging)
    finally:
        pool.close()
    assert errors[0] is None and errors[2] is None
    assert errors[1] is not None and errors[1].reason
    np.testing.assert_array_equal(staging[0], GOOD)  # PNG is lossless
    assert (staging[3] == 7).all()  # rows past the batch are left alone
    assert np.abs(staging[2].astype(int) - GOOD.astype(int)).mean() < 8
