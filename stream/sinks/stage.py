"""The worker loop of a sink: read events in order, deliver them, acknowledge what arrived.

One ``SinkStage`` drives one ``Sink`` (MQTT, OPC UA, webhook) through ``run_worker``, so a
sink has the same heartbeat, drain on SIGTERM and Redis-failure handling as the other stages.
What it adds:

* **Its own consumer group** ``sink:<kind>:<name>`` on the events stream, so each sink sees
  every verdict whatever the others (or the dashboard) do, and one that is down just falls
  behind: its entries wait in the stream.
* **Order per camera**: a sink reads in stream order with one consumer and holds at most
  ``queue_size`` events. It never reads past an event it could not deliver; it retries the
  same events, oldest first, with exponential backoff (``retry_base_s`` doubling up to
  ``retry_cap_s``, with jitter) until the receiver is back.
* **Acknowledge after delivery**: an entry is XACKed only once the sink says it arrived
  (PUBACK, a 2xx, the OPC UA nodes written). A crash between delivery and acknowledgement
  re-delivers those events on restart: at least once, never lost. Receivers deduplicate on
  ``frame_key`` and ``epoch``.
* **Poison and refusals**: an entry that is not a valid event, or one the receiver refuses
  for good (a webhook's 4xx), goes to the dead stream with its reason instead of blocking
  the line forever.

Keep one running consumer per sink name: a second one in the same group would split the
stream between them. The default consumer name is ``<name>@<host>`` so a restart on the same
host re-reads its own unacknowledged events first; entries left by a consumer of another
name are taken over after ``reclaim_idle_ms`` (those may then arrive after newer ones).
"""

from __future__ import annotations

import random
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis
import structlog

from lineguard.stream.bus import Bus, Entry
from lineguard.stream.metrics import get_metrics, observe_queue
from lineguard.stream.protocol import ENTRY_FIELD, Event, ProtocolError, decode_event
from lineguard.stream.settings import Settings, SinkBaseSettings
from lineguard.stream.sinks.payload import encode_payload, verdict_payload
from lineguard.stream.worker import Reclaimer, StopFlag

log = structlog.get_logger("lineguard.sinks")

_MAX_WAIT_S = 0.5  # one step never sleeps longer, so heartbeats and SIGTERM stay prompt


@dataclass(frozen=True, slots=True)
class Delivery:
    """One verdict on its way out: the event, its stream entry and its encoded payload."""

    entry_id: str
    event: Event
    payload: dict[str, Any]
    body: bytes


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt achieved, for a batch sent in order.

    ``delivered`` leading items arrived. If fewer than all: ``refused`` says why the next item
    was refused for good (it is dead-lettered and the rest go on), else ``error`` says why it
    could not be delivered now (it and the rest are retried later).
    """

    delivered: int
    error: str | None = None
    refused: str | None = None


class Sink(Protocol):
    """One kind of receiver. ``deliver`` sends in order and reports how far it got."""

    kind: str

    def open(self, bus: Bus, group: str) -> None:
        """Connect, start serving, restore persisted state (called once, in setup)."""
        ...

    def deliver(self, items: list[Delivery]) -> Outcome: ...

    def acknowledge(self, bus: Bus, group: str, items: list[Delivery]) -> None:
        """XACK ``items`` (``ack_plain``), with any state that must move with the
        acknowledgement written in the same server-side step."""
        ...

    def committed(self, items: list[Delivery]) -> None:
        """Called once ``items`` are acknowledged."""
        ...

    def wake(self) -> bool:
        """True if the receiver is known to be back, so retrying need not wait."""
        ...

    def close(self) -> None: ...

    def connected(self) -> bool: ...

    def status(self) -> dict[str, Any]: ...


@dataclass
class _Backoff:
    base_s: float
    cap_s: float
    failures: int = 0
    retry_at: float = 0.0
    rng: random.Random = field(default_factory=random.Random)

    def fail(self, now: float) -> float:
        self.failures += 1
        delay = min(self.cap_s, self.base_s * 2 ** min(self.failures - 1, 30))
        delay *= 0.5 + 0.5 * self.rng.random()  # jitter: peers do not retry in lockstep
        self.retry_at = now + delay
        return delay

    def ok(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


def ack_plain(bus: Bus, group: str, items: list[Delivery]) -> None:
    """Acknowledge delivered items on the events stream (what most sinks need)."""
    bus.ack("events", group, [d.entry_id for d in items])


def sink_group(kind: str, name: str) -> str:
    """The consumer group of sink ``name`` of ``kind`` on the events stream."""
    return f"sink:{kind}:{name}"


class SinkStage:
    """``run_worker`` stage that feeds one sink from the events stream (module docstring)."""

    def __init__(
        self,
        bus: Bus,
        settings: Settings,
        sink: Sink,
        cfg: SinkBaseSettings,
        *,
        consumer: str | None = None,
        stop: StopFlag | None = None,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.sink = sink
        self.cfg = cfg
        self.name = f"sink-{sink.kind}"
        self.label = f"{sink.kind}:{cfg.name}"
        self.group = sink_group(sink.kind, cfg.name)
        self.consumer = consumer or f"{cfg.name}@{socket.gethostname()}"
        self.stop = stop or StopFlag()
        self.reader = bus.reader("events", self.group, self.consumer)
        self.metrics = get_metrics()
        self.held: list[Delivery] = []
        self.backoff = _Backoff(cfg.retry_base_s, cfg.retry_cap_s)
        self.last_error: str | None = None
        self.counts = {
            "delivered": 0,
            "errors": 0,
            "refused": 0,
            "dead": 0,
            "trimmed": 0,
            "reclaimed": 0,
        }
        self.reclaimer = Reclaimer(
            bus,
            "events",
            self.group,
            self.consumer,
            stage=self.name,
            min_idle_ms=cfg.reclaim_idle_ms,
            count=cfg.queue_size,
            every_s=min(cfg.reclaim_idle_ms / 2000, 5.0),
            counts=self.counts,
        )

    # lifecycle ---------------------------------------------------------------------

    def setup(self) -> None:
        start = "$" if self.cfg.start == "new" else "0"
        self.bus.ensure_group("events", self.group, start_id=start)
        self.sink.open(self.bus, self.group)
        self.metrics.sink_up.labels(self.label).set(0)
        self.reclaimer.rest()
        log.info("sink.ready", sink=self.label, group=self.group, consumer=self.consumer)

    def teardown(self) -> None:
        self.sink.close()

    def recover(self) -> None:
        """After a Redis failure: what is held is still pending in Redis; re-read it from there
        (an acknowledgement that failed after delivery means those are delivered twice)."""
        self.held.clear()
        self.reader.rewind()

    def status(self) -> dict[str, Any]:
        observe_queue(self.bus, self.metrics, "events", self.group)
        lag = self.lag()
        if lag is not None:
            self.metrics.sink_lag.labels(self.label).set(lag)
        return {
            "sink": self.label,
            "group": self.group,
            "connected": self.sink.connected(),
            "held": len(self.held),
            "lag": lag,
            "last_error": self.last_error,
            **self.counts,
            **self.sink.status(),
        }

    def lag(self) -> int | None:
        """Events not delivered yet: not read by the group, plus read and unacknowledged."""
        try:
            stats = self.bus.group_stats("events", self.group)
        except redis.RedisError:
            return None
        if stats is None or stats.lag is None:
            return None
        return stats.lag + stats.pending

    def done(self) -> bool:
        if self.held:
            return False
        stats = self.bus.group_stats("events", self.group)
        return stats is None or (stats.pending == 0 and not stats.lag)

    # one step ----------------------------------------------------------------------

    def step(self) -> int:
        if self.held:
            wait = self.backoff.retry_at - time.monotonic()
            if wait > 0 and not self.sink.wake():
                self.stop.wait(min(wait, _MAX_WAIT_S))
                return 0
            return self._deliver()
        entries = self.reclaimer.take()
        if not entries:
            entries = self.reader.read(count=self.cfg.queue_size, block_ms=self.cfg.block_ms)
        if not entries:
            return 0
        self._accept(entries)
        return self._deliver() if self.held else 0

    def _accept(self, entries: list[Entry]) -> None:
        """Decode what was read into ``held``; account for what cannot be delivered."""
        skip: list[str] = []
        for e in entries:
            if e.deleted:  # trimmed from the stream before this sink got to it
                skip.append(e.id)
                self.counts["trimmed"] += 1
                self.metrics.trimmed.labels(self.name).inc()
                continue
            data = e.data
            if data is None:
                self._dead(e.id, dict(e.fields), "missing_field", f"no {ENTRY_FIELD!r} field")
                continue
            try:
                event = decode_event(data, self.bus.limits)
            except ProtocolError as exc:
                self._dead(e.id, dict(e.fields), exc.reason, str(exc))
                continue
            if event.line != self.bus.line:
                self._dead(
                    e.id,
                    dict(e.fields),
                    "wrong_line",
                    f"event of {event.line!r} on {self.bus.line!r}",
                )
                continue
            payload = verdict_payload(event, e.id)
            self.held.append(Delivery(e.id, event, payload, encode_payload(payload)))
        if skip:
            self.bus.ack("events", self.group, skip)

    def _deliver(self) -> int:
        """Send what is held, oldest first; acknowledge what arrived. Returns that count."""
        handled = 0
        while self.held:
            out = self.sink.deliver(list(self.held))
            n = max(0, min(out.delivered, len(self.held)))
            if n:
                self._acknowledge(self.held[:n])
                del self.held[:n]
                handled += n
            if not self.held:
                break
            if out.refused is not None:
                bad = self.held.pop(0)
                self.counts["refused"] += 1
                self.metrics.sink_refused.labels(self.label).inc()
                self._dead(
                    bad.entry_id, {ENTRY_FIELD: bad.body}, f"{self.sink.kind}_refused", out.refused
                )
                handled += 1
                continue
            self._failed(out.error or "delivery incomplete")
            return handled
        if self.backoff.failures:
            log.info("sink.recovered", sink=self.label, after_failures=self.backoff.failures)
        self.backoff.ok()
        self.last_error = None
        self.metrics.sink_up.labels(self.label).set(1)
        return handled

    def _failed(self, error: str) -> None:
        delay = self.backoff.fail(time.monotonic())
        self.counts["errors"] += 1
        self.metrics.sink_errors.labels(self.label).inc()
        self.metrics.sink_up.labels(self.label).set(0)
        first = self.last_error is None or self.backoff.failures == 1
        self.last_error = error
        (log.warning if first else log.debug)(
            "sink.delivery_failed",
            sink=self.label,
            error=error,
            held=len(self.held),
            failures=self.backoff.failures,
            retry_in_s=round(delay, 2),
        )

    def _acknowledge(self, items: list[Delivery]) -> None:
        self.sink.acknowledge(self.bus, self.group, items)
        self.sink.committed(items)
        self.counts["delivered"] += len(items)
        self.metrics.sink_delivered.labels(self.label).inc(len(items))
        self.metrics.sink_delay.labels(self.label).set(
            max(0.0, time.time() - items[-1].event.t_event)
        )

    def _dead(self, entry_id: str, fields: dict[bytes, bytes], reason: str, detail: str) -> None:
        self.counts["dead"] += 1
        self.metrics.dead_lettered.labels(self.name, reason).inc()
        self.bus.dead_letter("events", self.group, entry_id, fields, reason, detail=detail)


def sink_queues(bus: Bus) -> dict[str, dict[str, Any]]:
    """Every sink group on the events stream with its lag, whether or not its worker runs:
    a sink that is down still shows how far behind it is (``lineguard health``)."""
    try:
        groups = bus.client.xinfo_groups(bus.key("events"))
    except redis.ResponseError:  # no events stream yet
        return {}
    out: dict[str, dict[str, Any]] = {}
    for g in groups:
        raw = g.get("name")
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        if not name.startswith("sink:"):
            continue
        st = bus.group_stats("events", name)
        if st is not None:
            out[name] = {"lag": st.lag, "pending": st.pending, "consumers": st.consumers}
    return out
