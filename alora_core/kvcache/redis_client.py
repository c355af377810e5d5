"""Every Redis command the KV cache sends, behind one small interface, on three deployments
(redis_url.py picks one from --redis-url):

    RedisClient     one standalone Redis, or the master a Sentinel set names now
    ClusterClient   a Redis Cluster: commands grouped by the node serving each key's slot (redis_cluster.py)

    get_many(keys)       GETEX each key (TTL refreshed), FETCH_WINDOW replies in flight per node, in order
    exists_many(keys)    EXISTS per key, one round trip (one pipeline per node, all sent first)
    set_many(items)      SET EX per key, pipelined, not atomic (keys in different slots)
    set_atomic(items)    SET EX of keys sharing one hash tag in one MULTI/EXEC (one slot, one node)
    expire / delete / getex
    recover()            probe the nodes whose breaker is due (and refresh a Cluster's slot map)

Each client owns a RedisHealth (redis_health.py): a node whose breaker is open is not asked; its keys
read as UNREACHABLE (missing: recompute) and writes to it raise `Unreachable`. Value replies are
bytes, None (missing), a ResponseError (a key of another type: corrupt) or UNREACHABLE.
"""

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

import redis
from redis.exceptions import AskError, ResponseError

from alora_core.kvcache.redis_health import RedisHealth

log = logging.getLogger(__name__)

REDIS_ERRORS = (redis.RedisError, OSError)
# Value reads in flight on one connection. Redis copies each reply into its output buffer before
# sending: with a whole conversation requested at once that buffer grows to the conversation's
# size (fresh pages, faulted in, every restore); a few values in flight keep it small and reused.
FETCH_WINDOW = 2
T = TypeVar("T")


class Unreachable(redis.ConnectionError):
    """A node not asked (its breaker is open) or that could not answer."""


UNREACHABLE = Unreachable("Redis node unreachable")  # the value reply of such a key


class KVClient(Protocol):
    health: RedisHealth

    def get_many(self, keys: list[str], ttl_s: int) -> Iterator[object]: ...
    def exists_many(self, keys: list[str]) -> list[bool]: ...
    def set_many(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None: ...
    def set_atomic(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None: ...
    def expire(self, keys: list[str], ttl_s: int) -> None: ...
    def delete(self, keys: list[str]) -> None: ...
    def getex(self, key: str, ttl_s: int) -> bytes | None: ...
    def recover(self) -> None: ...
    def close(self) -> None: ...


def node_failure(reply: object) -> bool:
    """An error reply that says the node cannot serve keys now (CLUSTERDOWN, READONLY, LOADING...),
    as opposed to a redirection or a reply about the value itself (WRONGTYPE)."""
    return (
        isinstance(reply, ResponseError)
        and not isinstance(reply, AskError)
        and not str(reply).startswith("WRONGTYPE")
    )


class ValueStream:
    """GETEX of `keys` on one connection of `pool`, FETCH_WINDOW in flight, replies read in order.
    A node failure marks the stream failed: its remaining keys read as UNREACHABLE."""

    def __init__(self, pool: redis.ConnectionPool, node: str, health: RedisHealth, ttl_s: int) -> None:
        self.pool, self.node, self.health, self.ttl_s = pool, node, health, ttl_s
        self.keys: list[str] = []
        self._conn: redis.connection.ConnectionInterface | None = None
        self._sent: deque[float] = deque()  # send time of each reply in flight
        self._next = 0  # keys sent
        self.failed = False

    def start(self) -> None:
        try:
            self._conn = self.pool.get_connection()
            self._send(min(FETCH_WINDOW, len(self.keys)))
        except REDIS_ERRORS as exc:
            self._fail(exc)

    def _send(self, n: int) -> None:
        assert self._conn is not None
        commands = [("GETEX", k, "EX", self.ttl_s) for k in self.keys[self._next : self._next + n]]
        self._conn.send_packed_command(self._conn.pack_commands(commands))
        self._sent.extend([time.perf_counter()] * len(commands))
        self._next += len(commands)

    def next(self) -> object:
        """The next key's reply: bytes, None, an error reply (redirections included) or UNREACHABLE."""
        if self.failed or self._conn is None:
            return UNREACHABLE
        try:
            reply = read_reply(self._conn)
            self.health.ok(self.node, time.perf_counter() - self._sent.popleft())
            if self._next < len(self.keys):
                self._send(1)
        except REDIS_ERRORS as exc:
            self._fail(exc)
            return UNREACHABLE
        if node_failure(reply):
            assert isinstance(reply, ResponseError)
            self._fail(reply)
            return UNREACHABLE
        return reply

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        self.health.failed(self.node, exc)
        if self._conn is not None:
            self._conn.disconnect()  # replies may be pending: never hand this connection out in step

    def close(self) -> None:
        """Release the connection (disconnected first when replies are still pending)."""
        if self._conn is None:
            return
        if self._sent and not self.failed:
            self._conn.disconnect()
        self.pool.release(self._conn)
        self._conn = None


def read_reply(conn: redis.connection.ConnectionInterface) -> object:
    """One reply; an error reply (a redirection, a key of another type) is returned, not raised."""
    try:
        return conn.read_response()
    except ResponseError as exc:
        return exc


class RedisClient:
    """KVClient on one Redis: standalone, or the current master of a Sentinel-watched set (the
    connection pool asks the Sentinels for its address on every new connection)."""

    def __init__(self, client: redis.Redis, node: str) -> None:
        self._redis = client
        self.node = node
        self.health = RedisHealth([node])
        self._warned_moved = False

    def _call(self, command: Callable[[], T]) -> T:
        if not self.health.closed(self.node):
            raise Unreachable(self.node)
        t0 = time.perf_counter()
        try:
            result = command()
        except REDIS_ERRORS as exc:
            self.health.failed(self.node, exc)
            self._explain(exc)
            raise
        self.health.ok(self.node, time.perf_counter() - t0)
        return result

    def _explain(self, exc: BaseException) -> None:
        if isinstance(exc, AskError) and not self._warned_moved:
            self._warned_moved = True
            log.error("%s answers MOVED: it is a Redis Cluster node; use redis+cluster://", self.node)

    def get_many(self, keys: list[str], ttl_s: int) -> Iterator[object]:
        """Each key's value, in order. A consumer that stops early still leaves the pool clean."""
        if not keys:
            return
        if not self.health.closed(self.node):
            yield from [UNREACHABLE] * len(keys)
            return
        stream = ValueStream(self._redis.connection_pool, self.node, self.health, ttl_s)
        stream.keys = keys
        try:
            stream.start()
            for _ in keys:
                reply = stream.next()
                if isinstance(reply, AskError):  # a Cluster node named by a plain URL
                    self.health.redirected(reply)
                    self._explain(reply)
                    reply = UNREACHABLE
                yield reply
        finally:
            stream.close()

    def _pipeline(
        self, fill: Callable[[redis.client.Pipeline], None], transaction: bool = False
    ) -> list[object]:
        def run() -> list[object]:
            pipe = self._redis.pipeline(transaction=transaction)
            fill(pipe)
            return list(pipe.execute())

        return self._call(run)

    def exists_many(self, keys: list[str]) -> list[bool]:
        if not self.health.closed(self.node):
            return [False] * len(keys)
        replies = self._pipeline(lambda p: [p.exists(k) for k in keys])
        return [bool(n) for n in replies]

    def set_many(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        self._pipeline(lambda p: [p.set(k, v, ex=ttl_s) for k, v in items])

    def set_atomic(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        self._pipeline(lambda p: [p.set(k, v, ex=ttl_s) for k, v in items], transaction=True)

    def expire(self, keys: list[str], ttl_s: int) -> None:
        self._pipeline(lambda p: [p.expire(k, ttl_s) for k in keys])

    def delete(self, keys: list[str]) -> None:
        self._pipeline(lambda p: [p.delete(k) for k in keys])

    def getex(self, key: str, ttl_s: int) -> bytes | None:
        value = self._call(lambda: self._redis.getex(key, ex=ttl_s))
        return value if isinstance(value, bytes) else None

    def recover(self) -> None:
        if self.node not in self.health.due():
            return
        t0 = time.perf_counter()
        try:
            self._redis.ping()
        except REDIS_ERRORS as exc:
            self.health.failed(self.node, exc)
        else:
            self.health.ok(self.node, time.perf_counter() - t0)

    def close(self) -> None:
        self._redis.close()
