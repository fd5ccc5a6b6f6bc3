"""The decide stage: raw scores → one verdict event per frame, exactly once, with no holes.

**Verdicts.** Each branch score is normalised with the calibration of the model version that
produced it (``Calibration.contributions``), the contributions are summed and compared with
the threshold: ``fail`` if the fused score is above it, else ``pass``. A ``Scores`` with an
error becomes an ``error`` event carrying that reason. Calibrations are kept per model
version, so scores still in flight from the previous model are judged with the previous
calibration after a hot reload; a version decide never saw gives an ``error`` event naming
both versions (never a guess).

**Exactly one event per frame.** Delivery is at least once, so a ``Scores`` can arrive twice
(a redelivery after a crash, a retried EXEC, a reclaimed batch). Writing an event is one Lua
script that, atomically, for each frame: ``SET <prefix>:{line}:seen:<camera>:<seq> NX EX ttl``
and only if that succeeded XADDs the event; then XACKs the consumed scores and raises the
per-camera watermark. A crash before the script leaves the scores pending (they are
redelivered and judged again), a crash after it leaves everything done; there is no moment
where an event exists without its dedup mark or the other way round. The watermark (``next``:
every seq below it has an event) lives in ``<prefix>:{line}:decide:next``; anything below it
is a duplicate even after the dedup keys expired.

**Holes become ``uninspected`` events.** Ingest numbers each camera's frames densely, so a
seq that never reaches decide while later ones do is a frame that was trimmed from a stream
or lost before scoring. When decide sees a seq above the highest so far, the seqs in between
become *missing*. A missing seq is declared ``uninspected`` as soon as decide can prove it is
nowhere in the pipeline: it is not pending in the infer group, not in the scores stream
waiting for or held by a decide consumer, and has no dedup mark. Frames are delivered to the
infer group in stream order and ingest appends them in seq order, so a seq below one already
seen cannot still be waiting undelivered in the frames stream; the places are read from
upstream to downstream, so a frame moving along the pipeline during the check is still seen.
When those places hold too many entries to read cheaply, the fallback is a grace period
(``gap_grace_s``) after which the seq is declared anyway. A late score for a seq already
declared uninspected is a duplicate and is dropped: the first verdict stands, and an
uninspected part is what the line must re-check or reject.

``frames sent = pass + fail + error + uninspected`` for every camera, once the pipeline is idle.

**Only seqs ingest handed out open gaps.** The gap rule trusts that a seq above the highest so
far was numbered by ingest. A message that was not (a bridge bypassing ingest, a forged or
replayed entry, a camera whose counter was reset) would otherwise open a gap of up to
``MAX_GAP`` seqs, all declared uninspected, including real frames still to come, whose
verdicts would then be dropped as duplicates. So a seq above the highest seen is checked
against the camera's ingest counter (``<prefix>:{line}:seq:<camera>``, cached): one at or
above it is dead-lettered as ``seq_not_issued``. A camera with no counter at all (tools and
tests that write scores directly) may open gaps of at most ``UNCOUNTED_MAX_GAP`` seqs per
message and ``UNCOUNTED_MAX_HOLES`` in all; a message beyond either is dead-lettered with the
reason, so a forged frame of an unknown camera costs at most that many ``uninspected`` events.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import redis
import structlog

from lineguard.engines.bundle import Bundle, load_bundle
from lineguard.engines.errors import LineguardError
from lineguard.engines.fusion import Calibration
from lineguard.stream.bus import Bus, Entry, consumer_name
from lineguard.stream.logs import frame_context
from lineguard.stream.metrics import get_metrics, observe_queue
from lineguard.stream.protocol import (
    ENTRY_FIELD,
    Event,
    ProtocolError,
    Scores,
    Verdict,
    decode_scores,
    encode,
    frame_identity,
)
from lineguard.stream.settings import Settings
from lineguard.stream.worker import BackgroundLoad, BundleWatcher, Reclaimer, line_key

log = structlog.get_logger("lineguard.decide")

# KEYS: events, scores, watermark hash, then one dedup key per event.
# ARGV: group, ttl, events maxlen, entry field, n events, n acks, payloads…, ack ids…,
#       then (camera, next) pairs for the watermark.
_COMMIT_LUA = """
local n = tonumber(ARGV[5])
local nack = tonumber(ARGV[6])
local written = {}
for i = 1, n do
  if redis.call('SET', KEYS[3 + i], '1', 'NX', 'EX', ARGV[2]) then
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', ARGV[4], ARGV[6 + i])
    written[i] = 1
  else
    written[i] = 0
  end
end
if nack > 0 then
  local ids = {}
  for j = 1, nack do ids[j] = ARGV[6 + n + j] end
  redis.call('XACK', KEYS[2], ARGV[1], unpack(ids))
end
local k = 7 + n + nack
while k < #ARGV do
  local cur = tonumber(redis.call('HGET', KEYS[3], ARGV[k]) or '0')
  local nxt = tonumber(ARGV[k + 1])
  if nxt > cur then redis.call('HSET', KEYS[3], ARGV[k], nxt) end
  k = k + 2
end
return written
"""

STAGES = ("ingest", "queue", "infer", "handoff", "decide", "total")
UNINSPECTED_REASON = (
    "frame never reached decide: trimmed from a stream or lost before scoring "
    "(sequence gap); re-check or reject the part"
)
DEADLINE_REASON = (
    "no score within {ms} ms of capture (verdict deadline): infer down or behind; re-check or "
    "reject the part"
)
MAX_TRACKED = 200_000  # frames waiting for their deadline; beyond it the oldest are dropped
MAX_LATE_KEYS = 100_000
MAX_CALIBRATIONS = 8
MAX_GAP = 1_000_000
MAX_UNINSPECTED_PER_STEP = 1024
INFLIGHT_SCAN_LIMIT = 2000
# A camera ingest never numbered (no seq counter: tools, tests, a bridge) gets a verdict for
# every message, but the holes it may open are bounded, per message and in total, so one
# forged or misnumbered message cannot flood the line with phantom `uninspected` events.
UNCOUNTED_MAX_GAP = 16
UNCOUNTED_MAX_HOLES = 256


@dataclass
class CameraState:
    """What decide knows about one camera's sequence numbers."""

    next: int = 0
    """Every seq below ``next`` has an event."""
    done: set[int] = field(default_factory=set)
    """Seqs at or above ``next`` that have an event (arrived out of order)."""
    hwm: int = -1
    """Highest seq seen so far (or ``next - 1``)."""
    missing: dict[int, float] = field(default_factory=dict)
    """Seqs below ``hwm`` without an event, with the monotonic time they were noticed."""

    def has_event(self, seq: int) -> bool:
        return seq < self.next or seq in self.done

    def watermark_with(self, seqs: set[int]) -> int:
        nxt = self.next
        while nxt in self.done or nxt in seqs:
            nxt += 1
        return nxt

    def observe(self, seq: int, now: float) -> None:
        """A frame with ``seq`` reached decide: note the holes below it."""
        if seq > self.hwm:
            start = max(self.hwm + 1, self.next)
            if seq - start > MAX_GAP:
                log.error(
                    "decide.seq_jump",
                    from_seq=self.hwm,
                    to_seq=seq,
                    note="gap too large to track; was the camera's seq key reset?",
                )
                start = seq - MAX_GAP
            for q in range(start, seq):
                if q not in self.done:
                    self.missing.setdefault(q, now)
            self.hwm = seq
        self.missing.pop(seq, None)

    def mark(self, seq: int) -> None:
        """``seq`` has an event now."""
        self.missing.pop(seq, None)
        if seq < self.next:
            return
        self.done.add(seq)
        while self.next in self.done:
            self.done.discard(self.next)
            self.next += 1
        self.hwm = max(self.hwm, seq)


@dataclass
class _Pending:
    event: Event
    payload: bytes
    seen_key: str


def latency_of(scores: Scores, t_read: float, t_event: float) -> dict[str, float]:
    """Per-stage seconds of one frame (see ``lineguard.stream.metrics``); clocks of different hosts
    meet here, so small negative differences are clipped to 0."""
    t = scores.timings
    out: dict[str, float] = {}
    t_queued, t_infer_read, t_scored = t.get("t_queued"), t.get("t_read"), t.get("t_scored")
    if t_queued:
        out["ingest"] = t_queued - scores.t_capture
        if t_infer_read:
            out["queue"] = t_infer_read - t_queued
    if t_infer_read and t_scored:
        out["infer"] = t_scored - t_infer_read
    if t_scored:
        out["handoff"] = t_read - t_scored
    out["decide"] = t_event - t_read
    out["total"] = t_event - scores.t_capture
    return {k: max(0.0, v) for k, v in out.items()}


class DecideStage:
    """``run_worker`` stage for the decide consumer group (see the module docstring)."""

    name = "decide"

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        bundle_path: str | Path,
        *,
        consumer: str | None = None,
        gap_grace_s: float = 60.0,
        reload_interval_s: float = 2.0,
        inflight_check_s: float = 0.25,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.cfg = settings.decide
        self.bundle_path = Path(bundle_path)
        self.consumer = consumer_name(consumer)
        self.gap_grace_s = gap_grace_s
        self.reload_interval_s = reload_interval_s
        self.inflight_check_s = inflight_check_s
        self.reader = bus.reader("scores", self.cfg.group, self.consumer)
        self.metrics = get_metrics()
        self.calibrations: OrderedDict[str, Calibration] = OrderedDict()
        self.current: str | None = None
        self.cameras: dict[str, CameraState] = {}
        self.state_key = line_key(bus, "decide", "next")
        self._script = bus.client.register_script(_COMMIT_LUA)
        self.watcher: BundleWatcher | None = None
        self.loading: BackgroundLoad[Bundle] = BackgroundLoad("decide")
        self._next_inflight_check = 0.0
        self._issued: dict[str, int] = {}  # camera -> ingest's next seq, as last read
        # camera without a counter -> (highest seq let through, holes it opened); kept apart
        # from CameraState because several of its messages may sit in one batch
        self._uncounted: dict[str, tuple[int, int]] = {}
        self.counts = {
            "pass": 0,
            "fail": 0,
            "error": 0,
            "uninspected": 0,
            "duplicates": 0,
            "dead": 0,
            "trimmed": 0,
            "reclaimed": 0,
            "reloads": 0,
            "state_resets": 0,
            "late": 0,
        }
        self.epoch: str | None = None  # the line's epoch this state belongs to (setup)
        self.deadline_s = settings.decide.deadline_ms / 1000.0
        # frames seen in the frames stream, waiting for a verdict: (camera, seq) → capture
        self._tracked: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._frames_cursor = "$"
        self._deadlined: OrderedDict[tuple[str, int], float] = OrderedDict()  # → deadline
        self.reclaimer = Reclaimer(
            bus,
            "scores",
            self.cfg.group,
            self.consumer,
            stage="decide",
            min_idle_ms=self.cfg.reclaim_idle_ms,
            count=self.cfg.count,
            every_s=min(self.cfg.reclaim_idle_ms / 2000, 5.0),
            counts=self.counts,
        )

    # lifecycle ---------------------------------------------------------------------

    def setup(self) -> None:
        self.epoch = self.bus.ensure_epoch()
        self._frames_cursor = self._newest_frame_id()
        self.bus.ensure_group("scores", self.cfg.group)
        self._load_calibration()
        self.watcher = BundleWatcher(self.bundle_path, self.reload_interval_s)
        for cam, value in self.bus.client.hgetall(self.state_key).items():
            name = cam.decode() if isinstance(cam, bytes) else str(cam)
            nxt = int(value)
            self.cameras[name] = CameraState(next=nxt, hwm=nxt - 1)
        self.reclaimer.rest()

    def _load_calibration(self, bundle: Bundle | None = None) -> bool:
        bundle = bundle if bundle is not None else load_bundle(self.bundle_path)
        version = bundle.version
        changed = version != self.current
        self.calibrations[version] = bundle.calibration
        self.calibrations.move_to_end(version)
        while len(self.calibrations) > MAX_CALIBRATIONS:
            self.calibrations.popitem(last=False)
        previous, self.current = self.current, version
        self.metrics.set_model("decide", version, previous=previous)
        return changed

    def recover(self) -> None:
        """After a Redis failure: re-read what this consumer read but could not acknowledge
        (the batch in flight), at once rather than after ``reclaim_idle_ms``."""
        self.reader.rewind()

    def teardown(self) -> None:
        self.loading.wait()
        self.loading.take()

    def status(self) -> dict[str, Any]:
        observe_queue(self.bus, self.metrics, "scores", self.cfg.group)
        out: dict[str, Any] = {
            "model": self.current,
            "epoch": self.epoch,
            **self.counts,
            # list(): the heartbeat thread reads this while the loop may add a camera
            "missing": sum(len(c.missing) for c in list(self.cameras.values())),
        }
        loading = self.loading.status()
        if loading is not None:
            out["reload"] = loading
        return out

    def done(self) -> bool:
        if any(c.missing for c in self.cameras.values()):
            return False
        stats = self.bus.group_stats("scores", self.cfg.group)
        return stats is None or stats.pending == 0

    def _apply_loaded(self) -> bool:
        """Between batches: use the calibration a background load finished; True if the
        model changed."""
        done = self.loading.take()
        if done is None:
            return False
        bundle, error = done
        if error is not None:
            if not isinstance(error, LineguardError):
                raise error  # a bug, not a bad bundle
            self.metrics.model_reloads.labels("decide", "failed").inc()
            log.error("decide.reload_failed", path=str(self.bundle_path), error=str(error))
            return False
        assert bundle is not None
        changed = self._load_calibration(bundle)
        if changed:
            self.counts["reloads"] += 1
            self.metrics.model_reloads.labels("decide", "ok").inc()
            log.info("decide.reloaded", model=self.current)
        return changed

    def _start_load(self) -> None:
        self.loading.start(lambda: load_bundle(self.bundle_path))

    def reload(self) -> bool:
        """Pick up the bundle now at ``bundle_path`` (its calibration), waiting for it; True
        if it changed. The step loop loads in the background instead; this is for scores
        that name a version decide does not have yet, which cannot be judged without it."""
        self.loading.wait()  # the load in flight may be the very version
        if self._apply_loaded():
            return True
        self._start_load()
        self.loading.wait()
        return self._apply_loaded()

    # one step ----------------------------------------------------------------------

    def _check_epoch(self) -> None:
        """Forget the sequence state if Redis lost the line's (see ``Bus.ensure_epoch``).

        Without this, a server restarted empty left decide holding watermarks in the millions
        while ingest numbered new frames from 0: every new frame was dropped as already
        judged, for hours. Frames lost with the data cannot be accounted for; new ones get
        their verdicts."""
        now = self.bus.current_epoch()
        if now == self.epoch:
            return
        log.error(
            "decide.state_lost",
            epoch_was=self.epoch,
            epoch_now=now,
            cameras=len(self.cameras),
            note="Redis lost the line's data (restart without persistence, lost AOF tail, "
            "failover to an empty replica, FLUSHALL): sequence state reset; frames lost "
            "with it got no verdict",
        )
        self.cameras.clear()
        self._issued.clear()
        self._uncounted.clear()
        self._tracked.clear()
        self._deadlined.clear()
        self._frames_cursor = "0-0"  # the new server's frames stream, from its start
        self.counts["state_resets"] += 1
        self.epoch = self.bus.ensure_epoch()
        self.bus.ensure_group("scores", self.cfg.group)

    def step(self) -> int:
        self._check_epoch()  # also for idle steps, which only resolve gaps and deadlines
        self._apply_loaded()
        if self.watcher is not None and self.watcher.changed():
            self._start_load()  # verified in the background; used from a later step
        reclaimed = self.reclaimer.take()
        if reclaimed:
            self.process(reclaimed)
        n = len(reclaimed)
        if not n:
            entries = self.reader.read(count=self.cfg.count, block_ms=self.cfg.block_ms)
            if entries:
                self.process(entries)
            n = len(entries)
        return n + self.resolve_gaps() + self.resolve_deadlines()

    def camera(self, name: str) -> CameraState:
        cam = self.cameras.get(name)
        if cam is None:
            cam = self.cameras[name] = CameraState()
        return cam

    def seen_key(self, camera: str, seq: int) -> str:
        return line_key(self.bus, "seen", camera, str(seq))

    def process(self, entries: list[Entry]) -> None:
        """Judge a batch of scores and commit their events and acknowledgements together."""
        # here, not only at the top of step(): a read blocked across a server restart returns
        # entries of the new, empty server, which the old watermarks would call duplicates
        self._check_epoch()
        t_read = time.time()
        m = self.metrics
        m.frames_in.labels("decide").inc(len(entries))
        pending: list[_Pending] = []
        ack_ids: list[str] = []
        in_batch: set[tuple[str, int]] = set()
        for e in entries:
            if e.deleted:
                ack_ids.append(e.id)
                self.counts["trimmed"] += 1
                m.trimmed.labels("decide").inc()
                continue
            data = e.data
            if data is None:
                self._dead(e, "missing_field", f"entry has no {ENTRY_FIELD.decode()!r} field")
                continue
            if e.deliveries is not None and e.deliveries > self.cfg.max_deliveries:
                self._dead(e, "max_deliveries", f"delivered {e.deliveries} times")
                continue
            try:
                scores = decode_scores(data, self.bus.limits)
            except ProtocolError as exc:
                self._dead(e, exc.reason, str(exc))
                continue
            if scores.line != self.bus.line:
                self._dead(e, "wrong_line", f"scores of line {scores.line!r} on {self.bus.line!r}")
                continue
            refused = self._not_issued(scores.camera, scores.seq)
            if refused:
                self._dead(e, "seq_not_issued", refused)
                continue
            ident = (scores.camera, scores.seq)
            if self.camera(scores.camera).has_event(scores.seq) or ident in in_batch:
                ack_ids.append(e.id)
                if ident in self._deadlined:
                    self._late(scores, self._deadlined.pop(ident))
                else:
                    self._duplicate(scores.key)
                continue
            in_batch.add(ident)
            event = self.judge(scores, t_read)
            pending.append(_Pending(event, encode(event, self.bus.limits), ""))
            ack_ids.append(e.id)
        self._commit(pending, ack_ids)

    def _not_issued(self, camera: str, seq: int) -> str | None:
        """Why ``seq`` cannot be a frame ingest numbered, or None if it can (see the module
        docstring). Only seqs above the camera's highest so far are checked."""
        cam = self.cameras.get(camera)
        if cam is not None and seq <= max(cam.hwm, cam.next - 1):
            return None
        if seq < self._issued.get(camera, 0):
            return None
        raw = self.bus.client.get(line_key(self.bus, "seq", camera))
        if raw is not None:
            self._issued[camera] = issued = int(raw)
            if seq < issued:
                return None
            return (
                f"seq {seq} of camera {camera!r} was never handed out by ingest (its next seq "
                f"is {issued}): a producer bypassing ingest, a forged or replayed message, or "
                "a reset counter; no verdict was made for it"
            )
        top, opened = self._uncounted.get(camera, (-1, 0))
        start = max(top + 1, 0 if cam is None else max(cam.hwm + 1, cam.next))
        if seq < start:
            return None  # below what it already let through: fills a hole, opens none
        gap = seq - start
        if gap > UNCOUNTED_MAX_GAP:
            return (
                f"seq {seq} of camera {camera!r}, which ingest never numbered (no seq counter), "
                f"would open a gap of {gap} frames (at most {UNCOUNTED_MAX_GAP}); no verdict "
                "was made for it"
            )
        if opened + gap > UNCOUNTED_MAX_HOLES:
            return (
                f"camera {camera!r}, which ingest never numbered (no seq counter), has opened "
                f"{opened} holes already; seq {seq} would open {gap} more (at most "
                f"{UNCOUNTED_MAX_HOLES} in all); no verdict was made for it"
            )
        if len(self._uncounted) >= 4096:  # forged camera names: stay bounded
            self._uncounted.clear()
        self._uncounted[camera] = (seq, opened + gap)
        return None

    def judge(self, scores: Scores, t_read: float) -> Event:
        """The verdict for one frame's scores (no I/O)."""
        t_event = time.time()
        latency = latency_of(scores, t_read, t_event)
        base = (scores.line, scores.camera, scores.seq)
        if scores.error is not None:
            return Event(
                *base, "error", None, None, {}, scores.model, latency, scores.error,
                scores.t_capture, t_event, scores.epoch,
            )  # fmt: skip
        cal = self.calibrations.get(scores.model)
        if cal is None and (
            self.loading.busy or (self.watcher is not None and self.watcher.changed(force=True))
        ):
            self.reload()  # the bundle was replaced: its calibration may be the one needed
            cal = self.calibrations.get(scores.model)
        if cal is None:
            reason = (
                f"scores come from model {scores.model} but decide has the calibration of "
                f"{self.current}; point infer and decide at the same bundle"
            )
            return Event(
                *base, "error", None, None, {}, scores.model, latency, reason,
                scores.t_capture, t_event, scores.epoch,
            )  # fmt: skip
        missing = [b for b in cal.branches if b not in scores.raw]
        if missing:
            reason = f"scores lack branch(es) {missing} that the calibration needs"
            return Event(
                *base, "error", None, None, {}, scores.model, latency, reason,
                scores.t_capture, t_event, scores.epoch,
            )  # fmt: skip
        raw = np.asarray([[scores.raw[b] for b in cal.branches]], dtype=np.float64)
        contrib = cal.contributions(raw)[0]
        fused = float(cal.combined(contrib[None])[0])
        contributions = {b: float(c) for b, c in zip(cal.branches, contrib, strict=True)}
        if not np.isfinite(fused):
            reason = "fused score is not finite"
            return Event(
                *base, "error", None, None, {}, scores.model, latency, reason,
                scores.t_capture, t_event, scores.epoch,
            )  # fmt: skip
        verdict: Verdict = "fail" if fused > cal.threshold else "pass"
        reason = ""
        if verdict == "fail":
            top = max(cal.active, key=lambda b: contributions[b])
            reason = (
                f"fused score {fused:.3f} > threshold {cal.threshold:.3f}; "
                f"largest contribution {top} ({contributions[top]:+.3f})"
            )
        return Event(
            *base, verdict, fused, float(cal.threshold), contributions, scores.model, latency,
            reason, scores.t_capture, t_event, scores.epoch,
        )  # fmt: skip

    def _commit(self, pending: list[_Pending], ack_ids: list[str]) -> None:
        if not pending and not ack_ids:
            return
        by_cam: dict[str, set[int]] = {}
        for p in pending:
            p.seen_key = self.seen_key(p.event.camera, p.event.seq)
            by_cam.setdefault(p.event.camera, set()).add(p.event.seq)
        marks: list[Any] = []
        for cam_name, seqs in by_cam.items():
            marks += [cam_name, self.camera(cam_name).watermark_with(seqs)]
        keys = [self.bus.key("events"), self.bus.key("scores"), self.state_key]
        keys += [p.seen_key for p in pending]
        args: list[Any] = [
            self.cfg.group,
            self.cfg.dedup_ttl_s,
            self.cfg.events_max_len,
            ENTRY_FIELD,
            len(pending),
            len(ack_ids),
            *[p.payload for p in pending],
            *ack_ids,
            *marks,
        ]
        written = self._script(keys=keys, args=args)
        now = time.monotonic()
        m = self.metrics
        for p, flag in zip(pending, written, strict=True):
            ev = p.event
            cam = self.camera(ev.camera)
            cam.observe(ev.seq, now)
            cam.mark(ev.seq)
            if not int(flag):
                self._duplicate(ev.key)
                continue
            self.counts[ev.verdict] += 1
            m.verdicts.labels(ev.verdict).inc()
            m.frames_out.labels("decide").inc()
            for stage in ("handoff", "decide", "total"):
                if stage in ev.latency:
                    m.stage_seconds.labels(stage).observe(ev.latency[stage])
            with frame_context(ev.key):
                if ev.verdict == "pass":
                    log.debug("decide.event", verdict="pass", score=ev.score)
                elif ev.verdict == "fail":
                    log.info("decide.event", verdict="fail", score=ev.score, reason=ev.reason)
                else:
                    log.warning("decide.event", verdict=ev.verdict, reason=ev.reason)

    def _duplicate(self, key: str) -> None:
        self.counts["duplicates"] += 1
        self.metrics.duplicates.labels("decide").inc()
        with frame_context(key):
            log.info("decide.duplicate", note="an event for this frame exists; dropped")

    def _dead(self, e: Entry, reason: str, detail: str) -> None:
        self.counts["dead"] += 1
        self.metrics.dead_lettered.labels("decide", reason).inc()
        self.bus.dead_letter(
            "scores",
            self.cfg.group,
            e.id,
            dict(e.fields),
            reason,
            detail=detail,
            deliveries=e.deliveries,
        )

    # holes -------------------------------------------------------------------------

    def resolve_gaps(self) -> int:
        """Turn missing seqs into ``uninspected`` events once provably lost (or past grace)."""
        if not any(c.missing for c in self.cameras.values()):
            return 0
        now = time.monotonic()
        due: list[tuple[str, int]] = []
        for name, cam in self.cameras.items():
            due += [(name, q) for q, t in cam.missing.items() if now - t >= self.gap_grace_s]
        if not due and now >= self._next_inflight_check:
            self._next_inflight_check = now + self.inflight_check_s
            inflight = self.inflight()
            if inflight is not None:
                for name, cam in self.cameras.items():
                    due += [(name, q) for q in cam.missing if (name, q) not in inflight]
        return len(self._declare_uninspected({ident: 0.0 for ident in due}, UNINSPECTED_REASON))

    def _declare_uninspected(
        self, due: dict[tuple[str, int], float], reason: str
    ) -> list[tuple[str, int]]:
        """Commit ``uninspected`` events for ``due`` ((camera, seq) → capture time, 0 when
        unknown), skipping those a peer (or an earlier life of ours) judged meanwhile; at most
        ``MAX_UNINSPECTED_PER_STEP`` per call. Returns the idents declared."""
        idents = sorted(due)[:MAX_UNINSPECTED_PER_STEP]
        if not idents:
            return []
        pipe = self.bus.client.pipeline(transaction=False)
        for name, q in idents:
            pipe.exists(self.seen_key(name, q))
        exists = pipe.execute()
        t_event = time.time()
        pending: list[_Pending] = []
        for (name, q), ex in zip(idents, exists, strict=True):
            if int(ex):
                self.camera(name).mark(q)
                continue
            t_capture = due[(name, q)]
            latency = {"total": max(0.0, t_event - t_capture)} if t_capture else {}
            event = Event(
                self.bus.line, name, q, "uninspected", None, None, {}, self.current or "",
                latency, reason, t_capture, t_event, self.epoch or "",
            )  # fmt: skip
            pending.append(_Pending(event, encode(event, self.bus.limits), ""))
        self._commit(pending, [])
        return [(p.event.camera, p.event.seq) for p in pending]

    # verdict deadlines ---------------------------------------------------------------

    def _newest_frame_id(self) -> str:
        """Deadlines cover frames captured from now on: older ones may have scores waiting
        in the scores stream (decide was down, not infer), which must not be pre-empted."""
        rows: Any = self.bus.client.xrevrange(self.bus.key("frames"), count=1)
        return _text(rows[0][0]) if rows else "0-0"

    def _track_frames(self) -> None:
        """Note the identity and capture time of every frame ingest appended since the last
        call (a plain XREAD: the frames stay infer's)."""
        key = self.bus.key("frames")
        while True:
            reply: Any = self.bus.client.xread({key: self._frames_cursor}, count=1000)
            rows = reply[0][1] if reply else []
            for entry_id, fields in rows:
                self._frames_cursor = _text(entry_id)
                ident = frame_identity(fields.get(ENTRY_FIELD), self.bus.limits)
                if ident is None or ident.line != self.bus.line:
                    continue  # infer dead-letters it; nothing to wait for
                self._tracked[(ident.camera, ident.seq)] = ident.t_capture
                if len(self._tracked) > MAX_TRACKED:
                    self._tracked.popitem(last=False)
            if len(rows) < 1000:
                return

    def resolve_deadlines(self) -> int:
        """``uninspected`` (deadline) for every tracked frame past capture + deadline that has
        no verdict yet: the gate gets an answer on time even while infer is down."""
        if self.deadline_s <= 0:
            return 0
        self._track_frames()
        now = time.time()
        due: dict[tuple[str, int], float] = {}
        for ident, t_capture in list(self._tracked.items()):
            if len(due) >= MAX_UNINSPECTED_PER_STEP:
                break  # the rest stay tracked for the next step
            if now < t_capture + self.deadline_s:
                continue
            del self._tracked[ident]
            if self.camera(ident[0]).has_event(ident[1]) or self._not_issued(*ident):
                continue  # judged already, or not numbered by ingest: no verdict owed
            due[ident] = t_capture
        reason = DEADLINE_REASON.format(ms=int(self.deadline_s * 1000))
        declared = self._declare_uninspected(due, reason)
        for ident in declared:
            self._deadlined[ident] = now
            if len(self._deadlined) > MAX_LATE_KEYS:
                self._deadlined.popitem(last=False)
        return len(declared)

    def _late(self, scores: Scores, t_deadline: float) -> None:
        """A score for a frame already given its deadline verdict: counted, never a second
        verdict (the part has passed the gate)."""
        self.counts["late"] += 1
        self.metrics.late_scores.labels("decide").inc()
        with frame_context(scores.key):
            log.warning(
                "decide.late_score",
                late_s=round(max(0.0, time.time() - t_deadline), 3),
                error=scores.error,
                note="the frame was declared uninspected at its deadline; no second verdict",
            )

    def inflight(self) -> set[tuple[str, int]] | None:
        """(camera, seq) of every frame still somewhere between ingest and decide's commit,
        or None when there are too many entries to check cheaply (then grace applies)."""
        client = self.bus.client
        found: set[tuple[str, int]] = set()
        infer_group = self.settings.infer.group
        frames_key, scores_key = self.bus.key("frames"), self.bus.key("scores")
        try:
            # 1. pending in the infer group (read by a worker, not yet scored); no group means
            #    no infer worker ever read a frame, so nothing is held there
            try:
                rows = client.xpending_range(
                    frames_key, infer_group, min="-", max="+", count=INFLIGHT_SCAN_LIMIT + 1
                )
            except redis.ResponseError as exc:
                if not str(exc).startswith("NOGROUP"):
                    raise
                rows = []
            if len(rows) > INFLIGHT_SCAN_LIMIT:
                return None
            pipe = client.pipeline(transaction=False)
            for r in rows:
                mid = r["message_id"]
                pipe.xrange(frames_key, min=mid, max=mid, count=1)
            for res in pipe.execute() if rows else []:
                for _id, fields in res or ():
                    _add_ident(found, fields)
            # 2. scores not yet acknowledged by decide: pending or never delivered
            groups = client.xinfo_groups(scores_key)
            info = next((g for g in groups if _text(g.get("name")) == self.cfg.group), None)
            start = "-"
            if info is not None:
                summary = client.xpending(scores_key, self.cfg.group)
                if int(summary.get("pending", 0)) > 0 and summary.get("min") is not None:
                    start = _text(summary["min"])
                else:
                    last = _text(info.get("last-delivered-id", b"0-0"))
                    start = "(" + last if last != "0-0" else "-"
            entries: Any = client.xrange(
                scores_key, min=start, max="+", count=INFLIGHT_SCAN_LIMIT + 1
            )
            if len(entries) > INFLIGHT_SCAN_LIMIT:
                return None
            for _id, fields in entries:
                _add_ident(found, fields)
        except redis.ResponseError:
            return None  # a stream or group is missing: not provable now
        return found


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _add_ident(found: set[tuple[str, int]], fields: Any) -> None:
    """(camera, seq) of a packed frame or scores message, without full validation."""
    data = fields.get(ENTRY_FIELD) if isinstance(fields, dict) else None
    if not isinstance(data, bytes):
        return
    try:
        obj = msgpack.unpackb(data, raw=False)
    except Exception:
        return
    if isinstance(obj, dict):
        cam, seq = obj.get("camera"), obj.get("seq")
        if isinstance(cam, str) and type(seq) is int:
            found.add((cam, seq))
