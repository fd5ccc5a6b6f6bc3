"""Embedded Valkey: start, stop, temp-dir cleanup, AOF persistence across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from lineguard.engines.errors import LineguardError
from lineguard.stream.bus import Bus, connect, server_version
from lineguard.stream.server import (
    EmbeddedServerError,
    EmbeddedValkey,
    embedded_valkey,
    redis_url_for,
)
from lineguard.stream.settings import RedisSettings, Settings


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=1)


def test_start_stop_and_temp_dir_removed() -> None:
    server = EmbeddedValkey()
    with pytest.raises(EmbeddedServerError):
        _ = server.url
    url = server.start()
    assert url.startswith("redis://127.0.0.1:")
    assert server.start() == url  # idempotent
    data_dir = server.data_dir
    assert data_dir is not None and data_dir.is_dir()
    client = _client(url)
    assert client.ping()
    assert server_version(client)[0] == "valkey"
    assert server.is_running()
    server.stop()
    server.stop()  # idempotent
    assert not server.is_running()
    assert not data_dir.exists()
    with pytest.raises(redis.ConnectionError):
        client.ping()
    client.close()


def test_context_manager_yields_url() -> None:
    with embedded_valkey() as url:
        client = _client(url)
        assert client.ping()
        client.close()
    with pytest.raises(redis.ConnectionError):
        _client(url).ping()


def test_aof_persistence_survives_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "valkey"
    settings = RedisSettings(socket_timeout=2)
    with embedded_valkey(data_dir, appendonly=True, appendfsync="always") as url:
        client = connect(settings, url)
        bus = Bus(client, prefix="persist")
        bus.ensure_group("frames", "infer")
        entry_id = bus.add("frames", b"kept")
        assert client.config_get("appendonly")["appendonly"] in ("yes", b"yes")
        client.close()
    assert (data_dir / "appendonlydir").is_dir()
    with embedded_valkey(data_dir, appendonly=True) as url:
        client = connect(settings, url)
        bus = Bus(client, prefix="persist")
        (entry,) = bus.read_group("frames", "infer", "w1")  # group state came back too
        assert (entry.id, entry.data) == (entry_id, b"kept")
        client.close()
    assert data_dir.is_dir()  # a given data dir is never deleted


def test_without_aof_data_is_gone_after_restart(tmp_path: Path) -> None:
    with embedded_valkey(tmp_path) as url:
        client = _client(url)
        client.set("k", "v")
        client.close()
    with embedded_valkey(tmp_path) as url:
        client = _client(url)
        assert client.get("k") is None
        client.close()


def test_redis_url_for_prefers_configured_url() -> None:
    s = Settings.load({"redis.url": "redis://example.invalid:6379/0"}, env_file=None)
    with redis_url_for(s) as url:
        assert url == "redis://example.invalid:6379/0"


def test_redis_url_for_starts_embedded_when_unset(tmp_path: Path) -> None:
    s = Settings.load(
        {"redis.embedded_dir": str(tmp_path / "v"), "redis.embedded_appendonly": True},
        env_file=None,
    )
    with redis_url_for(s) as url:
        client = _client(url)
        assert client.config_get("appendonly")["appendonly"] in ("yes", b"yes")
        client.close()
    assert (tmp_path / "v").is_dir()


def test_unwritable_data_dir_is_a_lineguard_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(LineguardError, match="LINEGUARD_REDIS__EMBEDDED_DIR"):
        EmbeddedValkey(data_dir=blocker / "sub").start()
