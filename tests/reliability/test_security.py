"""Credentials and TLS against real servers started here, and secrets that never show.

* ACL: a server whose default user is off and whose only user is ``lineguard`` with a
  password; the line works with the credentials given as settings *or* inside the URL, and the
  password appears in no log line (structlog JSON, every level), no ``repr`` and no CLI output.
* TLS: a server with only a TLS port and a certificate signed by a CA made here with openssl;
  ``rediss://`` with ``ssl_ca_certs`` works, the same URL without the CA (or ``redis://``) is
  refused with a clear error.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import structlog

from lineguard.stream.bus import Bus, BusError, connect, wait_for_server
from lineguard.stream.decide import DecideStage
from lineguard.stream.infer import InferStage
from lineguard.stream.ingest import Ingestor
from lineguard.stream.logs import configure_logging
from lineguard.stream.settings import LogSettings, RedisSettings, Settings
from lineguard.stream.worker import StopFlag, run_worker
from tests.reliability.helpers import (
    ROOT,
    RedisProcess,
    events_now,
    make_tls_files,
    server_binary,
    unique_prefix,
    wait_until,
)
from tests.stream.pipeline_helpers import BAD, GOOD, SIZE, split_bundle, write_folder

USER = "lineguard"
SECRET = "Pw-9f3c1a-never-logged"

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no redis-server/valkey-server")


@pytest.fixture
def acl_server(tmp_path: Path) -> Iterator[RedisProcess]:
    acl = ["--user", "default", "off", "--user", USER, "on", f">{SECRET}", "~*", "&*", "+@all"]
    server = RedisProcess(tmp_path / "redis", args=acl, username=USER, password=SECRET)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    """Every structlog line of this process (all threads), JSON, debug and up."""
    out = io.StringIO()
    configure_logging(LogSettings(level="debug", format="json"), stream=out)
    try:
        yield out
    finally:
        structlog.reset_defaults()


def run_line_briefly(settings: Settings, n: int = 6) -> list[str]:
    """Infer and decide in threads on ``settings``' server; returns the verdicts of n frames."""
    split = split_bundle()
    client = connect(settings, client_name="security-test")
    wait_for_server(client, 10)
    bus = Bus.from_settings(client, settings)
    stop = StopFlag()
    stages: list[InferStage | DecideStage] = [
        InferStage(Bus.from_settings(connect(settings), settings), settings, split.path,
                   runtime="onnxruntime", consumer="i0"),
        DecideStage(Bus.from_settings(connect(settings), settings), settings, split.path,
                    consumer="d0"),
    ]  # fmt: skip
    threads = [
        threading.Thread(
            target=run_worker, args=(s, s.bus), kwargs={"stop": stop, "handle_signals": False}
        )
        for s in stages
    ]
    for t in threads:
        t.start()
    try:
        ing = Ingestor(bus, camera="cam0", size=SIZE, encoding="png")
        for i in range(n):
            ing.send(BAD if i % 2 else GOOD)
        wait_until(lambda: len(events_now(bus)) >= n, 60, "verdicts")
        return [e.verdict for e in sorted(events_now(bus), key=lambda e: e.seq)]
    finally:
        stop.set()
        for t in threads:
            t.join(20)
        for s in stages:
            s.bus.client.close()
        client.close()


def settings_with(url: str, **redis_fields: object) -> Settings:
    fields = {f"redis.{k}": v for k, v in redis_fields.items()}
    base = {"redis.url": url, "redis.key_prefix": unique_prefix(), "ingest.encoding": "png"}
    return Settings.load({**base, **fields}, env_file=None)


def test_acl_user_and_password_as_settings_work_and_are_never_logged(
    acl_server: RedisProcess, captured_logs: io.StringIO
) -> None:
    anonymous = redis.Redis.from_url(acl_server.url, socket_timeout=2)
    with pytest.raises(redis.AuthenticationError):  # NOAUTH: the default user is off
        anonymous.ping()
    anonymous.close()

    settings = settings_with(acl_server.url, username=USER, password=SECRET)
    assert run_line_briefly(settings) == ["pass", "fail"] * 3
    for text in (repr(settings), str(settings), str(settings.redacted()), repr(settings.redis)):
        assert SECRET not in text
    logged = captured_logs.getvalue()
    assert "worker.ready" in logged and "decide.event" in logged  # the capture saw the run
    assert SECRET not in logged


def test_credentials_inside_the_url_work_and_are_never_logged(
    acl_server: RedisProcess, captured_logs: io.StringIO
) -> None:
    url = f"redis://{USER}:{SECRET}@127.0.0.1:{acl_server.port}/0"
    settings = settings_with(url)
    assert run_line_briefly(settings, n=4) == ["pass", "fail"] * 2
    assert SECRET not in repr(settings) and SECRET not in str(settings.redacted())
    assert SECRET not in captured_logs.getvalue()


def test_wrong_password_fails_fast_and_the_message_holds_no_secret(
    acl_server: RedisProcess, captured_logs: io.StringIO
) -> None:
    wrong = "Wrong-7e1d-password"
    creds = {"url": acl_server.url, "username": USER, "password": wrong}
    client = connect(RedisSettings.model_validate(creds))
    with pytest.raises(BusError, match="LINEGUARD_REDIS__PASSWORD") as info:
        wait_for_server(client, 10)
    client.close()
    assert wrong not in str(info.value) and SECRET not in str(info.value)
    assert wrong not in captured_logs.getvalue()


def cli(
    args: list[str], env: dict[str, str], timeout_s: float = 180
) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("LINEGUARD_")}
    return subprocess.run(
        [sys.executable, "-m", "lineguard.stream.cli", "--log-level", "debug", *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


@pytest.mark.slow
def test_cli_output_never_shows_the_password(acl_server: RedisProcess, tmp_path: Path) -> None:
    """``lineguard run`` against an external Redis whose URL carries the password, then
    ``lineguard health`` with a wrong one: neither prints it (stdout, stderr, debug logs)."""
    folder = tmp_path / "frames"
    write_folder(folder, lambda i: i % 3 == 1, 3)
    url = f"redis://{USER}:{SECRET}@127.0.0.1:{acl_server.port}/0"
    env = {"LINEGUARD_REDIS__URL": url, "LINEGUARD_REDIS__KEY_PREFIX": unique_prefix()}
    run = cli(
        ["run", "--bundle", str(split_bundle().path), "--source", str(folder), "--size",
         str(SIZE), "--runtime", "onnxruntime", "--show", "all"],
        env,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert "fail" in run.stdout  # the events were printed
    assert SECRET not in run.stdout + run.stderr
    bad = {**env, "LINEGUARD_REDIS__URL": url.replace(SECRET, "Wrong-pw-5150")}
    health = cli(["health"], bad, timeout_s=60)
    assert health.returncode == 1
    assert "LINEGUARD_REDIS__PASSWORD" in health.stderr
    assert "Wrong-pw-5150" not in health.stdout + health.stderr


# ------------------------------------------------------------------------------ TLS


def test_rediss_urls_pass_ssl_options_to_redis_py() -> None:
    """Without a server: ``rediss://`` builds an SSL connection pool with the options from the
    URL's query (how CA, client certificate and verification are configured)."""
    url = (
        "rediss://:pw@redis.plant:6380/0?ssl_ca_certs=/etc/ssl/plant-ca.pem&ssl_cert_reqs=required"
    )
    client = connect(RedisSettings(url=url))
    pool = client.connection_pool
    assert pool.connection_class is redis.SSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == "/etc/ssl/plant-ca.pem"
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    from lineguard.stream.bus import client_url

    assert client_url(client) == "rediss://redis.plant:6380/0"
    client.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[RedisProcess]:
    files = make_tls_files(tmp_path / "tls")
    server = RedisProcess(tmp_path / "redis", tls=files)
    try:
        server.start(timeout_s=10)
    except RuntimeError as exc:
        pytest.skip(
            f"{server.binary} cannot serve TLS here ({exc}); only the URL pass-through is tested"
        )
    try:
        yield server
    finally:
        server.stop()


def test_rediss_with_a_ca_made_here_carries_the_line(
    tls_server: RedisProcess, captured_logs: io.StringIO
) -> None:
    assert tls_server.tls is not None
    ca = tls_server.tls.ca
    url = f"rediss://127.0.0.1:{tls_server.port}/0?ssl_ca_certs={ca}&ssl_cert_reqs=required"
    settings = settings_with(url)
    assert run_line_briefly(settings, n=4) == ["pass", "fail"] * 2

    # the same server without our CA: the certificate is not trusted, and we say so
    untrusted = connect(RedisSettings(url=f"rediss://127.0.0.1:{tls_server.port}/0"))
    with pytest.raises(BusError, match="could not reach Redis at rediss://") as info:
        wait_for_server(untrusted, 1.0)
    untrusted.close()
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value) or "certificate" in str(info.value)
    # and plain TCP to the TLS port gets nowhere
    plain = connect(RedisSettings(url=f"redis://127.0.0.1:{tls_server.port}/0", socket_timeout=1))
    with pytest.raises(BusError):
        wait_for_server(plain, 1.0)
    plain.close()
