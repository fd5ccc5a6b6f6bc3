"""Real receivers for the sinks, for ``lineguard bench sinks`` and the tests: an HTTP server
on loopback that records each POST, a Mosquitto broker of our own that can be stopped and
started again, and an MQTT subscriber that records what arrives.

They exist to measure and to check delivery, not to run a plant: the HTTP receiver answers
whatever ``answer`` says, so a test can make it fail first and then recover.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

Answer = Callable[[int, dict[str, Any]], int]
"""Status for the n-th request (from 0) with this JSON body."""


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


def wait_until(
    cond: Callable[[], bool],
    timeout: float,
    what: str,
    *,
    error: type[Exception] = TimeoutError,
) -> None:
    """Poll ``cond`` until it holds; raise ``error`` after ``timeout`` seconds (the tests
    pass ``AssertionError``, so a timeout reads as a failed check)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class HttpReceiver:
    """A threaded HTTP server on 127.0.0.1:``port`` that records every POST."""

    def __init__(self, port: int | None = None, answer: Answer | None = None) -> None:
        self.port = port or free_port()
        self.answer: Answer = answer or (lambda n, body: 200)
        self.requests: list[tuple[int, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._open: set[socket.socket] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/verdicts"

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as a real receiver would

            def setup(self) -> None:
                super().setup()
                with outer.lock:
                    outer._open.add(self.connection)

            def finish(self) -> None:
                with outer.lock:
                    outer._open.discard(self.connection)
                super().finish()

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with outer.lock:
                    n = len(outer.requests)
                    status = outer.answer(n, json.loads(body))
                    outer.requests.append((status, dict(self.headers), body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return None

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, name="http-receiver", daemon=True).start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:  # kept-alive connections too: a stopped receiver is really down
            for conn in list(self._open):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._open.clear()

    def delivered_keys(self) -> list[str]:
        with self.lock:
            return [json.loads(b)["frame_key"] for s, _, b in self.requests if 200 <= s < 300]


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if Path(p).exists():
            return p
    return None


class Mosquitto:
    """A broker of our own on 127.0.0.1:``port`` with persistent sessions, so a restart keeps
    what a durable subscriber has not read yet; ``stop``/``start`` make an outage."""

    def __init__(self, workdir: Path, port: int | None = None, *, extra: str = "") -> None:
        self.binary = mosquitto_binary()
        self.port = port or free_port()
        self.workdir = workdir
        self.extra = extra  # more configuration lines (TLS files, a password file)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def available(self) -> bool:
        return self.binary is not None

    def start(self) -> None:
        if self.binary is None:
            raise FileNotFoundError("no mosquitto binary (apt-get install mosquitto)")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n{self.extra}\n"
            f"allow_anonymous {'false' if 'password_file' in self.extra else 'true'}\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 1000000\n"
            f"log_dest file {self.workdir}/mosquitto.log\n"
            # run as whoever started it: as root, mosquitto would switch to its own user,
            # which cannot write the persistence file into our folder
            f"user {getpass.getuser()}\n"
        )
        self.proc = subprocess.Popen([self.binary, "-c", str(conf)])
        wait_until(lambda: port_open("127.0.0.1", self.port), 10, "mosquitto to listen")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


class MqttRecorder:
    """A real MQTT client that records what arrives on ``topic``. With ``client_id`` it keeps
    a durable session, so what is published while it is away is kept for it."""

    def __init__(self, host: str, port: int, topic: str, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt

        self.messages: list[tuple[str, dict[str, Any], bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        durable = client_id is not None
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id or f"lineguard-recorder-{uuid.uuid4().hex[:8]}",
            clean_session=not durable,
        )
        self.topic = topic
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect(host, port)
        self.client.loop_start()
        if not self.subscribed.wait(10):
            raise TimeoutError(f"no SUBACK from the broker at {host}:{port}")

    def _on_message(self, _c: Any, _u: Any, msg: Any) -> None:
        with self.lock:
            self.messages.append((msg.topic, json.loads(msg.payload), bool(msg.retain)))

    def keys(self) -> list[str]:
        with self.lock:
            return [p["frame_key"] for _, p, _ in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def first_seen_in_order(keys: list[str]) -> dict[str, list[int]]:
    """Per camera, the seqs in the order they first arrived (duplicates dropped)."""
    seen: set[str] = set()
    out: dict[str, list[int]] = {}
    for key in keys:
        if key in seen:
            continue
        seen.add(key)
        _line, cam, seq = key.rsplit("/", 2)
        out.setdefault(cam, []).append(int(seq))
    return out
