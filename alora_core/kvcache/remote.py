"""The Redis side of the KV index: what is written behind, how a prefix is probed and fetched, and
conversation handles in Redis (resume on any replica, delete).

    written behind, when a request ends, from its blocks on the device (their groups Redis lacks):
        base blocks (a base request's; an aLoRA's before its activation block) and every block of a
        plain LoRA (expensive to recompute); a conversation's handle (meta + partial last block) at
        each commit of a /generate
    never written: an aLoRA's adapted blocks (its invocation and output: a few tokens, cheaper to
        recompute than a group of K blocks is to move)

    value of group g of a chain: blocks [g*K, min((g+1)*K, written end)), key = hash of its last
    block (redis_tier.py). A writer that extends a group rewrites it and deletes the shorter value
    it supersedes. A probe asks which values exist beyond the local prefix: the end of every whole
    group, and every possible end in the last two groups (one round trip, no values moved).
"""

from collections.abc import Callable

import torch

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.codec import ChunkHeader, RemoteMeta, encode_meta, prefix_hashes
from alora_core.kvcache.conversations import Conversation
from alora_core.kvcache.host_tier import copy_blocks
from alora_core.kvcache.index import ENDS_VALUE, IN_REDIS, BlockChain, CachedBlock, make_root
from alora_core.kvcache.redis_jobs import FetchJob, ProbeJob, ValueWrite, WriteJob
from alora_core.kvcache.redis_tier import RedisTier


class RemoteCache:
    def __init__(self, redis: RedisTier, pool: BlockPool, fingerprint: str) -> None:
        self.redis = redis
        self.pool = pool
        self.fingerprint = fingerprint
        self.bs = pool.block_size
        self.k = redis.blocks_per_value

    def handle_chain(self, conv: Conversation, blocks: int) -> BlockChain:
        """A chain over the handle's own token ids (its Redis values are named after them)."""
        chain = BlockChain(conv.root, self.bs)
        chain.hash_blocks(conv.token_ids, blocks)
        return chain

    def _header(self, start: int, end: int, digest: bytes) -> ChunkHeader:
        return ChunkHeader(start, end - start, (end - start) * self.bs, digest)

    # -- writes ---------------------------------------------------------------------------------------

    def write_behind(
        self,
        chain: BlockChain,
        tokens: list[int],
        table: BlockTable,
        conv: Conversation | None,
        supersedes: int = 0,
    ) -> None:
        """Queue the writes of a finished request's writable blocks Redis lacks, and of its handle
        (conv) whose previous values reached block `supersedes`: a shorter value of a group it now
        writes whole is deleted (others' values are left to their TTL: a handle may name them)."""
        redis, bs = self.redis, self.bs
        entries = chain.entries
        n = (
            len(entries)
            if chain.adapted_from == 0 or chain.adapter is None
            else min(len(entries), chain.adapted_from)
        )
        groups = [(s, e) for s, e in redis.value_groups(0, n, n) if not entries[e - 1].redis & ENDS_VALUE]
        tail = table.num_tokens - n * bs if conv is not None else 0
        if not groups and conv is None:
            return
        if not redis.writable():  # a Redis node is unreachable: counted, written by a later request
            redis.counters.redis_writes_skipped += 1
            return
        tenant = chain.root.tenant
        digests = prefix_hashes(
            tokens, [e * bs for _, e in groups] + ([n * bs + tail] if tail else []), chain.digest_seed
        )
        rows: list[int] = []
        values: list[ValueWrite] = []
        for (start, end), digest in zip(groups, digests, strict=False):
            values.append(
                ValueWrite(
                    redis.value_key(tenant, chain.hashes[end - 1]),
                    self._header(start, end, digest),
                    len(rows),
                )
            )
            rows += table.blocks[start:end]
        delete = []
        old = supersedes - 1
        if supersedes % self.k and any(s <= old < e - 1 for s, e in groups):
            delete.append(redis.value_key(tenant, entries[old].hash))
            entries[old].redis &= ~ENDS_VALUE
        tail_write = None
        if tail and conv is not None:
            tail_write = ValueWrite(redis.tail_key(conv.key), ChunkHeader(n, 1, tail, digests[-1]), len(rows))
            rows.append(table.blocks[n])
        staged = torch.empty(
            len(rows), *redis.layout.block_shape, dtype=redis.layout.dtype, pin_memory=self.pool.kv.is_cuda
        )
        copy_blocks(self.pool, rows, staged, list(range(len(rows))), to_pool=False)
        ready = None
        if self.pool.kv.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        if tail:  # slots past the end may hold an earlier owner's KV: never write them out
            if ready is not None:
                ready.synchronize()
            staged[-1, :, :, :, tail:] = 0
        flagged = [(entries[s:e], entries[e - 1]) for s, e in groups]
        for run, last in flagged:  # optimistic: a second writer skips them; undone on failure
            for e in run:
                e.redis |= IN_REDIS
            last.redis |= ENDS_VALUE
        job = WriteJob(
            tenant,
            staged,
            values,
            settle=self._settle(flagged, conv, n * bs + tail),
            delete=delete,
            ready=ready,
        )
        if conv is not None:
            cached = n * bs + tail
            written = {end for _, end in groups}
            job.conversation, job.tail = conv.key, tail_write
            job.touch = [
                redis.value_key(tenant, chain.hashes[e - 1])
                for _, e in redis.value_groups(0, n, n)
                if e not in written
            ]
            meta = RemoteMeta(
                conv.key, list(tokens), cached, -(-cached // redis.chunk_tokens), conv.root.salt
            )
            job.meta = encode_meta(redis.layout, self.k, meta)
        if redis.submit_write(job):
            if conv is not None:
                conv.persist_pending = conv.version
        else:
            job.settle(False)

    def _settle(
        self, flagged: list[tuple[list[CachedBlock], CachedBlock]], conv: Conversation | None, cached: int
    ) -> Callable[[bool], None]:
        version = conv.version if conv is not None else 0

        def settle(ok: bool) -> None:
            if not ok:
                for _, last in flagged:
                    last.redis &= ~ENDS_VALUE
            if conv is not None:
                if conv.persist_pending == version:
                    conv.persist_pending = None
                if ok and conv.version == version:
                    conv.remote_tokens = cached

        return settle

    # -- reads ----------------------------------------------------------------------------------------

    def fetch(
        self,
        chain: BlockChain,
        tokens: list[int],
        first_block: int,
        end_token: int,
        written_end: int,
        tail_of: Conversation | None,
        blocks: list[int],
    ) -> FetchJob:
        """A job restoring [first_block * bs, end_token) of chain into `blocks`: from the values of a
        chain written up to block written_end, then (tail_of) a handle's partial last block."""
        redis, bs = self.redis, self.bs
        groups = redis.value_groups(first_block, -(-end_token // bs), written_end)
        tail = tail_of is not None and end_token > written_end * bs
        tail_tokens = len(tail_of.token_ids) if tail_of is not None else 0
        ends = [e * bs for _, e in groups]
        tail_end = min(tail_of.remote_tokens, tail_tokens) if tail_of is not None else 0
        digests = prefix_hashes(tokens, ends + ([tail_end] if tail else []), chain.digest_seed)
        tenant = chain.root.tenant
        values = [
            (redis.value_key(tenant, chain.hashes[e - 1]), self._header(s, e, d))
            for (s, e), d in zip(groups, digests, strict=False)
        ]
        if tail and tail_of is not None:
            values.append(
                (
                    redis.tail_key(tail_of.key),
                    ChunkHeader(written_end, 1, tail_end - written_end * bs, digests[-1]),
                )
            )
        return FetchJob(values, tenant, self.pool, first_block, end_token, blocks)

    def probe(
        self, chain: BlockChain, tokens: list[int], local: int, limit: int
    ) -> tuple[ProbeJob, list[int]]:
        """Which values could continue a local prefix of `local` blocks up to `limit` blocks: the job
        and the block end each key stands for."""
        chain.hash_blocks(tokens, limit)
        k, ends = self.k, []
        last_whole = limit // k  # groups [0, last_whole) are whole
        for g in range(local // k, -(-limit // k)):
            if g >= last_whole - 1:  # the last two groups: every end past the local prefix
                ends += range(max(local, g * k) + 1, min((g + 1) * k, limit) + 1)
            elif (g + 1) * k <= limit:
                ends.append((g + 1) * k)
        keys = [self.redis.value_key(chain.root.tenant, chain.hashes[e - 1]) for e in ends]
        return ProbeJob(keys), ends

    def probed_end(self, job: ProbeJob, ends: list[int], local: int) -> int:
        """The block end the existing values reach, contiguously from `local` (0: none)."""
        exists = job.exists or [False] * len(ends)
        found = {e for e, ok in zip(ends, exists, strict=True) if ok}
        reach, k = local, self.k
        while True:
            g = reach // k
            ahead = [e for e in found if g * k < e <= (g + 1) * k and e > reach]
            if not ahead:
                return reach if reach > local else 0
            reach = max(ahead)
            if reach < (g + 1) * k:
                return reach

    # -- handles --------------------------------------------------------------------------------------

    def adopt(self, conv: Conversation, meta: RemoteMeta) -> None:
        """A handle resumed from Redis: history known, KV to fetch on first use."""
        conv.root = make_root(self.fingerprint, conv.root.tenant, meta.salt)
        conv.token_ids = list(meta.token_ids)
        conv.remote_tokens = meta.cached_tokens

    def readable_tokens(self, conv: Conversation) -> int:
        """What a fetch may read of the handle's Redis copy now: all of it, or, while a write of it is
        in flight (which rewrites its tail and deletes a value it supersedes), its whole groups."""
        if conv.persist_pending is None:
            return conv.remote_tokens
        chunk = self.redis.chunk_tokens
        return conv.remote_tokens // chunk * chunk

    def forget(self, conv: Conversation) -> None:
        """Delete a handle's Redis copy: meta, tail and the values of its chain."""
        n = max(conv.remote_tokens, conv.kv.num_tokens, len(conv.chain) * self.bs) // self.bs
        chain = self.handle_chain(conv, n)
        keys = [
            self.redis.value_key(conv.root.tenant, chain.hashes[e - 1])
            for _, e in self.redis.value_groups(0, n, n)
        ]
        self.redis.submit_delete(conv.key, keys)
