"""A preallocated pool of fixed-size KV blocks, shared by all sequences, with reference counts.

Layout, chosen so any run of consecutive blocks is a zero-copy [KVH, n, D] view for attention:

    kv: [layers, 2 (K|V), kv_heads, num_blocks * block_size, head_dim]
    block b holds token slots [b * block_size, (b + 1) * block_size) of the slot axis

A block is also the unit of sharing (intrinsic forks), spilling and Redis values. Allocation prefers
the block right after a sequence's last one, so a growing conversation stays one contiguous run.
"""

import heapq

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
        self._free = set(range(num_blocks))
        self._free_heap = list(range(num_blocks))  # lazily pruned: ids may have been taken via `after`

    @staticmethod
    def bytes_per_block(shape: ModelShape, block_size: int, dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return shape.num_layers * 2 * shape.num_kv_heads * block_size * shape.head_dim * itemsize

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block: int) -> int:
        return self._ref_counts[block]

    def allocate(self, n: int, after: int | None = None) -> list[int]:
        """Take n free blocks (ref count 1), continuing the run after block `after` where possible."""
        if n > len(self._free):
            raise CapacityError(
                f"KV pool exhausted: need {n} blocks, {len(self._free)} of {self.num_blocks} free"
            )
        blocks: list[int] = []
        nxt = None if after is None else after + 1
        while len(blocks) < n:
            if nxt is not None and nxt in self._free:
                block = nxt
            else:
                block = heapq.heappop(self._free_heap)
                if block not in self._free:
                    continue
            self._free.discard(block)
            self._ref_counts[block] = 1
            blocks.append(block)
            nxt = block + 1
        return blocks

    def retain(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._ref_counts[b] > 0, f"retain of free block {b}"
            self._ref_counts[b] += 1

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert self._ref_counts[b] > 0, f"double free of block {b}"
            self._ref_counts[b] -= 1
            if self._ref_counts[b] == 0:
                self._free.add(b)
                heapq.heappush(self._free_heap, b)
        if len(self._free_heap) > 2 * self.num_blocks:  # drop stale entries left by `after` allocations
            self._free_heap = sorted(self._free)

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens slots of block src into block dst (all layers, K and V)."""
        s, d = src * self.block_size, dst * self.block_size
        self.kv[:, :, :, d : d + num_tokens].copy_(self.kv[:, :, :, s : s + num_tokens])
