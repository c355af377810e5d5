"""A sequence's KV: an ordered list of pool blocks holding positions 0..num_tokens-1.

    positions: 0 ........ bs-1 | bs ...... 2bs-1 | 2bs .. num_tokens-1 (partly filled)
    blocks:    [    b7         |      b8         |      b3            ]

Fork shares the full blocks (reference counted) and copies the partly filled last one, so neither
side ever writes into a block the other reads. Truncating into a shared block, or into one whose KV
the index holds (kvcache/index.py), copies it first: cached KV is never written over.
"""

import torch

from alora_core.kvcache.block_pool import BlockPool


class BlockTable:
    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.blocks: list[int] = []
        self.num_tokens = 0  # positions whose K/V is written

    @property
    def capacity(self) -> int:
        return len(self.blocks) * self.pool.block_size

    def reserve(self, total_tokens: int) -> None:
        """Make room for positions up to total_tokens - 1 (raises CapacityError, leaving the table as it was)."""
        missing = -(-total_tokens // self.pool.block_size) - len(self.blocks)
        if missing > 0:
            self.blocks += self.pool.allocate(missing, after=self.blocks[-1] if self.blocks else None)

    def slots(self, start: int, end: int) -> torch.Tensor:
        """Pool slot of each position in [start, end): [end - start] int64. Needs capacity >= end."""
        assert end <= self.capacity, (end, self.capacity)
        bs = self.pool.block_size
        positions = torch.arange(start, end)
        blocks = torch.tensor(self.blocks, dtype=torch.long)
        return blocks[positions // bs] * bs + positions % bs

    def segments(self, num_tokens: int) -> tuple[tuple[int, int], ...]:
        """Pool slot ranges [start, end) covering positions 0..num_tokens-1, consecutive blocks merged."""
        bs = self.pool.block_size
        num_blocks = -(-num_tokens // bs)
        segments: list[tuple[int, int]] = []
        for block in self.blocks[:num_blocks]:
            start = block * bs
            if segments and segments[-1][1] == start:
                segments[-1] = (segments[-1][0], start + bs)
            else:
                segments.append((start, start + bs))
        if segments:  # the last block may be partly filled
            start, end = segments[-1]
            segments[-1] = (start, end - (num_blocks * bs - num_tokens))
        return tuple(segments)

    def fork(self, num_tokens: int) -> "BlockTable":
        """A new table holding this one's first num_tokens positions, sharing every full block."""
        assert num_tokens <= self.num_tokens, (num_tokens, self.num_tokens)
        bs = self.pool.block_size
        full, partial = divmod(num_tokens, bs)
        child = BlockTable(self.pool)
        shared = self.blocks[:full]
        if partial:
            (copy,) = self.pool.allocate(1, after=shared[-1] if shared else None)
        self.pool.retain(shared)
        child.blocks = list(shared)
        if partial:
            self.pool.copy_block(self.blocks[full], copy, partial)
            child.blocks.append(copy)
        child.num_tokens = num_tokens
        return child

    def truncate(self, num_tokens: int) -> None:
        """Keep positions 0..num_tokens-1 and release the rest; copy-on-write a shared last block."""
        assert num_tokens <= self.num_tokens, (num_tokens, self.num_tokens)
        bs = self.pool.block_size
        keep = -(-num_tokens // bs)
        self.pool.release(self.blocks[keep:][::-1])
        del self.blocks[keep:]
        self.num_tokens = num_tokens
        partial = num_tokens % bs
        last = self.blocks[-1] if partial else -1
        if partial and (self.pool.ref_count(last) > 1 or self.pool.is_cached(last)):
            (copy,) = self.pool.allocate(1, after=self.blocks[-2] if len(self.blocks) > 1 else None)
            self.pool.copy_block(self.blocks[-1], copy, partial)
            self.pool.release([self.blocks[-1]])
            self.blocks[-1] = copy

    def free(self) -> None:
        self.pool.release(self.blocks[::-1])  # the tail of a cached chain is evicted first
        self.blocks = []
        self.num_tokens = 0
