"""Shared by the sink tests: real events on the real events stream, a worker in a thread,
and a Mosquitto broker of the test's own when one is needed."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from lineguard.stream.bus import Bus
from lineguard.stream.protocol import Event
from lineguard.stream.settings import Settings
from lineguard.stream.sinks import SinkStage
from lineguard.stream.tools.receivers import (
    HttpReceiver,
    Mosquitto,
    MqttRecorder,
    first_seen_in_order,
    free_port,
    port_open,
)
from lineguard.stream.tools.receivers import wait_until as _poll
from lineguard.stream.worker import run_worker

__all__ = [
    "HttpReceiver",
    "Mosquitto",
    "MqttRecorder",
    "first_seen_in_order",
    "free_port",
    "make_event",
    "port_open",
    "produce",
    "running",
    "sink_settings",
    "wait_until",
]

VERDICT_CYCLE = ("pass", "pass", "fail", "uninspected", "pass", "error")


def make_event(camera: str, seq: int, *, line: str = "line1") -> Event:
    verdict = VERDICT_CYCLE[seq % len(VERDICT_CYCLE)]
    scored = verdict in ("pass", "fail")
    t = time.time()
    return Event(
        line, camera, seq, verdict,  # type: ignore[arg-type]
        (1.5 if verdict == "fail" else 0.25) if scored else None,
        1.0 if scored else None,
        {"lgst": 0.2, "patch": 0.05} if scored else {},
        "m-test",
        {"infer": 0.004, "total": 0.012},
        "" if verdict == "pass" else f"{verdict} for the test",
        t - 0.012,
        t,
    )  # fmt: skip


def produce(bus: Bus, cameras: tuple[str, ...], seqs: range) -> list[Event]:
    """Write events round-robin over ``cameras`` to the events stream, as decide does."""
    out = []
    for seq in seqs:
        for cam in cameras:
            ev = make_event(cam, seq)
            bus.add("events", ev)
            out.append(ev)
    return out


def sink_settings(bus: Bus, **overrides: Any) -> Settings:
    """Settings for ``bus``'s line; short blocking reads so a worker stops quickly."""
    quick = {f"sinks.{kind}.block_ms": 200 for kind in ("mqtt", "opcua", "webhook")}
    return Settings.load(
        {"redis.key_prefix": bus.prefix, "line.id": bus.line, **quick, **overrides},
        env_file=None,
    )


@contextlib.contextmanager
def running(stage: SinkStage, bus: Bus) -> Iterator[threading.Thread]:
    """``run_worker(stage)`` in a thread until the block ends."""
    stop = stage.stop
    ready = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_worker(stage, bus, stop=stop, handle_signals=False, on_ready=ready.set)
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)
            ready.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert ready.wait(30), "sink worker did not start"
    assert not errors, errors
    try:
        yield thread
    finally:
        stop.set()
        thread.join(20)
        assert not thread.is_alive(), "sink worker did not stop"
        assert not errors, errors


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    """The receivers' poll loop, failing as an assertion (a check that did not hold)."""
    _poll(cond, timeout, what, error=AssertionError)
