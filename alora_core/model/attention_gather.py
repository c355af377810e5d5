"""GPU: the short-query sequences of a step (decode tokens, intrinsic invocations, chunks over
several runs) attend in padded batches; per-sequence calls would cost more in launches than the
attention itself. Each batch gathers its sequences' keys into a transient [B, KVH, L, D] copy and
makes one SDPA call (matmuls for soft-capping or sinks) with a causal-window-and-padding mask; the
plan (slot and row indices, mask) is built once per step and shared by every layer:

    K pool [KVH, S, D] --index_select(slots [B*L])--> [B, KVH, L, D]  <-  Q [B, KVH, G*Tq, D]
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alora_core.model.attention_parts import binding, part_matmul, sink_weight, visible_keys
from alora_core.model.batch import SeqSpan

# Bounds on one gathered batch: key elements copied (B * L * KVH * D, as much again for V) and scores.
MAX_GATHER_ELEMENTS = 1 << 26
MAX_GATHER_SCORES = 1 << 28


@dataclass(frozen=True)
class GatherBatch:
    """B sequences padded to Tq query rows and L keys each (see the module docstring)."""

    slots: torch.Tensor  # [B*L] pool slots of each sequence's keys in order (padding: its first slot)
    q_rows: torch.Tensor  # [B*Tq] rows of the step's query (padding repeats the sequence's last row)
    # [B, 1, G*Tq, L] bool, True = visible: row g*Tq + i of a sequence sees the keys up to its position
    # (and within the window)
    mask: torch.Tensor
    real: torch.Tensor  # [n] indices into the padded B*Tq rows that are real queries
    out_rows: torch.Tensor  # [n] rows of the step's output they fill
    shape: tuple[int, int, int]  # (B, Tq, L)


def gather_plan(
    seqs: list[SeqSpan], groups: int, key_width: int, device: torch.device, window: int | None = None
) -> list[GatherBatch]:
    """Pack sequences (SeqSpan) into padded batches, shortest first, within the gather bounds.
    key_width = KVH * D (elements per key slot and layer)."""
    batches: list[list[SeqSpan]] = []
    for seq in sorted(seqs, key=lambda s: (s.query_len, s.context_len)):
        if batches:
            trial = [*batches[-1], seq]
            b, tq, keys = (
                len(trial),
                max(s.query_len for s in trial),
                _padded(max(s.context_len for s in trial)),
            )
            if b * keys * key_width <= MAX_GATHER_ELEMENTS and b * groups * tq * keys <= MAX_GATHER_SCORES:
                batches[-1] = trial
                continue
        batches.append([seq])
    return [_gather_batch(batch, groups, device, window) for batch in batches]


def _padded(n: int) -> int:
    return -(-n // 16) * 16  # keys padded to a multiple of 16: aligned rows for the fused SDPA kernels


def _gather_batch(seqs: list[SeqSpan], groups: int, device: torch.device, window: int | None) -> GatherBatch:
    b, tq, keys = len(seqs), max(s.query_len for s in seqs), _padded(max(s.context_len for s in seqs))
    window = binding(window, max(s.context_len for s in seqs))
    slots = torch.empty(b, keys, dtype=torch.long)
    for row, s in enumerate(seqs):
        slots[row] = s.kv_segments[0][0]
        slots[row, : s.context_len] = torch.cat([torch.arange(start, end) for start, end in s.kv_segments])
    t = torch.tensor([s.query_len for s in seqs])[:, None]
    offset = torch.tensor([s.context_len - s.query_len for s in seqs])[:, None]
    query = torch.minimum(torch.arange(tq)[None, :], t - 1)  # [B, Tq] padding repeats the last real row
    mask = visible_keys(offset + query, torch.arange(keys), window)  # [B, Tq, L]
    q_rows = torch.tensor([s.query_start for s in seqs])[:, None] + query
    real = (torch.arange(tq)[None, :] < t).flatten().nonzero().squeeze(1)
    out_rows = q_rows.flatten()[real]
    return GatherBatch(
        slots=slots.flatten().to(device),
        q_rows=q_rows.flatten().to(device),
        mask=mask.unsqueeze(1).repeat(1, 1, groups, 1).to(device),
        real=real.to(device),
        out_rows=out_rows.to(device),
        shape=(b, tq, keys),
    )


def attend_gathered(
    batch: GatherBatch,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """One padded batch: query [H, T, D] (the step's), caches [KVH, S, D]; fills out [T, H, D] at its rows.
    Soft-capping or sinks ([H]): the scores in matmuls instead of one SDPA call."""
    b, tq, keys = batch.shape
    num_kv_heads, _, dim = k_cache.shape
    heads = query.shape[0]
    k = k_cache.index_select(1, batch.slots).view(num_kv_heads, b, keys, dim).transpose(0, 1)
    v = v_cache.index_select(1, batch.slots).view(num_kv_heads, b, keys, dim).transpose(0, 1)
    q = query.index_select(1, batch.q_rows).view(num_kv_heads, heads // num_kv_heads, b, tq, dim)
    q = q.permute(2, 0, 1, 3, 4).reshape(b, num_kv_heads, -1, dim)  # [B, KVH, G*Tq, D]
    k, v = k.to(q.dtype), v.to(q.dtype)
    if softcap is None and sinks is None:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask, scale=scale)
    else:
        mask = torch.zeros(batch.mask.shape, dtype=torch.float32, device=q.device)
        o, lse = part_matmul(q, k, v, mask.masked_fill_(~batch.mask, float("-inf")), scale, softcap)
        if sinks is not None:
            o = o * sink_weight(lse, sinks, tq)
        o = o.to(q.dtype)
    o = o.view(b, num_kv_heads, -1, tq, dim).permute(0, 3, 1, 2, 4).reshape(b * tq, heads, dim)
    out.index_copy_(0, batch.out_rows, o.index_select(0, batch.real))
