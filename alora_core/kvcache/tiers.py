"""Where the index's blocks live: device pool -> host tier -> Redis, moved block by block, LRU.

    device  in use (requests, conversation handles) or evictable (no reference, still cached)
      | demote (copy) when the pool runs out of empty blocks (BlockPool.evict: evictable, LRU),
      |   when idle blocks exceed the device budget (evictable first, then idle handles' last blocks),
      v   when a request needs room (idle handles, least recently used first, last blocks first)
    host    least recently demoted first; blocks no handle holds go first, then handles' blocks
      | drop: Redis has them if they were written behind (remote.py), else they are lost
      v
    Redis
    promote host -> device at admission (prefix_cache.py); Redis -> device by the fetch thread
    cost model: restore a tier's part only when cheaper than recomputing it (cost_model.py)

An index entry without a local copy leaves the index. Everything here runs under the scheduler's
state lock.
"""

import time
from collections import Counter, OrderedDict
from typing import Literal, Protocol

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.kvcache.cost_model import CostModel, RestorePolicy
from alora_core.kvcache.host_tier import HostTier
from alora_core.kvcache.index import IN_REDIS, CachedBlock, PrefixIndex
from alora_core.kvcache.redis_jobs import FetchJob
from alora_core.kvcache.redis_tier import RedisTier
from alora_core.kvcache.stats import CacheCounters, CacheStats, EvictionReason

RestoreStatus = Literal["ready", "fetching"]
HostOwner = CachedBlock | Conversation  # an entry's block, or a handle's partial last block


class Extents(Protocol):
    """A cached prefix: [0, device) on the device, [device, local) on the host, then Redis."""

    @property
    def device_tokens(self) -> int: ...
    @property
    def local_tokens(self) -> int: ...
    @property
    def remote_tokens(self) -> int: ...


class TieredCache:
    def __init__(
        self,
        pool: BlockPool,
        index: PrefixIndex,
        store: ConversationStore,
        host: HostTier,
        redis: RedisTier | None,
        cost: CostModel,
        counters: CacheCounters,
        policy: RestorePolicy = "cost",
        device_budget_blocks: int | None = None,
    ) -> None:
        self.pool = pool
        self.index = index
        self.store = store
        self.host = host
        self.redis = redis
        self.cost = cost
        self.counters = counters
        self.policy = policy
        self.device_budget_blocks = device_budget_blocks
        self.bytes_per_block = host.layout.bytes_per_block
        self._entry_at: list[CachedBlock | None] = [None] * pool.num_blocks  # device block -> entry
        self._host_lru: OrderedDict[int, HostOwner] = OrderedDict()  # unprotected host blocks
        self._host_lru_protected: OrderedDict[int, HostOwner] = OrderedDict()  # of handles
        self.num_device = 0  # entries with a device copy
        self.num_host = 0  # ... with a host copy
        self._abandoned: list[FetchJob] = []  # fetches given up while the I/O thread still writes
        pool.evict = self._evict_lru
        store.on_drop = self.drop_handle

    # -- residency ------------------------------------------------------------------------------------

    def place(self, entry: CachedBlock, block: int) -> None:
        """The KV of entry now lies in pool block `block` (in use)."""
        assert entry.device < 0 and self._entry_at[block] is None
        entry.device = block
        self._entry_at[block] = entry
        self.pool.mark_cached(block)
        self.num_device += 1

    def entry_at(self, block: int) -> CachedBlock | None:
        return self._entry_at[block]

    def _unplace(self, entry: CachedBlock) -> None:
        block, entry.device = entry.device, -1
        self._entry_at[block] = None
        self.pool.uncache(block)
        self.num_device -= 1
        self._forget_if_gone(entry)

    def _forget_if_gone(self, entry: CachedBlock) -> None:
        if not entry.resident:
            self.index.remove(entry)

    def _count_lost(self, in_redis: bool, tier: str) -> None:
        if in_redis and self.redis is not None:
            self.counters.demoted_blocks[f"{tier}->redis"] += 1
        else:
            self.counters.dropped_blocks[tier] += 1

    # -- device -> host -------------------------------------------------------------------------------

    def _evict_lru(self, blocks: list[int]) -> None:
        """BlockPool.evict: its least recently released cached blocks, to make empty ones."""
        self.demote([e for b in blocks if (e := self._entry_at[b]) is not None], "pressure")

    def demote(self, entries: list[CachedBlock], reason: EvictionReason) -> None:
        """Take unreferenced entries off the device: copied to the host when it has room, else dropped."""
        moved: list[tuple[CachedBlock, int]] = []
        for e in entries:
            if e.host < 0:
                hb = self._host_take(protected=e.handles > 0)
                if hb >= 0:
                    moved.append((e, hb))
                else:
                    self._count_lost(bool(e.redis & IN_REDIS), "device")
            self.counters.evicted_blocks[f"device:{reason}"] += 1
        if moved:
            t0 = time.perf_counter()
            self.host.from_pool(self.pool, [e.device for e, _ in moved], [hb for _, hb in moved])
            self.counters.transfer(
                "device->host", len(moved) * self.bytes_per_block, time.perf_counter() - t0
            )
            self.counters.demoted_blocks["device->host"] += len(moved)
            for e, hb in moved:
                e.host = hb
                self.num_host += 1
                self._host_add(hb, e)
        for e in entries:
            self._unplace(e)

    def demote_handle(self, conv: Conversation, n: int, reason: EvictionReason) -> int:
        """Move the handle's last n device blocks off the device; returns the pool blocks freed."""
        bs, freed = self.pool.block_size, 0
        partial = conv.kv.num_tokens % bs
        if n > 0 and partial:  # its private partial last block
            block = conv.kv.blocks.pop()
            hb = self._host_take(protected=True)
            if hb >= 0:
                self.host.from_pool(self.pool, [block], [hb])
                self.counters.demoted_blocks["device->host"] += 1
                conv.host.blocks, conv.host.num_tokens = [hb], partial
                self._host_add(hb, conv)
            else:
                self._count_lost(conv.remote_tokens >= conv.kv.num_tokens, "device")
            conv.kv.num_tokens -= partial
            self.pool.release([block])
            self.counters.evicted_blocks[f"device:{reason}"] += 1
            freed, n = 1, n - 1
        entries = []
        while n > 0 and conv.kv.blocks:
            block = conv.kv.blocks.pop()
            conv.kv.num_tokens -= bs
            n -= 1
            self.pool.release([block])
            entry = self._entry_at[block]
            if self.pool.ref_count(block) == 0 and entry is not None:
                entries.append(entry)  # nobody else holds it
        self.demote(entries, reason)
        return freed + len(entries)

    def make_room(self, blocks_needed: int, protect: frozenset[str]) -> None:
        """Demote idle handles' device blocks, LRU first, until blocks_needed are free."""
        for conv in self.store.lru():
            if self.pool.num_free >= blocks_needed:
                return
            if conv.key not in protect and conv.kv.blocks:
                self.demote_handle(conv, blocks_needed - self.pool.num_free, "pressure")

    def idle_device_blocks(self, busy: set[str] | frozenset[str]) -> int:
        """Device blocks no request uses: evictable ones, and those only idle handles hold."""
        holders: Counter[int] = Counter()
        busy_blocks: set[int] = set()
        for conv in self.store.lru():
            if conv.key in busy:
                busy_blocks.update(conv.kv.blocks)
            else:
                holders.update(conv.kv.blocks)
        held = sum(1 for b, n in holders.items() if b not in busy_blocks and self.pool.ref_count(b) == n)
        return self.pool.num_evictable + held

    def idle_device_bytes(self, busy: set[str] | frozenset[str]) -> int:
        return self.idle_device_blocks(busy) * self.bytes_per_block

    def enforce_budget(self, busy: set[str] | frozenset[str]) -> None:
        """Keep the idle device blocks within the device budget: evictable first, then idle handles'."""
        if self.device_budget_blocks is None:
            return
        excess = self.idle_device_blocks(busy) - self.device_budget_blocks
        if excess <= 0:
            return
        victims = self.pool.evictable()[:excess]
        self.demote([e for b in victims if (e := self._entry_at[b]) is not None], "budget")
        excess -= len(victims)
        for conv in self.store.lru():
            if excess <= 0:
                return
            if conv.key not in busy and conv.kv.blocks:
                excess -= self.demote_handle(conv, excess, "budget")

    # -- the host tier --------------------------------------------------------------------------------

    def _host_take(self, protected: bool) -> int:
        """A free host block, evicting the LRU one if needed (a handle's only for a handle's); -1: none."""
        if self.host.num_free == 0:
            lru = self._host_lru or (self._host_lru_protected if protected else None)
            if not lru:
                return -1
            hb, owner = next(iter(lru.items()))
            self.evict_host(hb, owner, "pressure")
        return self.host.allocate(1)[0]

    def evict_host(self, hb: int, owner: HostOwner, reason: EvictionReason) -> None:
        self._host_lru.pop(hb, None)
        self._host_lru_protected.pop(hb, None)
        if isinstance(owner, CachedBlock):
            owner.host = -1
            self.num_host -= 1
            self._count_lost(bool(owner.redis & IN_REDIS), "host")
            self._forget_if_gone(owner)
        else:
            self._count_lost(owner.remote_tokens >= owner.local_tokens, "host")
            owner.host.blocks, owner.host.num_tokens = [], 0
        self.host.release([hb])
        self.counters.evicted_blocks[f"host:{reason}"] += 1

    def _host_add(self, hb: int, owner: HostOwner) -> None:
        protected = isinstance(owner, Conversation) or owner.handles > 0
        (self._host_lru_protected if protected else self._host_lru)[hb] = owner

    def unpin_host(self, hb: int, owner: HostOwner) -> None:
        """Back in the host LRU (most recent), unless it was promoted meanwhile: `pin_host` took it
        out while a request's admission used it (pins never outlive one admission)."""
        held = owner.host == hb if isinstance(owner, CachedBlock) else owner.host.blocks == [hb]
        if held:
            self._host_add(hb, owner)

    def pin_host(self, hb: int) -> HostOwner | None:
        """Keep host block hb from eviction until unpinned (None: already pinned)."""
        return self._host_lru.pop(hb, None) or self._host_lru_protected.pop(hb, None)

    def protect(self, entries: list[CachedBlock], delta: int) -> None:
        """A handle's chain gains (delta 1) or loses (-1) these entries."""
        for e in entries:
            before = e.handles > 0
            e.handles += delta
            if e.host >= 0 and (e.handles > 0) != before and self.pin_host(e.host) is not None:
                self._host_add(e.host, e)

    def promote(self, entries: list[CachedBlock]) -> list[int]:
        """Copy pinned host entries into new pool blocks (one reference each: the caller's); their
        host copies are freed."""
        if not entries:
            return []
        blocks = self.pool.allocate(len(entries))
        t0 = time.perf_counter()
        self.host.to_pool([e.host for e in entries], self.pool, blocks)
        seconds = time.perf_counter() - t0
        for e, b in zip(entries, blocks, strict=True):
            self.host.release([e.host])
            e.host = -1
            self.num_host -= 1
            self.place(e, b)
        nbytes = len(entries) * self.bytes_per_block
        self.counters.transfer("host->device", nbytes, seconds)
        self.counters.promoted_blocks["host"] += len(entries)
        self.cost.observe_transfer("host", nbytes, seconds)
        return blocks

    # -- handles --------------------------------------------------------------------------------------

    def drop_handle(self, conv: Conversation) -> None:
        """A handle goes (LRU or deleted): its blocks stay cached, unprotected, until evicted."""
        conv.kv.free()
        if conv.host.blocks:
            hb = conv.host.blocks[0]
            if self.pin_host(hb) is not None:
                self.host.release([hb])
            conv.host.blocks, conv.host.num_tokens = [], 0
        self.protect(conv.chain, -1)

    def purge(self, entries: list[CachedBlock]) -> None:
        """Drop the KV of entries nobody holds or protects (a deleted conversation's)."""
        for e in entries:
            if e.handles:
                continue
            if e.device >= 0 and self.pool.ref_count(e.device) == 0:
                self.counters.evicted_blocks["device:deleted"] += 1
                self._unplace(e)
            if e.host >= 0 and (hb := e.host) in self._host_lru:
                self.evict_host(hb, e, "deleted")

    # -- restore or recompute -------------------------------------------------------------------------

    def plan(self, where: Extents, want: int) -> int:
        """Prefix end to make device-resident for a request reusing [0, want) (cost model)."""
        d = where.device_tokens
        if want <= d:
            return want
        h = where.local_tokens
        options = [d]
        if h > d:
            options.append(min(want, h))
        # Redis values hold whole blocks: they continue a local prefix that ends on a block boundary
        redis_usable = self.redis is not None and self.redis.readable and h % self.pool.block_size == 0
        if redis_usable and where.remote_tokens > h:
            options.append(min(want, where.remote_tokens))
        if self.policy == "always":
            return max(options)
        if self.policy == "never":
            return d

        def cost(end: int) -> float:
            host_blocks = -(-(min(end, h) - d) // self.pool.block_size) if end > d else 0
            redis_blocks = -(-(end - max(h, d)) // self.pool.block_size) if end > max(h, d) else 0
            restore = self.cost.restore_s(
                host_blocks * self.bytes_per_block, redis_blocks * self.bytes_per_block
            )
            return restore + self.cost.recompute_s(want - end)

        return min(options, key=lambda end: (cost(end), -end))

    # -- Redis jobs -----------------------------------------------------------------------------------

    def abandon(self, job: FetchJob) -> None:
        """Give up a fetch; its blocks are freed once the I/O thread is done with them."""
        self._abandoned.append(job)
        self.poll()

    def poll(self) -> None:
        """Settle the Redis writes that finished and free abandoned fetches' blocks."""
        for job in [j for j in self._abandoned if j.done.is_set()]:
            self.pool.release(job.blocks)
            self._abandoned.remove(job)
        if self.redis is not None:
            for write in self.redis.completed_writes():
                write.settle(write.ok)

    # -- reporting ------------------------------------------------------------------------------------

    def stats(self) -> CacheStats:
        c = self.counters
        kinds, latency = self.redis.health.snapshot() if self.redis is not None else ({}, {})
        budget = self.device_budget_blocks if self.device_budget_blocks is not None else self.pool.num_blocks
        return CacheStats(
            device_bytes=(self.pool.num_blocks - self.pool.num_free) * self.bytes_per_block,
            device_budget_bytes=budget * self.bytes_per_block,
            host_bytes=self.host.bytes_used,
            host_capacity_bytes=self.host.capacity_bytes,
            redis_enabled=self.redis is not None,
            degraded=self.redis is not None and self.redis.degraded,
            pending_write_bytes=self.redis.pending_write_bytes if self.redis is not None else 0,
            query_tokens=c.query_tokens,
            hit_tokens=dict(c.hit_tokens),
            recomputed_tokens=c.recomputed_tokens,
            demoted_blocks=dict(c.demoted_blocks),
            dropped_blocks=dict(c.dropped_blocks),
            promoted_blocks=dict(c.promoted_blocks),
            transfer_bytes=dict(c.transfer_bytes),
            transfer_seconds=dict(c.transfer_seconds),
            transfer_count=dict(c.transfer_count),
            redis_errors=sum(kinds.values()),
            redis_writes_skipped=c.redis_writes_skipped,
            discarded_entries=dict(c.discarded_entries),
            index_blocks={"device": self.num_device, "host": self.num_host},
            kind_query_tokens=dict(c.kind_query_tokens),
            kind_hit_tokens=dict(c.kind_hit_tokens),
            evicted_blocks=dict(c.evicted_blocks),
            probes=c.probes,
            redis_error_kinds=kinds,
            redis_node_latency=latency,
        )

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
