"""Conversations are named handles on chains of the KV index: a `conversation_id` names the token
history of a conversation and the index entries of its full blocks, which it protects from being
dropped (they may still be demoted to the host tier and Redis under the byte budgets).

    positions:   0 ................. d | d ........................ h |
                 kv: device blocks     | chain entries on the host,   |   Redis: token_ids[:remote_tokens]
                 (chain's, then the    | then the partial last block  |   (values by chain hash + the
                  partial last block)  | (`host`)                     |    handle's own tail value)

Invariant: `kv.blocks[i]` is `chain[i].device` for every full block it holds, the handle holds a
reference on each (`kv` is a BlockTable), and only the partly filled last block is private to the
handle. A /generate's last sampled token has no KV yet. The LRU store drops the least recently used
handle beyond `max_conversations`; its Redis copy stays, so any replica can resume it.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.codec import tenant_of
from alora_core.kvcache.host_tier import HostBlocks, HostTier
from alora_core.kvcache.index import CachedBlock, PrefixIndex, Root


@dataclass(eq=False)
class Conversation:
    key: str
    root: Root  # tenant and cache salt its blocks were keyed with
    kv: BlockTable
    host: HostBlocks  # the partial last block, when it was demoted to the host (at most one block)
    chain: list[CachedBlock] = field(default_factory=list)  # index entries of its full blocks
    token_ids: list[int] = field(default_factory=list)
    remote_tokens: int = 0  # Redis holds the KV of token_ids[:remote_tokens] (confirmed writes)
    version: int = 0  # bumped at each commit: orders Redis write confirmations
    persist_pending: int | None = None  # version whose Redis write is in flight

    @property
    def device_tokens(self) -> int:
        return self.kv.num_tokens

    @property
    def local_tokens(self) -> int:
        """End of the prefix held on this replica (device, then host, block by block)."""
        bs = self.kv.pool.block_size
        if self.kv.num_tokens % bs:
            return self.kv.num_tokens  # the partial last block is on the device: all of it is
        i = self.kv.num_tokens // bs
        while i < len(self.chain) and self.chain[i].resident:
            i += 1
        return i * bs + (self.host.num_tokens if i == len(self.chain) else 0)

    @property
    def cached_tokens(self) -> int:
        """Longest prefix whose KV can be restored without recompute, from any tier."""
        return max(self.local_tokens, self.remote_tokens)

    def partial_source(self, block: int) -> tuple[str, int] | None:
        """Where the handle's block `block` lies locally: ("device" | "host", block id)."""
        if block < len(self.chain):
            entry = self.chain[block]
            if entry.device >= 0:
                return "device", entry.device
            return ("host", entry.host) if entry.host >= 0 else None
        if block == len(self.chain):
            if len(self.kv.blocks) > block:
                return "device", self.kv.blocks[block]
            if self.host.blocks:
                return "host", self.host.blocks[0]
        return None


class ConversationStore:
    def __init__(self, pool: BlockPool, max_conversations: int, host: HostTier, index: PrefixIndex) -> None:
        self.pool = pool
        self.host = host
        self.index = index
        self.max_conversations = max_conversations
        self._by_key: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self.on_drop: Callable[[Conversation], None] | None = None  # frees a dropped handle's KV

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> Conversation | None:
        conv = self._by_key.get(key)
        if conv is not None:
            self._by_key.move_to_end(key)
        return conv

    def peek(self, key: str) -> Conversation | None:
        """Like get, without counting as a use."""
        return self._by_key.get(key)

    def lru(self) -> list[Conversation]:
        """Every conversation, least recently used first."""
        return list(self._by_key.values())

    def get_or_create(self, key: str, root: Root | None = None) -> Conversation:
        conv = self.get(key)
        if conv is None:
            while len(self._by_key) >= self.max_conversations:
                _, oldest = self._by_key.popitem(last=False)
                self._drop(oldest)  # Redis keeps its copy until the TTL: it can still be resumed
            root = root or self.index.root(tenant_of(key), None)
            conv = Conversation(key=key, root=root, kv=BlockTable(self.pool), host=HostBlocks(self.host))
            self._by_key[key] = conv
        return conv

    def delete(self, key: str) -> Conversation | None:
        conv = self._by_key.pop(key, None)
        if conv is not None:
            self._drop(conv)
        return conv

    def _drop(self, conv: Conversation) -> None:
        if self.on_drop is not None:
            self.on_drop(conv)
