"""All three stages on one box: ``lineguard run``, the demo and the end-to-end benchmark.

``LocalPipeline`` starts infer and decide workers against one Redis URL (an embedded Valkey
when ``LINEGUARD_REDIS__URL`` is unset, see ``server.redis_url_for``), either as threads
of this process (cheap to start; torch and ONNX Runtime release the GIL while they compute) or
as child processes running ``lineguard infer`` / ``lineguard decide`` (isolation, one metrics
port each). ``run_line`` then feeds a source through them as the ingest stage.

Shutdown order on SIGTERM/SIGINT: stop capturing, wait (bounded) for the events of frames
already sent, then stop the workers, each of which finishes and acknowledges its batch.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog

from lineguard.engines.errors import ConfigError, LineguardError
from lineguard.stream.bus import Bus, connect, wait_for_server
from lineguard.stream.decide import DecideStage
from lineguard.stream.feed import EventCollector, RunSummary, events_cursor, send_source, summarise
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import bundle_frame_codec, bundle_input_size
from lineguard.stream.metrics import serve_metrics
from lineguard.stream.protocol import Event
from lineguard.stream.server import redis_url_for
from lineguard.stream.settings import Settings, env_var
from lineguard.stream.sources import open_source
from lineguard.stream.worker import StopFlag, health_report, run_worker, signals_stop

log = structlog.get_logger("lineguard.run")

Mode = Literal["threads", "processes"]


def settings_env(settings: Settings, url: str | None = None) -> dict[str, str]:
    """Every setting as ``LINEGUARD_*`` variables, so a child process sees the same values
    (including ones given as CLI flags to the parent). Nested sections (the sinks') become
    ``LINEGUARD_SINKS__MQTT__HOST``; secrets are passed through as is, never masked."""
    from pydantic import BaseModel, SecretStr

    env: dict[str, str] = {}

    def walk(model: BaseModel, loc: tuple[str, ...]) -> None:
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, BaseModel):
                walk(value, (*loc, name))
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            if value is None:
                continue
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list | tuple):
                text = ",".join(str(v) for v in value)
            else:
                text = str(value)
            env[env_var(*loc, name)] = text

    walk(settings, ())
    if url is not None:
        env[env_var("redis", "url")] = url
    return env


def without_deadline_at_max_rate(settings: Settings, rate: float | None) -> Settings:
    """Settings for feeding a recording or folder as fast as possible: no verdict deadline
    unless one was set explicitly. Frames are stamped when sent, so at the maximum rate they
    queue by design and a deadline would turn the queue into `uninspected` verdicts; a line
    fed by a camera in real time keeps it."""
    if rate is not None or "deadline_ms" in settings.decide.model_fields_set:
        return settings
    decide = settings.decide.model_copy(update={"deadline_ms": 0})
    return settings.model_copy(update={"decide": decide})


@dataclass
class _ThreadWorker:
    name: str
    thread: threading.Thread
    ready: threading.Event
    error: BaseException | None = None


class LocalPipeline:
    """Infer and decide workers on this box; a context manager (``start`` / ``stop``)."""

    def __init__(
        self,
        settings: Settings,
        url: str,
        bundle: str | Path,
        *,
        mode: Mode = "threads",
        runtime: str = "auto",
        device: str = "cpu",
        precision: str = "fp32",
        maps: bool = False,
        infer_workers: int = 1,
        gap_grace_s: float = 60.0,
        metrics_port: int | None = None,
        ready_timeout_s: float = 300.0,
        consumer_prefix: str | None = None,
    ) -> None:
        if mode not in ("threads", "processes"):
            raise ConfigError(f"unknown worker mode {mode!r}; use threads or processes")
        if infer_workers < 1:
            raise ConfigError(f"infer workers must be ≥ 1, got {infer_workers}")
        self.settings = settings
        self.url = url
        self.bundle = Path(bundle)
        self.mode = mode
        self.runtime = runtime
        self.device = device
        self.precision = precision
        self.maps = maps
        self.infer_workers = infer_workers
        self.gap_grace_s = gap_grace_s
        self.metrics_port = metrics_port
        self.ready_timeout_s = ready_timeout_s
        self.prefix = consumer_prefix or socket.gethostname()
        self.stop_flag = StopFlag()
        self._threads: list[_ThreadWorker] = []
        self._procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self._stop_metrics: Callable[[], None] = lambda: None

    # names -------------------------------------------------------------------------

    def consumers(self) -> list[tuple[str, str]]:
        """(stage, consumer name) of every worker; stable, so a restart resumes backlogs."""
        out = [("infer", f"{self.prefix}-infer-{i}") for i in range(self.infer_workers)]
        out.append(("decide", f"{self.prefix}-decide"))
        return out

    # lifecycle ---------------------------------------------------------------------

    def start(self) -> LocalPipeline:
        if self.mode == "threads":
            self._stop_metrics = serve_metrics(
                self.metrics_port, self.settings.metrics.addr, self.settings.metrics.token_value
            )
            for stage, consumer in self.consumers():
                self._start_thread(stage, consumer)
        else:
            for i, (stage, consumer) in enumerate(self.consumers()):
                port = None if self.metrics_port is None else self.metrics_port + i
                self._start_process(stage, consumer, port)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _make_stage(self, stage: str, consumer: str, bus: Bus) -> InferStage | DecideStage:
        if stage == "infer":
            return InferStage(
                bus, self.settings, self.bundle, runtime=self.runtime, device=self.device,
                precision=self.precision, consumer=consumer, maps=self.maps,
            )  # fmt: skip
        return DecideStage(
            bus, self.settings, self.bundle, consumer=consumer, gap_grace_s=self.gap_grace_s
        )

    def _start_thread(self, stage: str, consumer: str) -> None:
        ready = threading.Event()
        worker = _ThreadWorker(consumer, threading.Thread(), ready)

        def target() -> None:
            client = connect(self.settings, self.url, client_name=consumer)
            try:
                wait_for_server(client, self.settings.redis.wait_timeout)
                bus = Bus.from_settings(client, self.settings)
                run_worker(
                    self._make_stage(stage, consumer, bus),
                    bus,
                    stop=self.stop_flag,
                    handle_signals=False,
                    on_ready=ready.set,
                )
            except BaseException as exc:
                worker.error = exc
                log.error(
                    "run.worker_failed", worker=consumer, error=f"{type(exc).__name__}: {exc}"
                )
            finally:
                client.close()

        worker.thread = threading.Thread(target=target, name=consumer, daemon=True)
        self._threads.append(worker)
        worker.thread.start()

    def _start_process(self, stage: str, consumer: str, port: int | None) -> None:
        env = dict(os.environ)
        env.update(settings_env(self.settings, self.url))
        cmd = [sys.executable, "-m", "lineguard.stream.cli", stage, "--bundle", str(self.bundle)]
        cmd += ["--consumer", consumer]
        if stage == "infer":
            cmd += ["--runtime", self.runtime, "--device", self.device]
            cmd += ["--precision", self.precision]
            cmd += ["--maps"] if self.maps else []
        else:
            cmd += ["--gap-grace-s", str(self.gap_grace_s)]
        if port is not None:
            cmd += ["--metrics-port", str(port)]
        # a session of its own: Ctrl-C reaches `run` alone, which stops the workers in order
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
        self._procs.append((consumer, proc))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        names = {c for _s, c in self.consumers()}
        client = None
        try:
            while True:
                self.check()
                if self.mode == "threads":
                    if all(w.ready.is_set() for w in self._threads):
                        return
                else:
                    if client is None:
                        client = connect(self.settings, self.url)
                        bus = Bus.from_settings(client, self.settings)
                    live = {str(h.get("consumer")) for h in health_report(bus)}
                    if names <= live:
                        return
                if time.monotonic() > deadline:
                    raise LineguardError(
                        f"workers did not become ready within {self.ready_timeout_s:.0f} s "
                        "(loading the bundle takes long on a slow disk?); see the log above"
                    )
                time.sleep(0.05)
        finally:
            if client is not None:
                client.close()

    def check(self) -> None:
        """Raise if a worker has died (its error, or its exit code)."""
        for w in self._threads:
            if w.error is not None:
                if isinstance(w.error, LineguardError):
                    raise w.error
                raise LineguardError(
                    f"worker {w.name} failed: {type(w.error).__name__}: {w.error}"
                ) from w.error
            if w.ready.is_set() and not w.thread.is_alive() and not self.stop_flag.is_set():
                raise LineguardError(f"worker {w.name} stopped unexpectedly")
        for name, proc in self._procs:
            code = proc.poll()
            if code is not None and not self.stop_flag.is_set():
                raise LineguardError(f"worker process {name} exited with status {code}")

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask every worker to drain and stop; kill processes that ignore SIGTERM."""
        self.stop_flag.set()
        for _name, proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for w in self._threads:
            w.thread.join(max(0.1, deadline - time.monotonic()))
        for name, proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("run.kill", worker=name)
                proc.kill()
                proc.wait()
        self._stop_metrics()

    def __enter__(self) -> LocalPipeline:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_line(
    settings: Settings,
    bundle: str | Path,
    source_spec: str,
    *,
    rate: float | None = None,
    loop: bool = False,
    limit: int | None = None,
    size: tuple[int, int] | None = None,
    record: str | Path | None = None,
    mode: Mode = "threads",
    runtime: str = "auto",
    device: str = "cpu",
    precision: str = "fp32",
    maps: bool = False,
    infer_workers: int = 1,
    metrics_port: int | None = None,
    drain_timeout_s: float = 60.0,
    on_event: Callable[[Event], None] | None = None,
    on_ready: Callable[[str], None] | None = None,
) -> RunSummary:
    """``lineguard run``: workers here, ``source_spec`` fed through them until it ends (or
    ``limit`` frames are sent, or a signal arrives), then every sent frame's event awaited
    before the workers stop."""
    bundle = Path(bundle)
    size = size or bundle_input_size(bundle)
    settings = without_deadline_at_max_rate(settings, rate)
    stop = StopFlag()
    with signals_stop(stop), redis_url_for(settings) as url:
        pipeline = LocalPipeline(
            settings, url, bundle, mode=mode, runtime=runtime, device=device,
            precision=precision, maps=maps, infer_workers=infer_workers,
            metrics_port=metrics_port,
        )  # fmt: skip
        with pipeline:
            if on_ready is not None:
                on_ready(url)
            client = connect(settings, url, client_name="lineguard-run")
            try:
                bus = Bus.from_settings(client, settings)
                since = events_cursor(bus)
                with (
                    EventCollector(
                        settings, url, settings.line.camera, since=since, on_event=on_event
                    ) as collector,
                    open_source(source_spec, loop=loop) as source,
                ):
                    checked = [time.monotonic()]

                    def health(_sent: Any) -> None:
                        now = time.monotonic()
                        if now - checked[0] > 1.0:
                            checked[0] = now
                            pipeline.check()

                    sent = send_source(
                        bus, settings, source, size=size, fps=rate, record=record, limit=limit,
                        stop=stop, on_sent=health, codec=bundle_frame_codec(bundle),
                    )  # fmt: skip
                    log.info("run.source_done", sent=sent.count, camera=sent.camera)
                    collector.wait_for(sent.seqs, drain_timeout_s, check=pipeline.check)
                    events, counts = collector.snapshot()
                return summarise(sent, events, counts)
            finally:
                client.close()
