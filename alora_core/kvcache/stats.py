"""Counters of the KV index and its tiers, for the metrics endpoint and the benchmarks.

`CacheCounters` is mutated by the scheduler thread and the Redis threads (plain int adds under the
GIL); `CacheStats` is the frozen snapshot `Engine.cache_stats()` returns.
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from alora_core.kvcache.redis_health import Latency

Tier = Literal["device", "host", "redis"]
Transfer = Literal["device->host", "host->device", "redis->device", "to_redis"]
AdapterKind = Literal["base", "alora", "lora"]
EvictionReason = Literal["pressure", "budget", "deleted"]  # blocks needed / over the device budget / DELETE


@dataclass
class CacheCounters:
    query_tokens: int = 0  # prompt tokens of every admitted request (each looks up the index)
    hit_tokens: Counter[str] = field(default_factory=Counter)  # tier -> prompt tokens reused from it
    kind_query_tokens: Counter[str] = field(default_factory=Counter)  # adapter kind -> prompt tokens
    kind_hit_tokens: Counter[str] = field(default_factory=Counter)  # adapter kind -> tokens reused
    evicted_blocks: Counter[str] = field(default_factory=Counter)  # "tier:reason" -> blocks moved out
    probes: int = 0  # Redis probes for a prefix (requests without a conversation handle)
    recomputed_tokens: int = 0  # tokens a lower tier held but the cost model chose to recompute
    demoted_blocks: Counter[str] = field(default_factory=Counter)  # "device->host", "host->redis"
    dropped_blocks: Counter[str] = field(default_factory=Counter)  # tier -> blocks lost (no lower tier)
    promoted_blocks: Counter[str] = field(default_factory=Counter)  # tier -> blocks restored to device
    transfer_bytes: Counter[str] = field(default_factory=Counter)
    transfer_seconds: dict[str, float] = field(default_factory=dict)
    transfer_count: Counter[str] = field(default_factory=Counter)
    redis_writes_skipped: int = 0  # writes not attempted: Redis degraded or write buffer full
    discarded_entries: Counter[str] = field(default_factory=Counter)  # reason -> Redis values refused

    def transfer(self, kind: Transfer, nbytes: int, seconds: float) -> None:
        self.transfer_bytes[kind] += nbytes
        self.transfer_seconds[kind] = self.transfer_seconds.get(kind, 0.0) + seconds
        self.transfer_count[kind] += 1


@dataclass(frozen=True)
class CacheStats:
    device_bytes: int  # KV bytes in use on the device: requests and conversation handles (not evictable)
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
    redis_errors: int  # failed Redis operations and redirections, every kind
    redis_writes_skipped: int
    discarded_entries: dict[str, int]
    index_blocks: dict[str, int]  # tier -> index entries with KV there ("device", "host")
    kind_query_tokens: dict[str, int]
    kind_hit_tokens: dict[str, int]
    evicted_blocks: dict[str, int]
    probes: int
    redis_error_kinds: dict[str, int] = field(default_factory=dict)  # kind (redis_health.ERROR_KINDS) -> n
    redis_node_latency: dict[str, Latency] = field(default_factory=dict)  # node -> round-trip histogram
