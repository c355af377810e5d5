"""Block pool and block tables: allocation, sharing, copy-on-write, segments, no leaks."""

import pytest
import torch

from alora_core.errors import CapacityError
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.model.loader import ModelShape

SHAPE = ModelShape(num_layers=2, num_kv_heads=2, head_dim=4, vocab_size=10, max_position_embeddings=1000)
BS = 4


@pytest.fixture
def pool() -> BlockPool:
    return BlockPool(SHAPE, num_blocks=16, block_size=BS, dtype=torch.float32, device=torch.device("cpu"))


def filled(pool: BlockPool, n: int, value_offset: float = 0.0) -> BlockTable:
    table = BlockTable(pool)
    table.reserve(n)
    slots = table.slots(0, n)
    pool.kv[:, :, :, slots] = torch.arange(n, dtype=torch.float32)[None, None, None, :, None] + value_offset
    table.num_tokens = n
    return table


def values(pool: BlockPool, table: BlockTable) -> torch.Tensor:
    return pool.kv[0, 0, 0, table.slots(0, table.num_tokens), 0]


def test_growing_table_stays_one_contiguous_segment(pool: BlockPool) -> None:
    table = BlockTable(pool)
    for n in range(1, 30):
        table.reserve(n)
    assert table.segments(29) == ((table.blocks[0] * BS, table.blocks[0] * BS + 29),)
    assert table.slots(0, 29).tolist() == list(range(table.blocks[0] * BS, table.blocks[0] * BS + 29))


def test_segments_cover_exactly_the_positions(pool: BlockPool) -> None:
    held = pool.allocate(16)  # the whole pool, then free holes: [1], later [4] and [6, 7]
    pool.release([held[1]])
    table = BlockTable(pool)
    table.reserve(BS)  # block 1, the only free one
    pool.release([held[4], held[6], held[7]])
    table.reserve(3 * BS)  # block 2 is taken: a fresh run of 2 in the largest gap, [6, 8)
    assert table.blocks == [1, 6, 7]
    assert table.segments(9) == ((4, 8), (24, 29))
    slots = torch.cat([torch.arange(s, e) for s, e in table.segments(9)])
    assert slots.tolist() == table.slots(0, 9).tolist()


def test_fresh_runs_start_mid_gap_so_interleaved_growth_stays_contiguous(pool: BlockPool) -> None:
    a, b = BlockTable(pool), BlockTable(pool)
    a.reserve(2 * BS)  # blocks 0, 1: the gap starts the pool
    b.reserve(2 * BS)  # blocks 8, 9: the free gap [2, 16) after half of the 12 blocks b does not need
    for n in range(3, 8):  # both grow a block at a time, alternately
        a.reserve(n * BS)
        b.reserve(n * BS)
    assert a.segments(7 * BS) == ((0, 7 * BS),)
    assert b.segments(7 * BS) == ((8 * BS, 15 * BS),)


def test_fork_shares_full_blocks_and_copies_the_partial_one(pool: BlockPool) -> None:
    parent = filled(pool, 10)  # blocks: full, full, 2/4
    free = pool.num_free
    child = parent.fork(10)
    assert child.blocks[:2] == parent.blocks[:2]
    assert child.blocks[2] != parent.blocks[2]
    assert pool.num_free == free - 1
    assert [pool.ref_count(b) for b in parent.blocks] == [2, 2, 1]
    assert torch.equal(values(pool, child), values(pool, parent))

    # the child writes its own positions without touching the parent
    child.reserve(14)
    pool.kv[:, :, :, child.slots(10, 14)] = -1.0
    child.num_tokens = 14
    assert torch.equal(values(pool, parent), torch.arange(10, dtype=torch.float32))

    child.free()
    assert [pool.ref_count(b) for b in parent.blocks] == [1, 1, 1]
    assert pool.num_free == free


def test_fork_of_a_prefix(pool: BlockPool) -> None:
    parent = filled(pool, 12)
    child = parent.fork(6)
    assert child.num_tokens == 6 and len(child.blocks) == 2
    assert child.blocks[0] == parent.blocks[0]
    assert torch.equal(values(pool, child), torch.arange(6, dtype=torch.float32))


def test_truncate_into_a_shared_block_copies_it_first(pool: BlockPool) -> None:
    parent = filled(pool, 12)
    child = parent.fork(12)  # shares all three full blocks
    parent.truncate(6)  # the parent's new last block (2/4 used) is still shared with the child
    assert parent.blocks[1] != child.blocks[1]
    parent.reserve(8)
    pool.kv[:, :, :, parent.slots(6, 8)] = -5.0
    parent.num_tokens = 8
    assert torch.equal(values(pool, child), torch.arange(12, dtype=torch.float32))
    assert values(pool, parent)[:6].tolist() == list(range(6))


def test_capacity_error_leaves_table_unchanged(pool: BlockPool) -> None:
    table = filled(pool, 8)
    blocks = list(table.blocks)
    with pytest.raises(CapacityError):
        table.reserve(100 * BS)
    assert table.blocks == blocks
    table.free()
    assert pool.num_free == pool.num_blocks


def test_many_forks_and_frees_do_not_leak(pool: BlockPool) -> None:
    parent = filled(pool, 13)
    for i in range(50):
        child = parent.fork(i % 13 + 1)
        child.reserve(child.num_tokens + 5)
        child.free()
    parent.free()
    assert pool.num_free == pool.num_blocks
