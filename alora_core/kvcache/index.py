"""The KV index: every full KV block, found by the hash chain of its token ids (automatic prefix caching).

    root      = block_hash(model fingerprint | tenant | cache salt)
    hash(b_i) = block_hash(token ids of block i as uint32 bytes + adapter key of block i, seed=hash(b_i-1))

    adapter key of block i: none for a base block; (adapter name, digest of its weights and config,
    activation start) for a block holding any adapted position, i.e. the block containing the
    activation start and every later one (all blocks of a plain LoRA, whose start is 0):

        positions:  | b0      | b1      | b2    s...| b3        |      (an aLoRA activating at s)
        adapter:      -         -         (A, d, s)   (A, d, s)        shared by base requests: b0, b1

A hash only names a candidate. An entry is reused only when its token ids, its parent (the very
entry matched for the block before, or the same root) and its adapter key are all equal, so a
collision, even of a deliberately weak hash (see the tests), never hands out another prefix's KV.
Entries with equal hashes are chained through `CachedBlock.next`.

An entry lives here while its KV lies in a local tier: `device` (a pool block) or `host` (a host
block); tiers.py moves and drops it. Redis copies are found by key (remote.py), not through here.
"""

import json
from array import array
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

# (data, seed) -> 64-bit hash. Tests swap in a weak one: exact matching must make that harmless.
block_hash: Callable[[bytes, int], int] = xxhash.xxh3_64_intdigest
NOT_ADAPTED = 1 << 62  # first adapted block of a base chain: none

IN_REDIS = 1  # a Redis value holding this block was written (or read) by this replica
ENDS_VALUE = 2  # ... and one of them ends with this block (its key is this block's hash)


@dataclass(frozen=True)
class Root:
    """What every block of a chain shares: tenant and cache salt (the model is this index's own)."""

    tenant: str
    salt: str
    seed: int  # hash of block -1

    @property
    def digest_seed(self) -> bytes:
        """Seed of the strong (sha256) prefix hash in Redis headers."""
        return json.dumps(["alora-kv2", self.tenant, self.salt]).encode()


@dataclass(frozen=True)
class AdapterKey:
    """Identity of the KV an adapter computes: a reload with other weights is another adapter."""

    name: str
    digest: str  # sha256 of the adapter's config and weights
    activation_start: int  # absolute position of the first adapted token (0: plain LoRA)
    key_bytes: bytes

    @classmethod
    def of(cls, name: str, digest: str, activation_start: int) -> "AdapterKey":
        return cls(name, digest, activation_start, json.dumps([name, digest, activation_start]).encode())


class CachedBlock:
    """One full block in the index. ~300 bytes of Python objects each (see docs/caching.md)."""

    __slots__ = ("adapter", "device", "handles", "hash", "host", "next", "parent", "redis", "tokens")

    def __init__(
        self, h: int, parent: "CachedBlock | Root", tokens: bytes, adapter: AdapterKey | None
    ) -> None:
        self.hash = h
        self.parent = parent
        self.tokens = tokens  # block_size uint32 token ids
        self.adapter = adapter
        self.device = -1  # pool block holding its KV, -1: none
        self.host = -1  # host block holding its KV, -1: none
        self.handles = 0  # conversation handles whose chain holds it (protects it from being dropped)
        self.redis = 0  # IN_REDIS | ENDS_VALUE flags
        self.next: CachedBlock | None = None  # next entry with the same hash

    @property
    def resident(self) -> bool:
        return self.device >= 0 or self.host >= 0

    def matches(self, parent: "CachedBlock | Root", tokens: bytes, adapter: AdapterKey | None) -> bool:
        same_parent = self.parent is parent or (isinstance(parent, Root) and self.parent == parent)
        return same_parent and self.tokens == tokens and self.adapter == adapter


class BlockChain:
    """A sequence's blocks as the index sees them: their hashes, computed as tokens become known, and
    the entry of every full block computed or reused so far (`entries[i]` is block i)."""

    def __init__(self, root: Root, block_size: int, adapter: AdapterKey | None = None) -> None:
        self.root = root
        self.block_size = block_size
        self.adapter = adapter
        # first block holding an adapted position (the one containing the activation start)
        self.adapted_from = NOT_ADAPTED if adapter is None else adapter.activation_start // block_size
        self.hashes: list[int] = []
        self.entries: list[CachedBlock] = []
        self._tokens = bytearray()  # uint32 token ids of the hashed blocks

    def fork(self, blocks: int) -> "BlockChain":
        """A chain holding this one's first `blocks` blocks (hashes and entries): the view of a
        sequence that shares those blocks and goes on with other tokens (the choices of n > 1)."""
        child = BlockChain(self.root, self.block_size, self.adapter)
        child.hashes = self.hashes[:blocks]
        child.entries = self.entries[:blocks]
        child._tokens = self._tokens[: 4 * self.block_size * len(child.hashes)]
        return child

    def adapter_of(self, block: int) -> AdapterKey | None:
        return self.adapter if block >= self.adapted_from else None

    def hash_blocks(self, tokens: list[int], n: int) -> None:
        """Extend the hashes to the first n blocks of tokens (n * block_size <= len(tokens))."""
        have, bs = len(self.hashes), self.block_size
        if n <= have:
            return
        self._tokens += array("I", tokens[have * bs : n * bs]).tobytes()
        h = self.hashes[-1] if have else self.root.seed
        width = 4 * bs
        for i in range(have, n):
            data = bytes(self._tokens[i * width : (i + 1) * width])
            adapter = self.adapter_of(i)
            h = block_hash(data + adapter.key_bytes if adapter is not None else data, h)
            self.hashes.append(h)

    def block_tokens(self, block: int) -> bytes:
        width = 4 * self.block_size
        return bytes(self._tokens[block * width : (block + 1) * width])

    def parent_of(self, block: int) -> "CachedBlock | Root":
        return self.entries[block - 1] if block else self.root

    @property
    def digest_seed(self) -> bytes:
        """Seed of the strong prefix hash of this chain's Redis values (codec.prefix_hashes). Only
        base blocks and plain-LoRA chains (every block adapted) are written to Redis."""
        if self.adapter is None or self.adapted_from > 0:
            return self.root.digest_seed
        return self.root.digest_seed + self.adapter.key_bytes


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists (slices compared in C)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i, step = 0, 256
    while a[i : i + step] == b[i : i + step]:
        i += step
    while a[i] == b[i]:
        i += 1
    return i


def make_root(fingerprint: str, tenant: str, salt: str | None) -> Root:
    seed = block_hash(json.dumps([fingerprint, tenant, salt or ""]).encode(), 0)
    return Root(tenant, salt or "", seed)


class PrefixIndex:
    """hash -> entry (chained on collisions), and how many entries each local tier holds."""

    def __init__(self, fingerprint: str, block_size: int) -> None:
        self.fingerprint = fingerprint
        self.block_size = block_size
        self._by_hash: dict[int, CachedBlock] = {}
        self.num_entries = 0

    def __len__(self) -> int:
        return self.num_entries

    def root(self, tenant: str, salt: str | None) -> Root:
        return make_root(self.fingerprint, tenant, salt)

    def chain(self, root: Root, adapter: AdapterKey | None = None) -> BlockChain:
        return BlockChain(root, self.block_size, adapter)

    def find(self, chain: BlockChain, block: int, parent: "CachedBlock | Root") -> CachedBlock | None:
        """The entry of block `block` of chain (hashed) after `parent`, if the index holds it."""
        tokens, adapter = chain.block_tokens(block), chain.adapter_of(block)
        entry = self._by_hash.get(chain.hashes[block])
        while entry is not None and not entry.matches(parent, tokens, adapter):
            entry = entry.next
        return entry

    def match(self, chain: BlockChain, tokens: list[int], max_blocks: int) -> list[CachedBlock]:
        """The entries of the longest prefix of chain's first max_blocks blocks held here."""
        chain.hash_blocks(tokens, max_blocks)
        out: list[CachedBlock] = []
        parent: CachedBlock | Root = chain.root
        for i in range(max_blocks):
            entry = self.find(chain, i, parent)
            if entry is None:
                break
            out.append(entry)
            parent = entry
        return out

    def add(self, chain: BlockChain, block: int) -> tuple[CachedBlock, bool]:
        """The entry of chain's block `block` (its parent is chain.entries[block - 1]): the one held
        here, or a new one (not resident yet: the caller places it). Returns (entry, created)."""
        parent = chain.parent_of(block)
        existing = self.find(chain, block, parent)
        if existing is not None:
            return existing, False
        h = chain.hashes[block]
        entry = CachedBlock(h, parent, chain.block_tokens(block), chain.adapter_of(block))
        self.link(entry)
        return entry, True

    def link(self, entry: CachedBlock) -> None:
        entry.next = self._by_hash.get(entry.hash)
        self._by_hash[entry.hash] = entry
        self.num_entries += 1

    def remove(self, entry: CachedBlock) -> None:
        """Forget an entry whose KV no local tier holds any more (its descendants become unreachable
        and are dropped in their turn by the LRU)."""
        head = self._by_hash.get(entry.hash)
        if head is entry:
            if entry.next is None:
                del self._by_hash[entry.hash]
            else:
                self._by_hash[entry.hash] = entry.next
        else:
            while head is not None and head.next is not entry:
                head = head.next
            if head is None:
                return  # not linked
            head.next = entry.next
        entry.next = None
        self.num_entries -= 1
