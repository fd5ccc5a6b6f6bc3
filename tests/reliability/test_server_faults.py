"""The bus goes away: a restart of the server mid-run (AOF on), and no server at start-up.

Each test starts its own server process (``RedisProcess``), runs infer and decide as real
``lineguard`` processes and the ingest stage in a thread (through ``run_worker``, as
``lineguard ingest`` does), and checks the contract: every frame ingest acknowledged (its seq
counter in Redis) gets exactly one event, and the verdicts are the right ones.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from lineguard.stream.bus import Bus, connect
from lineguard.stream.ingest import Ingestor
from lineguard.stream.settings import RedisSettings, Settings
from lineguard.stream.worker import line_key
from tests.reliability.helpers import (
    IngestThread,
    RedisProcess,
    WorkerProcess,
    free_port,
    heartbeat_consumers,
    server_binary,
    stopped,
    unique_prefix,
    wait_for_every_seq,
    wait_until,
    worker_env,
)
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, settings_for, split_bundle

IMAGES = [GOOD, BAD, GOOD, GOOD]
EXPECTED = ["pass", "fail", "pass", "pass"]

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no redis-server/valkey-server")


def bus_on(url: str) -> Bus:
    client = connect(RedisSettings(url=url, socket_timeout=5.0, retries=1))
    return Bus(client, line="line1", prefix=unique_prefix())


def workers(bus: Bus, url: str, bundle: Path, tmp: Path, **env: object) -> list[WorkerProcess]:
    base = {
        "redis.wait_timeout": 60,
        "infer.reclaim_idle_ms": 3000,
        "infer.reclaim_interval_ms": 500,
        "decide.reclaim_idle_ms": 3000,
        **env,
    }
    e = worker_env(url, bus, **base)
    infer = WorkerProcess(
        "infer",
        ["--bundle", str(bundle), "--runtime", "onnxruntime", "--consumer", "infer-0"],
        e,
        tmp / "infer.log",
    )
    decide = WorkerProcess(
        "decide",
        ["--bundle", str(bundle), "--consumer", "decide-0", "--gap-grace-s", "30"],
        e,
        tmp / "decide.log",
    )
    return [infer, decide]


def wait_for_workers(bus: Bus) -> None:
    """Until infer-0 and decide-0 both have a live heartbeat."""
    wait_until(
        lambda: (
            {"infer-0"} <= heartbeat_consumers(bus, "infer")
            and {"decide-0"} <= heartbeat_consumers(bus, "decide")
        ),
        90,
        "infer and decide to be ready",
    )


def check_one_event_each(bus: Bus, n: int, timeout_s: float) -> None:
    events = wait_for_every_seq(bus, "cam0", n, timeout_s)
    per_seq = Counter(e.seq for e in events)
    assert set(per_seq) == set(range(n)), "events for frames ingest never sent"
    assert max(per_seq.values()) == 1, f"duplicated events: {per_seq.most_common(3)}"
    verdicts = {e.seq: e.verdict for e in events}
    wrong = {s: v for s, v in verdicts.items() if v != EXPECTED[s % len(EXPECTED)]}
    assert not wrong, f"unexpected verdicts: {dict(list(wrong.items())[:10])}"


@pytest.mark.slow
def test_server_restart_mid_run_loses_no_acknowledged_frame(
    tmp_path: Path, own_server: RedisProcess
) -> None:
    """A graceful restart and then a crash (SIGKILL; AOF fsync always) while frames flow:
    workers ride through with backoff, ingest resends what it could not hand over, every
    frame whose seq Redis acknowledged gets exactly one, correct, event."""
    split = split_bundle()
    bus = bus_on(own_server.url)
    settings = settings_for(bus, own_server.url)
    procs = workers(bus, own_server.url, split.path, tmp_path)
    n = 120
    with stopped(*procs):
        for p in procs:
            p.start()
        wait_for_workers(bus)
        ingest = IngestThread(settings, IMAGES, n, size=SIZE, fps=25).start()
        try:
            wait_until(lambda: ingest.sent >= 30, 30, "30 frames sent")
            own_server.restart(down_s=2.5)  # graceful: SIGTERM, AOF flushed
            wait_until(lambda: ingest.sent >= 70, 60, "70 frames sent")
            own_server.restart(crash=True, down_s=2.5)  # SIGKILL: only fsync'ed data survives
            ingest.join(120)
        finally:
            ingest.close()
        acknowledged = int(bus.client.get(line_key(bus, "seq", "cam0")) or 0)
        assert ingest.sent == n, "ingest skipped captures during the outage"
        assert acknowledged == n
        check_one_event_each(bus, acknowledged, 120)
        assert all(p.alive() for p in procs), "a worker died during the outage"
        for p in procs:
            outages = [e for e in p.logs() if e.get("event") == "worker.redis_unavailable"]
            assert outages, f"{p.stage} logged no outage"
            # backoff, not a hot loop: redis-py's own retries (exponential, jittered) absorb
            # most of the 2 × 2.5 s, then run_worker waits 0.1, 0.2, 0.4 ... s between steps
            delays = [e["retry_in_s"] for e in outages]
            assert len(delays) <= 12, f"{p.stage} spun on the outage: {delays}"
            assert set(delays) <= {0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0}, delays
        codes = [p.stop() for p in procs]
        assert codes == [0, 0], f"workers did not drain and exit cleanly: {codes}"
    bus.client.close()


@pytest.mark.slow
def test_server_unreachable_at_start_workers_wait_and_log_then_proceed(tmp_path: Path) -> None:
    """No server yet: infer and decide log each failed attempt with the URL and the time
    left, keep waiting, and serve the line as soon as the server appears."""
    port = free_port()
    server = RedisProcess(tmp_path / "redis", port=port, appendfsync="always")
    split = split_bundle()
    bus = bus_on(server.url)
    procs = workers(bus, server.url, split.path, tmp_path)
    try:
        with stopped(*procs):
            for p in procs:
                p.start()

            def attempts(p: WorkerProcess) -> list[dict[str, object]]:
                return [e for e in p.logs() if e.get("event") == "redis.unreachable"]

            wait_until(
                lambda: all(len(attempts(p)) >= 2 for p in procs), 60, "logged connection attempts"
            )
            for p in procs:
                first = attempts(p)[0]
                assert first["url"] == f"redis://127.0.0.1:{port}/0"
                assert first["level"] == "warning" and first["attempt"] == 1
                assert "Connection refused" in str(first["error"])
                assert 0 < float(first["remaining_s"]) <= 60  # type: ignore[arg-type]
                assert p.alive()
            server.start()
            wait_until(
                lambda: (
                    bool(heartbeat_consumers(bus, "infer"))
                    and bool(heartbeat_consumers(bus, "decide"))
                ),
                60,
                "workers to connect",
            )
            for p in procs:
                assert any(e.get("event") == "redis.reachable" for e in p.logs())
            ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
            for i in range(8):
                ing.send(IMAGES[i % len(IMAGES)])
            check_one_event_each(bus, 8, 60)
    finally:
        bus.client.close()
        server.stop()


def test_a_batch_caught_by_an_outage_is_rescored_as_soon_as_the_server_is_back(
    tmp_path: Path, own_server: RedisProcess
) -> None:
    """The server goes away after infer read a batch and before it could publish: with the
    default reclaim_idle_ms (30 s) the batch used to wait for XAUTOCLAIM; the worker now
    re-reads its own unacknowledged entries first when Redis comes back."""
    import threading
    import time

    from lineguard.stream.infer import InferStage
    from lineguard.stream.protocol import ENTRY_FIELD, decode_scores
    from lineguard.stream.worker import StopFlag, run_worker

    split = split_bundle()
    bus = bus_on(own_server.url)
    settings = settings_for(bus, own_server.url)
    assert settings.infer.reclaim_idle_ms == 30_000
    stage = InferStage(
        Bus.from_settings(connect(settings), settings), settings, split.path,
        runtime="onnxruntime", consumer="i0",
    )  # fmt: skip
    stop = StopFlag()
    outage = threading.Event()
    worker = threading.Thread(
        target=run_worker,
        args=(stage, stage.bus),
        kwargs={"stop": stop, "handle_signals": False},
        daemon=True,
    )
    worker.start()
    try:
        wait_until(lambda: stage.model is not None, 60, "infer ready")
        assert stage.model is not None
        real = stage.model.runtime

        class StopsTheServer:
            """Runs the batch, but the server dies while it does (once)."""

            kind = real.kind

            def run(self, images: object) -> object:
                if not outage.is_set():
                    outage.set()
                    own_server.kill()
                return real.run(images)  # type: ignore[arg-type]

            def close(self) -> None:
                real.close()

        stage.model.runtime = StopsTheServer()  # type: ignore[assignment]
        ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
        ing.send(GOOD)
        wait_until(outage.is_set, 30, "the batch to be read")
        time.sleep(2.0)  # redis-py gives up; the worker backs off
        own_server.start()
        t_back = time.monotonic()
        wait_until(lambda: bus.length("scores") == 1, 20, "the batch to be scored again")
        assert time.monotonic() - t_back < 15  # not after the 30 s reclaim_idle_ms
        rows: Any = bus.client.xrange(bus.key("scores"))
        ((_id, fields),) = rows
        assert decode_scores(fields[ENTRY_FIELD]).seq == 0
        assert bus.pending("frames", "infer") == []
    finally:
        stop.set()
        worker.join(20)
        stage.bus.client.close()
        bus.client.close()


@contextmanager
def volatile_line(tmp_path: Path) -> Iterator[tuple[RedisProcess, Bus, Settings, list]]:
    """A server without persistence (a restart empties it), the line's bus and settings on
    it, and the infer and decide worker processes (not started); the server stops at the end."""
    server = RedisProcess(tmp_path / "redis", appendonly=False)
    server.start()
    try:
        split = split_bundle()
        bus = bus_on(server.url)
        yield (
            server,
            bus,
            settings_for(bus, server.url),
            workers(bus, server.url, split.path, tmp_path),
        )
    finally:
        server.stop()


@pytest.mark.slow
def test_a_server_restarted_without_its_data_still_gives_every_new_frame_one_verdict(
    tmp_path: Path,
) -> None:
    """No persistence, SIGKILL, restart: the line's streams, groups, counters and watermarks
    are gone. Decide used to keep its watermark (40 here, millions on a real line) and drop
    every new frame as already judged; the line's epoch tells it the state is gone."""
    with volatile_line(tmp_path) as (server, bus, settings, procs):
        with stopped(*procs):
            for p in procs:
                p.start()
            wait_for_workers(bus)
            first = IngestThread(settings, IMAGES, 40, size=SIZE, fps=50).start()
            first.join(60)
            first.close()
            check_one_event_each(bus, 40, 60)
            epoch = bus.current_epoch()
            assert epoch is not None
            server.restart(crash=True, down_s=1.0)  # SIGKILL without persistence: empty
            assert bus.length("events") == 0  # the first 40 verdicts went with the data
            # ingest restarts (systemd does) and numbers the camera's frames from 0 again
            second = IngestThread(settings, IMAGES, 30, size=SIZE, fps=50).start()
            second.join(90)
            second.close()
            check_one_event_each(bus, 30, 90)
            assert bus.current_epoch() not in (None, epoch)
            lost = [e for e in procs[1].logs() if e.get("event") == "decide.state_lost"]
            assert len(lost) == 1 and lost[0]["epoch_was"] == epoch, lost
            assert all(p.alive() for p in procs), "a worker died"
            assert [p.stop() for p in procs] == [0, 0]
        bus.client.close()


@pytest.mark.slow
def test_the_history_keeps_every_verdict_of_both_epochs_when_redis_lost_its_data(
    tmp_path: Path,
) -> None:
    """No persistence, SIGKILL, restart: ingest numbers the camera's frames from 0 again, so
    the new frames have the frame keys of old ones. The history (a real ``history-worker``
    process, SQLite) used to drop every such verdict as a duplicate and overwrite the old
    reject's picture; keyed on (epoch, frame key) it keeps both, each once, and a genuine
    redelivery is still skipped."""
    from lineguard.stream.history.archive import ImageArchive
    from lineguard.stream.history.store import HistoryStore
    from lineguard.stream.history.worker import history_lag
    from lineguard.stream.protocol import ENTRY_FIELD

    n = 12
    with volatile_line(tmp_path) as (server, bus, base, procs):
        settings = base.model_copy(
            update={"history": base.history.model_copy(update={"dir": tmp_path / "history"})}
        )
        history = WorkerProcess(
            "history-worker",
            ["--consumer", "history-0"],
            worker_env(
                server.url, bus, **{"redis.wait_timeout": 60, "history.dir": tmp_path / "history",
                                    "history.max_delay_ms": 20, "history.block_ms": 200}
            ),
            tmp_path / "history.log",
        )  # fmt: skip
        store = HistoryStore.from_settings(settings.history)

        def caught_up(rows: int) -> bool:
            return history_lag(bus, settings) == 0 and store.count() == rows

        with stopped(*procs, history):
            for p in (*procs, history):
                p.start()
            wait_for_workers(bus)
            epochs = []
            for i in (0, 1):
                ingest = IngestThread(settings, IMAGES, n, size=SIZE, fps=50).start()
                ingest.join(60)
                ingest.close()
                check_one_event_each(bus, n, 60)
                wait_until(partial(caught_up, n * (i + 1)), 60, "the history")
                epochs.append(bus.current_epoch())
                if i == 0:
                    server.restart(crash=True, down_s=1.0)  # SIGKILL without persistence
                    # the data is gone; a worker may already have stamped a new epoch
                    assert bus.length("events") == 0 and bus.current_epoch() != epochs[0]
            # the second epoch's events once more, as a retried EXEC would put them
            copies = [f[ENTRY_FIELD] for _id, f in bus.client.xrange(bus.key("events"))]
            assert len(copies) == n
            for data in copies:
                bus.client.xadd(bus.key("events"), {ENTRY_FIELD: data})
            wait_until(lambda: caught_up(2 * n), 30, "the history to skip the copies")
            assert all(p.alive() for p in (*procs, history)), "a worker died"
            assert [p.stop() for p in (*procs, history)] == [0, 0, 0]
        assert None not in epochs and len(set(epochs)) == 2
        rows = store.query()
        assert store.count() == 2 * n
        assert sorted((r.epoch, r.seq) for r in rows) == sorted(
            (e, s) for e in epochs for s in range(n)
        )
        assert all(r.verdict == EXPECTED[r.seq % len(EXPECTED)] for r in rows)
        fails = [r for r in rows if r.verdict == "fail"]
        assert len(fails) == 2 * EXPECTED.count("fail") * n // len(EXPECTED)
        # both epochs' rejects of seq 1, 5, 9 (same camera, same day): distinct files
        archive = ImageArchive(settings.history.dir / "images", max_days=1, max_bytes=1 << 30)
        images = [r.image for r in fails]
        assert None not in images and len(set(images)) == len(fails)
        files = [archive.path(i) for i in images]  # type: ignore[arg-type]
        assert all(f.is_file() for f in files) and len({f.stat().st_ino for f in files}) == len(
            fails
        )
        store.close()
        bus.client.close()
