"""Shared by the sink tests: real events on the real events stream, a worker in a thread,
and a Mosquitto broker of the test's own when one is needed."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lineguard.stream.bus import Bus
from lineguard.stream.protocol import Event
from lineguard.stream.settings import Settings
from lineguard.stream.sinks import SinkStage
from lineguard.stream.worker import run_worker

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
    return Settings.load(
        {"redis.key_prefix": bus.prefix, "line.id": bus.line, **overrides}, env_file=None
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
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def first_seen_in_order(keys: list[str]) -> dict[str, list[int]]:
    """Per camera, the seqs in the order they first arrived (duplicates dropped)."""
    seen: set[str] = set()
    out: dict[str, list[int]] = {}
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        _line, cam, seq = key.split("/")
        out.setdefault(cam, []).append(int(seq))
    return out


class Mosquitto:
    """A broker of our own on ``port`` (persistent sessions, so a restart keeps what a
    durable subscriber has not read yet); ``stop``/``start`` make an outage."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()),
            None,
        )
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self) -> None:
        assert self.binary is not None
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 100000\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
        )
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)])
        wait_until(lambda: port_open("127.0.0.1", self.port), 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None
