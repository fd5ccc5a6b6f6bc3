"""``lineguard bench history``: what the verdict history sustains, and how it rides out an
outage of its database.

Two phases on one line, with the history worker of ``stream.history.worker`` in a thread of
this process (its own Redis client, like a process of its own):

1. **Throughput**: ``rows`` events are put on the events stream first, then the worker is
   started and timed until it has committed them all (rows per second, batches of
   ``LINEGUARD_HISTORY__BATCH``). Events carry no reject pictures here: this measures the
   database path.
2. **Outage**: events arrive at ``rate`` per second; after ``before_s`` the database goes away
   for ``outage_s`` — a throwaway PostgreSQL server stopped like a crash (``pg_ctl stop -m
   immediate``) and started again, or for SQLite another connection holding an exclusive
   lock on the file — and the feed goes on. Reported: the lag (events not yet committed)
   when the database comes back, how long the worker took to catch up to the live feed, and
   whether the history then holds exactly the stream's verdicts (per verdict, and no key
   missing).
"""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lineguard.stream.bus import Bus, connect
from lineguard.stream.history.store import HistoryStore
from lineguard.stream.history.worker import HistoryStage, history_lag
from lineguard.stream.protocol import ENTRY_FIELD, Event, decode_event, encode
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings
from lineguard.stream.tools.harness import delete_prefix
from lineguard.stream.worker import StopFlag, run_worker

_CYCLE = ("pass",) * 18 + ("fail", "uninspected")


def _event(line: str, seq: int) -> Event:
    t = time.time()
    v = _CYCLE[seq % len(_CYCLE)]
    judged = v in ("pass", "fail")
    return Event(
        line, "cam0", seq, v,  # type: ignore[arg-type]
        (2.0 if v == "fail" else 0.3) if judged else None, 1.0 if judged else None,
        {"patch_hist": 0.1, "lgst": 0.2, "patch_knn": 0.3} if judged else {}, "bench-model",
        {"total": 0.02}, "" if judged else "frame never reached decide", t, t,
    )  # fmt: skip


def _push(bus: Bus, first: int, n: int) -> None:
    pipe = bus.client.pipeline(transaction=False)
    for seq in range(first, first + n):
        pipe.xadd(bus.key("events"), {ENTRY_FIELD: encode(_event(bus.line, seq))})
    pipe.execute()


def _stream_counts(bus: Bus) -> tuple[Counter[str], set[str]]:
    """Verdicts per frame key on the events stream, in pages."""
    seen: dict[str, str] = {}
    start = "-"
    while True:
        rows: Any = bus.client.xrange(bus.key("events"), min=start, count=5000)
        if not rows:
            break
        for _id, fields in rows:
            ev = decode_event(fields[ENTRY_FIELD], bus.limits)
            seen.setdefault(ev.key, ev.verdict)
        start = "(" + rows[-1][0].decode()
    return Counter(seen.values()), set(seen)


class _Worker:
    def __init__(self, settings: Settings, url: str) -> None:
        self.client = connect(settings, url)
        self.bus = Bus.from_settings(self.client, settings)
        self.stage = HistoryStage(self.bus, settings, consumer="bench-history")
        self.stop = StopFlag()
        self.thread = threading.Thread(
            target=run_worker,
            args=(self.stage, self.bus),
            kwargs={"stop": self.stop, "handle_signals": False},
            daemon=True,
        )

    def __enter__(self) -> _Worker:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        self.client.close()


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def history_bench(
    settings: Settings,
    *,
    backend: str,
    pg_url: str | None = None,
    rows: int = 20_000,
    rate: float = 50.0,
    before_s: float = 5.0,
    outage_s: float = 60.0,
    after_s: float = 10.0,
    work_dir: Path = Path(".lineguard/bench-history"),
    say: Callable[[str], None] = lambda _m: None,
) -> dict[str, Any]:
    """Run both phases for ``backend`` (``sqlite`` or ``postgresql``) and return the figures.

    ``pg_url`` is used for the throughput phase (default: a throwaway server, as for the
    outage, which always needs one it may stop)."""
    from lineguard.stream.tools import pgserver

    pg = None
    if backend == "postgresql":
        pg = pgserver.ThrowawayPostgres().start()
    try:
        result: dict[str, Any] = {"backend": backend}
        with redis_url_for(settings) as url:
            for phase in ("throughput", "outage"):
                prefix = f"lineguard-bench-history-{uuid.uuid4().hex[:8]}"
                table = f"bench_{uuid.uuid4().hex[:8]}"
                h_url = None
                if backend == "postgresql":
                    assert pg is not None
                    h_url = pg_url if (phase == "throughput" and pg_url) else pg.url
                hdir = work_dir / f"{phase}-{uuid.uuid4().hex[:6]}"
                s = settings.model_copy(
                    update={
                        "redis": settings.redis.model_copy(
                            update={"url": url, "key_prefix": prefix}
                        ),
                        "history": settings.history.model_copy(
                            update={
                                "url": h_url,
                                "dir": hdir,
                                "table_prefix": table,
                                "images": False,
                                "retry_max_s": 1.0,
                            }
                        ),
                    }
                )
                store = HistoryStore.from_settings(s.history)
                client = connect(s, url)
                bus = Bus.from_settings(client, s)
                try:
                    if phase == "throughput":
                        result["throughput"] = _throughput(s, url, bus, store, rows, say)
                    else:
                        result["outage"] = _outage(
                            s, url, bus, store, pg, rate, before_s, outage_s, after_s, say
                        )
                finally:
                    try:
                        store.drop()
                    finally:
                        store.close()
                    delete_prefix(client, prefix)
                    client.close()
                    shutil.rmtree(hdir, ignore_errors=True)
        return result
    finally:
        if pg is not None:
            pg.close()


def _throughput(
    s: Settings, url: str, bus: Bus, store: HistoryStore, rows: int, say: Callable[[str], None]
) -> dict[str, Any]:
    for first in range(0, rows, 2000):
        _push(bus, first, min(2000, rows - first))
    say(f"throughput: {rows} events queued; starting the worker")
    t0 = time.perf_counter()
    with _Worker(s, url):
        ok = _wait(lambda: history_lag(bus, s) == 0, 600)
        elapsed = time.perf_counter() - t0
    stored = store.count()
    return {
        "history": store.where,
        "rows": rows,
        "stored": stored,
        "seconds": round(elapsed, 3),
        "rows_per_s": round(stored / elapsed, 1),
        "batch": s.history.batch,
        "ok": ok and stored == rows,
    }


def _outage(
    s: Settings,
    url: str,
    bus: Bus,
    store: HistoryStore,
    pg: Any,
    rate: float,
    before_s: float,
    outage_s: float,
    after_s: float,
    say: Callable[[str], None],
) -> dict[str, Any]:
    seq = 0
    lock: sqlite3.Connection | None = None
    marks: dict[str, float] = {}
    max_lag = 0
    lag_at_return: int | None = None
    caught_up_s: float | None = None
    t_start = time.monotonic()
    total_s = before_s + outage_s + after_s
    with _Worker(s, url) as w:
        next_t = t_start
        while True:
            now = time.monotonic()
            el = now - t_start
            if el >= total_s and caught_up_s is not None:
                break
            if el >= total_s + 600:
                break  # never caught up: reported as such
            if el < total_s:
                due = int(el * rate) - seq
                if due > 0:
                    _push(bus, seq, due)
                    seq += due
            if "down" not in marks and el >= before_s:
                say(f"outage: database down for {outage_s:g} s (feed goes on at {rate:g}/s)")
                if pg is not None:
                    pg.stop("immediate")
                else:
                    assert store.path is not None
                    lock = sqlite3.connect(str(store.path), timeout=10)
                    lock.execute("BEGIN EXCLUSIVE")
                marks["down"] = el
            if "down" in marks and "up" not in marks and el >= before_s + outage_s:
                lag_at_return = history_lag(bus, s)
                if pg is not None:
                    pg.start()
                elif lock is not None:
                    lock.rollback()
                    lock.close()
                marks["up"] = time.monotonic() - t_start
                say(f"outage: database back; lag {lag_at_return} events")
            lag = history_lag(bus, s) or 0
            max_lag = max(max_lag, lag)
            if "up" in marks and caught_up_s is None and w.stage.db_ok and lag <= max(1, rate):
                caught_up_s = (time.monotonic() - t_start) - marks["up"]
            next_t += 0.05
            time.sleep(max(0.0, next_t - time.monotonic()))
        _wait(lambda: history_lag(bus, s) == 0, 60)
        failures = w.stage.counts["db_failures"]
    counts, keys = _stream_counts(bus)
    stored = store.counts()
    stored_keys = {r.frame_key for r in store.iter_rows()}
    return {
        "history": store.where,
        "rate_per_s": rate,
        "outage_s": outage_s,
        "method": "pg_ctl stop -m immediate / start"
        if pg is not None
        else "exclusive lock on the file",
        "events": seq,
        "lag_when_back": lag_at_return,
        "max_lag": max_lag,
        "catch_up_s": None if caught_up_s is None else round(caught_up_s, 2),
        "db_failures_seen": failures,
        "stream_counts": dict(counts),
        "history_counts": stored,
        "missing": len(keys - stored_keys),
        "extra": len(stored_keys - keys),
        "ok": dict(counts) == stored and keys == stored_keys,
    }
