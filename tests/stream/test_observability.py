"""Logs, metrics, heartbeats and the event follower."""

from __future__ import annotations

import io
import json
import socket
import threading
import time
import urllib.request

import pytest
import structlog

from lineguard.engines.errors import ConfigError
from lineguard.stream.bus import Bus, connect
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.logs import bind_worker, configure_logging, frame_context
from lineguard.stream.metrics import get_metrics, observe_queue, serve_metrics
from lineguard.stream.protocol import Event
from lineguard.stream.tools.events import event_line, follow_events
from lineguard.stream.worker import StopFlag
from tests.stream.pipeline_helpers import GOOD, SIZE, settings_for, split_bundle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def event(seq: int, verdict: str = "pass") -> Event:
    t = time.time()
    return Event("line1", "cam0", seq, verdict, 0.5, 1.0, {"lgst": 0.5}, "m-1",  # type: ignore[arg-type]
                 {"total": 0.02}, "", t, t)  # fmt: skip


def test_json_logs_carry_the_frame_key() -> None:
    out = io.StringIO()
    configure_logging(level="debug", fmt="json", stream=out)
    try:
        log = structlog.get_logger("t")
        with frame_context("line1/cam0/000000042"):
            log.info("decide.event", verdict="fail")
        log.debug("outside")
        lines = [json.loads(x) for x in out.getvalue().splitlines()]
        assert lines[0]["frame"] == "line1/cam0/000000042" and lines[0]["level"] == "info"
        assert lines[0]["event"] == "decide.event" and "timestamp" in lines[0]
        assert "frame" not in lines[1]
    finally:
        configure_logging(level="warning", fmt="console")


def test_worker_identity_is_bound_per_thread() -> None:
    out = io.StringIO()
    configure_logging(level="info", fmt="json", stream=out)
    try:

        def work() -> None:
            bind_worker("infer", "w-1")
            structlog.get_logger().info("hello")

        t = threading.Thread(target=work)
        t.start()
        t.join()
        line = json.loads(out.getvalue().splitlines()[0])
        assert (line["stage"], line["consumer"]) == ("infer", "w-1")
    finally:
        configure_logging(level="warning", fmt="console")


def test_metrics_endpoint_and_queue_gauges(bus: Bus) -> None:
    port = free_port()
    stop = serve_metrics(port, "127.0.0.1")
    try:
        assert serve_metrics(port, "127.0.0.1")() is None  # a second request is a no-op
        bus.ensure_group("frames", "infer")
        bus.client.xadd(bus.key("frames"), {b"m": b"x"})
        observe_queue(bus, get_metrics(), "frames", "infer")
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        stop()
    assert "lineguard_queue_lag" in body and 'stream="frames"' in body
    for name in (
        "lineguard_frames_in_total",
        "lineguard_batch_size",
        "lineguard_dead_lettered_total",
        "lineguard_reclaimed_total",
        "lineguard_verdicts_total",
        "lineguard_stage_seconds",
    ):
        assert name in body  # fmt: skip


def test_metrics_port_in_use_is_a_config_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(ConfigError, match="LINEGUARD_METRICS__PORT"):
            serve_metrics(int(s.getsockname()[1]), "127.0.0.1")


def test_follow_prints_events_as_they_arrive(bus: Bus) -> None:
    bus.add("events", event(0))  # before following: not shown
    stop = StopFlag()
    seen: list[int] = []

    def follow() -> None:
        for _id, ev in follow_events(bus, stop=stop, block_ms=50):
            seen.append(ev.seq)
            if len(seen) == 2:
                stop.set()

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.2)
    bus.add("events", event(1, "fail"))
    bus.add("events", event(2))
    t.join(5)
    assert seen == [1, 2]
    assert "fail" in event_line(event(1, "fail")).plain


def test_a_batch_window_longer_than_the_socket_timeout_is_fine(bus: Bus, redis_url: str) -> None:
    """The top-up polls rather than blocking on the server, so a window longer than the
    client's socket timeout (once refused: one blocking read would have timed out) waits its
    whole length and returns the batch."""
    settings = settings_for(
        bus,
        redis_url,
        **{"redis.socket_timeout": 2.0, "infer.max_delay_ms": 2100, "infer.block_ms": 500},
    )
    client = connect(settings, redis_url)
    try:
        short = Bus.from_settings(client, settings)
        stage = InferStage(short, settings, split_bundle().path, runtime="onnxruntime")
        stage.setup()
        Ingestor(short, camera="cam0", size=SIZE, encoding="png").send(GOOD)
        t0 = time.perf_counter()
        assert stage.step() == 1
        assert time.perf_counter() - t0 >= 2.1  # the whole window, past the 2 s timeout
        stage.teardown()
    finally:
        client.close()


def test_metrics_off_loopback_need_a_token_and_check_it() -> None:
    """The endpoint used to bind 0.0.0.0 by default with nothing asked: now loopback by
    default, and any other address refuses to start without a token, which it then checks."""
    import urllib.error

    from lineguard.stream.settings import MetricsSettings, Settings

    assert MetricsSettings().addr == "127.0.0.1"
    with pytest.raises(ValueError, match="LINEGUARD_METRICS__TOKEN"):
        MetricsSettings(port=9100, addr="0.0.0.0")
    with pytest.raises(ConfigError, match="LINEGUARD_METRICS__TOKEN"):
        Settings.load({"metrics.port": 9100, "metrics.addr": "0.0.0.0"}, env_file=None)
    with pytest.raises(ConfigError, match="LINEGUARD_METRICS__TOKEN"):
        serve_metrics(9100, "0.0.0.0")
    token = "s3cret-token-for-tests"
    ok = MetricsSettings(port=9100, addr="0.0.0.0", token=token)  # type: ignore[arg-type]
    assert ok.token_value == token and token not in repr(ok)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    stop = serve_metrics(port, "127.0.0.1", token)
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(url, timeout=5)
        assert info.value.code == 401
        wrong = urllib.request.Request(url, headers={"Authorization": "Bearer nope"})
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(wrong, timeout=5)
        right = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(right, timeout=5) as resp:
            assert b"lineguard_" in resp.read()
    finally:
        stop()
