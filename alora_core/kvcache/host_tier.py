"""The host tier: KV blocks demoted from the device pool, in one preallocated block-major buffer.

    pool.kv: [layers, 2, kv_heads, num_blocks * bs, head_dim]     (device; a block is strided)
    host.kv: [num_host_blocks, layers, 2, kv_heads, bs, head_dim]  (pinned when CUDA is present;
                                                                    a block is contiguous bytes,
                                                                    ready to become a Redis value)

Copies move runs of consecutive blocks with one strided copy each. With CUDA they are issued
non-blocking on the current stream, so they overlap with host work and stay ordered with the
forwards that later reuse the freed device blocks; `sync()` waits before the CPU reads host bytes.
"""

import heapq
from collections.abc import Iterator

import numpy as np
import torch

from alora_core.errors import CapacityError
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.codec import KVLayout


class HostTier:
    def __init__(self, layout: KVLayout, num_blocks: int, pin: bool) -> None:
        self.layout = layout
        self.num_blocks = num_blocks
        self.pinned = pin and num_blocks > 0
        # empty, not zeros: on CPU untouched pages are never committed, so RSS grows only with use
        self.kv = torch.empty(num_blocks, *layout.block_shape, dtype=layout.dtype, pin_memory=self.pinned)
        self._free = list(range(num_blocks))  # a heap: low ids first keeps runs contiguous
        self._pending: torch.cuda.Event | None = None

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def bytes_used(self) -> int:
        return (self.num_blocks - len(self._free)) * self.layout.bytes_per_block

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.layout.bytes_per_block

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise CapacityError(f"host tier full: need {n} blocks, {len(self._free)} free")
        return [heapq.heappop(self._free) for _ in range(n)]

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            heapq.heappush(self._free, b)

    def sync(self) -> None:
        """Wait for device -> host copies in flight before the CPU reads host bytes."""
        if self._pending is not None:
            self._pending.synchronize()
            self._pending = None

    def from_pool(self, pool: BlockPool, pool_blocks: list[int], host_blocks: list[int]) -> None:
        copy_blocks(pool, pool_blocks, self.kv, host_blocks, to_pool=False)
        if pool.kv.is_cuda:
            self._pending = torch.cuda.Event()
            self._pending.record()

    def to_pool(self, host_blocks: list[int], pool: BlockPool, pool_blocks: list[int]) -> None:
        copy_blocks(pool, pool_blocks, self.kv, host_blocks, to_pool=True)


class HostBlocks:
    """A conversation's blocks on the host: positions [start, start + num_tokens) where `start` is
    the end of its device prefix. Only the last block may be partly filled."""

    def __init__(self, tier: HostTier) -> None:
        self.tier = tier
        self.blocks: list[int] = []
        self.num_tokens = 0

    def free(self) -> None:
        self.tier.release(self.blocks)
        self.blocks = []
        self.num_tokens = 0

    def drop_tail(self, n: int) -> int:
        """Release the last n blocks; returns the tokens they held."""
        n = min(n, len(self.blocks))
        if n == 0:
            return 0
        keep = len(self.blocks) - n
        dropped = self.num_tokens - keep * self.tier.layout.block_size
        self.tier.release(self.blocks[keep:])
        del self.blocks[keep:]
        self.num_tokens -= dropped
        return dropped


def block_runs(a: list[int], b: list[int]) -> Iterator[tuple[int, int, int]]:
    """Maximal (a_start, b_start, length) runs where both id lists count up by one."""
    i = 0
    while i < len(a):
        j = i + 1
        while j < len(a) and a[j] == a[j - 1] + 1 and b[j] == b[j - 1] + 1:
            j += 1
        yield a[i], b[i], j - i
        i = j


def pool_blocks_view(pool: BlockPool) -> torch.Tensor:
    """pool.kv as [layers, 2, kv_heads, num_blocks, bs, head_dim] (a view: no copy)."""
    layers, two, heads, _, dim = pool.kv.shape
    return pool.kv.view(layers, two, heads, pool.num_blocks, pool.block_size, dim)


def copy_blocks(
    pool: BlockPool,
    pool_blocks: list[int],
    blocks: torch.Tensor,
    block_ids: list[int],
    to_pool: bool,
    side_thread: bool = False,
) -> None:
    """Copy between pool blocks and rows of a block-major tensor [n, layers, 2, kv_heads, bs, dim].

    side_thread: the caller is not the scheduler thread (the Redis fetch thread). On the CPU the copy
    then stays out of torch's intra-op thread pool (see `cpu_copy`)."""
    assert len(pool_blocks) == len(block_ids)
    kv = pool_blocks_view(pool)
    non_blocking = pool.kv.is_cuda
    for p, h, n in block_runs(pool_blocks, block_ids):
        device_run = kv[:, :, :, p : p + n]  # [L, 2, KVH, n, bs, D]
        host_run = blocks[h : h + n].permute(1, 2, 3, 0, 4, 5)
        src, dst = (host_run, device_run) if to_pool else (device_run, host_run)
        if side_thread and not pool.kv.is_cuda:
            cpu_copy(dst, src)
        else:
            dst.copy_(src, non_blocking=non_blocking)


def cpu_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[...] = src for CPU tensors of one shape and dtype (any strides, unit stride in the last
    dimension), in the calling thread alone.

    For threads other than the scheduler's: a torch copy this large runs in an OpenMP team of the
    calling thread, and once a second thread owns a team, libgomp counts more threads than cores and
    stops spin-waiting: every parallel region of the scheduler's forwards then pays a wake-up. Measured
    on the 2-core VM: decode 12.4 -> 20.0 ms/token for as long as the side thread lives, after a
    single 4 MiB `copy_` on it; numpy's single-threaded copy leaves it at 12.3."""
    assert dst.shape == src.shape and dst.dtype == src.dtype, (dst.shape, src.shape)
    np.copyto(dst.view(torch.uint8).numpy(), src.view(torch.uint8).numpy())
