"""The OPC UA sink's server, read with asyncua's own client."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.settings import Settings
from lineguard.stream.sinks import sink_stage
from tests.stream.sink_helpers import free_port, produce, running, sink_settings, wait_until

asyncua = pytest.importorskip("asyncua")

NAMES = ("Verdict", "FrameKey", "Score", "PassCount", "FailCount", "UninspectedCount",
         "ErrorCount", "TotalCount")  # fmt: skip


def read_cameras(
    url: str, cameras: tuple[str, ...], user: str | None = None, password: str | None = None
) -> dict[str, dict[str, Any]]:
    async def go() -> dict[str, dict[str, Any]]:
        client = asyncua.Client(url, timeout=5)
        if user is not None:
            client.set_user(user)
            client.set_password(password or "")
        async with client:
            idx = await client.get_namespace_index("urn:lineguard:verdicts")
            out: dict[str, dict[str, Any]] = {}
            for cam in cameras:
                out[cam] = {}
                for name in NAMES:
                    node = client.get_node(asyncua.ua.NodeId(f"line1.{cam}.{name}", idx))
                    out[cam][name] = await node.read_value()
            return out

    return asyncio.run(go())


def opcua_settings(bus: Bus, port: int, **more: Any) -> Settings:
    return sink_settings(bus, **{"sinks.opcua.port": port, "sinks.opcua.start": "all", **more})


def expected(events: list[Any], cam: str) -> dict[str, Any]:
    mine = [e for e in events if e.camera == cam]
    counts = {
        v: sum(e.verdict == v for e in mine) for v in ("pass", "fail", "uninspected", "error")
    }
    return {
        "Verdict": mine[-1].verdict,
        "FrameKey": mine[-1].key,
        "PassCount": counts["pass"],
        "FailCount": counts["fail"],
        "UninspectedCount": counts["uninspected"],
        "ErrorCount": counts["error"],
        "TotalCount": len(mine),
    }


def test_last_verdict_and_counters_per_camera_survive_a_restart(bus: Bus) -> None:
    port = free_port()
    settings = opcua_settings(bus, port)
    url = f"opc.tcp://127.0.0.1:{port}/lineguard"
    events = produce(bus, ("cam0", "cam1"), range(14))
    stage = sink_stage("opcua", settings, bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
        got = read_cameras(url, ("cam0", "cam1"))
    for cam in ("cam0", "cam1"):
        want = expected(events, cam)
        assert {k: got[cam][k] for k in want} == want
        last = [e for e in events if e.camera == cam][-1]
        score = got[cam]["Score"]
        assert (score != score) if last.score is None else score == pytest.approx(last.score)
    # sink down while the line goes on; back up: the counters continue, nothing twice
    events += produce(bus, ("cam0", "cam1"), range(14, 20))
    stage = sink_stage("opcua", settings, bus)
    with running(stage, bus):
        first = read_cameras(url, ("cam0",))  # restored from Redis before anything new
        assert first["cam0"]["TotalCount"] >= 14
        wait_until(stage.done, 20, "catch-up")
        got = read_cameras(url, ("cam0", "cam1"))
    for cam in ("cam0", "cam1"):
        want = expected(events, cam)
        assert {k: got[cam][k] for k in want} == want


def test_password_refuses_anonymous_and_non_loopback_needs_one(bus: Bus) -> None:
    with pytest.raises(ConfigError, match="reachable from the network"):
        opcua_settings(bus, 4840, **{"sinks.opcua.host": "0.0.0.0"})
    port = free_port()
    settings = opcua_settings(
        bus, port, **{"sinks.opcua.username": "plc", "sinks.opcua.password": "opcua-pass-123"}
    )
    url = f"opc.tcp://127.0.0.1:{port}/lineguard"
    events = produce(bus, ("cam0",), range(3))
    stage = sink_stage("opcua", settings, bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
        got = read_cameras(url, ("cam0",), "plc", "opcua-pass-123")
        assert got["cam0"]["FrameKey"] == events[-1].key
        with pytest.raises(Exception):  # noqa: B017 - asyncua raises its own ua errors
            read_cameras(url, ("cam0",))
        with pytest.raises(Exception):  # noqa: B017
            read_cameras(url, ("cam0",), "plc", "wrong-password")


def test_a_repeated_acknowledgement_counts_nothing_twice(bus: Bus) -> None:
    """What a retried call after a lost reply does: the counters move only with an
    acknowledgement that took effect."""
    from lineguard.stream.protocol import decode_event
    from lineguard.stream.sinks import Delivery, encode_payload, verdict_payload
    from lineguard.stream.sinks.opcua import OpcuaSink

    settings = opcua_settings(bus, free_port())
    events = produce(bus, ("cam0",), range(4))
    group = "sink:opcua:default"
    bus.ensure_group("events", group)
    entries = bus.read_group("events", group, "c", count=10)
    items = []
    for e in entries:
        ev = decode_event(e.data, bus.limits)
        payload = verdict_payload(ev, e.id)
        items.append(Delivery(e.id, ev, payload, encode_payload(payload)))
    sink = OpcuaSink(settings.sinks.opcua, "line1")
    sink.bind(bus, group)  # its state and script, without starting a server
    sink.acknowledge(bus, group, items)
    sink.acknowledge(bus, group, items)
    state = {k.decode(): v for k, v in bus.client.hgetall(sink.state_key).items()}
    counted = sum(int(v) for k, v in state.items() if not k.endswith("|last"))
    assert counted == len(events) == 4
    assert state["cam0|pass"] == str(sum(e.verdict == "pass" for e in events)).encode()
    assert bus.group_stats("events", group).pending == 0
