"""Fixtures shared by every test package."""

from collections.abc import Iterator

import pytest

from tests.alora_core.redis_server import RedisServer, free_port, redis_binary


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh redis-server for one test (skipped without the binary, failed under CI)."""
    server = RedisServer(redis_binary(), free_port())
    server.start()
    yield server
    server.kill()
