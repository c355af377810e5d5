"""Per-conversation state: the committed token history and where the base-model KV of its prefix lies.

    positions:  0 ............ d | d ............ h |            (token_ids)
                device: kv       | host: host        |
                Redis: token_ids[:remote_tokens] (a prefix, written behind; may reach past h)

Invariant (of an idle conversation): `kv` holds exactly the base-model K/V of token_ids[:d], `host`
that of token_ids[d:h], and Redis, as far as this replica knows, that of token_ids[:remote_tokens].
A /generate's last sampled token has no KV yet. Keys are opaque strings; the service namespaces
them by tenant. Demotion and promotion between the tiers live in tiers.py.
"""

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.host_tier import HostBlocks, HostTier
from alora_core.kvcache.redis_tier import FetchJob


@dataclass(eq=False)
class Conversation:
    key: str
    kv: BlockTable
    host: HostBlocks
    token_ids: list[int] = field(default_factory=list)
    remote_tokens: int = 0  # Redis holds the KV of token_ids[:remote_tokens] (confirmed writes)
    remote_chunks: int = 0  # values Redis may hold for it (what a delete removes)
    version: int = 0  # bumped at each commit: orders Redis write confirmations
    persist_pending: int | None = None  # version whose Redis write is in flight
    fetch: FetchJob | None = None  # Redis read in flight or done, not yet copied to the device

    @property
    def device_tokens(self) -> int:
        return self.kv.num_tokens

    @property
    def local_tokens(self) -> int:
        """End of the prefix held on this replica (device, then host)."""
        return self.kv.num_tokens + self.host.num_tokens

    @property
    def cached_tokens(self) -> int:
        """Longest prefix whose KV can be restored without recompute, from any tier."""
        return max(self.local_tokens, self.remote_tokens)

    def drop_local(self) -> None:
        self.kv.free()
        self.host.free()
        self.fetch = None


class ConversationStore:
    def __init__(self, pool: BlockPool, max_conversations: int, host: HostTier) -> None:
        self.pool = pool
        self.host = host
        self.max_conversations = max_conversations
        self._by_key: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first
        self.on_drop: Callable[[Conversation], None] | None = None  # before a conversation is dropped

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

    def get_or_create(self, key: str) -> Conversation:
        conv = self.get(key)
        if conv is None:
            while len(self._by_key) >= self.max_conversations:
                _, oldest = self._by_key.popitem(last=False)
                self._drop(oldest)  # Redis keeps its copy until the TTL: it can still be resumed
            conv = Conversation(key=key, kv=BlockTable(self.pool), host=HostBlocks(self.host))
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
        conv.drop_local()
