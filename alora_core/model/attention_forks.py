"""Attention of a step's sequences on the CPU without the C kernels (ALORA_CPU_KERNELS=0, no
compiler, a dtype they do not serve): per group of sequences that start at one pool slot, parts over
the pool's runs merged by their logsumexp (attention_parts.py).

No sequence's cache is copied: the long parts are views of the pool. Sequences whose KV starts
at the same pool slots (intrinsic forks of one conversation) share those keys physically, so their
queries meet the shared prefix in one call and it is read from memory once per step. What each
sequence has past the shared runs (a fork's own blocks: the conversation's copied tail, its
invocation, its tokens; a chunk's own new keys) is short: it is gathered into one padded, masked
call for all of them (`ForkPlan`, built once per step):

    shared runs K [KVH, n, D]  <-  Q of fork 1 | fork 2 | fork 3   (rows stacked)  one part per run
    own keys [F, KVH, N, D]    <-  Q [F, KVH, M, D], mask [F, 1, M, N]               one part

A single-run sequence with many queries (prefill) goes through torch SDPA on the pool view (`attend`).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from alora_core.model.attention_parts import (
    Part,
    Segments,
    binding,
    common_runs,
    flash_cpu,
    flash_cpu_serves,
    merge,
    part,
    sink_weight,
    skip,
    visible_keys,
)

# Above this many query rows a contiguous sequence uses SDPA (fused, causal mask built in).
SDPA_MIN_QUERIES = 16


def use_sdpa(
    segments: Segments, t: int, softcap: float | None = None, sinks: torch.Tensor | None = None
) -> bool:
    return len(segments) == 1 and t >= SDPA_MIN_QUERIES and softcap is None and sinks is None


def attend(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    segments: Segments,
    q_offset: int,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of q ([H, t, D], positions q_offset..q_offset+t-1) over the keys at positions
    0..q_offset+t-1, stored in `segments` of the caches ([KVH, S, D]); the segments cover exactly
    q_offset+t slots. Within `window`, soft-capped, with sinks ([H]) where given. Returns [H, t, D]."""
    t = q.shape[1]
    if not use_sdpa(segments, t, softcap, sinks):
        features = {"window": window, "softcap": softcap, "sinks": sinks}
        return attend_forks([(q, segments, q_offset)], k_cache, v_cache, scale, **features)[0]
    start, end = segments[0]
    k = k_cache[:, start:end].unsqueeze(0)  # [1, KVH, n, D] view
    v = v_cache[:, start:end].unsqueeze(0)
    window = binding(window, end - start)
    if q_offset == 0 and window is None:
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        positions = torch.arange(end - start, device=q.device)
        mask = visible_keys(positions[q_offset:], positions, window)  # [t, n]
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0]


Fork = tuple[torch.Tensor, Segments, int]  # (q [H, t, D], segments, q_offset)
RowMask = tuple[torch.Tensor, torch.Tensor | None]  # (additive mask [R, n], rows that see no key [R])


@dataclass(frozen=True)
class OwnKeys:
    """The keys of each sequence of a ForkPlan past the shared runs, padded to N, with its query rows
    padded to M, for one masked call (see the module docstring)."""

    slots: torch.Tensor  # [F*N] pool slots, sequence by sequence (padding: a slot of its own, masked)
    run: tuple[int, int] | None  # one sequence whose own keys are one run: a view of it, no gather
    q_rows: torch.Tensor | None  # [F*M] rows of the stacked queries (padding repeats the last); None: all R
    # [F, 1, M, N] additive, 0 = visible: own key j of row g*t + i if j <= offset + i (and within the
    # window); None: all visible
    mask: torch.Tensor | None
    empty: torch.Tensor | None  # [F, 1, M] rows that see no own key (weigh nothing); None: there are none
    real: torch.Tensor | None  # [R] positions of the stacked rows among the F*M; None: the same rows
    shape: tuple[int, int, int]  # (F, M, N)


@dataclass(frozen=True)
class ForkPlan:
    """How a group of sequences that start at one pool slot attend (intrinsic forks of a conversation,
    or one sequence over several runs): the runs they all share, visible to every query, plus each
    one's own keys. Depends on the step's layout only: built once a step, used by every layer."""

    shared: Segments
    rows: tuple[int, ...]  # stacked query rows of each sequence (G * t)
    own: OwnKeys | None  # None: no sequence has keys past the shared runs
    # per shared run, where a sliding window hides some of its keys from some rows; empty: none does
    shared_masks: tuple[RowMask | None, ...] = ()


def lone_decode(items: list[Fork], softcap: float | None = None, window: int | None = None) -> bool:
    """One decode token over one run, on the CPU flash kernel: one unmasked call, nothing to plan or merge."""
    q, segments, _ = items[0]
    if len(items) != 1 or len(segments) != 1 or q.shape[1] != 1 or softcap is not None:
        return False
    return binding(window, segments[0][1] - segments[0][0]) is None and flash_cpu_serves(q)


def attend_forks(
    items: list[Fork],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    plan: ForkPlan | None = None,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> list[torch.Tensor]:
    """Attention of several sequences (q [H, t, D], segments, q_offset) whose segments all start at the
    same pool slot: each run of keys they all share (the conversation's blocks up to the fork), visible
    to all their queries, is one part for all their rows at once; the keys each has past those runs are
    one padded part for all of them (`plan`, from `plan_forks` with the same window: pass it to reuse it
    across layers). Returns [H, t, D] each."""
    num_kv_heads, _, dim = k_cache.shape
    if lone_decode(items, softcap, window):
        q, ((start, end),), _ = items[0]
        out, lse = flash_cpu(
            q.reshape(num_kv_heads, -1, dim), k_cache[:, start:end], v_cache[:, start:end], None, scale
        )
        if sinks is not None:
            out = (out * sink_weight(lse.float(), sinks, 1)).to(q.dtype)
        return [out.reshape(q.shape)]
    plan = plan or plan_forks(items, num_kv_heads, items[0][0].dtype, window)
    # q: [H, t, D] -> [KVH, G*t, D]; row g*t + i of kv-head h is head h*G + g at query i (HF repeat_kv order).
    qgs = [q.reshape(num_kv_heads, -1, dim) for q, _, _ in items]
    q_all = qgs[0] if len(qgs) == 1 else torch.cat(qgs, dim=1)  # [KVH, R, D]
    masks = plan.shared_masks or (None,) * len(plan.shared)
    parts = []
    for (s, e), shared_mask in zip(plan.shared, masks, strict=True):
        mask, empty = shared_mask or (None, None)
        parts.append(part(q_all, k_cache[:, s:e], v_cache[:, s:e], mask, scale, empty, softcap))
    if plan.own is not None:
        parts.append(_own_part(q_all, k_cache, v_cache, plan.own, scale, softcap))
    out, lse = merge(parts)
    results, row = [], 0
    for (q, _, _), rows in zip(items, plan.rows, strict=True):
        o = out[:, row : row + rows]
        if sinks is not None:
            o = o * sink_weight(lse[:, row : row + rows], sinks, q.shape[1])
        results.append(o.reshape(q.shape).to(q.dtype))
        row += rows
    return results


def _own_part(
    q_all: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    own: OwnKeys,
    scale: float,
    softcap: float | None = None,
) -> Part:
    """The own keys of every sequence of a plan in one masked call: (out [KVH, R, D], lse [KVH, R])."""
    f, m, n = own.shape
    num_kv_heads, _, dim = k_cache.shape
    q = q_all if own.q_rows is None else q_all.index_select(1, own.q_rows)
    q = q.reshape(num_kv_heads, f, m, dim).transpose(0, 1)  # [F, KVH, M, D]
    if own.run is not None:
        start, end = own.run
        k, v = k_cache[:, start:end].unsqueeze(0), v_cache[:, start:end].unsqueeze(0)
    else:
        k = k_cache.index_select(1, own.slots).view(num_kv_heads, f, n, dim).transpose(0, 1)
        v = v_cache.index_select(1, own.slots).view(num_kv_heads, f, n, dim).transpose(0, 1)
    out, lse = part(q, k, v, own.mask, scale, own.empty, softcap)  # [F, KVH, M, D], [F, KVH, M]
    out, lse = (
        out.transpose(0, 1).reshape(num_kv_heads, f * m, dim),
        lse.transpose(0, 1).reshape(num_kv_heads, f * m),
    )
    if own.real is not None:
        out, lse = out.index_select(1, own.real), lse.index_select(1, own.real)
    return out, lse


def plan_forks(
    items: list[Fork], num_kv_heads: int, dtype: torch.dtype, window: int | None = None
) -> ForkPlan:
    """The shared runs (key <= the smallest q_offset: causally visible to every query; a window may hide
    some of them from some rows, then they get a mask) and the padded own keys."""
    device = items[0][0].device
    window = binding(window, max(off + q.shape[1] for q, _, off in items))
    common = common_runs([segs for _, segs, _ in items], min(off for _, _, off in items) + 1)
    shared = sum(e - s for s, e in common)
    owns = [skip(segs, shared) for _, segs, _ in items]  # each sequence's keys past the shared runs
    lengths = [sum(e - s for s, e in own) for own in owns]
    queries = [q.shape[1] for q, _, _ in items]
    rows = tuple(q.shape[0] // num_kv_heads * q.shape[1] for q, _, _ in items)
    shared_masks = _shared_masks(common, items, rows, window, dtype) if window is not None else ()
    if max(lengths) == 0:
        return ForkPlan(common, rows, None, shared_masks)
    f, m, n = len(items), max(rows), max(lengths)
    slots = torch.zeros(f, n, dtype=torch.long)
    visible = torch.zeros(f, m, n, dtype=torch.bool)
    q_rows = torch.empty(f, m, dtype=torch.long)
    real, row = [], 0
    for i, ((_, _, offset), runs, length, r, t) in enumerate(
        zip(items, owns, lengths, rows, queries, strict=True)
    ):
        if length:
            slots[i] = runs[0][0]
            slots[i, :length] = torch.cat([torch.arange(s, e) for s, e in runs])
        query = torch.arange(r) % t  # row g*t + i is query i
        seen = visible_keys(offset + query, shared + torch.arange(n), window)
        visible[i, :r] = seen & (torch.arange(n) < length)[None, :]
        visible[i, r:] = visible[i, r - 1]  # padding rows repeat the last row
        q_rows[i] = row + torch.minimum(torch.arange(m), torch.tensor(r - 1))
        real.append(torch.arange(r) + i * m)
        row += r
    mask = torch.zeros(f, 1, m, n, dtype=dtype).masked_fill_(~visible.unsqueeze(1), float("-inf"))
    empty = ~visible.any(dim=-1).unsqueeze(1)
    padded = any(r != m for r in rows)
    own = OwnKeys(
        slots=slots.flatten().to(device),
        run=owns[0][0] if f == 1 and len(owns[0]) == 1 else None,
        q_rows=q_rows.flatten().to(device) if padded else None,
        mask=None if bool(visible.all()) else mask.to(device),
        empty=empty.to(device) if bool(empty.any()) else None,
        real=torch.cat(real).to(device) if padded else None,
        shape=(f, m, n),
    )
    return ForkPlan(common, rows, own, shared_masks)


def _shared_masks(
    common: Segments, items: list[Fork], rows: tuple[int, ...], window: int, dtype: torch.dtype
) -> tuple[RowMask | None, ...]:
    """Per shared run: None if every row of every sequence sees all its keys, else (mask [R, n], empty)."""
    device = items[0][0].device
    positions = torch.cat(
        [off + torch.arange(r) % q.shape[1] for (q, _, off), r in zip(items, rows, strict=True)]
    )
    masks: list[RowMask | None] = []
    first = 0
    for start, end in common:
        seen = visible_keys(positions, torch.arange(first, first + end - start), window)  # [R, n]
        first += end - start
        if bool(seen.all()):
            masks.append(None)
            continue
        mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))
        empty = ~seen.any(dim=-1)
        masks.append((mask.to(device), empty.to(device) if bool(empty.any()) else None))
    return tuple(masks)
