"""The webhook sink against a real HTTP server on loopback (http.server in a thread)."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import structlog

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus
from lineguard.stream.sinks import sink_group, sink_stage
from tests.stream.sink_helpers import (
    HttpReceiver,
    first_seen_in_order,
    free_port,
    produce,
    running,
    sink_settings,
    wait_until,
)

SECRET = "webhook-secret-for-tests-0123456789"


@pytest.fixture
def receiver() -> Iterator[Callable[..., HttpReceiver]]:
    made: list[HttpReceiver] = []

    def make(answer: Callable[[int, dict[str, Any]], int] = lambda n, p: 200) -> HttpReceiver:
        r = HttpReceiver(free_port(), answer)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


def settings_for(bus: Bus, port: int, **more: Any) -> Any:
    return sink_settings(
        bus,
        **{
            "sinks.webhook.url": f"http://127.0.0.1:{port}/hook",
            "sinks.webhook.secret": SECRET,
            "sinks.webhook.start": "all",
            "sinks.webhook.retry_base_s": 0.05,
            "sinks.webhook.retry_cap_s": 0.4,
            "sinks.webhook.timeout_s": 2.0,
            **more,
        },
    )


def test_each_verdict_is_posted_once_and_signed(bus: Bus, receiver: Any) -> None:
    r = receiver()
    r.start()
    events = produce(bus, ("cam0", "cam1"), range(10))
    stage = sink_stage("webhook", settings_for(bus, r.port), bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
    assert sorted(r.delivered_keys()) == sorted(e.key for e in events)
    for _status, headers, body in r.requests:
        want = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Lineguard-Signature"] == want
        assert headers["Idempotency-Key"] == json.loads(body)["frame_key"]
        assert headers["Content-Type"] == "application/json"
    # a tampered body does not verify
    _s, headers, body = r.requests[0]
    forged = body.replace(b'"verdict":"', b'"verdict":"x', 1)
    bad = "sha256=" + hmac.new(SECRET.encode(), forged, hashlib.sha256).hexdigest()
    assert bad != headers["X-Lineguard-Signature"]


def test_failing_receiver_is_retried_with_backoff_until_it_recovers(
    bus: Bus, receiver: Any
) -> None:
    r = receiver(lambda n, p: 503 if n < 4 else 200)
    r.start()
    events = produce(bus, ("cam0",), range(6))
    stage = sink_stage("webhook", settings_for(bus, r.port), bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
    statuses = [s for s, _, _ in r.requests]
    assert statuses[:4] == [503] * 4 and set(statuses[4:]) == {200}
    # the same (oldest) verdict was retried each time: nothing newer overtook it
    first = [json.loads(b)["frame_key"] for _, _, b in r.requests[:5]]
    assert first == [events[0].key] * 5
    assert r.delivered_keys() == [e.key for e in events]
    assert stage.counts["errors"] == 4
    assert stage.backoff.failures == 0


def test_receiver_down_then_back_loses_nothing_in_order(bus: Bus, receiver: Any) -> None:
    r = receiver()  # not started: connection refused
    stage = sink_stage("webhook", settings_for(bus, r.port, **{"sinks.webhook.queue_size": 8}), bus)
    with running(stage, bus):
        events = produce(bus, ("cam0", "cam1", "cam2"), range(30))
        wait_until(lambda: stage.counts["errors"] >= 2, 10, "failed attempts")
        assert stage.counts["delivered"] == 0
        assert len(stage.held) <= 8  # the in-memory queue is bounded; the rest wait in Redis
        lag = stage.lag()
        assert lag == len(events)
        r.start()
        wait_until(stage.done, 30, "catch-up")
    order = first_seen_in_order(r.delivered_keys())
    assert {cam: seqs for cam, seqs in order.items()} == {
        cam: list(range(30)) for cam in ("cam0", "cam1", "cam2")
    }


def test_a_refused_verdict_is_dead_lettered_and_the_rest_go_on(bus: Bus, receiver: Any) -> None:
    r = receiver(lambda n, p: 422 if p["seq"] == 3 else 200)
    r.start()
    events = produce(bus, ("cam0",), range(6))
    stage = sink_stage("webhook", settings_for(bus, r.port), bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
    assert r.delivered_keys() == [e.key for e in events if e.seq != 3]
    dead = bus.dead_letters()
    assert len(dead) == 1
    assert dead[0].reason == "webhook_refused" and "422" in dead[0].detail
    assert dead[0].group == sink_group("webhook", "default")


def test_secret_is_required_and_never_logged(bus: Bus, receiver: Any) -> None:
    r = receiver()
    r.start()
    with pytest.raises(ConfigError, match="SECRET"):
        sink_stage(
            "webhook",
            sink_settings(bus, **{"sinks.webhook.url": f"http://127.0.0.1:{r.port}/"}),
            bus,
        )
    with pytest.raises(ConfigError, match="16 characters"):
        settings_for(bus, r.port, **{"sinks.webhook.secret": "short"})
    settings = settings_for(
        bus, r.port, **{"sinks.webhook.url": f"http://user:pw-in-url@127.0.0.1:{r.port}/h"}
    )
    produce(bus, ("cam0",), range(2))
    stage = sink_stage("webhook", settings, bus)
    with structlog.testing.capture_logs() as logs, running(stage, bus):
        wait_until(stage.done, 20, "delivery")
    text = repr(logs) + repr(settings) + json.dumps(settings.redacted()) + repr(stage.status())
    assert SECRET not in text and "pw-in-url" not in text
    assert r.requests[0][1]["Authorization"].startswith("Basic ")
