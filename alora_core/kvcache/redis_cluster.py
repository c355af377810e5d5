"""KVClient on a Redis Cluster: redis-py's `RedisCluster` keeps the slot map (seed nodes, CLUSTER
SLOTS, MOVED updates); the commands are sent here, grouped by the master serving each key's slot,
so that a fetch stays pipelined per node and one failing master costs only its own keys.

    get_many     one ValueStream per node (FETCH_WINDOW GETEX in flight on each), replies consumed in
                 key order: every node streams its values at once
    pipelines    EXISTS / SET / EXPIRE / DEL: one pipeline per node, all sent before any is read
    MOVED, ASK   followed once (ASKING first for ASK); MOVED also patches the slot map and schedules
                 a full refresh
    failures     connection errors, timeouts, CLUSTERDOWN, READONLY: the node's breaker opens, its keys
                 read as UNREACHABLE (recompute) and writes to it raise `Unreachable`; recover() (I/O
                 thread) refreshes the slot map and probes due nodes with CLUSTER INFO. A master that
                 failed over serves no slots any more: forgotten, so the tier recovers on its own.

A conversation's meta and tail share one hash tag, so set_atomic's MULTI/EXEC stays on one node.
"""

import logging
import time
from collections.abc import Iterator
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException
from redis.retry import Retry

from alora_core.kvcache.redis_client import (
    REDIS_ERRORS,
    UNREACHABLE,
    Unreachable,
    ValueStream,
    node_failure,
    read_reply,
)
from alora_core.kvcache.redis_health import RedisHealth

log = logging.getLogger(__name__)

CLUSTER_ERRORS = (*REDIS_ERRORS, RedisClusterException)
SEEDS = "seeds"  # the breaker of the whole cluster while no seed node answered yet
Command = tuple[str | int | bytes | bytearray, ...]


class ClusterClient:
    def __init__(self, seeds: list[tuple[str, int]], options: dict[str, Any]) -> None:
        self._seeds = seeds
        self._options = options
        self._cluster: RedisCluster | None = None
        self._stale = False  # the slot map may be out of date: refresh it on the next recover()
        self.health = RedisHealth()
        self._connect()

    def _connect(self) -> None:
        """Discover the cluster from the seeds; unreachable: degraded, retried by recover()."""
        try:
            self._cluster = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in self._seeds],
                require_full_coverage=False,  # a shard failing over must not stop the others
                retry=Retry(NoBackoff(), 0),  # retries are ours: the breakers and recover()
                **self._options,
            )
        except CLUSTER_ERRORS as exc:
            self.health.failed(SEEDS, exc)
            return
        self.health.retain(self._masters())
        log.info("Redis Cluster: masters %s", ", ".join(self._masters()))

    def _masters(self) -> list[str]:
        assert self._cluster is not None
        return sorted(n.name for n in self._cluster.get_primaries())

    def _node(self, key: str) -> ClusterNode | None:
        """The master serving key's slot (None: no cluster yet, or the slot is not served)."""
        if self._cluster is None:
            return None
        try:
            return self._cluster.nodes_manager.get_node_from_slot(key_slot(key.encode()))
        except RedisClusterException:
            return None

    def _usable(self, key: str) -> ClusterNode | None:
        node = self._node(key)
        return node if node is not None and self.health.closed(node.name) else None

    def _redis(self, node: ClusterNode) -> redis.Redis:
        assert self._cluster is not None
        return self._cluster.get_redis_connection(node)

    # -- reads ----------------------------------------------------------------------------------------

    def get_many(self, keys: list[str], ttl_s: int) -> Iterator[object]:
        streams: dict[str, ValueStream] = {}
        route: list[ValueStream | None] = []
        for key in keys:
            node = self._usable(key)
            if node is None:
                route.append(None)
                continue
            stream = streams.get(node.name)
            if stream is None:
                pool = self._redis(node).connection_pool
                stream = streams[node.name] = ValueStream(pool, node.name, self.health, ttl_s)
            stream.keys.append(key)
            route.append(stream)
        try:
            for stream in streams.values():
                stream.start()
            for key, via in zip(keys, route, strict=True):
                reply = UNREACHABLE if via is None else via.next()
                if isinstance(reply, AskError):
                    reply = self._follow(reply, ("GETEX", key, "EX", ttl_s))
                yield reply
        finally:
            for stream in streams.values():
                stream.close()

    def getex(self, key: str, ttl_s: int) -> bytes | None:
        (reply,) = self._pipeline([(key, ("GETEX", key, "EX", ttl_s))])
        if isinstance(reply, BaseException):
            raise reply
        return reply if isinstance(reply, bytes) else None

    def exists_many(self, keys: list[str]) -> list[bool]:
        """Keys on an unreachable node read as missing."""
        replies = self._pipeline([(k, ("EXISTS", k)) for k in keys])
        return [r == 1 for r in replies]

    # -- writes ---------------------------------------------------------------------------------------

    def set_many(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        self._all_ok(self._pipeline([(k, ("SET", k, v, "EX", ttl_s)) for k, v in items]))

    def expire(self, keys: list[str], ttl_s: int) -> None:
        self._all_ok(self._pipeline([(k, ("EXPIRE", k, ttl_s)) for k in keys]))

    def delete(self, keys: list[str]) -> None:
        self._all_ok(self._pipeline([(k, ("DEL", k)) for k in keys]))

    @staticmethod
    def _all_ok(replies: list[object]) -> None:
        """Raise the first failure of a write pipeline (the job is not done; nothing names its keys)."""
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply

    def set_atomic(self, items: list[tuple[str, bytes | bytearray]], ttl_s: int) -> None:
        """One MULTI/EXEC on the node of the keys' common slot; a MOVED is followed once."""
        slots = {key_slot(k.encode()) for k, _ in items}
        assert len(slots) == 1, "set_atomic: keys of one hash tag only"
        for attempt in range(2):
            node = self._usable(items[0][0])
            if node is None:
                raise Unreachable(f"no reachable master serves slot {slots.pop()}")
            pipe = self._redis(node).pipeline(transaction=True)
            for key, value in items:
                pipe.set(key, value, ex=ttl_s)
            t0 = time.perf_counter()
            try:
                pipe.execute()
            except AskError as exc:  # MOVED inside MULTI (ASK: the slot is migrating; skipped)
                self.health.redirected(exc)
                if isinstance(exc, MovedError) and attempt == 0:
                    self._moved(exc)
                    continue
                raise
            except REDIS_ERRORS as exc:
                self.health.failed(node.name, exc)
                raise
            self.health.ok(node.name, time.perf_counter() - t0)
            return

    # -- pipelines and redirections -------------------------------------------------------------------

    def _pipeline(self, commands: list[tuple[str, Command]]) -> list[object]:
        """Each (key, command) on the master of key's slot: one pipeline per node, all sent before any
        is read. Per command its reply, or the exception that kept it from being answered."""
        replies: list[object] = [UNREACHABLE] * len(commands)
        groups: dict[str, tuple[ClusterNode, list[int]]] = {}
        for i, (key, _) in enumerate(commands):
            node = self._usable(key)
            if node is not None:
                groups.setdefault(node.name, (node, []))[1].append(i)
        sent = []
        for node, rows in groups.values():
            pool = self._redis(node).connection_pool
            conn = None
            try:
                conn = pool.get_connection()
                t0 = time.perf_counter()
                conn.send_packed_command(conn.pack_commands([commands[i][1] for i in rows]))
                sent.append((node, rows, pool, conn, t0))
            except REDIS_ERRORS as exc:
                self._lost(node, pool, conn, exc)
        for node, rows, pool, conn, t0 in sent:
            try:
                for i in rows:
                    replies[i] = read_reply(conn)
            except REDIS_ERRORS as exc:
                for i in rows:
                    replies[i] = UNREACHABLE
                self._lost(node, pool, conn, exc)
                continue
            pool.release(conn)
            self.health.ok(node.name, time.perf_counter() - t0)
            for i in rows:
                reply = replies[i]
                if isinstance(reply, AskError):
                    replies[i] = self._follow(reply, commands[i][1])
                elif node_failure(reply):
                    assert isinstance(reply, Exception)
                    self.health.failed(node.name, reply)
                    replies[i] = UNREACHABLE
        return replies

    def _lost(self, node: ClusterNode, pool: redis.ConnectionPool, conn: object, exc: BaseException) -> None:
        self.health.failed(node.name, exc)
        if conn is not None:
            conn.disconnect()  # type: ignore[attr-defined]
            pool.release(conn)  # type: ignore[arg-type]

    def _moved(self, exc: MovedError) -> None:
        """Patch the slot map now; a full refresh follows on the I/O thread."""
        assert self._cluster is not None
        self._stale = True
        try:
            self._cluster.nodes_manager.move_slot(exc)
        except (KeyError, *CLUSTER_ERRORS):
            pass

    def _follow(self, exc: AskError, command: Command) -> object:
        """Send `command` once more where a MOVED or ASK reply points (ASKING first for ASK)."""
        assert self._cluster is not None
        self.health.redirected(exc)
        if isinstance(exc, MovedError):
            self._moved(exc)
        node = self._cluster.get_node(exc.host, exc.port) or ClusterNode(exc.host, exc.port)
        if not self.health.closed(node.name):
            return UNREACHABLE
        pipe = self._redis(node).pipeline(transaction=False)
        if not isinstance(exc, MovedError):
            pipe.execute_command("ASKING")
        pipe.execute_command(*command)
        t0 = time.perf_counter()
        try:
            reply = pipe.execute(raise_on_error=False)[-1]
        except REDIS_ERRORS as failure:
            self.health.failed(node.name, failure)
            return UNREACHABLE
        if isinstance(reply, AskError):  # redirected again: the slot is moving; recompute
            self.health.redirected(reply)
            return UNREACHABLE
        if node_failure(reply):
            assert isinstance(reply, Exception)
            self.health.failed(node.name, reply)
            return UNREACHABLE
        self.health.ok(node.name, time.perf_counter() - t0)
        return reply

    # -- recovery -------------------------------------------------------------------------------------

    def recover(self) -> None:
        """On the I/O thread: refresh the slot map when it may be stale or a node is due, then probe
        the due nodes (reachable and cluster_state:ok closes a breaker)."""
        due = self.health.due()
        if self._cluster is None:
            if SEEDS in due:
                self._connect()
            return
        if not due and not self._stale:
            return
        try:
            self._cluster.nodes_manager.initialize(additional_startup_nodes_info=self._seeds)
            self._stale = False
            self.health.retain(self._masters())
        except CLUSTER_ERRORS as exc:
            log.debug("Redis Cluster slot map not refreshed: %s", exc)
        for name in self.health.due():
            node = self._cluster.get_node(node_name=name)
            if node is None:
                continue
            t0 = time.perf_counter()
            try:
                info = self._redis(node).execute_command("CLUSTER", "INFO")
                if b"cluster_state:ok" not in info:
                    raise ClusterDownError(f"CLUSTERDOWN {name} reports cluster_state:fail")
            except REDIS_ERRORS as exc:
                self.health.failed(name, exc)
            else:
                self.health.ok(name, time.perf_counter() - t0)

    def close(self) -> None:
        if self._cluster is not None:
            self._cluster.close()
