"""What the Redis threads are asked to do (redis_tier.py), and what they hand back.

WriteJob   values to SET (each its own key), a conversation's meta + tail (one MULTI), keys to
           refresh and superseded values to delete; settled on the scheduler thread
FetchJob   values to read into pool blocks the job owns, in order, stopping at the first gap
ProbeJob   which value keys exist (one round trip)
"""

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.codec import ChunkHeader
from alora_core.kvcache.host_tier import copy_blocks


@dataclass(frozen=True)
class ValueWrite:
    key: str
    header: ChunkHeader
    row: int  # its blocks are WriteJob.blocks[row : row + header.num_blocks]


@dataclass
class WriteJob:
    """Values to write behind (each its own key), then a conversation's handle (meta + tail value, one
    MULTI), then keys to refresh and superseded values to delete. `settle(ok)` runs on the scheduler
    thread once it is done (TieredCache.poll)."""

    tenant: str
    blocks: torch.Tensor  # [n, *block_shape] on CPU: every block a value or the tail holds
    values: list[ValueWrite]
    settle: Callable[[bool], None]
    conversation: str | None = None  # the handle written, if any (orders lookups after the write)
    meta: bytes | None = None
    tail: ValueWrite | None = None
    touch: list[str] = field(default_factory=list)  # earlier values of the handle: TTL refreshed
    delete: list[str] = field(default_factory=list)
    ready: "torch.cuda.Event | None" = None  # device -> host copy of `blocks` in flight
    ok: bool = False

    @property
    def nbytes(self) -> int:
        return self.blocks.numel() * self.blocks.element_size()


@dataclass
class FetchJob:
    """Restore chain positions [first_block * bs, end_token) from `values` (in order, each what its
    header says) straight into `blocks`, pool blocks the job owns until it is collected.

    The I/O thread reads the values one by one and copies each valid one into its blocks while the
    next arrives; it stops filling at the first missing or refused value."""

    values: list[tuple[str, ChunkHeader]]
    tenant: str
    pool: BlockPool
    first_block: int
    end_token: int
    blocks: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    filled_blocks: int = 0
    filled_tokens: int = 0  # restored positions end here
    copied: "torch.cuda.Event | None" = None  # CUDA: the last copy into `blocks`
    seconds: float = 0.0

    def accept(self, header: ChunkHeader, payload: torch.Tensor) -> bool:
        """Copy the blocks of a valid value that continue what is filled. False: a gap."""
        lo = self.first_block + self.filled_blocks
        hi = min(header.first_block + header.num_blocks, self.first_block + len(self.blocks))
        if not header.first_block <= lo < hi:
            return False
        rows = list(range(lo - header.first_block, hi - header.first_block))
        copy_blocks(
            self.pool,
            self.blocks[lo - self.first_block : hi - self.first_block],
            payload,
            rows,
            to_pool=True,
            side_thread=True,  # the fetch thread
        )
        self.filled_blocks = hi - self.first_block
        self.filled_tokens = min(
            hi * self.pool.block_size,
            header.first_block * self.pool.block_size + header.num_tokens,
            self.end_token,
        )
        return True


@dataclass
class ProbeJob:
    """Which of `keys` exist (one round trip); `exists` stays None if Redis could not answer."""

    keys: list[str]
    done: threading.Event = field(default_factory=threading.Event)
    exists: list[bool] | None = None
