"""The flat StepBatch built in plain Python lists (step.build_step_batch) against the direct definition
(`reference_batch`: one arange / table lookup per sequence, the block table's own segments), over random
steps of a random life of block tables: growth, forks, truncation, copy-on-write, freeing."""

import random

import torch

from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.model.loader import ModelShape
from alora_core.sampling import SamplingParams
from alora_core.sequence import NO_ACTIVATION, Sequence
from alora_core.step import Work, build_step_batch, segments

BS = 4


def reference_batch(work: list[Work]) -> dict[str, object]:
    """What each field means, computed the direct way."""
    ids, positions, slots, adapter, spans, logits_rows = [], [], [], [], [], []
    for seq, start, end in work:
        row = len(ids)
        ids += seq.tokens[start:end]
        pos = torch.arange(start, end)
        positions.append(pos)
        slots.append(seq.table.slots(start, end))
        slot = -1 if seq.adapter_slot is None else seq.adapter_slot
        adapter.append(torch.where(pos >= seq.activation_start, slot, -1))
        spans.append((row, end - start, end, seq.table.segments(end)))
        if end == seq.num_tokens:
            logits_rows.append(row + end - start - 1)
    return {
        "input_ids": torch.tensor(ids),
        "positions": torch.cat(positions),
        "slot_mapping": torch.cat(slots),
        "adapter_index": torch.cat(adapter),
        "spans": spans,
        "logits_rows": torch.tensor(logits_rows, dtype=torch.long),
    }


def test_flat_batch_equals_the_direct_definition_over_random_steps() -> None:
    rng = random.Random(0)
    pool = BlockPool(ModelShape(1, 1, 8, 100, 4096), 400, BS, torch.float32, torch.device("cpu"))
    params = SamplingParams(max_tokens=4)
    seqs: list[Sequence] = []
    for step in range(60):
        # the life of the tables: new ones, forks of existing ones, growth, truncation, frees
        action = rng.random()
        if action < 0.3 or not seqs:
            table = BlockTable(pool)
            table.reserve(n := rng.randint(1, 40))
            table.num_tokens = rng.randint(0, n - 1)
            prompt = [rng.randint(3, 99) for _ in range(n)]
            slot = rng.choice([None, 1, 2])
            activation = rng.randint(0, n) if slot is not None else NO_ACTIVATION
            seqs.append(Sequence(prompt, table, params, 4096, (0,), slot, activation))
        elif action < 0.5:
            parent = rng.choice(seqs)
            if parent.table.num_tokens:
                child = parent.table.fork(rng.randint(1, parent.table.num_tokens))
                child.reserve(child.num_tokens + 3)
                prompt = [*parent.tokens[: child.num_tokens], 7, 8, 9]
                seqs.append(Sequence(prompt, child, params, 4096, (0,), 2, child.num_tokens))
        elif action < 0.6:
            victim = rng.choice(seqs)
            if victim.table.num_tokens > 1:
                victim.table.truncate(rng.randint(1, victim.table.num_tokens - 1))
        elif action < 0.7 and len(seqs) > 1:
            gone = seqs.pop(rng.randrange(len(seqs)))
            pool.release(gone.table.blocks)
        for seq in seqs:  # sampled tokens grow some outputs
            if seq.table.num_tokens == seq.num_tokens and rng.random() < 0.5:
                seq.output.append(rng.randint(3, 99))
                seq.table.reserve(seq.num_tokens)
        work: list[Work] = []
        for seq in rng.sample(seqs, k=rng.randint(1, len(seqs))):
            start = seq.table.num_tokens
            if start < seq.num_tokens:
                seq.table.reserve(seq.num_tokens)
                work.append((seq, start, rng.randint(start + 1, seq.num_tokens)))
        if not work:
            continue

        batch = build_step_batch(work, pool, torch.device("cpu"))

        expected = reference_batch(work)
        for name in ("input_ids", "positions", "slot_mapping", "logits_rows"):
            assert torch.equal(getattr(batch, name), expected[name]), (step, name)
        index = batch.lora.adapter_index if batch.lora is not None else torch.full_like(batch.positions, -1)
        assert torch.equal(index, expected["adapter_index"]), step
        assert [(s.query_start, s.query_len, s.context_len, s.kv_segments) for s in batch.seqs] == expected[
            "spans"
        ], step
        for seq, _, end in work:
            seq.table.num_tokens = end  # the step wrote them


def test_segments_follow_a_table_that_changes_under_them() -> None:
    """The remembered runs of a table are dropped when its first blocks change (truncate + regrow,
    copy-on-write of a shared last block), never served stale."""
    pool = BlockPool(ModelShape(1, 1, 8, 100, 4096), 64, BS, torch.float32, torch.device("cpu"))
    table = BlockTable(pool)
    table.reserve(30)
    table.num_tokens = 30
    assert segments(table, 30) == table.segments(30)
    fork = table.fork(30)  # shares 7 full blocks, copies the partial one
    table.truncate(13)  # into a shared block: copied first
    pool.allocate(5)  # regrowth lands elsewhere
    table.reserve(40)
    for n in (1, 13, 14, 29, 40):
        assert segments(table, n) == table.segments(n), n
    assert segments(fork, 30) == fork.segments(30)
