"""What a request sees of the KV index: the longest cached prefix of its tokens, on any tier, with
or without a conversation.

    lookup    walk the index over the request's full blocks (at most num_tokens - 1 tokens: the last
              one is always fed). A conversation handle adds its own base KV token by token (the
              partly filled block after the matched ones, up to an aLoRA's activation start) and
              its Redis extent; without a handle, a Redis probe tells how far values go on.
    plan      device / host / Redis end, by the cost model (tiers.plan)
    restore   device blocks shared (reference counted), host blocks promoted, the partial block
              copied; Redis values fetched by the I/O thread while other requests run (collect)
    register  after every step: the request's new full blocks join the index (prompt blocks at
              prefill, generated blocks as they fill)
    commit    a finished /generate on a conversation: the handle moves to its chain
    finish    anything else: its blocks are released (and stay cached, evictable, LRU)
"""

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

import torch

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.conversations import Conversation, ConversationStore
from alora_core.kvcache.index import ENDS_VALUE, IN_REDIS, BlockChain, CachedBlock, PrefixIndex, common_prefix
from alora_core.kvcache.redis_jobs import FetchJob, ProbeJob
from alora_core.kvcache.remote import RemoteCache
from alora_core.kvcache.tiers import HostOwner, TieredCache


class CachedSequence(Protocol):
    """The parts of a running sequence the cache reads and fills."""

    table: BlockTable
    chain: BlockChain | None  # set for every sequence the scheduler runs
    activation_start: int  # first adapted position; 0 for a plain LoRA, huge for a base request

    @property
    def tokens(self) -> list[int]: ...
    @property
    def num_tokens(self) -> int: ...


@dataclass
class Lookup:
    """The cached prefix of a request: [0, device) on the device, [device, local) on the host
    (entries, then the handle's partial block), [local, remote) in Redis."""

    entries: list[CachedBlock]  # index entries of the matched full blocks
    device_tokens: int
    local_tokens: int
    remote_tokens: int
    handle_tokens: int = 0  # what the conversation handle offers (its base KV, token-granular)
    partial: tuple[str, int] | None = None  # where the block after `entries` lies (the handle's)
    handle: Conversation | None = None  # remote_tokens are the handle's values (else: probed ones)
    pinned: list[int] = field(default_factory=list)  # device blocks held while this lookup is used
    pinned_host: list[tuple[int, HostOwner]] = field(default_factory=list)  # host blocks kept

    @property
    def want(self) -> int:
        return max(self.local_tokens, self.remote_tokens)


@dataclass
class Probe:
    job: ProbeJob
    ends: list[int]  # block end each probed key stands for
    local: int  # blocks held locally when it was sent


def chain_of(seq: CachedSequence) -> BlockChain:
    assert seq.chain is not None, "a sequence without a KV index chain"
    return seq.chain


class PrefixCache:
    def __init__(self, tiers: TieredCache, store: ConversationStore, remote: RemoteCache | None) -> None:
        self.tiers = tiers
        self.store = store
        self.remote = remote
        self.index: PrefixIndex = tiers.index
        self.pool: BlockPool = tiers.pool
        self.bs = self.pool.block_size

    # -- lookup ---------------------------------------------------------------------------------------

    def lookup(self, seq: CachedSequence, conv: Conversation | None, probed: int | None) -> Lookup:
        """The request's cached prefix; its device and host blocks are pinned until `unpin`."""
        bs, tokens, limit = self.bs, seq.tokens, seq.num_tokens - 1
        chain = chain_of(seq)
        chain.entries = []
        entries = self.index.match(chain, tokens, limit // bs)
        on_device = next((i for i, e in enumerate(entries) if e.device < 0), len(entries))
        found = Lookup(entries, on_device * bs, len(entries) * bs, 0)
        if conv is not None and conv.root == chain.root:  # its own base KV, token by token
            cap = min(limit, seq.activation_start)
            found.handle_tokens = min(common_prefix(conv.token_ids[: conv.cached_tokens], tokens), cap)
            if found.local_tokens < found.handle_tokens < found.local_tokens + bs:
                found.partial = conv.partial_source(len(entries))
                if found.partial is not None:
                    if found.partial[0] == "device" and found.device_tokens == found.local_tokens:
                        found.device_tokens = found.handle_tokens
                    found.local_tokens = found.handle_tokens
            readable = self.remote.readable_tokens(conv) if self.remote is not None else 0
            remote = min(readable, found.handle_tokens)
            if remote > found.local_tokens:
                found.remote_tokens, found.handle = remote, conv
        elif conv is None and probed:
            found.remote_tokens = min(probed * bs, limit)
        self._pin(found)
        return found

    def _pin(self, found: Lookup) -> None:
        sources = [("device", e.device) if e.device >= 0 else ("host", e.host) for e in found.entries]
        for tier, block in [*sources, *([found.partial] if found.partial else [])]:
            if tier == "device":
                found.pinned.append(block)
            elif (owner := self.tiers.pin_host(block)) is not None:
                found.pinned_host.append((block, owner))
        self.pool.retain(found.pinned)

    def unpin(self, found: Lookup) -> None:
        self.pool.release(found.pinned)
        for hb, owner in found.pinned_host:
            self.tiers.unpin_host(hb, owner)
        found.pinned, found.pinned_host = [], []

    def probe(self, seq: CachedSequence, found: Lookup) -> Probe | None:
        """A Redis probe for values continuing the local prefix, when they could beat recompute."""
        if self.remote is None or self.tiers.redis is None or not self.tiers.redis.readable:
            return None
        local, limit = len(found.entries), (seq.num_tokens - 1) // self.bs
        if limit <= local or self.tiers.policy == "never":
            return None
        cost = self.tiers.cost
        if self.tiers.policy == "cost" and cost.restore_s(
            0, (limit - local) * self.tiers.bytes_per_block
        ) >= cost.recompute_s((limit - local) * self.bs):
            return None
        job, ends = self.remote.probe(chain_of(seq), seq.tokens, local, limit)
        self.tiers.redis.submit_read(job)
        self.tiers.counters.probes += 1
        return Probe(job, ends, local)

    def probed_blocks(self, probe: Probe) -> int:
        assert self.remote is not None
        return self.remote.probed_end(probe.job, probe.ends, probe.local)

    # -- restore --------------------------------------------------------------------------------------

    def restore(self, seq: CachedSequence, found: Lookup, target: int, hits: Counter[str]) -> FetchJob | None:
        """Build seq.table holding [0, target) from the lookup (pinned); the part in Redis comes
        through the returned job (collect it). `hits` counts the tokens each tier gave."""
        try:
            self._restore_local(seq, found, target, hits)
        finally:
            self.unpin(found)
        bs, table = self.bs, seq.table
        if table.num_tokens >= target or table.num_tokens % bs or self.remote is None:
            return None
        first = len(table.blocks)
        blocks = self.pool.allocate(
            -(-target // bs) - first, after=table.blocks[-1] if table.blocks else None
        )
        conv = found.handle
        if conv is not None:
            written = self.remote.readable_tokens(conv) // bs
            chain = self.remote.handle_chain(conv, written)
            job = self.remote.fetch(chain, conv.token_ids, first, target, written, conv, blocks)
        else:
            job = self.remote.fetch(chain_of(seq), seq.tokens, first, target, target // bs, None, blocks)
        assert self.tiers.redis is not None
        self.tiers.redis.submit_read(job)
        return job

    def _restore_local(self, seq: CachedSequence, found: Lookup, target: int, hits: Counter[str]) -> None:
        bs, table = self.bs, seq.table
        assert not table.blocks, "restore into an empty table"
        use = found.entries[: target // bs]
        promoted = set(self.tiers.promote([e for e in use if e.device < 0]))
        self.pool.retain([e.device for e in use if e.device not in promoted])
        table.blocks = [e.device for e in use]
        table.num_tokens = len(use) * bs
        chain_of(seq).entries = list(use)
        hits["host"] += len(promoted) * bs
        hits["device"] += (len(use) - len(promoted)) * bs
        partial = found.partial
        if (
            partial is not None
            and len(use) == len(found.entries)
            and table.num_tokens < target <= found.local_tokens
        ):
            (copy,) = self.pool.allocate(1, after=table.blocks[-1] if table.blocks else None)
            if partial[0] == "device":
                self.pool.copy_block(partial[1], copy, target - table.num_tokens)
            else:
                self.tiers.host.to_pool([partial[1]], self.pool, [copy])
            table.blocks.append(copy)
            hits[partial[0]] += target - table.num_tokens
            table.num_tokens = target

    def collect(self, seq: CachedSequence, job: FetchJob, hits: Counter[str]) -> bool:
        """A finished fetch's filled blocks join seq.table and the index. False: still in flight."""
        if not job.done.is_set():
            return False
        if job.copied is not None:
            torch.cuda.current_stream().wait_event(job.copied)
        table, filled = seq.table, job.filled_blocks
        assert job.first_block == len(table.blocks)
        table.blocks += job.blocks[:filled]
        self.pool.release(job.blocks[filled:])
        if filled:
            hits["redis"] += job.filled_tokens - table.num_tokens
            table.num_tokens = job.filled_tokens
            c = self.tiers.counters
            c.transfer("redis->device", filled * self.tiers.bytes_per_block, job.seconds)
            c.promoted_blocks["redis"] += filled
        self.register(seq, IN_REDIS)
        for _, header in job.values:  # the values read: this replica need not write them again
            end = header.first_block + header.num_blocks
            if header.num_tokens == header.num_blocks * self.bs and end * self.bs <= table.num_tokens:
                chain_of(seq).entries[end - 1].redis |= ENDS_VALUE
        return True

    def attach(self, conv: Conversation, seq: CachedSequence, handle_tokens: int) -> None:
        """A request on a conversation restored part of the handle's own prefix: the handle holds
        those entries again, and its device prefix grows over them."""
        full, chain = min(handle_tokens, seq.table.num_tokens) // self.bs, chain_of(seq)
        if conv.root != chain.root or full <= len(conv.chain):
            new: list[CachedBlock] = []
        else:
            new = chain.entries[len(conv.chain) : full]
        self.tiers.protect(new, 1)
        conv.chain += new
        kv = conv.kv
        while kv.num_tokens % self.bs == 0 and len(kv.blocks) < len(conv.chain):
            block = conv.chain[len(kv.blocks)].device
            if block < 0:
                break
            self.pool.retain([block])
            kv.blocks.append(block)
            kv.num_tokens += self.bs

    def count(self, kind: str, prompt_tokens: int, hits: Counter[str], recomputed: int) -> None:
        """An admitted request's lookup: prompt tokens, those each tier gave, those recomputed."""
        c = self.tiers.counters
        c.query_tokens += prompt_tokens
        c.kind_query_tokens[kind] += prompt_tokens
        for tier in ("device", "host", "redis"):
            c.hit_tokens[tier] += hits[tier]
        c.kind_hit_tokens[kind] += sum(hits.values())
        c.recomputed_tokens += max(0, recomputed)

    # -- while running, and at the end ----------------------------------------------------------------

    def register(self, seq: CachedSequence, flags: int = 0) -> None:
        """Index the sequence's full blocks not indexed yet (their KV is computed or restored)."""
        n = seq.table.num_tokens // self.bs
        chain = chain_of(seq)
        if n <= len(chain.entries):
            return
        chain.hash_blocks(seq.tokens, n)
        for i in range(len(chain.entries), n):
            entry, _ = self.index.add(chain, i)
            if entry.device < 0:
                self.tiers.place(entry, seq.table.blocks[i])  # else: ours is a duplicate, freed at the end
            entry.redis |= flags
            chain.entries.append(entry)

    def finish(self, seq: CachedSequence) -> None:
        """A request without a handle to commit ends: write its base blocks behind, release them."""
        if self.remote is not None:
            self.remote.write_behind(chain_of(seq), seq.tokens, seq.table, None)
        seq.table.free()

    def commit(self, key: str, seq: CachedSequence) -> Conversation:
        """A /generate on conversation `key` ends: the handle moves to the sequence's chain (its
        tokens and blocks), protecting it; its previous chain stays cached, unprotected."""
        chain = chain_of(seq)
        conv = self.store.get_or_create(key, chain.root)
        table, entries = seq.table, chain.entries
        for i, e in enumerate(entries):  # the handle holds each entry's own device block
            if e.device < 0:
                self.tiers.place(e, table.blocks[i])
            elif e.device != table.blocks[i]:
                self.pool.retain([e.device])
                self.pool.release([table.blocks[i]])
                table.blocks[i] = e.device
        self.tiers.protect(entries, 1)
        old_tokens, same_root, old_written = conv.token_ids, conv.root == chain.root, conv.remote_tokens
        self.tiers.drop_handle(conv)  # its old blocks: released and unprotected
        conv.root, conv.kv, conv.chain, conv.token_ids = chain.root, table, list(entries), list(seq.tokens)
        seq.table = BlockTable(self.pool)
        valid = common_prefix(old_tokens, conv.token_ids) if same_root else 0
        conv.remote_tokens = min(conv.remote_tokens, valid)  # Redis: valid up to the common prefix
        conv.version += 1
        if self.remote is not None:
            supersedes = old_written // self.bs if valid >= old_written else 0
            self.remote.write_behind(chain, conv.token_ids, conv.kv, conv, supersedes)
        return conv
