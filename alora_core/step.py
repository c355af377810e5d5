"""Build one flat StepBatch from the running sequences, run the forward, sample.

    step(work = [(seq, start, end), ...]):
        rows       = concat(seq.tokens[start:end])            prefill chunks and single decode tokens
        positions  = concat(arange(start, end))
        slots      = concat(seq.table.slots(start, end))      where each row's K/V goes
        adapter    = slot if position >= activation_start else -1
        logits for the last row of every sequence that reached its end -> sample -> seq.append

The scheduler decides which sequences and positions go into each step; this module only runs it.
"""

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alora_core.kvcache.block_pool import BlockPool
from alora_core.model.batch import ForwardContext, LoraBatch, SeqSpan, StepBatch
from alora_core.model.step_buffers import StepBuffers
from alora_core.sampling import sample
from alora_core.sequence import Sequence

Work = tuple[Sequence, int, int]  # (sequence, first position to feed, end position)


def build_step_batch(
    work: list[Work], pool: BlockPool, device: torch.device, buffers: StepBuffers | None = None
) -> StepBatch:
    ids: list[int] = []
    positions, slots, adapter_index, spans, logits_rows = [], [], [], [], []
    for seq, start, end in work:
        assert seq.table.capacity >= end, "reserve KV blocks before building the step"
        row = len(ids)
        ids += seq.tokens[start:end]
        pos = torch.arange(start, end)
        positions.append(pos)
        slots.append(seq.table.slots(start, end))
        slot = -1 if seq.adapter_slot is None else seq.adapter_slot
        adapter_index.append(torch.where(pos >= seq.activation_start, slot, -1))
        spans.append(SeqSpan(row, end - start, end, seq.table.segments(end)))
        if end == seq.num_tokens:
            logits_rows.append(row + end - start - 1)
    if buffers is not None:  # CUDA: every per-step tensor through one pinned buffer and one copy
        ints = (
            torch.tensor(ids, dtype=torch.long),
            torch.cat(positions),
            torch.cat(slots),
            torch.cat(adapter_index),
        )
        return buffers.upload(*ints, torch.tensor(logits_rows, dtype=torch.long), tuple(spans), pool.kv)
    index = torch.cat(adapter_index).to(device)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slots).to(device),
        seqs=tuple(spans),
        kv=pool.kv,
        lora=LoraBatch.from_index(index),
        logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
    )


@torch.inference_mode()
def forward(model: nn.Module, ctx: ForwardContext, batch: StepBatch) -> torch.Tensor:
    """One forward pass of the HF model over the flat batch -> logits [len(logits_rows), V]."""
    with ctx.bind(batch):
        out = model(
            input_ids=batch.input_ids.unsqueeze(0),
            position_ids=batch.positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=batch.logits_rows,
            step_batch=batch,
        )
    return out.logits[0]


def run_step(
    work: list[Work],
    model: nn.Module,
    ctx: ForwardContext,
    pool: BlockPool,
    tokenizer: PreTrainedTokenizerBase,
    device: torch.device,
) -> None:
    """Feed each sequence's [start, end) and sample the next token of those that reached their end."""
    batch = build_step_batch(work, pool, device, ctx.buffers)
    logits = forward(model, ctx, batch)
    sampling = [seq for seq, _, end in work if end == seq.num_tokens]
    for seq, _, end in work:
        seq.table.num_tokens = end
    for seq, row_logits in zip(sampling, logits, strict=True):
        if seq.params.return_logits:
            seq.logits.append(row_logits.float().cpu())
        seq.append(sample(row_logits, seq.params, seq.generator), tokenizer)
