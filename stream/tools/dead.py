"""Reading the dead stream back: ``lineguard dead`` (the last N, or ``--follow``).

Every message a stage refused — not msgpack, a forged field, a corrupt image, a frame of
another line, one redelivered too often — is moved there with its reason, byte for byte. An
operator asking "why did frame 4711 get no verdict" needs those reasons without writing
Redis commands; like ``lineguard events`` this is a plain reader, never a consumer group.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from rich.text import Text

from lineguard.stream.bus import Bus, DeadLetter, parse_dead_letter
from lineguard.stream.protocol import ENTRY_FIELD, frame_identity
from lineguard.stream.tools.events import follow_stream
from lineguard.stream.worker import StopFlag


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def last_dead(bus: Bus, n: int) -> list[DeadLetter]:
    """The newest ``n`` dead letters, oldest first."""
    return list(reversed(bus.dead_letters(n))) if n > 0 else []


def follow_dead(
    bus: Bus, *, since: str = "$", stop: StopFlag | None = None, block_ms: int = 500
) -> Iterator[DeadLetter]:
    """Yield dead letters as they are written after ``since`` (``$``: from now) until stop."""
    for entry_id, fields in follow_stream(bus, "dead", since=since, stop=stop, block_ms=block_ms):
        yield parse_dead_letter(entry_id, fields)


def frame_of(bus: Bus, dl: DeadLetter) -> str | None:
    """``line/camera/seq`` of the frame a dead letter claims to be, when it says so."""
    ident = frame_identity(dl.fields.get(ENTRY_FIELD), bus.limits)
    return None if ident is None else f"{ident.line}/{ident.camera}/{ident.seq:09d}"


def dead_json(bus: Bus, dl: DeadLetter) -> str:
    """One JSON object: the annotations, the frame it names, the original fields' sizes."""
    return json.dumps(
        {
            "id": dl.id,
            "reason": dl.reason,
            "detail": dl.detail,
            "frame": frame_of(bus, dl),
            "source_stream": dl.source_stream,
            "source_id": dl.source_id,
            "group": dl.group,
            "deliveries": dl.deliveries,
            "t_dead": dl.t_dead,
            "fields": {_text(k): len(v) for k, v in dl.fields.items()},
        }
    )


def dead_line(bus: Bus, dl: DeadLetter) -> Text:
    """One human line: time, the stage's group, the reason, the frame it names, the detail."""
    when = datetime.fromtimestamp(dl.t_dead).strftime("%H:%M:%S.%f")[:-3] if dl.t_dead else "-"
    line = Text(f"{when}  {dl.group or '-':<7} ")
    line.append(f"{dl.reason:<16}", style="bold red")
    line.append(f"  {frame_of(bus, dl) or '(no frame identity)'}  ")
    line.append(dl.detail, style="dim")
    return line
