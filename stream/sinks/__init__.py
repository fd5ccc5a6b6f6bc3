"""Sinks: send each verdict where the plant listens — MQTT, OPC UA, a webhook.

Each sink is a worker (``lineguard sink mqtt|opcua|webhook``) with its own consumer group
``sink:<kind>:<name>`` on the line's events stream, so it never takes verdicts from anyone
else, several run side by side, and one that is down (or whose receiver is) only falls
behind and catches up, in order per camera, when it is back. Nothing on the hot path waits
for a sink: infer and decide only write the events stream.

Delivery is at least once: an event is acknowledged only after its receiver took it, so a
crash can repeat what was in flight (``queue_size`` events at most), never lose it.
Receivers deduplicate on the payload's ``frame_key`` and ``epoch``; the payload is versioned and
described by ``docs/schemas/verdict-v1.json``. Each sink's module says which duplicates it
can produce; the OPC UA counters are exact (kept in Redis with the acknowledgement).
"""

from __future__ import annotations

from typing import Final

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.settings import Settings
from lineguard.stream.sinks.payload import PAYLOAD_SCHEMA, encode_payload, verdict_payload
from lineguard.stream.sinks.stage import Delivery, Outcome, Sink, SinkStage, sink_group
from lineguard.stream.worker import StopFlag

SINK_KINDS: Final = ("mqtt", "opcua", "webhook")


def build_sink(kind: str, settings: Settings) -> Sink:
    """The sink of ``kind`` configured by ``settings.sinks.<kind>`` (client libraries are
    imported only by the sink that needs them)."""
    if kind == "mqtt":
        from lineguard.stream.sinks.mqtt import MqttSink

        return MqttSink(settings.sinks.mqtt, settings.line.id)
    if kind == "opcua":
        from lineguard.stream.sinks.opcua import OpcuaSink

        return OpcuaSink(settings.sinks.opcua, settings.line.id)
    if kind == "webhook":
        from lineguard.stream.sinks.webhook import WebhookSink

        return WebhookSink(settings.sinks.webhook)
    raise ConfigError(f"unknown sink kind {kind!r}; use one of {', '.join(SINK_KINDS)}")


def sink_stage(
    kind: str,
    settings: Settings,
    bus: Bus,
    *,
    consumer: str | None = None,
    stop: StopFlag | None = None,
) -> SinkStage:
    """A ready-to-run stage for sink ``kind`` (``run_worker(sink_stage(...), bus)``)."""
    sink = build_sink(kind, settings)
    cfg = getattr(settings.sinks, kind)
    return SinkStage(bus, settings, sink, cfg, consumer=consumer, stop=stop)


__all__ = [
    "PAYLOAD_SCHEMA",
    "SINK_KINDS",
    "Delivery",
    "Outcome",
    "Sink",
    "SinkStage",
    "build_sink",
    "encode_payload",
    "sink_group",
    "sink_stage",
    "verdict_payload",
]
