"""The MQTT sink against a real Mosquitto: the system broker at 127.0.0.1:1883 when it
answers, else one started here; the outage test always starts its own (it stops it)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lineguard.stream.bus import Bus
from lineguard.stream.settings import Settings
from lineguard.stream.sinks import sink_group, sink_stage
from tests.stream.sink_helpers import (
    Mosquitto,
    MqttRecorder,
    first_seen_in_order,
    port_open,
    produce,
    running,
    sink_settings,
    wait_until,
)

paho = pytest.importorskip("paho.mqtt.client")


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    if port_open("127.0.0.1", 1883):
        yield "127.0.0.1", 1883
        return
    own = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    if not own.available:
        pytest.skip("no MQTT broker at 127.0.0.1:1883 and no mosquitto binary to start one")
    own.start()
    try:
        yield "127.0.0.1", own.port
    finally:
        own.stop()


def _mqtt_settings(bus: Bus, port: int, topic: str, **sink: Any) -> tuple[str, Settings]:
    """A topic root of this test's own (the broker may be shared) and settings that publish
    under it from the first kept event; ``topic`` follows the root, ``sink`` sets the rest
    of ``sinks.mqtt``."""
    root = f"lgtest/{uuid.uuid4().hex[:8]}"
    overrides = {
        "sinks.mqtt.port": port,
        "sinks.mqtt.topic": root + topic,
        "sinks.mqtt.start": "all",
        **{f"sinks.mqtt.{key}": value for key, value in sink.items()},
    }
    return root, sink_settings(bus, **overrides)


def test_one_qos1_message_per_verdict_on_its_camera_topic(
    bus: Bus, broker: tuple[str, int]
) -> None:
    host, port = broker
    root, settings = _mqtt_settings(bus, port, "/{line}/{camera}/verdict", host=host)
    sub = MqttRecorder(host, port, root + "/#")
    try:
        events = produce(bus, ("cam0", "cam1"), range(12))
        stage = sink_stage("mqtt", settings, bus)
        with running(stage, bus):
            wait_until(lambda: len(sub.keys()) >= len(events), 20, "all verdicts at the subscriber")
            wait_until(stage.done, 10, "the group to be fully acknowledged")
        with sub.lock:
            got = list(sub.messages)
    finally:
        sub.close()
    assert sorted(p["frame_key"] for _, p, _ in got) == sorted(e.key for e in events)
    for topic, payload, _ in got:
        assert topic == f"{root}/line1/{payload['camera']}/verdict"
    by_key = {p["frame_key"]: p for _, p, _ in got}
    for ev in events:
        p = by_key[ev.key]
        assert (p["verdict"], p["score"], p["threshold"], p["model"]) == (
            ev.verdict, ev.score, ev.threshold, ev.model,
        )  # fmt: skip
    order = first_seen_in_order([p["frame_key"] for _, p, _ in got])
    assert all(seqs == sorted(seqs) for seqs in order.values()), order
    stats = bus.group_stats("events", sink_group("mqtt", "default"))
    assert stats is not None and stats.pending == 0 and stats.lag == 0


def test_retained_last_verdict_per_camera(bus: Bus, broker: tuple[str, int]) -> None:
    host, port = broker
    root, settings = _mqtt_settings(bus, port, "/{camera}", host=host, retain=True)
    events = produce(bus, ("cam0", "cam1"), range(5))
    stage = sink_stage("mqtt", settings, bus)
    with running(stage, bus):
        wait_until(stage.done, 20, "every verdict acknowledged")
    late = MqttRecorder(host, port, root + "/#")  # connects after everything was sent
    try:
        wait_until(lambda: len(late.keys()) >= 2, 10, "the retained messages")
        with late.lock:
            retained = {t: p["frame_key"] for t, p, r in late.messages if r}
    finally:
        late.close()
        for cam in ("cam0", "cam1"):  # clear the retained messages off the shared broker
            c = paho.Client(paho.CallbackAPIVersion.VERSION2)
            c.connect(host, port)
            c.loop_start()
            c.publish(f"{root}/{cam}", b"", qos=1, retain=True).wait_for_publish(5)
            c.disconnect()
            c.loop_stop()
    assert retained == {f"{root}/{e.camera}": e.key for e in events[-2:]}


def test_broker_outage_loses_nothing_and_keeps_order(bus: Bus, tmp_path: Path) -> None:
    own = Mosquitto(tmp_path)
    if not own.available:
        pytest.skip("the outage test stops a broker of its own: no mosquitto binary found")
    own.start()
    root, settings = _mqtt_settings(
        bus, own.port, "/{camera}", retry_base_s=0.2, retry_cap_s=1.0, queue_size=16
    )
    sub = MqttRecorder(
        "127.0.0.1", own.port, root + "/#", client_id=f"durable-{uuid.uuid4().hex[:6]}"
    )
    stage = sink_stage("mqtt", settings, bus)
    try:
        with running(stage, bus):
            events = produce(bus, ("cam0", "cam1"), range(0, 20))
            wait_until(stage.done, 20, "the first verdicts delivered")
            own.stop()
            events += produce(bus, ("cam0", "cam1"), range(20, 80))
            wait_until(lambda: stage.counts["errors"] > 0, 10, "the sink to notice the outage")
            lag = stage.lag()
            assert lag is not None and lag > 0
            own.start()
            wait_until(stage.done, 30, "catch-up after the outage")
            wait_until(
                lambda: len(set(sub.keys())) >= len(events), 20, "everything at the subscriber"
            )
    finally:
        sub.close()
        own.stop()
    order = first_seen_in_order(sub.keys())
    assert sorted(order) == ["cam0", "cam1"]
    for cam, seqs in order.items():
        assert seqs == list(range(80)), (cam, seqs)
    assert stage.counts["dead"] == 0 and stage.counts["refused"] == 0


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 signed by it (PEM files)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder().subject_name(name("lineguard test CA")).issuer_name(
            name("lineguard test CA")).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP256R1())
    san = x509.SubjectAlternativeName(
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
    )
    cert = (
        x509.CertificateBuilder().subject_name(name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(san, critical=False).sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    ca_file, cert_file, key_file = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return ca_file, cert_file, key_file


def test_tls_and_password_and_the_password_is_never_logged(bus: Bus, tmp_path: Path) -> None:
    import shutil
    import subprocess

    import structlog

    passwd_tool = shutil.which("mosquitto_passwd")
    broker = Mosquitto(tmp_path)
    if not broker.available or passwd_tool is None:
        pytest.skip("needs the mosquitto and mosquitto_passwd binaries (apt-get install mosquitto)")
    pytest.importorskip("cryptography")
    ca_file, cert_file, key_file = _tls_files(tmp_path)
    password = "mqtt-pass-never-logged-42"
    passwd = tmp_path / "passwd"
    subprocess.run([passwd_tool, "-b", "-c", str(passwd), "line", password], check=True)
    passwd.chmod(0o600)
    broker.extra = (
        f"cafile {ca_file}\ncertfile {cert_file}\nkeyfile {key_file}\npassword_file {passwd}"
    )
    broker.start()
    try:
        base = {
            "sinks.mqtt.port": broker.port,
            "sinks.mqtt.tls": True,
            "sinks.mqtt.ca_file": str(ca_file),
            "sinks.mqtt.username": "line",
            "sinks.mqtt.start": "all",
        }
        events = produce(bus, ("cam0",), range(5))
        good = sink_settings(bus, **base, **{"sinks.mqtt.password": password})
        stage = sink_stage("mqtt", good, bus)
        with structlog.testing.capture_logs() as logs, running(stage, bus):
            wait_until(stage.done, 20, "delivery over TLS with a password")
        assert stage.counts["delivered"] == len(events)
        # a wrong password: the broker refuses, nothing is acknowledged, the lag shows it
        produce(bus, ("cam0",), range(5, 8))
        bad = sink_settings(bus, **base, **{"sinks.mqtt.password": "wrong-password"})
        stage = sink_stage("mqtt", bad, bus)
        with structlog.testing.capture_logs() as bad_logs, running(stage, bus):
            wait_until(lambda: stage.counts["errors"] > 0, 10, "failed attempts")
            refused = lambda: any(e["event"] == "sink.mqtt_refused" for e in bad_logs)  # noqa: E731
            wait_until(refused, 10, "the broker's refusal")  # a CONNACK away, under load
            assert stage.counts["delivered"] == 0 and stage.lag() == 3
            assert not stage.sink.connected()
    finally:
        broker.stop()
    text = repr(logs) + repr(bad_logs) + repr(good) + repr(good.redacted())
    assert password not in text and "wrong-password" not in text
