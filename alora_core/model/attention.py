"""Paged attention backend, registered with transformers' AttentionInterface as "alora_paged".

The HF attention module hands us this step's q/k/v (RoPE applied) for the flat batch. We write the
new K/V into the pool at `slot_mapping`, then attend each sequence over its KV where it lies:

    pool kv[layer, 0|1]: [KVH, S, D]      a sequence = ordered slot ranges (segments) of the pool
    q: [H, t, D]  ->  grouped [KVH, G*t, D]  (G = H / KVH, no K/V repeat)
    scores = concat_seg(q @ K_seg^T)  ->  causal mask  ->  softmax  ->  sum_seg(P_seg @ V_seg)

No sequence's cache is ever copied: segments are views of the pool. A single-segment sequence with
many queries (prefill) goes through torch SDPA on the same views; everything else (decode, forks
whose blocks are in several runs) uses the grouped matmul path above.
"""

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from alora_core.model.batch import StepBatch

ATTN_IMPLEMENTATION = "alora_paged"

# Above this many query rows a contiguous sequence uses SDPA (fused, no score matrix in memory).
SDPA_MIN_QUERIES = 16
# Bound on the score matrix of the grouped path (elements); queries are processed in chunks below it.
MAX_SCORE_ELEMENTS = 1 << 24


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
    out = torch.empty(query.shape[2], query.shape[1], query.shape[3], dtype=query.dtype, device=query.device)
    for seq in step_batch.seqs:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        q = query[0, :, rows]  # [H, t, D]
        o = attend(q, k_cache, v_cache, seq.kv_segments, seq.context_len - seq.query_len, scale)
        out[rows] = o.transpose(0, 1)
    return out.unsqueeze(0), None


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: tuple[tuple[int, int], ...],
    q_offset: int,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q ([H, t, D], positions q_offset..q_offset+t-1) over the keys at positions
    0..q_offset+t-1, stored in `segments` of the caches ([KVH, S, D]); the segments cover exactly
    q_offset+t slots. Returns [H, t, D]."""
    num_heads, t, _head_dim = q.shape
    if len(segments) == 1 and t >= SDPA_MIN_QUERIES:
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

    num_kv_heads = k_cache.shape[0]
    groups = num_heads // num_kv_heads
    context_len = q_offset + t
    chunk = max(1, MAX_SCORE_ELEMENTS // (num_heads * context_len))
    if chunk >= t:
        return _grouped_attention(q, k_cache, v_cache, segments, q_offset, scale, groups)
    parts = [
        _grouped_attention(q[:, i : i + chunk], k_cache, v_cache, segments, q_offset + i, scale, groups)
        for i in range(0, t, chunk)
    ]
    return torch.cat(parts, dim=1)


def _grouped_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: tuple[tuple[int, int], ...],
    q_offset: int,
    scale: float,
    groups: int,
) -> torch.Tensor:
    num_heads, t, head_dim = q.shape
    num_kv_heads = num_heads // groups
    num_keys = sum(e - s for s, e in segments)  # >= q_offset + t when called on a chunk of the queries
    # q: [H, t, D] -> [KVH, G*t, D]; row g*t + i of kv-head h is head h*G + g at query i (HF repeat_kv order).
    qg = q.reshape(num_kv_heads, groups * t, head_dim)
    scores = torch.cat([qg @ k_cache[:, s:e].transpose(1, 2) for s, e in segments], dim=-1) * scale
    # scores: [KVH, G*t, num_keys]; query i sits at position q_offset + i and sees keys 0..q_offset+i
    if t > 1 or q_offset + t < num_keys:
        allowed = torch.ones(t, num_keys, dtype=torch.bool, device=q.device).tril(q_offset)
        scores = scores.masked_fill(~allowed.repeat(groups, 1), float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(v_cache.dtype)
    out = torch.zeros(num_kv_heads, groups * t, head_dim, dtype=v_cache.dtype, device=q.device)
    offset = 0
    for s, e in segments:
        out += probs[..., offset : offset + e - s] @ v_cache[:, s:e]
        offset += e - s
    return out.reshape(num_heads, t, head_dim).to(q.dtype)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
