"""Tiered conversation caches: device pool -> host tier -> Redis, demoted LRU block by block.

    demote (idle conversations, least recently used first, last blocks first):
        device --copy--> host                     when the pool is short or over its idle budget
        host   --free--> Redis                    when the host tier is full (Redis already has it:
                                                  every commit is written behind; else it is lost)
    promote (a request on the conversation, in Scheduler._start):
        host   --copy--> device                   at once, in the scheduler thread
        Redis  --fetch-> (I/O thread) --copy--> device   the request waits, other requests run
    cost model: restore a tier's part only when cheaper than recomputing it (cost_model.py)

A conversation's tiers stay ordered along positions (device prefix, then host, Redis beyond), so a
restored prefix is always contiguous. Everything here runs under the scheduler's state lock.
"""

import logging
import time
from typing import Literal

import torch

from alora_core.context import common_prefix
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.codec import RemoteMeta
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.kvcache.cost_model import CostModel, RestorePolicy
from alora_core.kvcache.host_tier import HostTier, copy_blocks
from alora_core.kvcache.redis_tier import FetchJob, RedisTier, WriteJob
from alora_core.kvcache.stats import CacheCounters, CacheStats

log = logging.getLogger(__name__)

RestoreStatus = Literal["ready", "fetching"]


class TieredCache:
    def __init__(
        self,
        pool: BlockPool,
        store: ConversationStore,
        host: HostTier,
        redis: RedisTier | None,
        cost: CostModel,
        counters: CacheCounters,
        policy: RestorePolicy = "cost",
        device_budget_blocks: int | None = None,
    ) -> None:
        self.pool = pool
        self.store = store
        self.host = host
        self.redis = redis
        self.cost = cost
        self.counters = counters
        self.policy = policy
        self.device_budget_blocks = device_budget_blocks
        self.bytes_per_block = host.layout.bytes_per_block
        self._cuda = pool.kv.is_cuda
        self._abandoned: list[FetchJob] = []  # fetches given up while the I/O thread still writes
        store.on_drop = self.drop_fetch

    # -- demotion -------------------------------------------------------------------------------------

    def make_room(self, blocks_needed: int, protect: frozenset[str]) -> None:
        """Demote idle conversations' device blocks, LRU first, until blocks_needed are free."""
        for conv in self.store.lru():
            if self.pool.num_free >= blocks_needed:
                return
            if conv.key not in protect and conv.kv.blocks and conv.fetch is None:
                self._demote(conv, blocks_needed - self.pool.num_free)

    def enforce_budget(self, protect: frozenset[str] | set[str]) -> None:
        """Keep the device blocks of idle conversations within the device budget."""
        idle = [c for c in self.store.lru() if c.key not in protect]
        for conv in idle:
            if conv.fetch is not None and conv.fetch.done.is_set():  # its request went away
                self.drop_fetch(conv)
        if self.device_budget_blocks is None:
            return
        idle = [c for c in idle if c.kv.blocks]
        excess = sum(len(c.kv.blocks) for c in idle) - self.device_budget_blocks
        for conv in idle:
            if excess <= 0:
                return
            n = min(excess, len(conv.kv.blocks))
            self._demote(conv, n)
            excess -= n

    def _demote(self, conv: Conversation, n: int) -> None:
        """Move the conversation's last n device blocks to the host tier (or drop them)."""
        bs = self.pool.block_size
        n = min(n, len(conv.kv.blocks))
        keep = len(conv.kv.blocks) - n
        tail = conv.kv.blocks[keep:]
        tokens = conv.kv.num_tokens - keep * bs
        if self._host_room(n):
            host_blocks = self.host.allocate(n)
            t0 = time.perf_counter()
            self.host.from_pool(self.pool, tail, host_blocks)
            self.counters.transfer("device->host", n * self.bytes_per_block, time.perf_counter() - t0)
            self.counters.demoted_blocks["device->host"] += n
            conv.host.blocks[:0] = host_blocks
            conv.host.num_tokens += tokens
        else:  # no host tier (or too small): what lay after the dropped blocks is unreachable too
            self._count_lost(conv, keep * bs, conv.kv.num_tokens, "device")
            self._count_lost(conv, conv.kv.num_tokens, conv.local_tokens, "host")
            conv.host.free()
        conv.kv.truncate(keep * bs)

    def _host_room(self, n: int) -> bool:
        if n > self.host.num_blocks:
            return False
        for conv in self.store.lru():
            if self.host.num_free >= n:
                break
            if conv.host.blocks:
                self._evict_host(conv, n - self.host.num_free)
        return self.host.num_free >= n

    def _evict_host(self, conv: Conversation, n: int) -> None:
        """Free the conversation's last n host blocks: they live on in Redis if it has them."""
        if self.redis is not None and conv.remote_tokens < conv.local_tokens:
            self.persist(conv)  # e.g. Redis was down at commit time and is back
        n = min(n, len(conv.host.blocks))
        start = conv.kv.num_tokens + (len(conv.host.blocks) - n) * self.pool.block_size
        self._count_lost(conv, start, conv.local_tokens, "host")
        conv.host.drop_tail(n)

    def _count_lost(self, conv: Conversation, start: int, end: int, tier: str) -> None:
        if end <= start:
            return
        bs = self.pool.block_size
        blocks = -(-end // bs) - start // bs
        in_redis = end <= conv.remote_tokens or conv.persist_pending == conv.version
        if in_redis and self.redis is not None:
            self.counters.demoted_blocks[f"{tier}->redis"] += blocks
        else:
            self.counters.dropped_blocks[tier] += blocks

    # -- promotion ------------------------------------------------------------------------------------

    def plan(self, conv: Conversation, want: int) -> int:
        """Prefix end to make device-resident for a request reusing token_ids[:want] (cost model)."""
        d = conv.kv.num_tokens
        if want <= d:
            return want
        h = conv.local_tokens
        options = [d]
        if h > d:
            options.append(min(want, h))
        # Redis values hold whole blocks: they continue a local prefix that ends on a block boundary
        redis_usable = self.redis is not None and not self.redis.degraded and h % self.pool.block_size == 0
        if redis_usable and conv.remote_tokens > h:
            options.append(min(want, conv.remote_tokens))
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

    def restore(self, conv: Conversation, target: int) -> RestoreStatus:
        """Bring token_ids[:target] to the device (call `collect` first). The caller made room for
        the blocks it takes: host blocks are copied now, Redis ones by the I/O thread."""
        if target > conv.kv.num_tokens and conv.host.blocks:
            self._promote_host(conv, target)
        if target <= conv.kv.num_tokens:
            return "ready"
        if conv.fetch is None:
            assert self.redis is not None and not conv.host.blocks
            assert conv.kv.num_tokens % self.pool.block_size == 0, "plan() keeps Redis after whole blocks"
            end = min(target, conv.remote_tokens)
            n = -(-end // self.pool.block_size) - len(conv.kv.blocks)
            conv.fetch = FetchJob(
                key=conv.key,
                version=conv.version,
                token_ids=list(conv.token_ids),
                cached_tokens=conv.remote_tokens,
                pool=self.pool,
                first_block=len(conv.kv.blocks),
                end_token=end,
                blocks=self.pool.allocate(n, after=conv.kv.blocks[-1] if conv.kv.blocks else None),
            )
            self.redis.submit_fetch(conv.fetch)
        return "fetching"

    def collect(self, conv: Conversation) -> None:
        """A finished Redis fetch: its filled blocks join the device prefix, the rest is freed."""
        job = conv.fetch
        if job is None or not job.done.is_set():
            return
        conv.fetch = None
        fits = job.version == conv.version and job.first_block == len(conv.kv.blocks)
        fits = fits and conv.kv.num_tokens == job.first_block * self.pool.block_size
        if not fits:  # the conversation moved on meanwhile
            self.pool.release(job.blocks)
            return
        if job.copied is not None:
            torch.cuda.current_stream().wait_event(job.copied)
        filled = job.filled_blocks
        conv.kv.blocks += job.blocks[:filled]
        self.pool.release(job.blocks[filled:])
        if filled:
            conv.kv.num_tokens = job.filled_tokens
            self.counters.transfer("redis->device", filled * self.bytes_per_block, job.seconds)
            self.counters.promoted_blocks["redis"] += filled
        if conv.kv.num_tokens < job.end_token:  # missing or refused values: recompute from here
            conv.remote_tokens = min(conv.remote_tokens, conv.kv.num_tokens)

    def drop_fetch(self, conv: Conversation) -> None:
        """Give up a conversation's fetch; its blocks are freed once the I/O thread is done with them."""
        if conv.fetch is not None:
            self._abandoned.append(conv.fetch)
            conv.fetch = None
        self._release_abandoned()

    def _release_abandoned(self) -> None:
        for job in [j for j in self._abandoned if j.done.is_set()]:
            self.pool.release(job.blocks)
            self._abandoned.remove(job)

    def _promote_host(self, conv: Conversation, target: int) -> None:
        bs = self.pool.block_size
        n = min(-(-(target - conv.kv.num_tokens) // bs), len(conv.host.blocks))
        tokens = min(n * bs, conv.host.num_tokens)
        host_blocks = conv.host.blocks[:n]
        pool_blocks = self.pool.allocate(n, after=conv.kv.blocks[-1] if conv.kv.blocks else None)
        t0 = time.perf_counter()
        self.host.to_pool(host_blocks, self.pool, pool_blocks)
        seconds = time.perf_counter() - t0
        conv.kv.blocks += pool_blocks
        conv.kv.num_tokens += tokens
        self.host.release(host_blocks)
        del conv.host.blocks[:n]
        conv.host.num_tokens -= tokens
        nbytes = n * self.bytes_per_block
        self.counters.transfer("host->device", nbytes, seconds)
        self.counters.promoted_blocks["host"] += n
        self.cost.observe_transfer("host", nbytes, seconds)

    # -- Redis: write behind, resume anywhere ---------------------------------------------------------

    def on_commit(self, conv: Conversation, old_token_ids: list[int]) -> None:
        """A /generate replaced the conversation's history: what Redis holds is valid up to the
        common prefix; write the new KV behind."""
        conv.remote_tokens = min(conv.remote_tokens, common_prefix(old_token_ids, conv.token_ids))
        conv.version += 1
        self.persist(conv)

    def persist(self, conv: Conversation) -> None:
        """Stage the blocks Redis lacks (device and host) and queue one write of the conversation."""
        if self.redis is None or not self.redis.writable() or conv.persist_pending == conv.version:
            return
        bs, k = self.pool.block_size, self.redis.blocks_per_value
        end = conv.local_tokens
        if conv.host.blocks:
            assert conv.kv.num_tokens % bs == 0
        first_chunk = min(conv.remote_tokens, end) // self.redis.chunk_tokens
        first_block = first_chunk * k
        device_ids = conv.kv.blocks[first_block:]
        host_ids = conv.host.blocks[max(0, first_block - len(conv.kv.blocks)) :]
        n = len(device_ids) + len(host_ids)
        staged = torch.empty(
            n, *self.host.layout.block_shape, dtype=self.host.layout.dtype, pin_memory=self._cuda
        )
        copy_blocks(self.pool, device_ids, staged, list(range(len(device_ids))), to_pool=False)
        ready = None
        if self._cuda:
            ready = torch.cuda.Event()
            ready.record()
        if host_ids:
            self.host.sync()
            staged[len(device_ids) :] = self.host.kv[host_ids]
        if n and end % bs:  # slots past the end may hold an earlier owner's KV: never write them out
            if ready is not None:
                ready.synchronize()
            staged[n - 1, :, :, :, end % bs :] = 0
        job = WriteJob(
            conv.key, conv.version, list(conv.token_ids), end, first_chunk, staged, conv.remote_chunks, ready
        )
        if self.redis.submit_write(job):
            conv.persist_pending = conv.version
            conv.remote_chunks = max(conv.remote_chunks, -(-end // self.redis.chunk_tokens))

    def poll(self) -> None:
        """Apply the Redis writes that finished since the last call."""
        if self.redis is None:
            return
        self._release_abandoned()
        for done in self.redis.completed_writes():
            conv = self.store.peek(done.key)
            if conv is None:
                continue
            if conv.persist_pending == done.version:
                conv.persist_pending = None
            if done.ok and conv.version == done.version:
                conv.remote_tokens = done.cached_tokens

    def lookup(self, key: str) -> RemoteMeta | None:
        """Metadata another replica (or this one, earlier) left in Redis. Call WITHOUT the state lock."""
        return self.redis.lookup(key) if self.redis is not None else None

    def adopt(self, meta: RemoteMeta) -> None:
        """Resume a conversation from its Redis metadata: history known, KV to fetch on first use."""
        if meta.conversation in self.store:
            return
        conv = self.store.get_or_create(meta.conversation)
        conv.token_ids = list(meta.token_ids)
        conv.remote_tokens = meta.cached_tokens
        conv.remote_chunks = meta.num_chunks
        log.info(
            "resumed conversation from Redis: %d tokens, %d cached", len(meta.token_ids), meta.cached_tokens
        )

    def forget(self, conv: Conversation) -> None:
        """The conversation was deleted: remove its Redis copy too."""
        if self.redis is not None:
            self.redis.submit_delete(conv.key, conv.remote_chunks)

    # -- reporting ------------------------------------------------------------------------------------

    def count_lookup(self, prompt_tokens: int, reuse: int, want: int, device_end: int, host_end: int) -> None:
        """An admitted request reused token_ids[:reuse] of a conversation that then held
        [0, device_end) on the device and [device_end, host_end) on the host (the rest: Redis)."""
        c = self.counters
        c.query_tokens += prompt_tokens
        c.hit_tokens["device"] += min(reuse, device_end)
        c.hit_tokens["host"] += max(0, min(reuse, host_end) - device_end)
        c.hit_tokens["redis"] += max(0, reuse - max(host_end, device_end))
        c.recomputed_tokens += max(0, want - reuse)

    def idle_device_bytes(self, busy: set[str] | frozenset[str]) -> int:
        return sum(len(c.kv.blocks) for c in self.store.lru() if c.key not in busy) * self.bytes_per_block

    def stats(self) -> CacheStats:
        c = self.counters
        device_blocks = sum(len(conv.kv.blocks) for conv in self.store.lru())
        budget = self.device_budget_blocks if self.device_budget_blocks is not None else self.pool.num_blocks
        return CacheStats(
            device_bytes=device_blocks * self.bytes_per_block,
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
            redis_errors=c.redis_errors,
            redis_writes_skipped=c.redis_writes_skipped,
            discarded_entries=dict(c.discarded_entries),
        )

    def close(self) -> None:
        if self.redis is not None:
            self.redis.close()
