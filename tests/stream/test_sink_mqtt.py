"""The MQTT sink against a real Mosquitto: the system broker at 127.0.0.1:1883 when it
answers, else one started here; the outage test always starts its own (it stops it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.sinks import sink_group, sink_stage
from tests.stream.sink_helpers import (
    Mosquitto,
    MqttRecorder,
    first_seen_in_order,
    port_open,
    produce,
    running,
    sink_settings,
    wait_until,
)

paho = pytest.importorskip("paho.mqtt.client")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    if port_open("127.0.0.1", 1883):
        yield "127.0.0.1", 1883
        return
    own = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    if not own.available:
        pytest.skip("no MQTT broker at 127.0.0.1:1883 and no mosquitto binary to start one")
    own.start()
    try:
        yield "127.0.0.1", own.port
    finally:
        own.stop()


def test_one_qos1_message_per_verdict_on_its_camera_topic(
    bus: Bus, broker: tuple[str, int]
) -> None:
    host, port = broker
    root = f"lgtest/{uuid.uuid4().hex[:8]}"
    settings = sink_settings(
        bus,
        **{
            "sinks.mqtt.host": host,
            "sinks.mqtt.port": port,
            "sinks.mqtt.topic": root + "/{line}/{camera}/verdict",
            "sinks.mqtt.start": "all",
        },
    )
    sub = MqttRecorder(host, port, root + "/#")
    try:
        events = produce(bus, ("cam0", "cam1"), range(12))
        stage = sink_stage("mqtt", settings, bus)
        with running(stage, bus):
            wait_until(lambda: len(sub.keys()) >= len(events), 20, "all verdicts at the subscriber")
            wait_until(stage.done, 10, "the group to be fully acknowledged")
        with sub.lock:
            got = list(sub.messages)
    finally:
        sub.close()
    assert sorted(p["frame_key"] for _, p, _ in got) == sorted(e.key for e in events)
    for topic, payload, _ in got:
        assert topic == f"{root}/line1/{payload['camera']}/verdict"
    by_key = {p["frame_key"]: p for _, p, _ in got}
    for ev in events:
        p = by_key[ev.key]
        assert (p["verdict"], p["score"], p["threshold"], p["model"]) == (
            ev.verdict, ev.score, ev.threshold, ev.model,
        )  # fmt: skip
    order = first_seen_in_order([p["frame_key"] for _, p, _ in got])
    assert all(seqs == sorted(seqs) for seqs in order.values()), order
    stats = bus.group_stats("events", sink_group("mqtt", "default"))
    assert stats is not None and stats.pending == 0 and stats.lag == 0


def test_retained_last_verdict_per_camera(bus: Bus, broker: tuple[str, int]) -> None:
    host, port = broker
    root = f"lgtest/{uuid.uuid4().hex[:8]}"
    settings = sink_settings(
        bus,
        **{
            "sinks.mqtt.host": host,
            "sinks.mqtt.port": port,
            "sinks.mqtt.topic": root + "/{camera}",
            "sinks.mqtt.retain": True,
            "sinks.mqtt.start": "all",
        },
    )
    events = produce(bus, ("cam0", "cam1"), range(5))
    stage = sink_stage("mqtt", settings, bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
    late = MqttRecorder(host, port, root + "/#")  # connects after everything was sent
    try:
        wait_until(lambda: len(late.keys()) >= 2, 10, "the retained messages")
        with late.lock:
            retained = {t: p["frame_key"] for t, p, r in late.messages if r}
    finally:
        late.close()
        for cam in ("cam0", "cam1"):  # clear the retained messages off the shared broker
            c = paho.Client(paho.CallbackAPIVersion.VERSION2)
            c.connect(host, port)
            c.loop_start()
            c.publish(f"{root}/{cam}", b"", qos=1, retain=True).wait_for_publish(5)
            c.disconnect()
            c.loop_stop()
    assert retained == {f"{root}/{e.camera}": e.key for e in events[-2:]}


def test_broker_outage_loses_nothing_and_keeps_order(bus: Bus, tmp_path: Path) -> None:
    own = Mosquitto(tmp_path)
    if not own.available:
        pytest.skip("the outage test stops a broker of its own: no mosquitto binary found")
    own.start()
    root = f"lgtest/{uuid.uuid4().hex[:8]}"
    settings = sink_settings(
        bus,
        **{
            "sinks.mqtt.port": own.port,
            "sinks.mqtt.topic": root + "/{camera}",
            "sinks.mqtt.start": "all",
            "sinks.mqtt.retry_base_s": 0.2,
            "sinks.mqtt.retry_cap_s": 1.0,
            "sinks.mqtt.queue_size": 16,
        },
    )
    sub = MqttRecorder(
        "127.0.0.1", own.port, root + "/#", client_id=f"durable-{uuid.uuid4().hex[:6]}"
    )
    stage = sink_stage("mqtt", settings, bus)
    try:
        with running(stage, bus):
            events = produce(bus, ("cam0", "cam1"), range(0, 20))
            wait_until(stage.done, 20, "the first verdicts delivered")
            own.stop()
            events += produce(bus, ("cam0", "cam1"), range(20, 80))
            wait_until(lambda: stage.counts["errors"] > 0, 10, "the sink to notice the outage")
            lag = stage.lag()
            assert lag is not None and lag > 0
            own.start()
            wait_until(stage.done, 30, "catch-up after the outage")
            wait_until(
                lambda: len(set(sub.keys())) >= len(events), 20, "everything at the subscriber"
            )
    finally:
        sub.close()
        own.stop()
    order = first_seen_in_order(sub.keys())
    assert sorted(order) == ["cam0", "cam1"]
    for cam, seqs in order.items():
        assert seqs == list(range(80)), (cam, seqs)
    assert stage.counts["dead"] == 0 and stage.counts["refused"] == 0
