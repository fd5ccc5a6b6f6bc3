"""Reading verdicts back: ``lineguard events`` (the last N, or ``--follow`` as they arrive).

A plain XREAD/XREVRANGE reader, not a consumer group: watching the line must never take
events away from the systems that act on them (a reject gate, an MES bridge).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from typing import Any

from rich.text import Text

from lineguard.stream.bus import Bus, StreamName
from lineguard.stream.protocol import ENTRY_FIELD, Event, ProtocolError, decode_event
from lineguard.stream.worker import StopFlag

VERDICT_STYLE = {"pass": "green", "fail": "bold red", "error": "magenta", "uninspected": "yellow"}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(bus: Bus, fields: Any) -> Event | None:
    try:
        return decode_event(fields.get(ENTRY_FIELD), bus.limits)
    except ProtocolError:
        return None


def last_events(bus: Bus, n: int, camera: str | None = None) -> list[tuple[str, Event]]:
    """The newest ``n`` events (oldest first), optionally of one camera."""
    out: list[tuple[str, Event]] = []
    end = "+"
    while len(out) < n:
        rows = bus.client.xrevrange(bus.key("events"), max=end, count=max(100, n))
        if not rows:
            break
        for entry_id, fields in rows:
            ev = _decode(bus, fields)
            if ev is not None and (camera is None or ev.camera == camera):
                out.append((_text(entry_id), ev))
                if len(out) >= n:
                    break
        end = "(" + _text(rows[-1][0])
    out.reverse()
    return out


def follow_events(
    bus: Bus,
    *,
    since: str = "$",
    camera: str | None = None,
    stop: StopFlag | None = None,
    block_ms: int = 500,
) -> Iterator[tuple[str, Event]]:
    """Yield events as they are written after ``since`` (``$`` = from now) until ``stop``."""
    for entry_id, fields in follow_stream(bus, "events", since=since, stop=stop, block_ms=block_ms):
        ev = _decode(bus, fields)
        if ev is not None and (camera is None or ev.camera == camera):
            yield entry_id, ev


def follow_stream(
    bus: Bus,
    stream: StreamName,
    *,
    since: str = "$",
    stop: StopFlag | None = None,
    block_ms: int = 500,
) -> Iterator[tuple[str, Any]]:
    """``(entry id, fields)`` of a stream as they are written after ``since`` (``$``: from
    now) until ``stop``: a plain XREAD reader, shared by ``events`` and ``dead``."""
    key = bus.key(stream)
    cursor = since
    if cursor == "$":
        newest: Any = bus.client.xrevrange(key, count=1)
        cursor = _text(newest[0][0]) if newest else "0-0"
    while stop is None or not stop.is_set():
        reply: Any = bus.client.xread({key: cursor}, count=500, block=block_ms)
        for _stream, rows in reply or ():
            for entry_id, fields in rows:
                cursor = _text(entry_id)
                yield cursor, fields


def event_line(ev: Event) -> Text:
    """One human line: time, frame key, verdict, score/threshold or reason, latency, model."""
    when = datetime.fromtimestamp(ev.t_event).strftime("%H:%M:%S.%f")[:-3]
    line = Text(f"{when}  {ev.key}  ")
    line.append(f"{ev.verdict:<11}", style=VERDICT_STYLE.get(ev.verdict, ""))
    if ev.score is not None and ev.threshold is not None:
        line.append(f"  score {ev.score:8.3f} / {ev.threshold:.3f}")
    total = ev.latency.get("total")
    if total is not None:
        line.append(f"  {total * 1000:7.1f} ms")
    if ev.verdict != "pass" and ev.reason:
        line.append(f"  {ev.reason}", style="dim")
    line.append(f"  [{ev.model}]", style="dim")
    return line


def event_json(ev: Event, entry_id: str | None = None) -> str:
    data = asdict(ev)
    data["key"] = ev.key
    if entry_id is not None:
        data["id"] = entry_id
    return json.dumps(data, sort_keys=True)
