"""``lineguard sink …`` end to end through the CLI, and sinks in ``lineguard health``."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lineguard.stream.bus import Bus
from lineguard.stream.cli import app
from lineguard.stream.metrics import get_metrics
from lineguard.stream.sinks import sink_stage
from tests.stream.sink_helpers import (
    HttpReceiver,
    free_port,
    produce,
    running,
    sink_settings,
    wait_until,
)
from tests.stream.test_sink_webhook import SECRET


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in list(os.environ):
        if name.upper().startswith("LINEGUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


def env_for(bus: Bus, url: str, **extra: str) -> dict[str, str]:
    return {
        "LINEGUARD_REDIS__URL": url,
        "LINEGUARD_REDIS__KEY_PREFIX": bus.prefix,
        "LINEGUARD_LOG__LEVEL": "warning",
        **extra,
    }


def test_sink_webhook_command_delivers_the_backlog_in_burst_mode(bus: Bus, redis_url: str) -> None:
    r = HttpReceiver(free_port(), lambda n, p: 200)
    r.start()
    try:
        events = produce(bus, ("cam0", "cam1"), range(5))
        env = env_for(bus, redis_url, LINEGUARD_SINKS__WEBHOOK__SECRET=SECRET)
        url = f"http://127.0.0.1:{r.port}/in"
        result = CliRunner().invoke(
            app, ["sink", "webhook", "--url", url, "--start", "all", "--burst"], env=env
        )
    finally:
        r.stop()
    assert result.exit_code == 0, result.output
    assert "delivered 10" in result.output
    assert SECRET not in result.output
    assert sorted(r.delivered_keys()) == sorted(e.key for e in events)


def test_health_shows_each_sink_and_its_lag(bus: Bus, redis_url: str) -> None:
    env = env_for(bus, redis_url)
    settings = sink_settings(bus, **{"sinks.opcua.port": free_port(), "sinks.opcua.start": "all"})
    stage = sink_stage("opcua", settings, bus)
    with running(stage, bus):
        produce(bus, ("cam0",), range(3))
        wait_until(stage.done, 20, "delivery")
        pattern = f"{bus.prefix}:*health:sink-opcua:*"
        wait_until(lambda: any(bus.client.scan_iter(match=pattern)), 10, "the heartbeat")
        result = CliRunner().invoke(
            app, ["health", "--stage", "sink-opcua", "--format", "json"], env=env
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        sinks = [w for w in report["workers"] if w["stage"] == "sink-opcua"]
        assert len(sinks) == 1 and sinks[0]["sink"] == "opcua:default"
        assert report["sinks"]["sink:opcua:default"]["pending"] == 0
    # the worker is gone: health fails for it, and the group still shows how far behind it is
    produce(bus, ("cam0",), range(3, 7))
    result = CliRunner().invoke(
        app, ["health", "--stage", "sink-opcua", "--format", "json"], env=env
    )
    assert result.exit_code == 1
    report = json.loads(result.output.splitlines()[0])
    assert report["missing"] == ["sink-opcua"]
    assert report["sinks"]["sink:opcua:default"]["lag"] == 4
    text = CliRunner().invoke(app, ["health", "--stage", ""], env=env).output
    assert "sink:opcua:default: lag 4" in text


def test_sink_metrics_count_deliveries_and_errors(bus: Bus) -> None:
    m = get_metrics()
    r = HttpReceiver(free_port(), lambda n, p: 500 if n < 2 else 200)
    r.start()
    try:
        settings = sink_settings(
            bus,
            **{
                "sinks.webhook.url": f"http://127.0.0.1:{r.port}/",
                "sinks.webhook.secret": SECRET,
                "sinks.webhook.name": "metrics",
                "sinks.webhook.start": "all",
                "sinks.webhook.retry_base_s": 0.05,
                "sinks.webhook.retry_cap_s": 0.1,
            },
        )
        before_ok = m.sink_delivered.labels("webhook:metrics")._value.get()
        before_err = m.sink_errors.labels("webhook:metrics")._value.get()
        produce(bus, ("cam0",), range(4))
        stage = sink_stage("webhook", settings, bus)
        with running(stage, bus):
            wait_until(stage.done, 20, "delivery")
            stage.status()
    finally:
        r.stop()
    assert m.sink_delivered.labels("webhook:metrics")._value.get() - before_ok == 4
    assert m.sink_errors.labels("webhook:metrics")._value.get() - before_err == 2
    assert m.sink_lag.labels("webhook:metrics")._value.get() == 0
    assert m.sink_up.labels("webhook:metrics")._value.get() == 1


def test_bench_sinks_reports_throughput_and_a_lossless_outage(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "sinks", "--sinks", "webhook", "--events", "40", "--outage", "1"]
    result = CliRunner().invoke(app, [*args, "--rate", "40", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    tp = data["throughput"]["webhook"]
    assert tp["verdicts"] == 40 and tp["arrived"] == 40 and tp["verdicts_per_s"] > 0
    o = data["outage"]["webhook"]
    assert o["lag_at_recovery"] > 0 and o["catch_up_s"] is not None
    assert o["missing"] == 0 and o["order_kept"] is True
    assert o["delivered"] == data["outage"]["produced"]
