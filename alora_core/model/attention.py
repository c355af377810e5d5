"""Paged attention backend, registered with transformers' AttentionInterface as "alora_paged".

The HF attention module hands us this step's q/k/v (RoPE applied) for the flat batch. We write the
new K/V into the pool at `slot_mapping`, then attend each sequence over its KV where it lies:

    pool kv[layer, 0|1]: [KVH, S, D]      a sequence = ordered slot ranges (segments) of the pool
    q: [H, t, D]  ->  grouped [KVH, G*t, D]  (G = H / KVH, no K/V repeat)
    scores = concat_seg(q @ K_seg^T)  ->  causal mask  ->  softmax  ->  sum_seg(P_seg @ V_seg)

No sequence's cache is ever copied: segments are views of the pool. Sequences whose KV starts at
the same pool slots (intrinsic forks of one conversation) share those keys physically, so their
queries meet the shared prefix in one matmul and it is read from memory once per step:

    shared prefix K [KVH, n, D]  <-  Q of fork 1 | fork 2 | fork 3   (rows stacked)

A single-segment sequence with many queries (prefill) goes through torch SDPA on the same views.
"""

from collections import defaultdict

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from alora_core.model.batch import StepBatch

ATTN_IMPLEMENTATION = "alora_paged"

# Above this many query rows a contiguous sequence uses SDPA (fused, no score matrix in memory).
SDPA_MIN_QUERIES = 16
# Bound on the score matrix of the grouped path (elements); queries are processed in chunks below it.
MAX_SCORE_ELEMENTS = 1 << 24

Segments = tuple[tuple[int, int], ...]


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    step_batch: StepBatch | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key, value: [1, KVH, T, D]. Returns ([1, T, H, D], None)."""
    if step_batch is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs the step_batch forward kwarg")
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache = step_batch.kv[layer, 0]  # [KVH, S, D]
    v_cache = step_batch.kv[layer, 1]
    k_cache.index_copy_(1, step_batch.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, step_batch.slot_mapping, value[0].to(v_cache.dtype))

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    num_heads = query.shape[1]
    out = torch.empty(query.shape[2], num_heads, query.shape[3], dtype=query.dtype, device=query.device)
    by_first_slot: dict[int, list[tuple[slice, torch.Tensor, Segments, int]]] = defaultdict(list)
    for seq in step_batch.seqs:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        q = query[0, :, rows]  # [H, t, D]
        q_offset = seq.context_len - seq.query_len
        if _small(num_heads, seq.query_len, seq.context_len) and not _use_sdpa(
            seq.kv_segments, seq.query_len
        ):
            by_first_slot[seq.kv_segments[0][0]].append((rows, q, seq.kv_segments, q_offset))
        else:
            out[rows] = attend(q, k_cache, v_cache, seq.kv_segments, q_offset, scale).transpose(0, 1)
    for items in by_first_slot.values():
        outs = _grouped_attention([(q, segs, off) for _, q, segs, off in items], k_cache, v_cache, scale)
        for (rows, _, _, _), o in zip(items, outs, strict=True):
            out[rows] = o.transpose(0, 1)
    return out.unsqueeze(0), None


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: Segments,
    q_offset: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q ([H, t, D], positions q_offset..q_offset+t-1) over the keys at positions
    0..q_offset+t-1, stored in `segments` of the caches ([KVH, S, D]); the segments cover exactly
    q_offset+t slots. Returns [H, t, D]."""
    num_heads, t, _head_dim = q.shape
    if _use_sdpa(segments, t):
        start, end = segments[0]
        k = k_cache[:, start:end].unsqueeze(0)  # [1, KVH, n, D] view
        v = v_cache[:, start:end].unsqueeze(0)
        if q_offset == 0:
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0), k, v, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            mask = torch.ones(t, end - start, dtype=torch.bool, device=q.device).tril(q_offset)
            o = F.scaled_dot_product_attention(
                q.unsqueeze(0), k, v, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return o[0]
    chunk = max(1, MAX_SCORE_ELEMENTS // (num_heads * (q_offset + t)))
    parts = [
        _grouped_attention([(q[:, i : i + chunk], segments, q_offset + i)], k_cache, v_cache, scale)[0]
        for i in range(0, t, chunk)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _use_sdpa(segments: Segments, t: int) -> bool:
    return len(segments) == 1 and t >= SDPA_MIN_QUERIES


def _small(num_heads: int, t: int, context_len: int) -> bool:
    return num_heads * t * context_len <= MAX_SCORE_ELEMENTS


def _grouped_attention(
    items: list[tuple[torch.Tensor, Segments, int]],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
) -> list[torch.Tensor]:
    """Attention of several sequences (q [H, t, D], segments, q_offset) whose segments all start at the
    same pool slot: the keys they share there are multiplied with all their queries at once.

    Softmax over the parts (shared run, then each sequence's own segments) without concatenating
    them: m = max over parts, out = sum_p exp(S_p - m) @ V_p / sum_p rowsum(exp(S_p - m))."""
    num_kv_heads = k_cache.shape[0]
    start = items[0][1][0][0]
    # the shared run: common to every sequence's first segment and before every sequence's queries
    shared = min(min(segs[0][1] for _, segs, _ in items) - start, min(off for _, _, off in items))
    k_shared = k_cache[:, start : start + shared]  # [KVH, shared, D] view
    v_shared = v_cache[:, start : start + shared]
    # q: [H, t, D] -> [KVH, G*t, D]; row g*t + i of kv-head h is head h*G + g at query i (HF repeat_kv order).
    qgs = [q.reshape(num_kv_heads, -1, q.shape[-1]) for q, _, _ in items]
    q_all = qgs[0] if len(qgs) == 1 else torch.cat(qgs, dim=1)
    shared_scores = (q_all @ k_shared.transpose(1, 2)).float() * scale  # [KVH, rows, shared]

    own_parts, row = [], 0
    for (q, segments, q_offset), qg in zip(items, qgs, strict=True):
        rows, t = qg.shape[1], q.shape[1]
        # query i sits at position q_offset + i and sees keys 0..q_offset+i; the shared run is all visible
        parts, key = [], shared
        for s, e in _skip(segments, shared):
            scores = (qg @ k_cache[:, s:e].transpose(1, 2)).float() * scale  # [KVH, G*t, e - s]
            if key + (e - s) - 1 > q_offset:  # some of these keys are after some queries
                positions = torch.arange(key, key + e - s, device=q.device)
                allowed = positions[None, :] <= q_offset + torch.arange(t, device=q.device)[:, None]
                scores = scores.masked_fill(~allowed.repeat(rows // t, 1), float("-inf"))
            parts.append((scores, v_cache[:, s:e]))
            key += e - s
        own_parts.append((shared_scores[:, row : row + rows], parts))
        row += rows

    shared_exps, totals, outs = [], [], []
    for sh, parts in own_parts:
        m = sh.amax(dim=-1, keepdim=True) if sh.shape[-1] else None
        for scores, _ in parts:
            pm = scores.amax(dim=-1, keepdim=True)
            m = pm if m is None else torch.maximum(m, pm)
        assert m is not None
        e_shared = torch.exp(sh - m)
        total = e_shared.sum(dim=-1, keepdim=True)
        out = None
        for scores, v in parts:
            exps = torch.exp(scores - m)
            total = total + exps.sum(dim=-1, keepdim=True)
            pv = exps.to(v.dtype) @ v
            out = pv if out is None else out + pv
        shared_exps.append(e_shared)
        totals.append(total)
        outs.append(out)
    e_all = shared_exps[0] if len(shared_exps) == 1 else torch.cat(shared_exps, dim=1)
    shared_out = e_all.to(v_shared.dtype) @ v_shared  # the shared prefix's values, read once
    result, row = [], 0
    for (q, _, _), out, total in zip(items, outs, totals, strict=True):
        rows = total.shape[1]
        o = shared_out[:, row : row + rows] if out is None else shared_out[:, row : row + rows] + out
        result.append((o.float() / total).reshape(q.shape).to(q.dtype))
        row += rows
    return result


def _skip(segments: Segments, n: int) -> Segments:
    """The segments without their first n slots."""
    rest: list[tuple[int, int]] = []
    for s, e in segments:
        if n >= e - s:
            n -= e - s
            continue
        rest.append((s + n, e))
        n = 0
    return tuple(rest)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
