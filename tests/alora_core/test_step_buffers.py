"""The device-resident step metadata (model/step_buffers.py) against the plain StepBatch of the same work.

On CPU the "device" buffer is a second host buffer; the CUDA run (ALORA_TEST_DEVICE=cuda or a GPU
machine) checks the pinned buffer and its copy. The oracle for the block tables is the sequences' own
BlockTable.blocks, which the buffers never see (they rebuild them from the slot segments).
"""

import pytest
import torch

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.model.loader import ModelShape
from alora_core.model.step_buffers import GPU_ATTENTION_ENV, StepBuffers, paged_kernel_available
from alora_core.sampling import SamplingParams
from alora_core.sequence import Sequence
from alora_core.step import Work, build_step_batch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BS = 4


def work_of_a_mixed_step() -> tuple[BlockPool, list[Work]]:
    """A prefill chunk over a cached prefix, a decode, an aLoRA fork of the same conversation (shared
    blocks, adapter from its activation), and a LoRA prefill, on a pool where runs are broken."""
    pool = BlockPool(ModelShape(1, 1, 8, 100, 4096), 32, BS, torch.float32, torch.device("cpu"))
    pool.allocate(3)  # taken by someone else: the next tables start after them
    conv = BlockTable(pool)
    conv.reserve(13)
    conv.num_tokens = 13
    pool.allocate(2)  # the conversation's next block is not adjacent
    fork = conv.fork(13)
    params = SamplingParams(max_tokens=4)

    def seq(table: BlockTable, n: int, slot: int | None = None, start: int = 1 << 62) -> Sequence:
        table.reserve(n)
        return Sequence(list(range(3, 3 + n)), table, params, 4096, (0,), slot, start)

    chunk, decode = seq(BlockTable(pool), 22), seq(conv, 19)
    alora, lora = seq(fork, 16, slot=2, start=14), seq(BlockTable(pool), 6, slot=5, start=0)
    return pool, [(chunk, 10, 18), (decode, 18, 19), (alora, 13, 16), (lora, 0, 6)]


def test_upload_gives_the_plain_batch_and_the_block_tables() -> None:
    pool, work = work_of_a_mixed_step()
    plain = build_step_batch(work, pool, DEVICE)
    buffers = StepBuffers(max_tokens=32, max_seqs=6, max_blocks=8, block_size=BS, device=DEVICE)
    batch = build_step_batch(work, pool, DEVICE, buffers)

    for name in ("input_ids", "positions", "slot_mapping", "logits_rows"):
        assert torch.equal(getattr(batch, name), getattr(plain, name)), name
    assert batch.seqs == plain.seqs and batch.kv is plain.kv
    assert batch.lora is not None and plain.lora is not None
    assert torch.equal(batch.lora.adapter_index, plain.lora.adapter_index)
    assert batch.lora.rows_by_slot.keys() == plain.lora.rows_by_slot.keys()

    step = batch.device_step
    assert step is not None and plain.device_step is None
    assert (step.num_seqs, step.num_tokens, step.max_query_len, step.max_seq_len) == (4, 18, 8, 19)
    for row, (seq, start, end) in enumerate(work):
        blocks = seq.table.blocks[: -(-end // BS)]
        assert step.block_tables[row, : len(blocks)].tolist() == blocks
        assert int(step.seq_lens[row]) == end
        assert int(step.query_start[row + 1] - step.query_start[row]) == end - start
    fork_blocks = step.block_tables[2, :3].tolist()
    assert fork_blocks[:3] == work[1][0].table.blocks[:3]  # the fork reads the conversation's full blocks


def test_one_buffer_one_copy_and_inert_padding(monkeypatch: pytest.MonkeyPatch) -> None:
    pool, work = work_of_a_mixed_step()
    buffers = StepBuffers(max_tokens=32, max_seqs=6, max_blocks=8, block_size=BS, device=DEVICE)
    copies: list[int] = []
    real_copy = torch.Tensor.copy_

    def counting_copy(self: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
        if self.data_ptr() == buffers.device.data_ptr():
            copies.append(src.numel())
        return real_copy(self, src, non_blocking=non_blocking)

    monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
    buffers.device.fill_(0x7F)  # a stale byte pattern everywhere the step does not write
    batch = build_step_batch(work, pool, DEVICE, buffers)
    monkeypatch.undo()

    assert len(copies) == 1, "one host-to-device copy per step"
    storage = buffers.device.untyped_storage().data_ptr()
    step = batch.device_step
    assert step is not None
    for t in (batch.input_ids, batch.positions, batch.slot_mapping, batch.logits_rows, step.block_tables):
        assert t.untyped_storage().data_ptr() == storage and t.device.type == DEVICE.type
    assert batch.lora is not None and batch.lora.adapter_index.untyped_storage().data_ptr() == storage
    assert step.block_tables.dtype == step.seq_lens.dtype == step.query_start.dtype == torch.int32
    assert step.block_tables.shape == (6, 8)

    # padding past the step's own entries: what a fixed-shape launch would read
    views = buffers._device_views
    assert views["slot_mapping"][18:].tolist() == [-1] * 14
    assert views["adapter_index"][18:].tolist() == [-1] * 14
    assert step.seq_lens[4:].tolist() == [0, 0] and step.query_start[4:].tolist() == [18, 18, 18]
    assert copies[0] < buffers.device.numel()  # rows past the step's sequences are not copied


def test_buffers_grow_for_a_step_larger_than_their_sizes() -> None:
    pool, work = work_of_a_mixed_step()
    buffers = StepBuffers(max_tokens=4, max_seqs=1, max_blocks=2, block_size=BS, device=DEVICE)
    batch = build_step_batch(work, pool, DEVICE, buffers)
    assert buffers.shape == (18, 4, 5)
    assert torch.equal(batch.slot_mapping, build_step_batch(work, pool, DEVICE).slot_mapping)
    again = build_step_batch(work[:2], pool, DEVICE, buffers)  # smaller: no growth, same views reused
    assert buffers.shape == (18, 4, 5) and again.device_step is not None and again.device_step.num_seqs == 2


def test_the_kernel_serves_cuda_only_and_the_env_var_picks_the_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert not paged_kernel_available(torch.device("cpu"))
    monkeypatch.setenv(GPU_ATTENTION_ENV, "gather")
    assert not paged_kernel_available(torch.device("cuda"))
    monkeypatch.setenv(GPU_ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="'triton' or 'gather'"):
        paged_kernel_available(torch.device("cuda"))
