"""Health of the Redis nodes behind the cold tier: one circuit breaker per node, errors counted by
kind, round-trip latency per node.

    node        "host:port" of a standalone Redis or of a Cluster master; a Sentinel deployment is
                one node named after its master set (its address changes on failover)
    breaker     closed: requests use the node. An error opens it: requests skip the node (its keys
                read as missing: recompute), the I/O thread probes it after a backoff (0.5 s doubling
                to 5 s) and closes it when it answers. A Cluster node that no longer serves slots
                (its replica took over) is forgotten.
    kinds       moved, ask (redirections, followed once), timeout, connection, cluster_down, other

Per node, not per tier: while one Cluster master fails over, the others keep serving their prefixes.
Label values stay bounded: nodes are the deployment's masters, kinds a fixed set.
"""

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import redis
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    RedisClusterException,
    SlotNotCoveredError,
)

log = logging.getLogger(__name__)

ERROR_KINDS = ("moved", "ask", "timeout", "connection", "cluster_down", "other")
# round trip of one command or pipeline to a node (send -> last reply), seconds
NODE_LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BACKOFF_S, MAX_BACKOFF_S = 0.5, 5.0


def error_kind(exc: BaseException) -> str:
    """The kind of a Redis failure (metrics label)."""
    if isinstance(exc, MovedError):  # before AskError: MovedError subclasses it
        return "moved"
    if isinstance(exc, AskError):
        return "ask"
    if isinstance(exc, redis.TimeoutError | TimeoutError):
        return "timeout"
    if isinstance(exc, ClusterDownError | SlotNotCoveredError):
        return "cluster_down"
    if isinstance(exc, redis.ConnectionError | OSError | RedisClusterException):
        return "connection"
    return "other"


@dataclass
class Latency:
    """A histogram of round trips to one node (cumulative counts per NODE_LATENCY_BUCKETS bound, +Inf last)."""

    buckets: list[int] = field(default_factory=lambda: [0] * (len(NODE_LATENCY_BUCKETS) + 1))
    sum_s: float = 0.0
    count: int = 0

    def observe(self, seconds: float) -> None:
        for i, bound in enumerate(NODE_LATENCY_BUCKETS):
            if seconds <= bound:
                self.buckets[i] += 1
        self.buckets[-1] += 1
        self.sum_s += seconds
        self.count += 1


@dataclass
class _Open:
    retry_at: float
    backoff_s: float


class RedisHealth:
    """Breakers, error counts and latencies of the nodes a KVClient talks to (thread-safe: the
    request path reads it, both Redis threads update it)."""

    def __init__(self, nodes: list[str] | None = None) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, _Open] = {}
        self._nodes = set(nodes or [])  # the nodes serving keys now
        self.errors: Counter[str] = Counter()  # kind -> failures
        self.latency: dict[str, Latency] = {n: Latency() for n in nodes or []}

    # -- breakers -------------------------------------------------------------------------------------

    def closed(self, node: str) -> bool:
        """Requests may use the node now."""
        return node not in self._open

    @property
    def degraded(self) -> bool:
        """Some node is unreachable: its keys are recomputed."""
        return bool(self._open)

    @property
    def usable(self) -> bool:
        """Some node serving keys is reachable."""
        return any(n not in self._open for n in self._nodes)

    def open_nodes(self) -> list[str]:
        with self._lock:
            return list(self._open)

    def due(self) -> list[str]:
        """Open nodes whose backoff has passed: the I/O thread probes them."""
        now = time.monotonic()
        with self._lock:
            return [n for n, o in self._open.items() if now >= o.retry_at]

    def ok(self, node: str, seconds: float | None = None) -> None:
        """A command or pipeline on `node` succeeded (in `seconds`)."""
        with self._lock:
            if seconds is not None:
                self.latency.setdefault(node, Latency()).observe(seconds)
            if self._open.pop(node, None) is not None:
                log.warning("Redis node %s is reachable again: its keys are used again", node)

    def failed(self, node: str, exc: BaseException) -> None:
        """A command on `node` failed: count it, open (or keep open) its breaker."""
        kind = error_kind(exc)
        with self._lock:
            self.errors[kind] += 1
            state = self._open.get(node)
            if state is None:
                log.warning("Redis node %s unreachable (%s: %s): its keys are recomputed", node, kind, exc)
                state = self._open[node] = _Open(0.0, BACKOFF_S)
            else:
                state.backoff_s = min(state.backoff_s * 2, MAX_BACKOFF_S)
            state.retry_at = time.monotonic() + state.backoff_s

    def redirected(self, exc: MovedError | AskError) -> None:
        """A MOVED or ASK reply (followed): counted, the node stays in use."""
        with self._lock:
            self.errors[error_kind(exc)] += 1

    def retain(self, nodes: list[str]) -> None:
        """The nodes serving slots now: others' breakers are dropped, new nodes get their series."""
        with self._lock:
            self._nodes = set(nodes)
            for node in [n for n in self._open if n not in nodes]:
                del self._open[node]
                log.warning("Redis node %s no longer serves slots (failed over): forgotten", node)
            for node in nodes:
                self.latency.setdefault(node, Latency())

    # -- reporting ------------------------------------------------------------------------------------

    @property
    def total_errors(self) -> int:
        return sum(self.errors.values())

    def snapshot(self) -> tuple[dict[str, int], dict[str, Latency]]:
        """Errors by kind and a copy of each node's latency histogram."""
        with self._lock:
            latency = {n: Latency(list(h.buckets), h.sum_s, h.count) for n, h in self.latency.items()}
            return dict(self.errors), latency
