"""The history worker: every event of the line into the history, exactly once.

A consumer group (``history``) on the events stream, driven by ``run_worker`` like the other
stages (so it heartbeats and shows in ``lineguard health``). One step reads a batch, turns
the events into rows, saves the rejects' pictures, inserts the rows in one transaction and
only then acknowledges the entries. The insert skips (frame key, epoch) pairs already
stored, so every way an event can come twice is harmless: a crash between commit and ack
(the entries are replayed from this consumer's pending list on restart, or reclaimed by a
peer), a retried ack, a duplicate on the stream. A crash before the commit leaves the
entries pending: nothing lost. The epoch (carried by every event, see ``Bus.ensure_epoch``)
keeps a frame numbered again after Redis lost its data from passing for a duplicate of the
old frame with its key.

While the database is down the batch is held, unacknowledged, and the insert is retried with
a capped backoff; nothing new is read meanwhile, so the backlog waits in Redis (the events
stream keeps ``LINEGUARD_DECIDE__EVENTS_MAX_LEN`` entries: an outage longer than that many
events loses the oldest, which are counted as ``trimmed``). The line itself never waits: infer
and decide do not know this group exists.
"""

from __future__ import annotations

import time
from typing import Any

import redis
import structlog

from lineguard.stream.bus import Bus, Entry, consumer_name
from lineguard.stream.history.archive import ImageArchive
from lineguard.stream.history.rows import HistoryRow, row_from_event
from lineguard.stream.history.store import HistoryStore, HistoryUnavailable
from lineguard.stream.lookup import find_frame, find_scores, queued_at
from lineguard.stream.metrics import get_metrics, observe_queue
from lineguard.stream.protocol import Event, ProtocolError, decode_event
from lineguard.stream.settings import Settings
from lineguard.stream.worker import Reclaimer

log = structlog.get_logger("lineguard.history")

PRUNE_EVERY_S = 60.0


class HistoryStage:
    """``run_worker`` stage for the history consumer group (see the module docstring)."""

    name = "history"

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        *,
        consumer: str | None = None,
        store: HistoryStore | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.cfg = settings.history
        self.consumer = consumer_name(consumer)
        self.store = store or HistoryStore.from_settings(self.cfg)
        self.archive = (
            ImageArchive(
                self.cfg.dir / "images",
                max_days=self.cfg.image_days,
                max_bytes=self.cfg.image_max_bytes,
            )
            if self.cfg.images
            else None
        )
        self.reader = bus.reader("events", self.cfg.group, self.consumer)
        self.metrics = get_metrics()
        self.counts: dict[str, int] = {
            "read": 0,
            "written": 0,
            "duplicates": 0,
            "dead": 0,
            "images": 0,
            "db_failures": 0,
        }
        self.reclaimer = Reclaimer(
            bus,
            "events",
            self.cfg.group,
            self.consumer,
            stage="history",
            min_idle_ms=self.cfg.reclaim_idle_ms,
            count=self.cfg.batch,
            every_s=min(self.cfg.reclaim_idle_ms / 2000, 5.0),
            counts=self.counts,
        )
        self._held_ids: list[str] = []
        self._held_rows: list[HistoryRow] = []
        self._retry_at = 0.0
        self._backoff = 0.1
        self.db_ok: bool | None = None
        self.down_since: float | None = None
        self._next_prune = 0.0

    # lifecycle ---------------------------------------------------------------------

    def setup(self) -> None:
        # from the start of the stream: the history wants every verdict the stream still has
        self.bus.ensure_group("events", self.cfg.group, start_id="0")
        try:
            self.store.count()
            self._db_up()
        except HistoryUnavailable as exc:
            self._db_down(exc)
        self.reclaimer.rest()

    def teardown(self) -> None:
        self.store.close()

    def recover(self) -> None:
        """After a Redis failure: replay this consumer's unacknowledged entries (a batch held
        for the database stays held; its entries are still pending either way)."""
        if not self._held_ids:
            self.reader.rewind()

    def done(self) -> bool:
        if self._held_ids:
            return False
        st = self.bus.group_stats("events", self.cfg.group)
        return st is None or (st.pending == 0 and (st.lag or 0) == 0)

    def status(self) -> dict[str, Any]:
        observe_queue(self.bus, self.metrics, "events", self.cfg.group)
        return {
            "history": self.store.where,
            "db": None if self.db_ok is None else ("up" if self.db_ok else "down"),
            "held": len(self._held_ids),
            "counts": dict(self.counts),
        }

    # one step -----------------------------------------------------------------------

    def step(self) -> int:
        if self._held_ids:
            wait = self._retry_at - time.monotonic()
            if wait > 0:
                time.sleep(min(wait, 0.25))  # short, so the heartbeat and SIGTERM stay live
                return 0
            return self._commit()
        self._maybe_prune()
        entries = self.reclaimer.take() or self.reader.read_batch(
            self.cfg.batch, self.cfg.max_delay_ms, self.cfg.block_ms
        )
        if not entries:
            return 0
        self.counts["read"] += len(entries)
        self.metrics.frames_in.labels("history").inc(len(entries))
        rows: list[HistoryRow] = []
        ids: list[str] = []
        for entry in entries:
            row = self._row(entry)
            if row is not None:
                rows.append(row)
            if row is not None or entry.deleted:
                ids.append(entry.id)
        self._held_ids, self._held_rows = ids, rows
        return self._commit()

    def _row(self, entry: Entry) -> HistoryRow | None:
        """The row of one entry, None for an entry that is gone or was dead-lettered."""
        if entry.deleted:  # trimmed while it was pending here: the verdict is gone for good
            self.counts["trimmed"] += 1
            self.metrics.trimmed.labels("history").inc()
            log.warning(
                "history.event_trimmed",
                entry_id=entry.id,
                note="the events stream dropped it before the history committed it; raise "
                "LINEGUARD_DECIDE__EVENTS_MAX_LEN to ride out longer outages",
            )
            return None
        try:
            ev = decode_event(entry.data, self.bus.limits)
        except ProtocolError as exc:
            self.counts["dead"] += 1
            self.metrics.dead_lettered.labels("history", exc.reason).inc()
            self.bus.dead_letter(
                "events", self.cfg.group, entry.id, entry.fields, exc.reason, detail=str(exc)
            )
            return None
        image = map_path = None
        if ev.verdict == "fail" and self.archive is not None:
            image, map_path = self._save_pictures(ev)
        return row_from_event(ev, image=image, map_path=map_path)

    def _save_pictures(self, ev: Event) -> tuple[str | None, str | None]:
        assert self.archive is not None
        scores = find_scores(self.bus, ev)
        frame = find_frame(self.bus, ev, queued_at(ev, scores))
        image = map_path = None
        try:
            if frame is not None:
                image = self.archive.save_frame(frame, self.bus.limits)
            if scores is not None and scores.amap is not None:
                map_path = self.archive.save_map(
                    ev.camera, ev.seq, ev.t_capture, scores.amap, epoch=ev.epoch
                )
        except OSError as exc:  # a full disk must not stop the verdicts being kept
            log.warning("history.image_failed", key=ev.key, error=str(exc))
        self.counts["images"] += int(image is not None) + int(map_path is not None)
        return image, map_path

    def _commit(self) -> int:
        rows, ids = self._held_rows, self._held_ids
        try:
            new = self.store.insert(rows)
        except HistoryUnavailable as exc:
            self._db_down(exc)
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, self.cfg.retry_max_s)
            return 0
        self._db_up()
        self.bus.ack("events", self.cfg.group, ids)
        self.counts["written"] += new
        self.counts["duplicates"] += len(rows) - new
        self.metrics.frames_out.labels("history").inc(new)
        if len(rows) > new:
            self.metrics.duplicates.labels("history").inc(len(rows) - new)
        self._held_ids, self._held_rows = [], []
        return len(ids)

    def _db_down(self, exc: HistoryUnavailable) -> None:
        self.counts["db_failures"] += 1
        self.metrics.output_errors.labels("history").inc()
        if self.db_ok is not False:
            self.down_since = time.time()
            log.warning("history.db_unavailable", error=str(exc), held=len(self._held_ids))
        self.db_ok = False

    def _db_up(self) -> None:
        if self.db_ok is False:
            log.info(
                "history.db_back",
                down_s=round(time.time() - (self.down_since or time.time()), 1),
            )
        self.db_ok = True
        self.down_since = None
        self._backoff = 0.1

    def _maybe_prune(self) -> None:
        if self.archive is None:
            return
        now = time.monotonic()
        if now < self._next_prune and not self.archive.due():
            return
        self._next_prune = now + PRUNE_EVERY_S
        try:
            self.archive.prune()
        except OSError as exc:
            log.warning("history.prune_failed", error=str(exc))


def history_lag(bus: Bus, settings: Settings) -> int | None:
    """Events the history has not committed yet: undelivered plus held (pending)."""
    try:
        st = bus.group_stats("events", settings.history.group)
    except redis.RedisError:
        return None
    if st is None:
        return None
    return (st.lag or 0) + st.pending
