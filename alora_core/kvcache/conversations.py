"""Per-conversation state: the committed token history and the base-model KV of its prefix.

Invariant: `kv` holds exactly the base-model K/V of `token_ids[:kv.num_tokens]` (a /generate's
last sampled token has no KV yet). Keys are opaque strings; the service namespaces them by tenant.
When the pool runs short, the least recently used conversations lose their KV (not their history):
their next request recomputes it.
"""

from collections import OrderedDict
from dataclasses import dataclass, field

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable


@dataclass
class Conversation:
    key: str
    kv: BlockTable
    token_ids: list[int] = field(default_factory=list)

    @property
    def cached_tokens(self) -> int:
        return self.kv.num_tokens


class ConversationStore:
    def __init__(self, pool: BlockPool, max_conversations: int) -> None:
        self.pool = pool
        self.max_conversations = max_conversations
        self._by_key: OrderedDict[str, Conversation] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._by_key)

    def __contains__(self, key: str) -> bool:
        return key in self._by_key

    def get(self, key: str) -> Conversation | None:
        conv = self._by_key.get(key)
        if conv is not None:
            self._by_key.move_to_end(key)
        return conv

    def get_or_create(self, key: str) -> Conversation:
        conv = self.get(key)
        if conv is None:
            while len(self._by_key) >= self.max_conversations:
                _, oldest = self._by_key.popitem(last=False)
                oldest.kv.free()
            conv = Conversation(key=key, kv=BlockTable(self.pool))
            self._by_key[key] = conv
        return conv

    def delete(self, key: str) -> bool:
        conv = self._by_key.pop(key, None)
        if conv is None:
            return False
        conv.kv.free()
        return True

    def evict_caches(self, blocks_needed: int, protect: frozenset[str] = frozenset()) -> int:
        """Drop the KV of least recently used conversations until blocks_needed are free. Returns tokens dropped."""
        dropped = 0
        for key, conv in list(self._by_key.items()):
            if self.pool.num_free >= blocks_needed:
                break
            if key in protect or not conv.kv.blocks:
                continue
            dropped += conv.kv.num_tokens
            conv.kv.free()
        return dropped
