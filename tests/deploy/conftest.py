"""The deploy tests that run processes reuse the stream tests' real servers (no mocks)."""

from tests.stream.conftest import bus, embedded_url, redis_url

__all__ = ["bus", "embedded_url", "redis_url"]
