"""The verdict history with real parts: SQLite files, the machine's PostgreSQL (database
``test``, a private table prefix per test), a throwaway PostgreSQL stopped and started for the
outage test, a real ``lineguard history-worker`` process killed with SIGKILL, a real bus."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from lineguard.stream.bus import Bus, connect
from lineguard.stream.cli import app
from lineguard.stream.history.archive import ImageArchive
from lineguard.stream.history.export import export_rows
from lineguard.stream.history.rows import COLUMNS, row_from_event
from lineguard.stream.history.store import HistoryStore, HistoryUnavailable
from lineguard.stream.history.worker import HistoryStage, history_lag
from lineguard.stream.protocol import ENTRY_FIELD, Event, LowResMap, encode, make_frame
from lineguard.stream.settings import Settings
from lineguard.stream.tools import pgserver
from lineguard.stream.worker import StopFlag, health_report, run_worker
from tests.stream.pipeline_helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]
PG_URL = os.environ.get("LINEGUARD_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = ROOT / "docs" / "schemas" / "history-v2.json"
VERDICT_CYCLE = ("pass", "pass", "fail", "pass", "error", "pass", "uninspected")


def pg_problem() -> str | None:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=2).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip()[:160]}"
    return None


def prefix() -> str:
    return f"lgt_{uuid.uuid4().hex[:10]}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    if request.param == "postgresql":
        problem = pg_problem()
        if problem:
            pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({problem})")
        s = HistoryStore(PG_URL, table_prefix=prefix())
    else:
        s = HistoryStore(None, directory=tmp_path / "h", table_prefix=prefix())
    try:
        yield s
    finally:
        s.drop()
        s.close()


def event(
    seq: int,
    verdict: str | None = None,
    *,
    camera: str = "cam0",
    model: str = "m-1",
    epoch: str = "",
    t: float | None = None,
) -> Event:
    t = time.time() if t is None else t
    v = verdict or VERDICT_CYCLE[seq % len(VERDICT_CYCLE)]
    judged = v in ("pass", "fail")
    return Event(
        "line1", camera, seq, v,  # type: ignore[arg-type]
        (2.0 if v == "fail" else 0.3) if judged else None, 1.0 if judged else None,
        {"lgst": 0.25, "patch_knn": 0.5} if judged else {}, model,
        {"total": 0.021, "infer": 0.01}, "" if judged else f"{v} for a reason", t, t, epoch,
    )  # fmt: skip


def push(bus: Bus, events: list[Event]) -> None:
    pipe = bus.client.pipeline(transaction=False)
    for ev in events:
        pipe.xadd(bus.key("events"), {ENTRY_FIELD: encode(ev)})
    pipe.execute()


def stream_counts(bus: Bus) -> Counter[str]:
    """Verdicts per frame key on the events stream (what the history must equal)."""
    from lineguard.stream.protocol import ProtocolError, decode_event

    seen: dict[str, str] = {}
    for _id, fields in bus.client.xrange(bus.key("events")):
        try:
            ev = decode_event(fields[ENTRY_FIELD], bus.limits)
        except ProtocolError:
            continue  # dead-lettered by the worker, not a verdict
        seen.setdefault(ev.key, ev.verdict)
    return Counter(seen.values())


def settings_for(bus: Bus, url: str, tmp: Path, history_url: str | None, **extra: Any) -> Settings:
    over: dict[str, Any] = {
        "redis.url": url,
        "redis.key_prefix": bus.prefix,
        "line.id": bus.line,
        "history.url": history_url,
        "history.dir": str(tmp / "history"),
        "history.max_delay_ms": 20,
        "history.block_ms": 200,
    }
    over.update(extra)
    return Settings.load(over, env_file=None)


class Worker:
    """A history worker thread with its own client, like a process of its own."""

    def __init__(self, settings: Settings, store: HistoryStore | None = None, consumer: str = "h1"):
        self.client = connect(settings)
        self.bus = Bus.from_settings(self.client, settings)
        self.stage = HistoryStage(self.bus, settings, consumer=consumer, store=store)
        self.stop = StopFlag()
        self.thread = threading.Thread(
            target=run_worker,
            args=(self.stage, self.bus),
            kwargs={"stop": self.stop, "handle_signals": False, "heartbeat_interval_s": 0.2},
            daemon=True,
        )

    def __enter__(self) -> Worker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=20)
        self.client.close()


# ------------------------------------------------------------------------------ rows, store


def test_row_keeps_what_the_event_says_and_drops_non_finite_numbers() -> None:
    ev = event(2, "fail")
    row = row_from_event(ev, image="cam0/x.jpg")
    assert (row.frame_key, row.verdict, row.score, row.threshold) == (ev.key, "fail", 2.0, 1.0)
    assert json.loads(row.contributions) == {"lgst": 0.25, "patch_knn": 0.5}
    assert row.latency_ms == pytest.approx(21.0)
    odd = Event(
        "line1", "cam0", 3, "fail", math.nan, 1.0, {"lgst": math.inf}, "m", {}, "", 1.0, 1.0
    )
    r = row_from_event(odd)
    assert (
        r.score is None and json.loads(r.contributions) == {"lgst": None} and r.latency_ms is None
    )


def test_store_writes_a_frame_key_once_and_keeps_marks(store: HistoryStore) -> None:
    rows = [row_from_event(event(i)) for i in range(50)]
    assert store.insert(rows) == 50
    assert store.insert([*rows[10:30], row_from_event(event(50))]) == 1  # only seq 50 is new
    assert store.count() == 51
    expected = Counter(VERDICT_CYCLE[i % len(VERDICT_CYCLE)] for i in range(51))
    assert store.counts() == dict(expected)
    store.mark(rows[2].frame_key, "defect")
    store.mark(rows[2].frame_key, "good", source="dashboard", note="scratch was dust")
    store.mark("line1/cam0/000000999", "defect")  # reported before its verdict row exists
    assert store.marks([rows[2].frame_key, rows[3].frame_key]) == {rows[2].frame_key: "good"}
    marked = store.query(mark="good")
    assert [r.frame_key for r in marked] == [rows[2].frame_key] and marked[0].t_mark
    assert ("line1/cam0/000000999", None) in store.marked("defect")
    assert [r.seq for r in store.query(verdict="fail", limit=3)] == [2, 9, 16]
    assert [r.seq for r in store.query(limit=2, newest_first=True)] == [50, 49]
    got = store.get(rows[0].frame_key)
    assert got is not None and got.model == "m-1" and store.get("line1/cam0/000123456") is None


def test_a_frame_key_used_again_in_a_new_epoch_is_a_row_of_its_own(store: HistoryStore) -> None:
    """After Redis lost its data, ingest numbers frames from 0 again: (key, epoch) is the
    identity, so the new epoch's verdicts are kept beside the old ones, each exactly once."""
    old = [row_from_event(event(i, epoch="e1", t=1000.0 + i)) for i in range(6)]
    new = [row_from_event(event(i, "fail", epoch="e2", t=2000.0 + i)) for i in range(4)]
    assert store.insert(old) == 6
    assert store.insert([*new, *old[:3]]) == 4  # the new epoch kept, redeliveries skipped
    assert store.insert(new) == 0 and store.count() == 10
    pairs = [(r.frame_key, r.epoch) for r in store.iter_rows(page=3)]
    assert len(pairs) == len(set(pairs)) == 10 and pairs[6:] == [(r.frame_key, "e2") for r in new]
    key = old[1].frame_key
    # a bare frame key names its newest verdict; an epoch picks one
    assert (store.get(key).epoch, store.get(key, "e1").verdict) == ("e2", old[1].verdict)  # type: ignore[union-attr]
    store.mark(key, "good", epoch="e1")
    assert store.marks([key]) == {}  # the newest verdict of the key has no mark
    store.mark(key, "defect")
    assert store.marks([key]) == {key: "defect"}
    assert {(r.epoch, r.mark) for r in store.query() if r.frame_key == key} == {
        ("e1", "good"),
        ("e2", "defect"),
    }
    # a mark made before any verdict of its key goes to the first row written with it
    late = row_from_event(event(9, "fail", epoch="e2", t=2009.0))
    store.mark(late.frame_key, "defect", note="found downstream")
    assert store.marks([late.frame_key]) == {late.frame_key: "defect"}
    assert (late.frame_key, None) in store.marked("defect")
    store.insert([late])
    assert store.get(late.frame_key).mark == "defect"  # type: ignore[union-attr]
    again = row_from_event(event(9, "pass", epoch="e3", t=3009.0))
    store.insert([again])
    assert store.get(late.frame_key).mark is None  # type: ignore[union-attr]
    assert store.get(late.frame_key, "e2").mark == "defect"  # type: ignore[union-attr]


def _old_tables(store: HistoryStore) -> None:
    """The tables as lineguard wrote them before the epoch: frame_key the primary key."""
    conn = store._connect()  # the new tables: replaced by the old shape below
    cur = conn.cursor()
    for table in (store.verdicts, store.marks_table):
        cur.execute(f"DROP TABLE {table}")
    num = "REAL" if store.dialect == "sqlite" else "DOUBLE PRECISION"
    cur.execute(
        f"CREATE TABLE {store.verdicts} (frame_key TEXT PRIMARY KEY, line TEXT, camera TEXT, "
        f"seq BIGINT, t_capture {num}, t_event {num}, verdict TEXT, reason TEXT, score {num}, "
        f"threshold {num}, contributions TEXT, model TEXT, latency_ms {num}, image TEXT, "
        f"map TEXT, t_stored {num})"
    )
    cur.execute(f"CREATE INDEX {store.verdicts}_t ON {store.verdicts} (t_capture, frame_key)")
    cur.execute(
        f"CREATE TABLE {store.marks_table} (frame_key TEXT PRIMARY KEY, mark TEXT NOT NULL, "
        f"t_mark {num} NOT NULL, source TEXT, note TEXT)"
    )
    ph = store._ph
    for i in range(3):
        cur.execute(
            f"INSERT INTO {store.verdicts} (frame_key, line, camera, seq, t_capture, t_event, "
            f"verdict, reason, contributions, model, image) VALUES "
            f"({', '.join([ph] * 11)})",
            (f"line1/cam0/{i:09d}", "line1", "cam0", i, 100.0 + i, 100.5 + i, "fail", "r",
             "{}", "m-0", f"cam0/19700101/{i:09d}.jpg"),
        )  # fmt: skip
    cur.execute(
        f"INSERT INTO {store.marks_table} VALUES ({', '.join([ph] * 5)})",
        ("line1/cam0/000000001", "good", 5.0, "cli", ""),
    )
    conn.commit()
    store.close()
    store._schema_ready = False


def test_a_history_from_before_the_epoch_is_migrated_and_keeps_its_rows(
    store: HistoryStore,
) -> None:
    _old_tables(store)
    assert store.count() == 3  # the first connection migrates
    rows = store.query()
    assert [(r.seq, r.epoch, r.mark) for r in rows] == [
        (0, "", None),
        (1, "", "good"),
        (2, "", None),
    ]
    assert store.marked("good") == [("line1/cam0/000000001", "cam0/19700101/000000001.jpg")]
    # the old rows are still deduplicated, and the same keys in an epoch are new rows
    assert store.insert([row_from_event(event(1, epoch=""))]) == 0
    assert store.insert([row_from_event(event(i, epoch="e1")) for i in range(3)]) == 3
    assert store.count() == 6
    other = HistoryStore(store.url, directory=store.directory, table_prefix=store.verdicts[:-9])
    assert other.count() == 6  # a second store opening it finds nothing left to migrate
    other.close()


def test_pictures_of_one_seq_in_two_epochs_are_two_files(tmp_path: Path) -> None:
    archive = ImageArchive(tmp_path / "images", max_days=1, max_bytes=1 << 20)
    t = time.time()
    rels: list[str] = []
    for epoch, value in (("e1", 10), ("e2", 200), ("e2", 200)):
        img = np.full((8, 8, 3), value, np.uint8)
        frame = make_frame("line1", "cam0", 5, img, encoding="png", t_capture=t, epoch=epoch)
        rel = archive.save_frame(frame)
        assert rel is not None
        rels.append(rel)
    assert rels[0] != rels[1] == rels[2]  # a redelivery rewrites its own file, no other
    pictures = [cv2.imread(str(archive.path(r))) for r in rels[:2]]
    assert [None if p is None else int(p[0, 0, 0]) for p in pictures] == [10, 200]
    no_epoch = make_frame("line1", "cam0", 5, np.zeros((8, 8, 3), np.uint8), t_capture=t)
    assert (
        archive.save_frame(no_epoch)
        == f"cam0/{time.strftime('%Y%m%d', time.gmtime(t))}/000000005.jpg"
    )


def test_refit_feedback_gets_the_picture_of_each_epoch_s_marked_frame(tmp_path: Path) -> None:
    """The frame key of both rejects is the same (seq 4 before and after Redis lost its
    data): each mark reaches its own verdict's picture, and neither is reported missing."""
    from lineguard.stream.history.feedback import collect_feedback

    store = HistoryStore(None, directory=tmp_path / "h")
    archive = ImageArchive(tmp_path / "h" / "images", max_days=1, max_bytes=1 << 20)
    t = time.time()
    for epoch, mark in (("e1", "good"), ("e2", "defect"), ("e3", "good")):
        img = np.full((8, 8, 3), 40, np.uint8)
        frame = make_frame("line1", "cam0", 4, img, encoding="png", t_capture=t, epoch=epoch)
        row = row_from_event(event(4, "fail", epoch=epoch, t=t), image=archive.save_frame(frame))
        store.insert([row])
        store.mark(row.frame_key, mark, epoch=epoch)
    fb = collect_feedback(store, archive.root)
    assert len(fb.good) == len(set(fb.good)) == 2 and len(fb.defects) == 1
    assert all(p.is_file() for p in (*fb.good, *fb.defects))
    assert fb.missing == {"good": [], "defect": []}
    store.close()


def test_store_filters_by_camera_model_and_time(store: HistoryStore) -> None:
    evs = [
        event(i, "pass", camera="a" if i % 2 else "b", model="m-2" if i > 5 else "m-1")
        for i in range(10)
    ]
    store.insert([row_from_event(e) for e in evs])
    assert {r.camera for r in store.query(camera="a")} == {"a"}
    assert len(store.query(model="m-2")) == 4
    t_mid = evs[5].t_capture
    assert all(r.t_capture >= t_mid for r in store.query(since=t_mid))
    assert store.counts(until=evs[0].t_capture) == {}


def test_pages_follow_capture_time_then_frame_key_in_both_directions(store: HistoryStore) -> None:
    """Exports page by (capture time, frame key); rows sharing a capture time must neither
    repeat nor go missing across a page boundary."""
    evs = [event(i, "pass") for i in range(103)]
    rows = [row_from_event(e) for e in evs]
    rows = [type(r)(**{**r.to_json(), "contributions": "{}", "t_capture": float(i // 7)})
            for i, r in enumerate(rows)]  # fmt: skip
    store.insert(rows)
    for newest_first in (False, True):
        whole = [r.frame_key for r in store.iter_rows(newest_first=newest_first, page=1000)]
        paged = [r.frame_key for r in store.iter_rows(newest_first=newest_first, page=10)]
        assert paged == whole and len(set(whole)) == 103
        some = store.iter_rows(newest_first=newest_first, page=10, limit=25, since=3.0)
        assert [r.frame_key for r in some] == [k for k in whole if int(k[-9:]) // 7 >= 3][:25]
    assert [r.seq for r in store.iter_rows(page=10)][:8] == list(range(8))


def test_export_formats_hold_the_schema_columns(store: HistoryStore, tmp_path: Path) -> None:
    import jsonschema
    import pyarrow.parquet as pq

    rows = [row_from_event(event(i)) for i in range(12)]
    store.insert(rows)
    store.mark(rows[2].frame_key, "good")
    assert export_rows(store.iter_rows(page=5), tmp_path / "h.csv") == 12
    with (tmp_path / "h.csv").open() as fh:
        table = list(csv.DictReader(fh))
    assert tuple(table[0]) == COLUMNS and table[2]["mark"] == "good"
    assert export_rows(store.iter_rows(), tmp_path / "h.parquet") == 12
    pt = pq.read_table(tmp_path / "h.parquet")
    assert tuple(pt.column_names) == COLUMNS
    assert pt.schema.metadata[b"lineguard.schema"] == b"lineguard/history-v2"
    assert pt.column("seq").to_pylist() == list(range(12))
    assert export_rows(store.iter_rows(), tmp_path / "h.jsonl") == 12
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    lines = (tmp_path / "h.jsonl").read_text().splitlines()
    for line in lines:
        jsonschema.validate(json.loads(line), schema)
    assert set(schema["properties"]) == set(COLUMNS)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**json.loads(lines[0]), "verdict": "maybe"}, schema)


# ------------------------------------------------------------------------------ the worker


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_worker_keeps_each_event_once_and_counts_match_the_stream(
    db: str, bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    if db == "postgresql" and (problem := pg_problem()):
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({problem})")
    settings = settings_for(
        bus, redis_url, tmp_path, PG_URL if db == "postgresql" else None,
        **{"history.table_prefix": prefix(), "history.batch": 64},
    )  # fmt: skip
    store = HistoryStore.from_settings(settings.history)
    evs = [event(i) for i in range(400)]
    push(bus, evs[:200])
    push(bus, evs[50:60])  # duplicates on the stream (a retried EXEC upstream)
    bus.client.xadd(bus.key("events"), {ENTRY_FIELD: b"\x81\xa1v\x63"})  # not a valid event
    try:
        with Worker(settings, store) as w:
            push(bus, evs[200:])
            wait_until(lambda: history_lag(bus, settings) == 0 and store.count() >= 400, 30, "rows")
            wait_until(lambda: any(h.get("stage") == "history" for h in health_report(bus)), 5)
            assert w.stage.counts["dead"] == 1 and w.stage.counts["duplicates"] == 10
        check = HistoryStore.from_settings(settings.history)
        assert check.counts() == dict(stream_counts(bus))
        assert check.count() == 400
        check.close()
    finally:
        store.drop()
        store.close()


class AckDies(Bus):
    """A bus whose process dies (KeyboardInterrupt) on its first ack: between commit and ack."""

    died = False

    def ack(self, stream: Any, group: str, ids: Any) -> int:
        if not AckDies.died:
            AckDies.died = True
            raise KeyboardInterrupt("killed between the commit and the ack")
        return super().ack(stream, group, ids)


def test_death_between_commit_and_ack_writes_nothing_twice(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(bus, redis_url, tmp_path, None)
    push(bus, [event(i) for i in range(30)])
    client = connect(settings)
    dying = AckDies.from_settings(client, settings)
    assert isinstance(dying, AckDies)
    stage = HistoryStage(dying, settings, consumer="c1")
    stage.setup()
    with pytest.raises(KeyboardInterrupt):
        stage.step()
    assert stage.store.count() == 30  # committed ...
    assert bus.group_stats("events", "history").pending == 30  # ... but not acknowledged
    stage.teardown()
    again = HistoryStage(Bus.from_settings(client, settings), settings, consumer="c1")
    again.setup()
    assert again.step() == 30  # replayed from its own pending list
    assert again.counts == {**again.counts, "written": 0, "duplicates": 30}
    assert again.store.count() == 30 and bus.group_stats("events", "history").pending == 0
    again.teardown()
    client.close()


def start_worker(env: dict[str, str], consumer: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lineguard.stream.cli", "--log-format", "json"]
    cmd += ["history-worker", "--consumer", consumer]
    return subprocess.Popen(cmd, env=env, cwd=ROOT, stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_sigkilled_worker_process_loses_and_doubles_nothing(
    db: str, bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    """A real process killed while it writes (whatever it held read but uncommitted, or
    committed but unacknowledged, is replayed by its successor under the same name); the
    exact commit-then-die case is ``test_death_between_commit_and_ack_...``."""
    if db == "postgresql" and (problem := pg_problem()):
        pytest.skip(f"PostgreSQL at {PG_URL} is unreachable ({problem})")
    url = PG_URL if db == "postgresql" else None
    table = prefix()
    settings = settings_for(bus, redis_url, tmp_path, url, **{"history.table_prefix": table})
    env = {
        **os.environ,
        "LINEGUARD_REDIS__URL": redis_url,
        "LINEGUARD_REDIS__KEY_PREFIX": bus.prefix,
        "LINEGUARD_LINE__ID": bus.line,
        "LINEGUARD_HISTORY__DIR": str(tmp_path / "history"),
        "LINEGUARD_HISTORY__TABLE_PREFIX": table,
        "LINEGUARD_HISTORY__BATCH": "50",
        "LINEGUARD_HISTORY__MAX_DELAY_MS": "5",
    }
    if url:
        env["LINEGUARD_HISTORY__URL"] = url
    else:
        env.pop("LINEGUARD_HISTORY__URL", None)
    store = HistoryStore.from_settings(settings.history)
    total = 3000
    proc = start_worker(env, "proc-1")
    try:
        fed = 0
        while fed < total:  # feed while the worker writes; kill it mid-stream
            push(bus, [event(i) for i in range(fed, fed + 250)])
            fed += 250
            if fed == 1500:
                wait_until(lambda: store.count() > 0, 30, "rows")
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                assert 0 < store.count() < total  # mid-run: half the events are still to come
                proc = start_worker(env, "proc-1")
        wait_until(lambda: store.count() >= total and history_lag(bus, settings) == 0, 60, "all")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert proc.returncode == 0  # SIGTERM drains and exits cleanly
    try:
        assert store.count() == total
        assert store.counts() == dict(stream_counts(bus))
    finally:
        store.drop()
        store.close()


def test_sqlite_locked_for_a_while_then_catches_up(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    """SQLite's downtime: another process holds an exclusive lock on the file."""
    settings = settings_for(bus, redis_url, tmp_path, None, **{"history.retry_max_s": 0.2})
    store = HistoryStore(None, directory=settings.history.dir, connect_timeout_s=0.1)
    push(bus, [event(i) for i in range(100)])
    with Worker(settings, store) as w:
        wait_until(lambda: store.count() == 100, 20, "first rows")
        locker = sqlite3.connect(str(store.path), timeout=5)
        locker.execute("BEGIN EXCLUSIVE")
        push(bus, [event(i) for i in range(100, 400)])
        wait_until(lambda: w.stage.db_ok is False, 10, "the worker to see the lock")
        time.sleep(0.5)
        assert history_lag(bus, settings) == 300  # all of it waits in Redis, none acked
        locker.rollback()
        locker.close()
        wait_until(lambda: history_lag(bus, settings) == 0, 20, "catch-up")
        assert w.stage.db_ok is True and w.stage.counts["db_failures"] >= 1
    assert store.count() == 400 and store.counts() == dict(stream_counts(bus))


def test_postgresql_stopped_and_restarted_loses_nothing(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    """A real outage: a private PostgreSQL on a free port, stopped like a crash, restarted."""
    problem = pgserver.unavailable_reason()
    if problem:
        pytest.skip(f"no throwaway PostgreSQL: {problem}")
    with pgserver.ThrowawayPostgres() as pg:
        settings = settings_for(bus, redis_url, tmp_path, pg.url, **{"history.retry_max_s": 0.3})
        store = HistoryStore.from_settings(settings.history)
        push(bus, [event(i) for i in range(200)])
        with Worker(settings) as w:
            wait_until(lambda: history_lag(bus, settings) == 0, 20, "first rows")
            pg.stop("immediate")
            push(bus, [event(i) for i in range(200, 700)])
            wait_until(lambda: w.stage.db_ok is False, 10, "the worker to notice")
            with pytest.raises(HistoryUnavailable):
                store.count()
            assert history_lag(bus, settings) == 500
            pg.start()
            wait_until(lambda: history_lag(bus, settings) == 0, 30, "catch-up")
        assert store.count() == 700 and store.counts() == dict(stream_counts(bus))
        store.close()


def test_rejects_pictures_are_saved_and_pruned(bus: Bus, redis_url: str, tmp_path: Path) -> None:
    settings = settings_for(bus, redis_url, tmp_path, None)
    img = np.full((32, 32, 3), 90, np.uint8)
    frame = make_frame("line1", "cam0", 7, img, encoding="png", t_capture=time.time())
    bus.client.xadd(bus.key("frames"), {ENTRY_FIELD: encode(frame)})
    from lineguard.stream.protocol import Scores

    amap = LowResMap.from_float(np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8))
    sc = Scores("line1", "cam0", 7, frame.t_capture, {"lgst": 3.0}, "m-1", amap=amap)
    bus.client.xadd(bus.key("scores"), {ENTRY_FIELD: encode(sc)})
    ev = Event("line1", "cam0", 7, "fail", 3.0, 1.0, {"lgst": 3.0}, "m-1", {"total": 0.01}, "",
               frame.t_capture, time.time())  # fmt: skip
    push(bus, [ev, event(8, "pass")])
    client = connect(settings)
    stage = HistoryStage(Bus.from_settings(client, settings), settings, consumer="p")
    stage.setup()
    assert stage.step() == 2
    row = stage.store.get(ev.key)
    assert row is not None and row.image and row.map and stage.store.get(event(8).key).image is None
    archive = ImageArchive(settings.history.dir / "images", max_days=1, max_bytes=10**9)
    saved = cv2.imread(str(archive.path(row.image)))
    assert saved is not None and saved.shape == (32, 32, 3)
    assert cv2.imread(str(archive.path(row.map)), cv2.IMREAD_GRAYSCALE).shape == (8, 8)
    with pytest.raises(ValueError):
        archive.path("../../etc/passwd")
    # retention: by age, then by bytes (oldest first)
    for i in range(5):
        p = archive.root / "cam0" / "20260101" / f"{i:09d}.jpg"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * 1000)
        os.utime(p, (time.time() - 3600 * (i + 1),) * 2)
    old = archive.root / "cam0" / "20250101" / "000000001.jpg"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"y")
    os.utime(old, (time.time() - 3 * 86400,) * 2)
    capped = ImageArchive(
        archive.root, max_days=1, max_bytes=2500 + archive.prune().kept_bytes - 5000
    )
    result = capped.prune()
    assert not old.exists() and not old.parent.exists()
    assert result.kept_bytes <= capped.max_bytes
    assert (archive.root / "cam0" / "20260101" / "000000000.jpg").exists()  # newest kept
    assert not (archive.root / "cam0" / "20260101" / "000000004.jpg").exists()
    stage.teardown()
    client.close()


# ------------------------------------------------------------------------------ the CLI


def test_feedback_and_history_commands(tmp_path: Path) -> None:
    hdir = tmp_path / "h"
    store = HistoryStore(None, directory=hdir)
    store.insert([row_from_event(event(i)) for i in range(14)])
    runner = CliRunner()
    env = {"LINEGUARD_HISTORY__DIR": str(hdir)}
    r = runner.invoke(app, ["feedback", "line1/cam0/2", "--good", "--note", "dust"], env=env)
    assert r.exit_code == 0, r.output
    assert "line1/cam0/000000002 marked good part" in r.output
    r = runner.invoke(app, ["feedback", "line1/cam0/77", "--defect"], env=env)
    assert r.exit_code == 0 and "no verdict row" in r.output
    # after Redis lost its data the key comes again; --epoch picks the older verdict
    store.insert([row_from_event(event(3, "fail", epoch="e9", t=time.time() + 5))])
    r = runner.invoke(app, ["feedback", "line1/cam0/3", "--defect"], env=env)
    assert r.exit_code == 0 and store.get("line1/cam0/000000003", "e9").mark == "defect"  # type: ignore[union-attr]
    r = runner.invoke(app, ["feedback", "line1/cam0/3", "--good", "--epoch", ""], env=env)
    assert r.exit_code == 0 and store.get("line1/cam0/000000003", "").mark == "good"  # type: ignore[union-attr]
    r = runner.invoke(app, ["feedback", "line1/cam0/3", "--good", "--epoch", "nope"], env=env)
    assert r.exit_code != 0 and "no verdict" in r.output
    assert runner.invoke(app, ["feedback", "nonsense", "--good"], env=env).exit_code != 0
    assert (
        runner.invoke(app, ["feedback", "line1/cam0/2", "--good", "--defect"], env=env).exit_code
        != 0
    )
    r = runner.invoke(app, ["history", "--verdict", "fail", "--format", "json"], env=env)
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["counts"]["total"] == 15 and data["counts"]["fail"] == 3
    assert data["reject_rate"] == pytest.approx(3 / 15)
    assert [row["seq"] for row in data["rows"]] == [3, 9, 2] and data["rows"][2]["mark"] == "good"
    r = runner.invoke(
        app, ["history", "--mark", "good", "--export", str(tmp_path / "g.csv")], env=env
    )
    assert r.exit_code == 0, r.output
    assert len((tmp_path / "g.csv").read_text().splitlines()) == 3
    r = runner.invoke(app, ["history", "--since", "1h"], env=env)
    assert r.exit_code == 0 and "15 verdicts in range" in r.output
    assert runner.invoke(app, ["history", "--since", "yesterday-ish"], env=env).exit_code != 0
    assert (
        runner.invoke(app, ["history", "--export", str(tmp_path / "x.xlsx")], env=env).exit_code
        != 0
    )
    store.close()
    nowhere = {"LINEGUARD_HISTORY__DIR": str(tmp_path / "typo")}
    r = runner.invoke(app, ["history"], env=nowhere)
    assert r.exit_code == 1 and "no history in" in r.output
    assert runner.invoke(app, ["feedback", "line1/cam0/2", "--good"], env=nowhere).exit_code == 1
    assert not (tmp_path / "typo").exists()  # refused, not created


def test_health_shows_the_history_worker_and_its_backlog(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    settings = settings_for(bus, redis_url, tmp_path, None)
    env = {
        "LINEGUARD_REDIS__URL": redis_url,
        "LINEGUARD_REDIS__KEY_PREFIX": bus.prefix,
        "LINEGUARD_LINE__ID": bus.line,
    }
    runner = CliRunner()
    r = runner.invoke(app, ["health", "--stage", "history", "--format", "json"], env=env)
    assert r.exit_code == 1 and json.loads(r.output.splitlines()[0])["missing"] == ["history"]
    push(bus, [event(i) for i in range(20)])
    with Worker(settings):
        wait_until(lambda: history_lag(bus, settings) == 0, 20, "rows")

        def beat_written() -> int:
            beats = [h for h in health_report(bus) if h.get("stage") == "history"]
            return int(beats[0]["counts"]["written"]) if beats else -1

        wait_until(lambda: beat_written() == 20, 5, "a heartbeat after the commit")
        r = runner.invoke(app, ["health", "--stage", "history", "--format", "json"], env=env)
        assert r.exit_code == 0, r.output
        report = json.loads(r.output)
        assert report["queues"]["events"]["group"] == "history"
        assert report["queues"]["events"]["lag"] == 0
        worker = next(w for w in report["workers"] if w["stage"] == "history")
        assert worker["db"] == "up" and worker["counts"]["written"] == 20


def test_a_real_line_fills_the_history_with_pictures_of_its_rejects(
    bus: Bus, redis_url: str, tmp_path: Path
) -> None:
    """ingest → infer (with maps) → decide → history, all real: every verdict kept, each
    reject with its frame and anomaly map on disk."""
    from lineguard.stream.run import LocalPipeline
    from lineguard.stream.tools.replay import replay
    from tests.stream.pipeline_helpers import SIZE, split_bundle, write_folder
    from tests.stream.pipeline_helpers import settings_for as line_settings

    base = line_settings(bus, redis_url)
    settings = base.model_copy(
        update={
            "history": base.history.model_copy(
                update={"dir": tmp_path / "history", "max_delay_ms": 20, "block_ms": 200}
            )
        }
    )
    labels = write_folder(tmp_path / "frames", lambda i: i % 4 == 1, 16)
    split = split_bundle()
    with (
        LocalPipeline(settings, redis_url, split.path, runtime="onnxruntime", maps=True),
        Worker(settings) as w,
    ):
        summary = replay(settings, str(tmp_path / "frames"), size=SIZE, timeout_s=60)
        assert summary.ok, summary.to_json()
        wait_until(lambda: w.stage.store.count() == 16, 20, "all verdicts in the history")
    store = HistoryStore.from_settings(settings.history)
    assert store.counts() == dict(stream_counts(bus)) == {"pass": 12, "fail": 4}
    archive = ImageArchive(settings.history.dir / "images", max_days=1, max_bytes=1 << 30)
    fails = store.query(verdict="fail")
    assert [r.seq for r in fails] == [i for i, bad in enumerate(labels) if bad]
    for r in fails:
        assert r.image and r.map and r.model == split.version and r.score is not None
        assert archive.path(r.image).is_file() and archive.path(r.map).is_file()
        assert set(json.loads(r.contributions)) == set(split.calibration.branches)
    store.close()


@pytest.mark.parametrize("encoding", ["jpeg", "png", "raw"])
def test_a_saved_reject_reads_back_as_the_pixels_infer_scored(
    tmp_path: Path, encoding: str
) -> None:
    """``refit --feedback`` reads archived frames with ``load_image`` and no codec: that must
    give exactly the pixels infer decoded from the frame, or the bank learns other images."""
    import cv2
    import numpy as np

    from lineguard.offline.datasets import load_image
    from lineguard.stream.history.archive import ImageArchive
    from lineguard.stream.protocol import decode_image, make_frame

    rng = np.random.default_rng(0)
    low = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
    image = cv2.resize(low, (48, 32), interpolation=cv2.INTER_CUBIC)
    frame = make_frame("l1", "cam0", 7, image, encoding=encoding, t_capture=1.0)  # type: ignore[arg-type]
    archive = ImageArchive(tmp_path / "images", max_days=1, max_bytes=1 << 20)
    rel = archive.save_frame(frame)
    assert rel is not None
    scored = decode_image(frame)
    np.testing.assert_array_equal(load_image(archive.path(rel), scored.shape[:2]), scored)
