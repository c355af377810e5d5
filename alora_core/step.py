"""Build one flat StepBatch from the running sequences, run the forward, sample.

    step(work = [(seq, start, end), ...]):
        rows       = concat(seq.tokens[start:end])            prefill chunks and single decode tokens
        positions  = concat(arange(start, end))
        slots      = concat(seq.table.slots(start, end))      where each row's K/V goes
        adapter    = slot if position >= activation_start else -1
        logits for the last row of every sequence that reached its end -> sample_rows -> seq.append
        (+ the rows of prompt positions a prompt_logprobs request scores -> score_prompt_rows)

The scheduler decides which sequences and positions go into each step; this module only runs it.
"""

import dataclasses
import weakref

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alora_core import threads
from alora_core.kvcache.block_pool import BlockPool
from alora_core.kvcache.block_table import BlockTable
from alora_core.model.batch import ForwardContext, LoraBatch, SeqSpan, StepBatch
from alora_core.model.step_buffers import StepBuffers
from alora_core.sampling import TokenLogprobs, apply_penalties, gather_logprobs, sample
from alora_core.sequence import PenaltyState, Sequence
from alora_core.structured.matcher import mask_rows

Work = tuple[Sequence, int, int]  # (sequence, first position to feed, end position)


def build_step_batch(
    work: list[Work], pool: BlockPool, device: torch.device, buffers: StepBuffers | None = None
) -> StepBatch:
    """The flat batch in plain Python lists (a few list extends per sequence: no tensor op per
    sequence), then one tensor per field."""
    bs = pool.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    adapter_index: list[int] = []
    spans, logits_rows = [], []
    adapted = False
    for seq, start, end in work:
        table = seq.table
        assert table.capacity >= end, "reserve KV blocks before building the step"
        row = len(ids)
        ids += _tokens(seq, start, end)
        positions += range(start, end)
        _extend_slots(slots, table.blocks, bs, start, end)
        plain = (
            end - start
            if seq.adapter_slot is None
            else min(max(seq.activation_start - start, 0), end - start)
        )
        adapter_index += [-1] * plain
        if plain < end - start:
            adapter_index += [seq.adapter_slot] * (end - start - plain)  # type: ignore[list-item]
            adapted = True
        spans.append(SeqSpan(row, end - start, end, segments(table, end)))
        logits_rows += [row + q - start for q in seq.prompt_rows(start, end)]
        if end == seq.num_tokens:
            logits_rows.append(row + end - start - 1)
    # the device buffers hold one logits row per sequence: a step that also scores prompt rows
    # (prompt_logprobs, rare) builds its batch directly (attention then takes the gather path)
    if buffers is not None and len(logits_rows) <= max(len(spans), buffers.max_seqs):
        # CUDA: every per-step tensor through one pinned buffer and one copy
        ints = tuple(torch.tensor(x, dtype=torch.long) for x in (ids, positions, slots, adapter_index))
        return buffers.upload(*ints, torch.tensor(logits_rows, dtype=torch.long), tuple(spans), pool.kv)
    index = torch.tensor(adapter_index, dtype=torch.long, device=device)
    return StepBatch(
        input_ids=torch.tensor(ids, dtype=torch.long, device=device),
        positions=torch.tensor(positions, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        seqs=tuple(spans),
        kv=pool.kv,
        lora=LoraBatch.from_index(index) if adapted else None,
        logits_rows=torch.tensor(logits_rows, dtype=torch.long, device=device),
    )


def _tokens(seq: Sequence, start: int, end: int) -> list[int]:
    """seq.tokens[start:end] without building the whole prompt + output list."""
    prompt, n = seq.prompt, len(seq.prompt)
    if end <= n:
        return prompt[start:end]
    if start >= n:
        return seq.output[start - n : end - n]
    return prompt[start:] + seq.output[: end - n]


def _extend_slots(slots: list[int], blocks: list[int], block_size: int, start: int, end: int) -> None:
    """slots += the pool slot of each position in [start, end), a range per block touched."""
    position = start
    while position < end:
        block, offset = divmod(position, block_size)
        stop = min(end, (block + 1) * block_size)
        first = blocks[block] * block_size + offset
        slots += range(first, first + stop - position)
        position = stop


# table -> (its blocks when last seen, the segments of those blocks): a decode step extends them
_SEGMENTS: "weakref.WeakKeyDictionary[BlockTable, tuple[tuple[int, ...], list[tuple[int, int]]]]" = (
    weakref.WeakKeyDictionary()
)


def segments(table: BlockTable, num_tokens: int) -> tuple[tuple[int, int], ...]:
    """table.segments(num_tokens) (pool slot runs covering positions 0..num_tokens-1), from the runs of
    the table's blocks as last seen when they are still its first blocks: a long sequence's runs are not
    rebuilt block by block every step."""
    bs = table.pool.block_size
    count = -(-num_tokens // bs)
    blocks = table.blocks
    seen, runs = _SEGMENTS.get(table, ((), []))
    if len(seen) > count or tuple(blocks[: len(seen)]) != seen:
        seen, runs = (), []
    if len(seen) < count:
        runs = list(runs)
        for block in blocks[len(seen) : count]:
            first = block * bs
            if runs and runs[-1][1] == first:
                runs[-1] = (runs[-1][0], first + bs)
            else:
                runs.append((first, first + bs))
        seen = tuple(blocks[:count])
        _SEGMENTS[table] = (seen, runs)
    if not runs:
        return ()
    last_start, last_end = runs[-1]
    return (*runs[:-1], (last_start, last_end - (count * bs - num_tokens)))


@torch.inference_mode()
def forward(model: nn.Module, ctx: ForwardContext, batch: StepBatch) -> torch.Tensor:
    """One forward pass of the HF model over the flat batch -> logits [len(logits_rows), V]
    (on CUDA, a replay of the step's captured graph where one fits: model/cuda_graphs.py)."""
    if ctx.graphs is not None and (logits := ctx.graphs.run(batch)) is not None:
        return logits
    return forward_eager(model, ctx, batch)


@torch.inference_mode()
def forward_eager(model: nn.Module, ctx: ForwardContext, batch: StepBatch) -> torch.Tensor:
    if ctx.cpu_kernels is not None and batch.cpu_kernels is None:
        batch = dataclasses.replace(batch, cpu_kernels=ctx.cpu_kernels, kernel_prefill=ctx.kernel_prefill)
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
    threads.prepare_current_thread()  # the scheduler thread's thread counts and pinning, once
    # the logits rows, in build_step_batch's order: each sequence's scored prompt rows, then its last
    scored: list[tuple[Sequence, range, int]] = []  # (seq, positions, first logits row)
    sampling: list[Sequence] = []
    sample_rows_at: list[int] = []
    n = 0
    for seq, start, end in work:
        positions = seq.prompt_rows(start, end)
        if positions:
            scored.append((seq, positions, n))
            n += len(positions)
        if end == seq.num_tokens:
            sampling.append(seq)
            sample_rows_at.append(n)
            n += 1
    batch = build_step_batch(work, pool, device, ctx.buffers)
    logits = forward(model, ctx, batch)
    assert logits.shape[0] == n
    for seq, _, end in work:
        seq.table.num_tokens = end
    if scored:
        score_prompt_rows(logits, scored)
    if sampling:
        rows = (
            logits if len(sample_rows_at) == n else logits[torch.tensor(sample_rows_at, device=logits.device)]
        )
        sample_rows(rows, sampling, tokenizer)


@torch.inference_mode()
def score_prompt_rows(logits: torch.Tensor, scored: list[tuple[Sequence, range, int]]) -> None:
    """prompt_logprobs: row r at position q scores prompt token q + 1 (raw log-softmax, no sampling
    adjustments, as vLLM). logits [R, V]; one log_softmax / gather / topk over every scored row."""
    rows = torch.cat([torch.arange(first, first + len(q)) for _, q, first in scored]).to(logits.device)
    targets = torch.tensor(
        [seq.prompt[p + 1] for seq, q, _ in scored for p in q], dtype=torch.long, device=logits.device
    )
    k = max(seq.params.prompt_logprobs or 0 for seq, _, _ in scored)
    entries = gather_logprobs(torch.log_softmax(logits[rows].float(), dim=-1), targets, k)
    at = 0
    for seq, q, _ in scored:
        k_seq = seq.params.prompt_logprobs or 0
        seq.prompt_logprobs += [_top(e, k_seq) for e in entries[at : at + len(q)]]
        at += len(q)


@torch.inference_mode()
def sample_rows(logits: torch.Tensor, seqs: list[Sequence], tokenizer: PreTrainedTokenizerBase) -> None:
    """logits [B, V]: the last position of each of B sequences -> each one's next token, appended.

        raw = logits (float32); rows with an output constraint: disallowed tokens -> -inf
        logprobs = log_softmax(raw)              rows that asked for logprobs only
        adjusted = penalties(bias(min_tokens(raw)))   rows that set any of them only, in place
        constrained row with no finite logit left -> that sequence ends, finish_reason "error"
        token = argmax(adjusted) for greedy rows (one batched argmax), else sample(row, generator)
        constrained rows: the matcher accepts the token (unless it ends the sequence)
    Per-row Python work is a few tensor ops on [V], never a loop over the vocabulary."""
    logits = logits.float()
    for seq, row in zip(seqs, logits, strict=True):
        if seq.params.return_logits:
            seq.logits.append(row.detach().clone().cpu())
        if seq.params.n > 1 and not seq.output:  # its other choices sample from this row (scheduler)
            seq.fork_logits = row.detach().clone()
    constrained = [i for i, seq in enumerate(seqs) if seq.grammar is not None]
    errors = _mask(logits, seqs, constrained) if constrained else {}
    wants_logprobs = [i for i, seq in enumerate(seqs) if seq.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[wants_logprobs], dim=-1) if wants_logprobs else None
    _adjust(logits, seqs)
    if constrained:  # a dead end: nothing allowed (e.g. min_tokens holds back the grammar's end)
        ends = logits[constrained].amax(dim=-1) == float("-inf")
        for i, dead in zip(constrained, ends.tolist(), strict=True):
            if dead and i not in errors:
                errors[i] = "the output constraint allows no next token"
    live = [i for i in range(len(seqs)) if i not in errors]
    tokens = [0] * len(seqs)
    if live:
        rows = logits if len(live) == len(seqs) else logits[live]
        for i, token in zip(live, _choose(rows, [seqs[i] for i in live]), strict=True):
            tokens[i] = token
    entries = {}
    if raw_logprobs is not None:
        k = max(seqs[i].params.logprobs or 0 for i in wants_logprobs)
        chosen = torch.tensor([tokens[i] for i in wants_logprobs], device=logits.device)
        entries = dict(zip(wants_logprobs, gather_logprobs(raw_logprobs, chosen, k), strict=True))
    for i, (seq, token) in enumerate(zip(seqs, tokens, strict=True)):
        if i in errors:
            seq.fail(errors[i])
            continue
        if i in entries:
            seq.logprobs.append(_top(entries[i], seq.params.logprobs or 0))
        if seq.penalties is not None:
            seq.penalties.output_counts[token] += 1
        seq.append(token, tokenizer)
        if seq.grammar is not None and not (seq.finish_reason == "stop" and token in seq.stop_ids):
            error = seq.grammar.accept(token)
            if error is not None:  # the mask allowed it, so this is a matcher bug: never a wrong answer
                seq.fail(error)


def _mask(logits: torch.Tensor, seqs: list[Sequence], constrained: list[int]) -> dict[int, str]:
    """Apply the grammar masks of the constrained rows in place; {row: error} of broken matchers."""
    states = []
    for i in constrained:
        grammar = seqs[i].grammar
        assert grammar is not None and grammar.consumed == len(seqs[i].output), "matcher out of step"
        states.append(grammar)
    stop_ids = [seqs[i].params.stop_token_ids for i in constrained]
    errors = mask_rows(logits, constrained, states, stop_ids)
    return {i: e for i, e in zip(constrained, errors, strict=True) if e is not None}


def _adjust(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    """min_tokens, logit_bias, then penalties (vLLM's order), in place on the rows that set them."""
    penalized: list[int] = []
    for i, seq in enumerate(seqs):
        p = seq.params
        if not p.adjusts_logits:
            continue
        row = logits[i]
        if len(seq.output) < p.min_tokens and seq.stop_ids:
            row[list(seq.stop_ids)] = float("-inf")
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=row.device)
            row.index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=row.device))
        if p.penalized:
            if seq.penalties is None:
                seq.penalties = PenaltyState.build(seq.prompt, seq.output, row.numel(), row.device)
            penalized.append(i)
    if penalized:
        index = torch.tensor(penalized, device=logits.device)
        states = [seqs[i].penalties for i in penalized]
        rows = logits[index]
        apply_penalties(
            rows,
            torch.stack([s.prompt_mask for s in states if s is not None]),
            torch.stack([s.output_counts for s in states if s is not None]),
            *(
                torch.tensor([getattr(seqs[i].params, name) for i in penalized], device=logits.device)
                for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            ),
        )
        logits[index] = rows


def _choose(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    greedy = [i for i, seq in enumerate(seqs) if seq.params.greedy]
    tokens = [0] * len(seqs)
    if greedy:
        rows = logits if len(greedy) == len(seqs) else logits[greedy]
        for i, token in zip(greedy, rows.argmax(dim=-1).tolist(), strict=True):
            tokens[i] = token
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            tokens[i] = sample(logits[i], seq.params, seq.generator)
    return tokens


def _top(entry: TokenLogprobs, k: int) -> TokenLogprobs:
    return entry if len(entry.top) == k else TokenLogprobs(entry.logprob, entry.rank, entry.top[:k])
