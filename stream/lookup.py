"""Finding one frame's ``Frame`` and ``Scores`` messages again on the bounded streams.

An event names its frame but carries neither the image nor the anomaly map; both are still
on the frames and scores streams for a while (until MAXLEN trims them). The dashboard's
reject gallery and the history's reject archive both need them, so the search lives here:
by entry-id time range around when the message was written (the event's latency breakdown
says when that was), peeking at the identity of each entry without decoding the rest, and
looking at a bounded number of entries. Read-only: plain XRANGE, never a group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, TypeVar

import msgpack

from lineguard.stream.bus import Bus, StreamName
from lineguard.stream.protocol import (
    ENTRY_FIELD,
    Event,
    Frame,
    ProtocolError,
    Scores,
    decode_frame,
    decode_scores,
)

T = TypeVar("T")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


Identity: TypeAlias = tuple[str, str, int, str]
"""(line, camera, seq, epoch): a frame key alone repeats after Redis lost its data."""


def peek_identity(fields: Any) -> Identity | None:
    """(line, camera, seq, epoch) of a packed message without validating the rest of it."""
    try:
        data = fields.get(ENTRY_FIELD)
        obj = msgpack.unpackb(data, raw=False) if isinstance(data, bytes) else None
    except Exception:  # hostile or foreign entry: not ours to judge here
        return None
    if not isinstance(obj, dict):
        return None
    line, camera, seq = obj.get("line"), obj.get("camera"), obj.get("seq")
    epoch = obj.get("epoch", "")
    if isinstance(line, str) and isinstance(camera, str) and type(seq) is int:
        return line, camera, seq, epoch if isinstance(epoch, str) else ""
    return None


def scan(bus: Bus, stream: StreamName, lo_ms: int, hi_ms: int, want: Identity, limit: int) -> Any:
    """The fields of the first entry of ``stream`` between the two times whose message is for
    frame ``want``, looking at no more than ``limit`` entries (None if not found)."""
    key = bus.key(stream)
    start = f"{max(0, lo_ms)}-0"
    seen = 0
    page = min(100, max(1, limit))
    while seen < limit:
        rows: Any = bus.client.xrange(key, min=start, max=f"{max(0, hi_ms)}", count=page)
        for _entry_id, fields in rows or ():
            if peek_identity(fields) == want:
                return fields
        seen += len(rows or ())
        if not rows or len(rows) < page:
            return None
        start = "(" + _text(rows[-1][0])
    return None


def _find(
    bus: Bus,
    stream: StreamName,
    want: Identity,
    windows: list[tuple[int, int, int]],
    decode: Callable[[Any, Any], T],
) -> T | None:
    """The decoded message for frame ``want`` from the first of ``windows`` (lo ms, hi ms,
    entries to look at) that has it; None if none has it or its message does not decode."""
    for lo, hi, limit in windows:
        fields = scan(bus, stream, lo, hi, want, limit)
        if fields is not None:
            try:
                return decode(fields.get(ENTRY_FIELD), bus.limits)
            except ProtocolError:
                return None
    return None


def find_scores(bus: Bus, ev: Event, *, scan_limit: int = 2_000) -> Scores | None:
    """The scores message of ``ev``'s frame, by time range around when infer wrote it."""
    want = (ev.line, ev.camera, ev.seq, ev.epoch)
    lat = ev.latency
    t_capture_ms = int(ev.t_capture * 1000)
    t_event_ms = int(ev.t_event * 1000)
    windows = []
    if "decide" in lat and "handoff" in lat:
        t_scored_ms = int((ev.t_event - lat["decide"] - lat["handoff"]) * 1000)
        windows.append((t_scored_ms - 20, t_event_ms + 2000, 500))
    windows.append((t_capture_ms - 5000, t_event_ms + 5000, scan_limit))
    return _find(bus, "scores", want, windows, decode_scores)


def find_frame(
    bus: Bus, ev: Event, t_queued: float | None, *, scan_limit: int = 200
) -> Frame | None:
    """The frame itself, if the bounded frames stream still has it. ``t_queued`` (when ingest
    appended it, from the scores' timings or the event's latency) narrows the search to a
    couple of milliseconds."""
    want = (ev.line, ev.camera, ev.seq, ev.epoch)
    windows = []
    if t_queued:
        ms = round(t_queued * 1000)
        windows.append((ms - 1, ms + 1, 200))
    t_capture_ms = int(ev.t_capture * 1000)
    windows.append((t_capture_ms - 1000, int(ev.t_event * 1000), scan_limit))
    return _find(bus, "frames", want, windows, decode_frame)


def queued_at(ev: Event, scores: Scores | None) -> float | None:
    """When ingest appended ``ev``'s frame, from the scores' timings or the event's latency."""
    if scores is not None and scores.timings.get("t_queued"):
        return scores.timings["t_queued"]
    if "ingest" in ev.latency:
        return ev.t_capture + ev.latency["ingest"]
    return None
