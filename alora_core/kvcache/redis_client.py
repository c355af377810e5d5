"""Every Redis command the KV cache sends, behind one small interface (a Redis Cluster client is
another implementation of it: value keys each carry their own hash tag, a conversation's keys share
one, so `set_atomic` never spans slots).

    get_many(keys)       GETEX each key (TTL refreshed), FETCH_WINDOW replies in flight, in order
    exists_many(keys)    EXISTS per key, one round trip
    set_many(items)      SET EX per key, pipelined, not atomic (keys in different slots)
    set_atomic(items)    SET EX of keys sharing one hash tag in one MULTI/EXEC
    expire / delete / getex / ping / close

Errors are redis-py's (`REDIS_ERRORS`); the caller (redis_tier.py) owns retries and the breaker.
"""

from collections.abc import Iterator
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

REDIS_ERRORS = (redis.RedisError, OSError)
# Value reads in flight on one connection. Redis copies each reply into its output buffer before
# sending: with a whole conversation requested at once that buffer grows to the conversation's
# size (fresh pages, faulted in, every restore); a few values in flight keep it small and reused.
FETCH_WINDOW = 2


class KVClient(Protocol):
    def get_many(self, keys: list[str], ttl_s: int) -> Iterator[object]: ...
    def exists_many(self, keys: list[str]) -> list[bool]: ...
    def set_many(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None: ...
    def set_atomic(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None: ...
    def expire(self, keys: list[str], ttl_s: int) -> None: ...
    def delete(self, keys: list[str]) -> None: ...
    def getex(self, key: str, ttl_s: int) -> bytes | None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...


class RedisClient:
    """KVClient on one standalone Redis (redis-py, hiredis parser)."""

    def __init__(self, url: str, timeout_s: float = 2.0) -> None:
        self._redis = redis.Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            socket_read_size=1 << 20,
        )

    def get_many(self, keys: list[str], ttl_s: int) -> Iterator[object]:
        """Each key's value (None: missing; a ResponseError: not a string), in order. A consumer that
        stops early still leaves the connection clean: the remaining replies are read on close."""
        if not keys:
            return
        commands: list[tuple[str | int, ...]] = [("GETEX", k, "EX", ttl_s) for k in keys]
        pool = self._redis.connection_pool
        conn = pool.get_connection()
        sent = 0
        try:
            conn.send_packed_command(conn.pack_commands(commands[:FETCH_WINDOW]))
            sent = min(FETCH_WINDOW, len(commands))
            for _ in range(len(commands)):
                value = _read_response(conn)
                if sent < len(commands):
                    conn.send_packed_command(conn.pack_command(*commands[sent]))
                    sent += 1
                yield value
        except BaseException:
            conn.disconnect()  # replies may be pending: never hand this connection out again
            raise
        finally:
            pool.release(conn)

    def exists_many(self, keys: list[str]) -> list[bool]:
        pipe = self._redis.pipeline(transaction=False)
        for k in keys:
            pipe.exists(k)
        return [bool(n) for n in pipe.execute()]

    def set_many(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key, value in items:
            pipe.set(key, value, ex=ttl_s)
        pipe.execute()

    def set_atomic(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        pipe = self._redis.pipeline(transaction=True)
        for key, value in items:
            pipe.set(key, value, ex=ttl_s)
        pipe.execute()

    def expire(self, keys: list[str], ttl_s: int) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.expire(key, ttl_s)
        pipe.execute()

    def delete(self, keys: list[str]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for key in keys:
            pipe.delete(key)
        pipe.execute()

    def getex(self, key: str, ttl_s: int) -> bytes | None:
        value = self._redis.getex(key, ex=ttl_s)
        return value if isinstance(value, bytes) else None

    def ping(self) -> None:
        self._redis.ping()

    def close(self) -> None:
        self._redis.close()


def _read_response(conn: redis.Connection) -> object:
    """One reply; an error reply (e.g. a key of another type) is returned, not raised: it is consumed."""
    try:
        return conn.read_response()
    except redis.ResponseError as exc:
        return exc
