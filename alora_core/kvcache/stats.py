"""Counters of the tiered conversation cache, for the metrics endpoint and the benchmarks.

`CacheCounters` is mutated by the scheduler thread and the Redis threads (plain int adds under the
GIL); `CacheStats` is the frozen snapshot `Engine.cache_stats()` returns.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

Tier = Literal["device", "host", "redis"]
Transfer = Literal["device->host", "host->device", "redis->device", "to_redis"]


@dataclass
class CacheCounters:
    query_tokens: int = 0  # prompt tokens of requests that looked up a conversation cache
    hit_tokens: Counter[str] = field(default_factory=Counter)  # tier -> prompt tokens reused from it
    recomputed_tokens: int = 0  # tokens a lower tier held but the cost model chose to recompute
    demoted_blocks: Counter[str] = field(default_factory=Counter)  # "device->host", "host->redis"
    dropped_blocks: Counter[str] = field(default_factory=Counter)  # tier -> blocks lost (no lower tier)
    promoted_blocks: Counter[str] = field(default_factory=Counter)  # tier -> blocks restored to device
    transfer_bytes: Counter[str] = field(default_factory=Counter)
    transfer_seconds: dict[str, float] = field(default_factory=dict)
    transfer_count: Counter[str] = field(default_factory=Counter)
    redis_errors: int = 0  # failed Redis operations (connection, timeout, protocol)
    redis_writes_skipped: int = 0  # writes not attempted: Redis degraded or write buffer full
    discarded_entries: Counter[str] = field(default_factory=Counter)  # reason -> Redis values refused

    def transfer(self, kind: Transfer, nbytes: int, seconds: float) -> None:
        self.transfer_bytes[kind] += nbytes
        self.transfer_seconds[kind] = self.transfer_seconds.get(kind, 0.0) + seconds
        self.transfer_count[kind] += 1


@dataclass(frozen=True)
class CacheStats:
    device_bytes: int  # KV bytes conversations hold on the device (idle and running)
    device_budget_bytes: int  # what idle conversations may keep there
    host_bytes: int
    host_capacity_bytes: int
    redis_enabled: bool
    degraded: bool  # Redis configured but unreachable: caches are recomputed, serving goes on
    pending_write_bytes: int  # staged for Redis, not yet written
    query_tokens: int
    hit_tokens: dict[str, int]
    recomputed_tokens: int
    demoted_blocks: dict[str, int]
    dropped_blocks: dict[str, int]
    promoted_blocks: dict[str, int]
    transfer_bytes: dict[str, int]
    transfer_seconds: dict[str, float]
    transfer_count: dict[str, int]
    redis_errors: int
    redis_writes_skipped: int
    discarded_entries: dict[str, int]
