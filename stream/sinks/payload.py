"""The verdict payload every sink sends: one JSON object per event, schema version 1.

A plant integrator codes against ``docs/schemas/verdict-v1.json``, so this module is the only
place that decides which fields go out and how they are spelled. Fields are only ever added
within a version; renaming or removing one, or changing its meaning, is a new version (a new
schema file and a new ``schema`` string), so a receiver can refuse what it does not know.

Receivers deduplicate on ``frame_key`` and ``epoch``: every sink delivers at least once (see
``lineguard.stream.sinks``), and both are the same on every copy of a verdict. The frame key
alone repeats after Redis lost its data (ingest numbers frames from 0 again, under a new
epoch); ``epoch`` was added within v1, so it is ``""`` from a line that predates it.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Final

from lineguard.stream.protocol import Event

PAYLOAD_SCHEMA: Final = "lineguard.verdict/1"
"""Sent as the payload's ``schema`` field; names the JSON Schema file ``verdict-v1.json``."""


def _number(value: float | None) -> float | None:
    # JSON has no NaN or infinity; the bus refuses them too, so this is belt and braces.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def iso_utc(t: float) -> str:
    """``t`` (Unix seconds) as RFC 3339 UTC with microseconds, e.g. 2026-12-03T06:10:53.123456Z."""
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def verdict_payload(event: Event, entry_id: str) -> dict[str, Any]:
    """The JSON-ready payload of ``event``, read from the events stream at ``entry_id``."""
    total = event.latency.get("total")
    if total is None:
        total = max(0.0, event.t_event - event.t_capture)
    return {
        "schema": PAYLOAD_SCHEMA,
        "frame_key": event.key,
        "epoch": event.epoch,
        "line": event.line,
        "camera": event.camera,
        "seq": event.seq,
        "verdict": event.verdict,
        "score": _number(event.score),
        "threshold": _number(event.threshold),
        "reason": event.reason,
        "model": event.model,
        "capture_time": iso_utc(event.t_capture),
        "t_capture": event.t_capture,
        "t_event": event.t_event,
        "latency_s": _number(total),
        "latency": {k: v for k, v in event.latency.items() if math.isfinite(v)},
        "contributions": {k: v for k, v in event.contributions.items() if math.isfinite(v)},
        "event_id": entry_id,
    }


def encode_payload(payload: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (what goes on the wire and what a webhook signature covers)."""
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()
