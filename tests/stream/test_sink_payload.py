"""The verdict payload against its published JSON Schema, and the sink stage's contract
(group per sink, poison entries, several sinks side by side)."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.protocol import ENTRY_FIELD
from lineguard.stream.sinks import PAYLOAD_SCHEMA, Delivery, Outcome, SinkStage, sink_group
from lineguard.stream.sinks.payload import verdict_payload
from lineguard.stream.sinks.stage import ack_plain
from tests.stream.sink_helpers import make_event, produce, running, sink_settings, wait_until

jsonschema = pytest.importorskip("jsonschema")

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "schemas" / "verdict-v1.json"


class Collecting:
    """A sink that keeps what it is given (a real in-process receiver, for the stage's own
    contract); ``down`` makes it refuse to deliver, as a receiver that is away would."""

    kind = "memory"

    def __init__(self) -> None:
        self.got: list[dict[str, Any]] = []
        self.down = threading.Event()

    def open(self, bus: Bus, group: str) -> None:
        return None

    def deliver(self, items: list[Delivery]) -> Outcome:
        if self.down.is_set():
            return Outcome(0, error="receiver away")
        self.got.extend(json.loads(d.body) for d in items)
        return Outcome(len(items))

    def acknowledge(self, bus: Bus, group: str, items: list[Delivery]) -> None:
        ack_plain(bus, group, items)

    def committed(self, items: list[Delivery]) -> None:
        return None

    def wake(self) -> bool:
        return False

    def connected(self) -> bool:
        return not self.down.is_set()

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None


def memory_stage(bus: Bus, name: str) -> tuple[SinkStage, Collecting]:
    settings = sink_settings(
        bus,
        **{
            "sinks.webhook.name": name,
            "sinks.webhook.start": "all",
            "sinks.webhook.retry_base_s": 0.05,
            "sinks.webhook.retry_cap_s": 0.2,
        },
    )
    sink = Collecting()
    return SinkStage(bus, settings, sink, settings.sinks.webhook), sink


def test_real_payloads_validate_against_the_schema(bus: Bus) -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    stage, sink = memory_stage(bus, "schema")
    events = produce(bus, ("cam0", "cam-b.2"), range(12))  # every verdict kind
    with running(stage, bus):
        wait_until(stage.done, 10, "delivery")
    assert {p["verdict"] for p in sink.got} == {"pass", "fail", "uninspected", "error"}
    assert len(sink.got) == len(events)
    for payload in sink.got:
        errors = sorted(validator.iter_errors(payload), key=str)
        assert not errors, errors
        assert payload["schema"] == PAYLOAD_SCHEMA
    # the schema is not a rubber stamp: a pass without its score is refused
    broken = dict(sink.got[0], verdict="pass", score=None)
    assert not validator.is_valid(broken)
    assert not validator.is_valid({k: v for k, v in sink.got[0].items() if k != "frame_key"})
    assert not validator.is_valid(dict(sink.got[0], epoch="a/b"))


def test_payload_fields_mirror_the_event() -> None:
    ev = make_event("cam0", 2)  # a fail
    p = verdict_payload(ev, "1-0")
    assert p["frame_key"] == "line1/cam0/000000002" and p["epoch"] == ""
    assert verdict_payload(dataclasses.replace(ev, epoch="e7"), "1-0")["epoch"] == "e7"
    assert (p["verdict"], p["score"], p["threshold"]) == ("fail", 1.5, 1.0)
    assert p["latency_s"] == ev.latency["total"]
    assert p["capture_time"].endswith("Z") and p["event_id"] == "1-0"


def test_two_sinks_each_get_everything_and_one_down_does_not_hold_the_other(bus: Bus) -> None:
    a, sink_a = memory_stage(bus, "a")
    b, sink_b = memory_stage(bus, "b")
    sink_b.down.set()
    events = produce(bus, ("cam0", "cam1"), range(10))
    with running(a, bus), running(b, bus):
        wait_until(a.done, 10, "sink a to deliver")
        assert len(sink_a.got) == len(events) and not sink_b.got
        assert b.lag() == len(events)
        sink_b.down.clear()
        wait_until(b.done, 10, "sink b to catch up")
    assert [p["frame_key"] for p in sink_b.got] == [e.key for e in events]
    assert sink_group("webhook", "a") != sink_group("webhook", "b")


def test_poison_entries_are_dead_lettered_not_delivered(bus: Bus) -> None:
    stage, sink = memory_stage(bus, "poison")
    produce(bus, ("cam0",), range(2))
    bus.client.xadd(bus.key("events"), {ENTRY_FIELD: b"\x93not-an-event"})
    bus.client.xadd(bus.key("events"), {b"other": b"x"})
    bus.add("events", make_event("cam0", 5, line="line2"))
    produce(bus, ("cam0",), range(2, 4))
    with running(stage, bus):
        wait_until(stage.done, 10, "delivery")
    assert [p["seq"] for p in sink.got] == [0, 1, 2, 3]
    reasons = sorted(d.reason for d in bus.dead_letters())
    assert len(reasons) == 3 and "missing_field" in reasons and "wrong_line" in reasons
    assert stage.counts["dead"] == 3
