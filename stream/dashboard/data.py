"""What the dashboard knows about a line, read from the bus and nothing else.

``LineView`` follows the events stream with plain XREAD/XRANGE/XREVRANGE from its own cursor
(never a consumer group, never an ack), looks at the group counters with XINFO, and fetches
the scores and frames of the newest rejects by entry-id range. So the page is a bystander:
whether it is open, closed or slow, infer and decide never wait for it, and it can never
take an entry away from them.

One background thread does all the reading, ``tick_s`` apart, and publishes an immutable
snapshot (a dict and its JSON bytes) that every HTTP request and SSE stream shares; the cost
of the dashboard does not grow with the number of people looking at it.

Where the frames stream has already trimmed a reject's frame (it is bounded by MAXLEN), the
reject is shown with its map and segmentation, and ``frame: false`` tells the page to say
"frame no longer available".

With a verdict history (``history``), the shift's counts and reject rate come from it (every
verdict since the shift began, however many the capped events stream still holds), the
gallery shows each reject's operator mark, and ``mark()`` records a new one. The history is
read in the same background thread every ``history_every_s``; a history that is down only
blanks the shift panel, with the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import random
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import cv2
import numpy as np
import redis
import structlog

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus, GroupStats
from lineguard.stream.dashboard.images import IMAGE_KINDS, ImageCache, Picture, render_reject
from lineguard.stream.history.store import HistoryStore, HistoryUnavailable
from lineguard.stream.lookup import find_frame, find_scores, queued_at
from lineguard.stream.protocol import (
    ENTRY_FIELD,
    VERDICTS,
    Event,
    Frame,
    ProtocolError,
    Scores,
    decode_event,
    decode_image,
    frame_key,
)
from lineguard.stream.settings import Settings
from lineguard.stream.worker import health_report

log = structlog.get_logger("lineguard.dashboard")

PAYLOAD_VERSION: Final = 1
_GLOB_CHARS: Final = frozenset("*?[")
_TEXT_MAX: Final = 240
_BRANCHES_MAX: Final = 16


@dataclass(frozen=True)
class DashboardConfig:
    """Windows, rates and bounds of the dashboard's reading and of what it sends."""

    window_s: float = 600.0
    """How far back the charts go (and how much history is read at start-up)."""
    bucket_s: float = 5.0
    """Width of one chart point."""
    rate_window_s: float = 60.0
    """The span of the headline rates, throughput and latency percentiles."""
    tick_s: float = 0.5
    """How often the bus is read and a new snapshot published."""
    queue_every_s: float = 1.0
    workers_every_s: float = 5.0
    rediscover_every_s: float = 5.0
    rejects: int = 24
    """Gallery size: the newest rejects kept with their pictures."""
    resolve_per_tick: int = 8
    backfill_max: int = 20_000
    read_count: int = 2_000
    read_budget_s: float = 0.25
    """Stop catching up after this long in one tick, so snapshots keep coming."""
    latency_samples: int = 2_000
    """Latencies kept per chart point (reservoir sample beyond that)."""
    dedup_keys: int = 50_000
    scan_limit: int = 2_000
    """Scores entries looked at, at most, to find one reject's scores."""
    frame_scan_limit: int = 200
    thumb_side: int = 160
    large_side: int = 512
    cache_items: int = 512
    cache_bytes: int = 32 * 1024 * 1024
    history_every_s: float = 5.0
    """How often the shift's counts and the gallery's marks are read from the history."""


def has_glob(pattern: str) -> bool:
    return any(c in pattern for c in _GLOB_CHARS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _ms(entry_id: Any) -> int:
    try:
        return int(_text(entry_id).split("-", 1)[0])
    except ValueError:
        return 0


def _clip(text: str, n: int = _TEXT_MAX) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _num(value: float | None, digits: int = 3) -> float | None:
    """JSON-safe rounding: NaN and infinities become null."""
    if value is None or not math.isfinite(value):
        return None
    return round(float(value), digits)


def shift_start(now: float, starts: tuple[str, ...]) -> float:
    """When the shift running at ``now`` began: the latest of the local ``HH:MM`` starts at
    or before ``now``, today or (before today's first) yesterday."""
    day = dt.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
    best: float | None = None
    for back in (0, 1):
        base = day - dt.timedelta(days=back)
        for item in starts:
            hh, mm = (int(x) for x in item.split(":"))
            t = (base + dt.timedelta(hours=hh, minutes=mm)).timestamp()
            if t <= now and (best is None or t > best):
                best = t
        if best is not None:
            return best
    return now


def discover_prefix(client: redis.Redis, pattern: str, line: str) -> str | None:
    """The key prefix matching ``pattern`` whose frames or events stream of ``line`` was
    written most recently (a plain prefix is returned as it is).

    The demo and ``bench e2e`` give each run its own prefix (``lineguard-demo-<id>``), so
    ``--prefix 'lineguard-demo-*'`` follows whichever run is newest.
    """
    if not has_glob(pattern):
        return pattern
    best: tuple[int, str] | None = None
    for suffix in ("events", "frames"):
        tail = f":{{{line}}}:{suffix}"
        for raw in client.scan_iter(match=f"{pattern}{tail}", count=1000):
            key = _text(raw)
            try:
                rows: Any = client.xrevrange(key, count=1)
            except redis.ResponseError:  # not a stream
                continue
            newest = _ms(rows[0][0]) if rows else 0
            candidate = (newest, key[: -len(tail)])
            if best is None or candidate > best:
                best = candidate
    return None if best is None else best[1]


# ------------------------------------------------------------------------------ aggregates


@dataclass
class _Bucket:
    """One chart point: events, verdicts, a sample of latencies, the worst queue lags."""

    n: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    seen_latencies: int = 0
    lag_frames: int | None = None
    lag_scores: int | None = None
    _stats: tuple[float | None, float | None] | None = None

    def add(self, ev: Event, cap: int, rng: random.Random) -> None:
        self.n += 1
        self.verdicts[ev.verdict] += 1
        total = ev.latency.get("total")
        if total is None or not math.isfinite(total):
            return
        self.seen_latencies += 1
        if len(self.latencies) < cap:
            self.latencies.append(total)
        else:  # reservoir sampling keeps the percentiles honest at any rate
            j = rng.randrange(self.seen_latencies)
            if j < cap:
                self.latencies[j] = total
        self._stats = None

    def percentiles(self) -> tuple[float | None, float | None]:
        if self._stats is None:
            if self.latencies:
                p50, p99 = np.percentile(np.asarray(self.latencies), [50, 99]) * 1000
                self._stats = (float(p50), float(p99))
            else:
                self._stats = (None, None)
        return self._stats


@dataclass
class Reject:
    """A ``fail`` event in the gallery and what the dashboard found for it on the bus."""

    event: Event
    entry_id: str
    resolved: bool = False
    frame: bool = False
    amap: bool = False
    seg: bool = False
    kinds: tuple[str, ...] = ()
    note: str = ""
    mark: str | None = None

    def to_json(self) -> dict[str, Any]:
        ev = self.event
        contributions = dict(list(ev.contributions.items())[:_BRANCHES_MAX])
        return {
            "key": ev.key,
            "camera": ev.camera,
            "seq": ev.seq,
            "id": self.entry_id,
            "t_capture": _num(ev.t_capture),
            "t_event": _num(ev.t_event),
            "score": _num(ev.score, 4),
            "threshold": _num(ev.threshold, 4),
            "contributions": {_clip(k, 64): _num(v, 4) for k, v in contributions.items()},
            "reason": _clip(ev.reason),
            "model": _clip(ev.model, 96),
            "latency_ms": _num(ev.latency.get("total", math.nan) * 1000, 1),
            "resolved": self.resolved,
            "frame": self.frame,
            "map": self.amap,
            "seg": self.seg,
            "images": {k: f"api/image/{ev.camera}/{ev.seq}/{k}" for k in self.kinds},
            "note": self.note,
            "mark": self.mark,
        }


class LineView:
    """The dashboard's picture of one line (see the module docstring).

    ``poll()`` does one round of reading and publishes a snapshot; ``start()`` runs it every
    ``tick_s`` in a daemon thread. ``snapshot()``/``snapshot_json()`` and ``image()`` are
    safe to call from any thread.
    """

    error: str | None
    """What keeps the view from being current (shown on the page); None when all is well."""

    def __init__(
        self,
        client: redis.Redis,
        settings: Settings,
        *,
        prefix: str | None = None,
        line: str | None = None,
        config: DashboardConfig | None = None,
        clock: Callable[[], float] = time.time,
        history: HistoryStore | None = None,
    ) -> None:
        self.client = client
        self.history = history
        self._history_lock = threading.Lock()  # one connection, two threads (view, HTTP)
        self._next_history = 0.0
        self.shift: dict[str, Any] | None = None
        self.marks: dict[str, str] = {}
        self.settings = settings
        self.pattern = prefix or settings.redis.key_prefix
        self.line = line or settings.line.id
        self.cfg = config or DashboardConfig()
        self.clock = clock
        self.cache = ImageCache(self.cfg.cache_items, self.cfg.cache_bytes)
        self.bus: Bus | None = None
        self.version = 0
        self._rng = random.Random(0)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._next_discovery = 0.0
        self._reset(None)
        self._publish()

    # lifecycle ---------------------------------------------------------------------

    def start(self) -> LineView:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dashboard-view", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                self.poll()
            except Exception as exc:  # a bug must not freeze the page: say so, keep going
                log.exception("dashboard.poll_failed")
                self.error = f"dashboard error: {type(exc).__name__}: {_clip(str(exc), 160)}"
                self._publish()
            self._stop.wait(max(0.02, self.cfg.tick_s - (time.monotonic() - t0)))

    def _reset(self, prefix: str | None) -> None:
        self.prefix = prefix
        self.bus = (
            None
            if prefix is None
            else Bus(self.client, line=self.line, prefix=prefix, limits=self.settings.limits)
        )
        self.cursor: str | None = None
        self.since: float | None = None
        self.counts: Counter[str] = Counter()
        self.bad_entries = 0
        self.duplicates = 0
        self.buckets: dict[int, _Bucket] = {}
        # (frame key, epoch): the key alone repeats once Redis lost its data and ingest
        # numbered frames from 0 again, and those verdicts are new, not duplicates
        self.seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.rejects: deque[Reject] = deque(maxlen=max(1, self.cfg.rejects))
        self.queues: dict[str, dict[str, Any] | None] = {}
        self.workers: list[dict[str, Any]] = []
        self.dead = 0
        self.model: str | None = None
        self.models: dict[str, float] = {}
        self.last_event: float | None = None
        self.error = None
        self._next_queue = 0.0
        self._next_workers = 0.0

    # one round ---------------------------------------------------------------------

    def poll(self) -> None:
        """Read what is new on the bus and publish a fresh snapshot (never raises for
        Redis trouble: the snapshot says what is wrong and the next round tries again)."""
        now = self.clock()
        try:
            self._discover(now)
            if self.bus is not None:
                self._read_events(now)
                if now >= self._next_queue:
                    self._next_queue = now + self.cfg.queue_every_s
                    self._read_queues(now)
                if now >= self._next_workers:
                    self._next_workers = now + self.cfg.workers_every_s
                    self._read_workers(now)
                self._resolve_rejects()
                self.error = None
            else:
                self.error = (
                    f"no streams of line {self.line!r} under prefix {self.pattern!r} yet; "
                    "waiting for the pipeline to write"
                )
            if self.history is not None and now >= self._next_history:
                self._next_history = now + self.cfg.history_every_s
                self._read_history(now)
        except (redis.RedisError, OSError) as exc:
            error = f"cannot read the bus: {type(exc).__name__}: {_clip(str(exc), 160)}"
            if error != self.error:  # once per outage, not every tick
                log.warning("dashboard.bus_error", error=error)
            self.error = error
        self._publish(now)

    def _discover(self, now: float) -> None:
        if self.bus is not None and (not has_glob(self.pattern) or now < self._next_discovery):
            return
        self._next_discovery = now + self.cfg.rediscover_every_s
        prefix = discover_prefix(self.client, self.pattern, self.line)
        if prefix is not None and prefix != self.prefix:
            log.info("dashboard.following", prefix=prefix, line=self.line)
            self._reset(prefix)

    def _read_events(self, now: float) -> None:
        assert self.bus is not None
        key = self.bus.key("events")
        if self.cursor is None:
            self._backfill(key, now)
        deadline = time.monotonic() + self.cfg.read_budget_s
        while time.monotonic() < deadline:
            streams: dict[Any, Any] = {key: self.cursor}
            reply: Any = self.client.xread(streams, count=self.cfg.read_count)
            rows = [row for _stream, entries in reply or () for row in entries]
            for entry_id, fields in rows:
                self.cursor = _text(entry_id)
                self._ingest(self.cursor, fields)
            if len(rows) < self.cfg.read_count:
                break
        self._prune(now)

    def _backfill(self, key: str, now: float) -> None:
        """The window's history, newest ``backfill_max`` events at most, then follow."""
        start_ms = int((now - self.cfg.window_s) * 1000)
        rows: Any = self.client.xrevrange(
            key, max="+", min=f"{max(0, start_ms)}-0", count=self.cfg.backfill_max
        )
        self.since = now - self.cfg.window_s
        if rows:
            for entry_id, fields in reversed(rows):
                self._ingest(_text(entry_id), fields)
            self.cursor = _text(rows[0][0])
            if len(rows) >= self.cfg.backfill_max:  # counts start at the oldest one read
                self.since = _ms(rows[-1][0]) / 1000
        else:
            newest: Any = self.client.xrevrange(key, count=1)
            self.cursor = _text(newest[0][0]) if newest else "0-0"

    def _ingest(self, entry_id: str, fields: Any) -> None:
        assert self.bus is not None
        try:
            ev = decode_event(fields.get(ENTRY_FIELD), self.bus.limits)
        except ProtocolError:
            self.bad_entries += 1
            return
        key = (ev.key, ev.epoch)
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen[key] = None
        if len(self.seen) > self.cfg.dedup_keys:
            self.seen.popitem(last=False)
        t = _ms(entry_id) / 1000
        self.counts[ev.verdict] += 1
        self._bucket(t).add(ev, self.cfg.latency_samples, self._rng)
        self.model = ev.model
        self.models[ev.model] = t
        self.last_event = t
        if ev.verdict == "fail":
            self.rejects.append(Reject(ev, entry_id))

    def _bucket(self, t: float) -> _Bucket:
        idx = int(t // self.cfg.bucket_s)
        b = self.buckets.get(idx)
        if b is None:
            b = self.buckets[idx] = _Bucket()
        return b

    def _prune(self, now: float) -> None:
        oldest = int((now - self.cfg.window_s) // self.cfg.bucket_s) - 1
        for idx in [i for i in self.buckets if i < oldest]:
            del self.buckets[idx]
        stale = now - self.cfg.window_s
        for model in [m for m, t in self.models.items() if t < stale and m != self.model]:
            del self.models[model]

    def _read_queues(self, now: float) -> None:
        assert self.bus is not None
        pairs = (
            ("frames", self.settings.infer.group, "infer"),
            ("scores", self.settings.decide.group, "decide"),
        )
        for stream, group, stage in pairs:
            st: GroupStats | None = self.bus.group_stats(stream, group)  # type: ignore[arg-type]
            self.queues[stream] = None if st is None else {
                "stage": stage,
                "group": group,
                "lag": st.lag,
                "pending": st.pending,
                "length": st.length,
                "consumers": st.consumers,
                "estimated": st.lag_estimated,
            }  # fmt: skip
            if st is not None and st.lag is not None:
                b = self._bucket(now)
                if stream == "frames":
                    b.lag_frames = max(b.lag_frames or 0, st.lag)
                else:
                    b.lag_scores = max(b.lag_scores or 0, st.lag)
        self.dead = self.bus.length("dead")

    def _read_workers(self, now: float) -> None:
        assert self.bus is not None
        out = []
        for w in health_report(self.bus)[:32]:
            t = w.get("t")
            out.append({
                "stage": _clip(str(w.get("stage", "?")), 32),
                "consumer": _clip(str(w.get("consumer", "?")), 96),
                "model": _clip(str(w.get("model") or ""), 96) or None,
                "age_s": _num(now - t, 1) if isinstance(t, int | float) else None,
            })  # fmt: skip
        self.workers = out

    # the history -------------------------------------------------------------------

    def _read_history(self, now: float) -> None:
        assert self.history is not None
        start = shift_start(now, self.settings.history.shift_starts)
        keys = [r.event.key for r in self.rejects]
        try:
            with self._history_lock:
                counts = self.history.counts(since=start)
                marks = self.history.marks(keys) if keys else {}
        except HistoryUnavailable as exc:
            self.shift = {"start": _num(start), "source": "history", "error": _clip(str(exc))}
            return
        total = sum(counts.values())
        self.shift = {
            "start": _num(start),
            "source": "history",
            "counts": {**{v: counts.get(v, 0) for v in VERDICTS}, "total": total},
            "reject_rate": _num(counts.get("fail", 0) / total, 5) if total else None,
            "error": None,
        }
        self.marks = marks
        for rej in self.rejects:
            rej.mark = marks.get(rej.event.key)

    def mark(self, key: str, mark: str) -> None:
        """Record an operator's mark on a frame of this line (raises ``HistoryUnavailable``
        or ``ConfigError``; the caller says so to the page)."""
        if self.history is None:
            raise ConfigError("this dashboard has no history to keep marks in")
        with self._history_lock:
            self.history.mark(key, mark, source="dashboard")
        self.marks[key] = mark
        for rej in self.rejects:
            if rej.event.key == key:
                rej.mark = mark
        self._publish()

    # rejects -----------------------------------------------------------------------

    def _resolve_rejects(self) -> None:
        budget = self.cfg.resolve_per_tick
        for rej in reversed(self.rejects):  # newest first
            if budget <= 0:
                break
            if not rej.resolved:
                budget -= 1
                self._resolve(rej)

    def _resolve(self, rej: Reject) -> None:
        assert self.bus is not None
        ev = rej.event
        scores = self.find_scores(ev)
        frame = self.find_frame(ev, queued_at(ev, scores))
        image = amap = seg = None
        notes = []
        if frame is not None:
            try:
                image = np.ascontiguousarray(decode_image(frame, self.bus.limits))
            except ProtocolError as exc:
                notes.append(f"frame unreadable: {exc.reason}")
        if scores is None:
            notes.append("scores no longer available")
        else:
            try:
                amap = scores.amap.to_float() if scores.amap is not None else None
                seg = scores.seg.to_labels() if scores.seg is not None else None
            except ProtocolError as exc:
                notes.append(f"map unreadable: {exc.reason}")
            if scores.amap is None:
                notes.append("no anomaly map (start infer with --maps)")
        try:
            pictures = render_reject(
                image, amap, seg, thumb_side=self.cfg.thumb_side, large_side=self.cfg.large_side
            )
        except (cv2.error, ValueError) as exc:  # an odd map shape: show the facts, no pictures
            pictures = {}
            notes.append(f"pictures failed: {type(exc).__name__}")
        for kind, pic in pictures.items():
            self.cache.put(ev.key, kind, pic)
        rej.frame = image is not None
        rej.amap = amap is not None
        rej.seg = seg is not None
        rej.kinds = tuple(k for k in IMAGE_KINDS if k in pictures)
        rej.note = "; ".join(notes)
        rej.resolved = True

    def find_scores(self, ev: Event) -> Scores | None:
        """The scores message of ``ev``'s frame (``lineguard.stream.lookup``)."""
        assert self.bus is not None
        return find_scores(self.bus, ev, scan_limit=self.cfg.scan_limit)

    def find_frame(self, ev: Event, t_queued: float | None) -> Frame | None:
        """The frame itself, if the bounded frames stream still has it."""
        assert self.bus is not None
        return find_frame(self.bus, ev, t_queued, scan_limit=self.cfg.frame_scan_limit)

    def image(self, camera: str, seq: int, kind: str) -> Picture | None:
        """An encoded picture of a reject, from the cache (None: not there)."""
        return self.cache.get(frame_key(self.line, camera, seq), kind)

    # snapshot ----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self._snapshot

    def snapshot_json(self) -> bytes:
        return self._snapshot_json

    def _publish(self, now: float | None = None) -> None:
        snap = self._build(self.clock() if now is None else now)
        self._snapshot_json = json.dumps(snap, separators=(",", ":"), allow_nan=False).encode()
        self._snapshot = snap
        self.version += 1

    def _build(self, now: float) -> dict[str, Any]:
        cfg = self.cfg
        now = max(now, self.last_event or 0.0)
        cur = int(now // cfg.bucket_s)
        n_points = max(1, int(cfg.window_s // cfg.bucket_s))
        first = cur - n_points + 1  # the last point is the bucket still filling
        fps: list[float | None] = []
        p50s: list[float | None] = []
        p99s: list[float | None] = []
        fails: list[int] = []
        lag_f: list[int | None] = []
        lag_s: list[int | None] = []
        empty = _Bucket()
        for idx in range(first, cur + 1):
            b = self.buckets.get(idx) or empty
            if idx < cur:
                fps.append(_num(b.n / cfg.bucket_s, 2))
            else:  # the bucket still filling: a sliding bucket_s, the previous one pro rata
                prev = self.buckets.get(idx - 1) or empty
                left = 1.0 - min(1.0, (now - cur * cfg.bucket_s) / cfg.bucket_s)
                fps.append(_num((b.n + left * prev.n) / cfg.bucket_s, 2))
            p50, p99 = b.percentiles()
            p50s.append(_num(p50, 1))
            p99s.append(_num(p99, 1))
            fails.append(b.verdicts.get("fail", 0))
            lag_f.append(b.lag_frames)
            lag_s.append(b.lag_scores)

        # headline numbers over the last rate_window_s (the current bucket included)
        since = self.since if self.since is not None else now
        span = max(1e-6, min(cfg.rate_window_s, now - since))
        lo_idx = int((now - cfg.rate_window_s) // cfg.bucket_s)
        recent = [b for i, b in self.buckets.items() if i >= lo_idx]
        recent_counts: Counter[str] = Counter()
        lats: list[float] = []
        for b in recent:
            recent_counts.update(b.verdicts)
            lats.extend(b.latencies)
        total = sum(self.counts.values())
        p50 = p99 = None
        if lats:
            q = np.percentile(np.asarray(lats), [50, 99]) * 1000
            p50, p99 = float(q[0]), float(q[1])
        return {
            "v": PAYLOAD_VERSION,
            "line": self.line,
            "prefix": self.prefix,
            "pattern": self.pattern,
            "error": self.error,
            "now": _num(now),
            "since": _num(self.since),
            "last_event": _num(self.last_event),
            "counts": {**{v: self.counts.get(v, 0) for v in VERDICTS}, "total": total},
            "share": {v: _num(self.counts[v] / total, 4) if total else None for v in VERDICTS},
            "rates": {
                "window_s": cfg.rate_window_s,
                "per_min": {v: _num(recent_counts.get(v, 0) * 60 / span, 1) for v in VERDICTS},
                "fps": _num(sum(recent_counts.values()) / span, 2),
            },
            "latency_ms": {"p50": _num(p50, 1), "p99": _num(p99, 1), "n": len(lats)},
            "queues": self.queues,
            "dead": self.dead,
            "model": {
                "current": self.model,
                "seen": sorted(self.models, key=self.models.__getitem__, reverse=True)[:8],
            },
            "workers": self.workers,
            "series": {
                "bucket_s": cfg.bucket_s,
                "t0": _num(first * cfg.bucket_s),
                "fps": fps,
                "p50_ms": p50s,
                "p99_ms": p99s,
                "fail": fails,
                "lag_frames": lag_f,
                "lag_scores": lag_s,
            },
            "rejects": [r.to_json() for r in reversed(self.rejects) if r.resolved],
            "shift": self.shift,
            "marks": self.history is not None,
            "ignored": {"unreadable": self.bad_entries, "duplicates": self.duplicates},
        }
