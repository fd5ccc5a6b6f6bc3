"""Prometheus metrics of the three stages, served on ``LINEGUARD_METRICS__PORT``.

One ``Metrics`` object per process (``get_metrics()``), registered once in the default
registry; workers that share a process (``lineguard run`` with threads) share it and tell
themselves apart with the ``stage`` label. Labels never carry frame ids (unbounded
cardinality); camera ids would be fine but are left out until someone needs them.

Stage latencies use the names of the end-to-end breakdown (see ``lineguard.stream.decide``):
``ingest`` capture→XADD, ``queue`` XADD→infer read, ``infer`` read→scores written,
``handoff`` scores written→decide read, ``decide`` read→event written, ``total``
capture→event.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from lineguard.engines.errors import ConfigError
from lineguard.stream.binding import bearer_ok, binding_problem
from lineguard.stream.bus import Bus, StreamName

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """Every lineguard metric, created in ``registry``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.frames_in = Counter(
            "lineguard_frames_in_total", "Entries a stage read from its input stream.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.frames_out = Counter(
            "lineguard_frames_out_total", "Messages a stage wrote to its output stream.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "lineguard_batch_size", "Frames per inference batch.",
            buckets=_BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_wait = Histogram(
            "lineguard_batch_wait_seconds", "Time a frame waited in the frames stream.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.infer_seconds = Histogram(
            "lineguard_infer_seconds", "Forward pass time per batch.",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.stage_seconds = Histogram(
            "lineguard_stage_seconds", "Per-frame latency of each pipeline stage.",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_lag = Gauge(
            "lineguard_queue_lag", "Entries not yet delivered to the group.",
            ["stream", "group"], registry=r,
        )  # fmt: skip
        self.queue_pending = Gauge(
            "lineguard_queue_pending", "Entries delivered but not acknowledged.",
            ["stream", "group"], registry=r,
        )  # fmt: skip
        self.verdicts = Counter(
            "lineguard_verdicts_total", "Events written, by verdict.", ["verdict"], registry=r
        )
        self.reclaimed = Counter(
            "lineguard_reclaimed_total", "Entries taken over from idle consumers (XAUTOCLAIM).",
            ["stage"], registry=r,
        )  # fmt: skip
        self.dead_lettered = Counter(
            "lineguard_dead_lettered_total", "Entries moved to the dead stream.",
            ["stage", "reason"], registry=r,
        )  # fmt: skip
        self.trimmed = Counter(
            "lineguard_trimmed_total",
            "Pending entries found deleted from their stream before they were processed.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.duplicates = Counter(
            "lineguard_duplicates_total", "Redelivered or duplicated messages dropped.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.late_scores = Counter(
            "lineguard_late_scores_total",
            "Scores that arrived after their frame's deadline verdict (uninspected) was made.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.frame_errors = Counter(
            "lineguard_frame_errors_total", "Frames that became an error instead of a score.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.output_errors = Counter(
            "lineguard_output_errors_total",
            "Failed writes to an output outside the bus (the history database), retried.",
            ["stage"], registry=r,
        )  # fmt: skip
        self.model_reloads = Counter(
            "lineguard_model_reloads_total", "Bundle reloads, by outcome.",
            ["stage", "outcome"], registry=r,
        )  # fmt: skip
        self.sink_delivered = Counter(
            "lineguard_sink_delivered_total", "Verdicts a sink delivered and acknowledged.",
            ["sink"], registry=r,
        )  # fmt: skip
        self.sink_errors = Counter(
            "lineguard_sink_errors_total", "Delivery attempts of a sink that failed (retried).",
            ["sink"], registry=r,
        )  # fmt: skip
        self.sink_refused = Counter(
            "lineguard_sink_refused_total",
            "Verdicts a receiver refused for good (moved to the dead stream).",
            ["sink"], registry=r,
        )  # fmt: skip
        self.sink_lag = Gauge(
            "lineguard_sink_lag", "Events a sink has not delivered yet (unread plus held).",
            ["sink"], registry=r,
        )  # fmt: skip
        self.sink_delay = Gauge(
            "lineguard_sink_delay_seconds",
            "Verdict-to-delivery time of the last event a sink delivered.",
            ["sink"], registry=r,
        )  # fmt: skip
        self.sink_up = Gauge(
            "lineguard_sink_up", "1 while a sink's last delivery attempt succeeded.",
            ["sink"], registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "lineguard_model_info", "1 for the model version a stage currently uses.",
            ["stage", "version"], registry=r,
        )  # fmt: skip

    def set_model(self, stage: str, version: str, previous: str | None = None) -> None:
        if previous is not None and previous != version:
            self.model_info.remove(stage, previous)
        self.model_info.labels(stage, version).set(1)


def observe_queue(bus: Bus, metrics: Metrics, stream: StreamName, group: str) -> None:
    """Refresh the lag and pending gauges of one group (called with each heartbeat)."""
    try:
        stats = bus.group_stats(stream, group)
    except redis.RedisError:
        return  # a gauge is not worth failing a worker over; the next beat retries
    if stats is None:
        return
    if stats.lag is not None:
        metrics.queue_lag.labels(stream, group).set(stats.lag)
    metrics.queue_pending.labels(stream, group).set(stats.pending)


_lock = threading.Lock()
_metrics: Metrics | None = None
_server_port: int | None = None


def get_metrics() -> Metrics:
    """The process's metrics (created on first use)."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = Metrics()
        return _metrics


def serve_metrics(
    port: int | None, addr: str = "127.0.0.1", token: str | None = None
) -> Callable[[], None]:
    """Expose ``/metrics`` on ``port`` (no-op for None); returns a function that stops it.

    With ``token`` every request must carry ``Authorization: Bearer <token>`` (401 otherwise);
    an address off loopback needs one (see ``lineguard.stream.binding``). A second call in
    the same process for the same port is a no-op, so several workers in one process can each
    ask for the endpoint.
    """
    global _server_port
    if port is None:
        return lambda: None
    problem = binding_problem("metrics endpoint", addr, token, "set LINEGUARD_METRICS__TOKEN")
    if problem:
        raise ConfigError(problem)
    get_metrics()
    with _lock:
        if _server_port == port:
            return lambda: None
        try:
            server = make_server(
                addr, port, _guarded(make_wsgi_app(REGISTRY), token),
                server_class=_ThreadingServer, handler_class=_QuietHandler,
            )  # fmt: skip
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {addr}:{port} ({exc}); pick a free port with "
                "LINEGUARD_METRICS__PORT or --metrics-port"
            ) from None
        thread = threading.Thread(target=server.serve_forever, name="metrics", daemon=True)
        thread.start()
        _server_port = port

    def stop() -> None:
        global _server_port
        server.shutdown()
        server.server_close()
        thread.join(timeout=2)
        with _lock:
            _server_port = None

    return stop


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not news
        return None


def _guarded(app: Any, token: str | None) -> Any:
    if token is None:
        return app

    def guarded(environ: dict[str, Any], start_response: Any) -> Any:
        if not bearer_ok(environ.get("HTTP_AUTHORIZATION"), token):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [b"a bearer token is required (LINEGUARD_METRICS__TOKEN)\n"]
        return app(environ, start_response)

    return guarded
