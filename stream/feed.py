"""Feeding a finite source into the line and collecting the verdict of each of its frames.

``lineguard run``, ``replay``, the demo and the end-to-end benchmark all send a known set of
frames and then need exactly one event back for each: ``send_source`` sends with the ingest
stage's own code and remembers which sequence numbers it used, ``wait_for_events`` (or
``EventCollector``, in a background thread while sending) follows the events stream until
every one has a verdict, and ``summarise`` turns that into counts and latencies — with the
frames that got no event or more than one, which would break the one-frame-one-verdict rule.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lineguard.engines.codec import FrameCodec
from lineguard.stream.bus import Bus, connect
from lineguard.stream.ingest import Ingestor, Pacer, Sent
from lineguard.stream.protocol import ENTRY_FIELD, Event, ProtocolError, decode_event
from lineguard.stream.settings import Settings
from lineguard.stream.sources import Recorder, Source
from lineguard.stream.worker import StopFlag


def events_cursor(bus: Bus) -> str:
    """The id of the newest event (``0-0`` if none): follow from here to see only new ones."""
    rows = bus.client.xrevrange(bus.key("events"), count=1)
    if not rows:
        return "0-0"
    first = rows[0][0]
    return first.decode() if isinstance(first, bytes) else str(first)


@dataclass
class SendResult:
    """What a producer sent: its camera, the seqs it used and the source names of each."""

    camera: str
    names: dict[int, str] = field(default_factory=dict)
    t_first: float = 0.0
    t_last: float = 0.0
    events_from: str = "0-0"

    @property
    def seqs(self) -> list[int]:
        return sorted(self.names)

    @property
    def count(self) -> int:
        return len(self.names)


def send_source(
    bus: Bus,
    settings: Settings,
    source: Source,
    *,
    size: tuple[int, int] | None,
    fps: float | None = None,
    record: str | Path | None = None,
    limit: int | None = None,
    stop: StopFlag | None = None,
    on_sent: Callable[[Sent], None] | None = None,
    codec: FrameCodec | None = None,
) -> SendResult:
    """Send every capture of ``source`` (up to ``limit``) as the configured camera, encoded
    as the settings say or else as ``codec`` (the bundle's) says."""
    recorder = Recorder(record) if record is not None else None
    ingestor = Ingestor.from_settings(bus, settings, size=size, recorder=recorder, codec=codec)
    pacer = Pacer(fps, stop)
    result = SendResult(camera=ingestor.camera, events_from=events_cursor(bus))
    try:
        for capture in source:
            if stop is not None and stop.is_set():
                break
            if limit is not None and result.count >= limit:
                break
            pacer.wait()
            sent = ingestor.send(capture.image, name=capture.name)
            result.names[sent.frame.seq] = capture.name
            if not result.t_first:
                result.t_first = sent.frame.t_capture
            result.t_last = time.time()
            if on_sent is not None:
                on_sent(sent)
    finally:
        if recorder is not None:
            recorder.close()
    return result


def wait_for_events(
    bus: Bus,
    camera: str,
    seqs: set[int] | list[int],
    *,
    since: str = "0-0",
    timeout_s: float = 60.0,
    stop: StopFlag | None = None,
    on_event: Callable[[Event], None] | None = None,
    block_ms: int = 500,
) -> tuple[dict[int, Event], Counter[int]]:
    """Follow the events stream from ``since`` until every seq of ``camera`` has an event.

    Returns the first event per seq and how many events each seq got (more than one would
    break the exactly-once contract; callers report it).
    """
    wanted = set(seqs)
    got: dict[int, Event] = {}
    counts: Counter[int] = Counter()
    cursor = since
    key = bus.key("events")
    deadline = time.monotonic() + timeout_s
    while len(got) < len(wanted):
        if stop is not None and stop.is_set():
            break
        left_ms = int((deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            break
        reply: Any = bus.client.xread(
            {key: cursor}, count=1000, block=max(1, min(block_ms, left_ms))
        )
        for _stream, rows in reply or ():
            for entry_id, fields in rows:
                cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                data = fields.get(ENTRY_FIELD)
                try:
                    event = decode_event(data, bus.limits)
                except ProtocolError:
                    continue
                if event.camera != camera or event.seq not in wanted:
                    continue
                counts[event.seq] += 1
                if event.seq not in got:
                    got[event.seq] = event
                    if on_event is not None:
                        on_event(event)
    return got, counts


class EventCollector:
    """Follows the events stream in a background thread, keeping the events of one camera.

    For callers that send and watch at the same time (``lineguard run``, the demo, the
    benchmark). It uses its own connection, since a blocking read holds one.
    """

    def __init__(
        self,
        settings: Settings,
        url: str,
        camera: str,
        *,
        since: str = "0-0",
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.client = connect(settings, url, client_name="lineguard-events")
        self.bus = Bus.from_settings(self.client, settings)
        self.camera = camera
        self.cursor = since
        self.on_event = on_event
        self.events: dict[int, Event] = {}
        self.counts: Counter[int] = Counter()
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="events", daemon=True)

    def start(self) -> EventCollector:
        self._thread.start()
        return self

    def _run(self) -> None:
        key = self.bus.key("events")
        try:
            while not self._stop.is_set():
                reply: Any = self.client.xread({key: self.cursor}, count=1000, block=250)
                for _stream, rows in reply or ():
                    for entry_id, fields in rows:
                        self.cursor = _text(entry_id)
                        try:
                            event = decode_event(fields.get(ENTRY_FIELD), self.bus.limits)
                        except ProtocolError:
                            continue
                        if event.camera != self.camera:
                            continue
                        with self._lock:
                            self.counts[event.seq] += 1
                            first = event.seq not in self.events
                            if first:
                                self.events[event.seq] = event
                            self._lock.notify_all()
                        if first and self.on_event is not None:
                            self.on_event(event)
        except BaseException as exc:  # surfaced by wait_for
            self.error = exc
            with self._lock:
                self._lock.notify_all()

    def wait_for(
        self, seqs: list[int] | set[int], timeout_s: float, check: Callable[[], None] | None = None
    ) -> bool:
        """Block until every seq has an event (True) or ``timeout_s`` passes (False)."""
        wanted = set(seqs)
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                if self.error is not None:
                    raise self.error
                if wanted <= self.events.keys():
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(min(left, 0.5))
                if check is not None:
                    check()

    def snapshot(self) -> tuple[dict[int, Event], Counter[int]]:
        with self._lock:
            return dict(self.events), Counter(self.counts)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.client.close()

    def __enter__(self) -> EventCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class RunSummary:
    """Counts and latencies of one replay or run (printed as a table, or as JSON)."""

    sent: int
    verdicts: dict[str, int]
    missing: int
    duplicates: int
    seconds: float
    latency_ms: dict[str, float]

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicates == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "verdicts": self.verdicts,
            "missing": self.missing,
            "duplicates": self.duplicates,
            "seconds": round(self.seconds, 3),
            "frames_per_s": round(self.sent / self.seconds, 2) if self.seconds > 0 else None,
            "latency_ms": self.latency_ms,
        }


def summarise(
    sent: SendResult, events: dict[int, Event], counts: Counter[int], t_end: float | None = None
) -> RunSummary:
    verdicts = Counter(e.verdict for e in events.values())
    totals = [e.latency["total"] for e in events.values() if "total" in e.latency]
    lat: dict[str, float] = {}
    if totals:
        arr = np.asarray(totals) * 1000
        lat = {
            "p50": round(float(np.percentile(arr, 50)), 2),
            "p99": round(float(np.percentile(arr, 99)), 2),
        }
    last_event = max((e.t_event for e in events.values()), default=sent.t_last)
    end = t_end if t_end is not None else last_event
    return RunSummary(
        sent=sent.count,
        verdicts={v: verdicts.get(v, 0) for v in ("pass", "fail", "error", "uninspected")},
        missing=sent.count - len(events),
        duplicates=sum(n - 1 for n in counts.values() if n > 1),
        seconds=max(0.0, end - sent.t_first) if sent.t_first else 0.0,
        latency_ms=lat,
    )
