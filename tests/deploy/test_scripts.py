"""The two helpers the images and units run: lineguard-probe (container health) and
lineguard-prepare (the infer init step), against a real server and a real bundle."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from lineguard.engines.bundle import Bundle
from lineguard.stream.bus import Bus
from lineguard.stream.settings import ENV_PREFIX
from lineguard.stream.worker import line_key
from tests.deploy.cli_check import load_script
from tests.deploy.deploy_files import COMPOSE, DEPLOY, load_yaml_docs

PROBE = DEPLOY / "bin" / "lineguard_probe.py"


def probe_env(bus: Bus, url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        LINEGUARD_REDIS__URL=url,
        LINEGUARD_REDIS__KEY_PREFIX=bus.prefix,
        LINEGUARD_LINE__ID=bus.line,
        # the probe runs `lineguard` from PATH, as in the images
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def beat(bus: Bus, stage: str, consumer: str, host: str) -> None:
    """A heartbeat as run_worker writes it (TTL'd JSON under the line's health key)."""
    payload = {"stage": stage, "consumer": consumer, "host": host, "pid": 1, "t": 0}
    bus.client.set(line_key(bus, "health", stage, consumer), json.dumps(payload), ex=30)


def run_probe(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_probe_passes_only_for_this_hosts_own_worker_of_the_stage(bus: Bus, redis_url: str) -> None:
    env = probe_env(bus, redis_url)
    beat(bus, "infer", "elsewhere-1", host="another-pod")
    # a peer's heartbeat does not make this container healthy (lineguard health alone would)
    assert run_probe(env, "infer").returncode == 1
    beat(bus, "infer", "here-1", host=socket.gethostname())
    assert run_probe(env, "infer").returncode == 0
    assert run_probe(env).returncode == 0  # the image's HEALTHCHECK: any stage
    failed = run_probe(env, "decide")
    assert failed.returncode == 1 and "no live decide worker" in failed.stderr


def test_the_sinks_probe_passes_for_a_live_sink_even_while_its_receiver_is_down(
    bus: Bus, redis_url: str
) -> None:
    """The healthcheck compose gives sink-webhook, against a real sink worker whose receiver
    refuses connections: the worker keeps its heartbeat (it only falls behind), so the probe
    passes and nobody restarts a sink for the plant's outage; it fails once the worker stops."""
    from lineguard.stream.sinks import sink_stage
    from tests.stream.sink_helpers import free_port, produce, running, sink_settings, wait_until
    from tests.stream.test_sink_webhook import SECRET

    (compose,) = load_yaml_docs(COMPOSE)
    test = compose["services"]["sink-webhook"]["healthcheck"]["test"]
    assert test[:2] == ["CMD", "lineguard-probe"]
    env = probe_env(bus, redis_url)
    overrides = {
        "sinks.webhook.url": f"http://127.0.0.1:{free_port()}/nobody-listens",
        "sinks.webhook.secret": SECRET,
        "sinks.webhook.start": "all",
    }
    stage = sink_stage("webhook", sink_settings(bus, **overrides), bus)
    with running(stage, bus):
        produce(bus, ("cam0",), range(3))
        wait_until(lambda: stage.counts["errors"] > 0, 20, "a failed delivery")
        assert run_probe(env, *test[2:]).returncode == 0
        other = run_probe(env, "sink-mqtt")
        assert other.returncode == 1 and "no live sink-mqtt worker" in other.stderr
    assert stage.counts["delivered"] == 0
    assert run_probe(env, *test[2:]).returncode == 1


def test_probe_fails_with_a_reason_when_redis_is_unreachable(bus: Bus, redis_url: str) -> None:
    env = probe_env(bus, "redis://127.0.0.1:1/0")
    env["LINEGUARD_REDIS__WAIT_TIMEOUT"] = "0"
    out = run_probe(env, "infer")
    assert out.returncode == 1 and out.stderr.startswith("probe:")


def test_prepare_opens_the_bundle_like_infer(
    tiny_bundle: Bundle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key in [k for k in os.environ if k.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LINEGUARD_INFER__MAX_BATCH", "4")
    monkeypatch.setenv("LINEGUARD_INFER__BATCH_BUCKETS", "1,2,4")
    prepare = load_script("lineguard_prepare")
    code = prepare.main(["--bundle", str(tiny_bundle.path), "--runtime", "onnxruntime"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"model {tiny_bundle.version}" in out and "max batch 4" in out


def test_prepare_fails_loudly_where_tensorrt_cannot_build(
    tiny_bundle: Bundle, capsys: pytest.CaptureFixture[str]
) -> None:
    """No TensorRT (or only its type stubs) or no GPU: the init step fails, with the reason,
    instead of letting the worker start without its engine."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present: here the init step would really build an engine")
    prepare = load_script("lineguard_prepare")
    args = ["--bundle", str(tiny_bundle.path), "--runtime", "tensorrt", "--device", "cuda:0"]
    assert prepare.main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("lineguard-prepare: error:") and "TensorRT" in err


def test_prepare_refuses_a_missing_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prepare = load_script("lineguard_prepare")
    assert prepare.main(["--bundle", str(tmp_path / "missing")]) == 1
    assert "lineguard-prepare: error:" in capsys.readouterr().err
