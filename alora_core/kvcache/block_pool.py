"""A preallocated pool of fixed-size KV blocks, shared by all sequences, with reference counts.

Layout, chosen so any run of consecutive blocks is a zero-copy [KVH, n, D] view for attention:

    kv: [layers, 2 (K|V), kv_heads, num_blocks * block_size, head_dim]
    block b holds token slots [b * block_size, (b + 1) * block_size) of the slot axis

A block is also the unit of sharing (intrinsic forks), spilling and Redis values. Allocation prefers
the block right after a sequence's last one, so a growing conversation stays one contiguous run.
A run that must start afresh goes into the largest free gap, after half of the room it does not
need, which is left for the run before it to grow into:

    |aaaa.......................|  ->  |aaaa.........bbbb..........|  ->  |aaaaaa.......bbbbbbb.......|

Attention reads one run with one fused kernel call; every extra run of a sequence costs another
call and a softmax merge per layer (bench_batching: 16 decoding 2K conversations, 72 -> 62 ms/step).

A block nobody references may still hold the KV of an index entry (kvcache/index.py): it is
"evictable", counted as free, and kept in LRU order. Allocation takes empty blocks first; when they
run out, `evict` is called with the least recently released evictable blocks, and must `uncache`
each of them (tiers.py demotes their KV to the host tier or drops it):

    ref > 0: in use      ref == 0, cached: evictable (LRU)      ref == 0, not cached: empty
"""

from collections import OrderedDict
from collections.abc import Callable
from itertools import islice

import torch

from alora_core.errors import CapacityError
from alora_core.model.loader import ModelShape


class BlockPool:
    def __init__(
        self,
        shape: ModelShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        # empty, not zeros: untouched pages are never committed on CPU; no slot is read before written.
        self.kv = torch.empty(
            shape.num_layers,
            2,
            shape.num_kv_heads,
            num_blocks * block_size,
            shape.head_dim,
            dtype=dtype,
            device=device,
        )
        self._ref_counts = [0] * num_blocks
        self._free = bytearray(b"\x01") * num_blocks  # 1 = empty; viewed as a tensor to find gaps
        self._num_free = num_blocks  # empty blocks
        self._cached = bytearray(num_blocks)  # 1 = holds an index entry's KV
        self._evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 and cached, LRU first
        self.evict: Callable[[list[int]], None] | None = None  # set by the tiers

    @staticmethod
    def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return shape.num_layers * 2 * shape.num_kv_heads * block_size * shape.head_dim * itemsize

    @property
    def num_free(self) -> int:
        """Blocks an allocation can take: empty ones and evictable ones."""
        return self._num_free + len(self._evictable)

    @property
    def num_empty(self) -> int:
        """Blocks holding no KV at all (neither in use nor cached)."""
        return self._num_free

    @property
    def num_evictable(self) -> int:
        return len(self._evictable)

    def evictable(self) -> list[int]:
        """Evictable blocks, least recently released first."""
        return list(self._evictable)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def is_cached(self, block: int) -> bool:
        return bool(self._cached[block])

    def mark_cached(self, block: int) -> None:
        """The block now holds an index entry's KV (it must be in use)."""
        assert self._ref_counts[block] > 0, f"caching free block {block}"
        self._cached[block] = 1

    def uncache(self, block: int) -> None:
        """The block no longer holds an entry's KV: an evictable one becomes empty."""
        self._cached[block] = 0
        if block in self._evictable:
            del self._evictable[block]
            self._free[block] = 1
            self._num_free += 1

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """Take n free blocks (ref count 1), continuing the run after block `after` where possible;
        evictable blocks are evicted (LRU) when empty ones run out."""
        if n > self.num_free:
            raise CapacityError(
                f"KV pool exhausted: need {n} blocks, {self.num_free} of {self.num_blocks} free"
            )
        if n > self._num_free:
            victims = list(islice(self._evictable, n - self._num_free))
            assert self.evict is not None, "evictable blocks without an evictor"
            self.evict(victims)
            assert n <= self._num_free, "the evictor must uncache the blocks it is given"
        blocks: list[int] = []
        nxt = None if after is None else after + 1
        while len(blocks) < n:
            block = (
                nxt
                if nxt is not None and nxt < self.num_blocks and self._free[nxt]
                else self._fresh_start(n - len(blocks))
            )
            self._free[block] = 0
            self._ref_counts[block] = 1
            blocks.append(block)
            nxt = block + 1
        self._num_free -= n
        return blocks

    def _fresh_start(self, n: int) -> int:
        """The block where a new run of n blocks starts: in the largest free gap, after half of the
        room the run does not need (none when the gap begins the pool: no run before it grows)."""
        free = torch.frombuffer(self._free, dtype=torch.int8)
        edges = torch.diff(free, prepend=free.new_zeros(1), append=free.new_zeros(1))
        starts, ends = (edges == 1).nonzero().squeeze(1), (edges == -1).nonzero().squeeze(1)
        longest = int(torch.argmax(ends - starts))
        start, end = int(starts[longest]), int(ends[longest])
        return start if start == 0 else start + max(0, end - start - n) // 2

    def retain(self, blocks: list[int]) -> None:
        """One more reference each (an evictable block is in use again)."""
        for b in blocks:
            if self._ref_counts[b] == 0:
                assert b in self._evictable, f"retain of free block {b}"
                del self._evictable[b]
            self._ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        """One reference less each. Pass a sequence's blocks last first: a cached chain's tail is
        then evicted before its head."""
        for b in blocks:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                if self._cached[b]:
                    self._evictable[b] = None
                else:
                    self._free[b] = 1
                    self._num_free += 1

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens slots of block src into block dst (all layers, K and V)."""
        s, d = src * self.block_size, dst * self.block_size
        self.kv[:, :, :, d : d + num_tokens].copy_(self.kv[:, :, :, s : s + num_tokens])
