"""The pieces every eager attention path is made of: one part (a run of keys for a block of query
rows -> normalized output and logsumexp), the merge of parts, masks from positions, and slot runs.

    part(q [.., r, D], k, v [.., n, D], mask) -> (out [.., r, D], lse [.., r])   ATen's CPU flash kernel,
                                                                                 or plain matmuls
    merge(parts): out = sum_p exp(lse_p - lse) * out_p,   lse = logsumexp_p(lse_p)

A row that sees no key of a part weighs nothing in the merge (lse -inf). Soft-capped scores take
the matmul path (the fused kernels have no cap). Users: attention_forks.py (CPU without the C
kernels), attention_gather.py (GPU batches).
"""

import torch

Segments = tuple[tuple[int, int], ...]
Part = tuple[torch.Tensor, torch.Tensor]  # (out [KVH, rows, D], logsumexp [KVH, rows] float32)

# Bound on the score matrix of the matmul reference path (elements); rows are processed in chunks below it.
MAX_SCORE_ELEMENTS = 1 << 24
FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    empty: torch.Tensor | None = None,
    softcap: float | None = None,
) -> Part:
    """Attention of q [..., r, D] over one run of keys k, v [..., n, D] (views; leading dims [KVH] or
    [B, KVH]), with an optional additive mask broadcastable to [..., r, n]: (out [..., r, D], logsumexp
    [..., r]). A row that sees no key (the mask's rows marked in `empty`, broadcastable to [..., r])
    gets out 0, lse -inf. Soft-capped scores take the matmul reference (the fused kernels have no cap)."""
    if softcap is not None or not flash_cpu_serves(q):
        return part_matmul(q, k, v, mask, scale, softcap)
    out, lse = flash_cpu(q, k, v, mask, scale)
    lse = lse.float()
    if empty is not None:  # the kernel reports lse 0 for a row with every key masked; it must weigh nothing
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def flash_cpu_serves(q: torch.Tensor) -> bool:
    return FLASH_CPU is not None and q.device.type == "cpu"


def flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> Part:
    """The one call site of ATen's CPU flash kernel: q [(B,) KVH, r, D], k, v [(B,) KVH, n, D] -> (out,
    lse [(B,) KVH, r]). Called directly, the kernel reads rows as unit-stride without checking (public
    SDPA would check and fall back), so a view with another last-dimension stride is copied first."""
    assert FLASH_CPU is not None
    unbatched = q.dim() == 3
    q, k, v = (t.unsqueeze(0) if unbatched else t for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = FLASH_CPU(q, k, v, attn_mask=mask, scale=scale)[:2]
    return (out[0], lse[0]) if unbatched else (out, lse)


def part_matmul(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> Part:
    """The reference of `part` in plain matmuls (any device), in row chunks of bounded score size."""
    chunk = max(1, MAX_SCORE_ELEMENTS // k.shape[:-1].numel())
    outs, lses = [], []
    for i in range(0, q.shape[-2], chunk):
        scores = (q[..., i : i + chunk, :] @ k.transpose(-1, -2)).float() * scale  # [..., r, n]
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if mask is not None:
            scores = scores + mask[..., i : i + chunk, :].float()
        lse = torch.logsumexp(scores, dim=-1)
        finite = torch.where(torch.isneginf(lse), 0.0, lse)  # an all-masked row: exp(-inf) = 0, not nan
        outs.append(torch.exp(scores - finite.unsqueeze(-1)).to(v.dtype) @ v)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def merge(parts: list[Part]) -> Part:
    """Softmax over the union of the parts' keys, from each part's normalized output and logsumexp:
    (out, lse) over all of them."""
    if len(parts) == 1:
        return parts[0]
    lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in parts]), dim=0)
    out = None
    for p_out, p_lse in parts:
        weighted = p_out.float() * torch.exp(p_lse - lse).unsqueeze(-1)
        out = weighted if out is None else out + weighted
    assert out is not None
    return out, lse


def common_runs(lists: list[Segments], limit: int) -> Segments:
    """The slot runs that every segment list starts with (forks of one conversation share its blocks up
    to the fork), at most `limit` keys. Lists that begin at one slot share at least their first key."""
    runs: list[tuple[int, int]] = []
    keys = 0
    for i in range(min(len(segs) for segs in lists)):
        start = lists[0][i][0]
        if any(segs[i][0] != start for segs in lists):
            break
        end = min(segs[i][1] for segs in lists)
        end = min(end, start + limit - keys)
        runs.append((start, end))
        keys += end - start
        if keys == limit or any(segs[i][1] != end for segs in lists):
            break
    return tuple(runs)


def skip(segments: Segments, n: int) -> Segments:
    """The segments without their first n slots."""
    rest: list[tuple[int, int]] = []
    for s, e in segments:
        if n >= e - s:
            n -= e - s
            continue
        rest.append((s + n, e))
        n = 0
    return tuple(rest)


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., r] query positions, [n] key positions -> [..., r, n] bool: key <= query, within the window
    (transformers' sliding overlay: query - key < window)."""
    seen = key_pos <= query_pos.unsqueeze(-1)
    if window is not None:
        seen &= key_pos > query_pos.unsqueeze(-1) - window
    return seen


def binding(window: int | None, keys: int) -> int | None:
    """The window, if it hides anything among `keys` positions 0..keys-1; None if every pair is closer."""
    return window if window is not None and keys > window else None


def sink_weight(lse: torch.Tensor, sinks: torch.Tensor, t: int) -> torch.Tensor:
    """What attention sinks leave of each row's output: lse [..., KVH, G*t] (rows g*t + i are head
    h*G + g), sinks [H] -> [..., KVH, G*t, 1] = exp(lse) / (exp(lse) + exp(sink))."""
    num_kv_heads = lse.shape[-2]
    sink_rows = sinks.view(num_kv_heads, -1, 1).expand(-1, -1, t).reshape(num_kv_heads, -1)
    return torch.sigmoid(lse - sink_rows).unsqueeze(-1)
