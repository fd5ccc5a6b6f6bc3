"""The sinks' settings: names of the variables, and the mistakes refused at start-up."""

from __future__ import annotations

import os

import pytest

from lineguard.engines.errors import ConfigError
from lineguard.stream.settings import Settings


@pytest.fixture(autouse=True)
def no_lineguard_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith("LINEGUARD_"):
            monkeypatch.delenv(name)


def test_environment_names_reach_each_sink(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LINEGUARD_SINKS__MQTT__PORT", "1999")
    monkeypatch.setenv("LINEGUARD_SINKS__MQTT__RETAIN", "true")
    monkeypatch.setenv("LINEGUARD_SINKS__OPCUA__NAME", "plc1")
    monkeypatch.setenv("LINEGUARD_SINKS__WEBHOOK__SECRET", "s" * 20)
    s = Settings.load(env_file=None)
    assert (s.sinks.mqtt.port, s.sinks.mqtt.retain, s.sinks.opcua.name) == (1999, True, "plc1")
    assert s.sinks.webhook.secret is not None
    assert "s" * 20 not in repr(s) and "s" * 20 not in str(s.redacted())
    assert s.sinks.mqtt.qos == 1 and s.sinks.opcua.host == "127.0.0.1"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sinks.mqtt.topic": "a/+/b"}, "LINEGUARD_SINKS__MQTT__TOPIC"),
        ({"sinks.mqtt.topic": "a/{station}"}, "may use {line}"),
        ({"sinks.mqtt.ca_file": "/tmp/ca.pem"}, "LINEGUARD_SINKS__MQTT__TLS is off"),
        ({"sinks.mqtt.password": "x"}, "without LINEGUARD_SINKS__MQTT__USERNAME"),
        ({"sinks.mqtt.qos": 0}, "LINEGUARD_SINKS__MQTT__QOS"),
        ({"sinks.webhook.url": "ftp://host/x"}, "http://"),
        ({"sinks.webhook.secret": "short"}, "at least 16"),
        ({"sinks.opcua.host": "10.0.0.5"}, "LINEGUARD_SINKS__OPCUA__PASSWORD"),
        ({"sinks.opcua.username": "plc"}, "go together"),
        ({"sinks.webhook.block_ms": 4000}, "LINEGUARD_SINKS__WEBHOOK__BLOCK_MS"),
        ({"sinks.mqtt.retry_base_s": 10, "sinks.mqtt.retry_cap_s": 1}, "raise the cap"),
        ({"sinks.mqtt.name": "a:b"}, "sink name"),
    ],
)
def test_mistakes_are_refused_naming_the_variable(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load(overrides, env_file=None)
    assert message in str(info.value)


def test_a_refused_secret_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        Settings.load({"sinks.webhook.secret": "tooshort1"}, env_file=None)
    assert "tooshort1" not in str(info.value)


def test_every_sink_setting_reaches_a_child_process_through_the_environment() -> None:
    """``settings_env`` is how run/bench start workers as processes: nested sink sections and
    their secrets must come back as the same values, not as a Python repr or masked."""
    from lineguard.stream.run import settings_env
    from lineguard.stream.settings import Settings

    parent = Settings.load(
        {
            "sinks.mqtt.qos": 2,
            "sinks.mqtt.username": "line",
            "sinks.mqtt.password": "s3cret-pass",
            "sinks.webhook.secret": "0123456789abcdef-secret",
        },
        env_file=None,
    )
    env = settings_env(parent)
    assert env["LINEGUARD_SINKS__MQTT__QOS"] == "2"
    assert env["LINEGUARD_SINKS__MQTT__PASSWORD"] == "s3cret-pass"
    import os

    saved = dict(os.environ)
    try:
        os.environ.update(env)
        child = Settings.load(env_file=None)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    assert child.sinks.mqtt.qos == 2
    assert child.sinks.mqtt.password is not None
    assert child.sinks.mqtt.password.get_secret_value() == "s3cret-pass"
    assert child.model_dump() == parent.model_dump()
