"""Paged attention backend, registered with transformers' AttentionInterface as "alora_paged".

The HF attention module hands us this step's q/k/v (RoPE applied) for the flat batch. We write the
new K/V into the pool at `slot_mapping`, then attend each sequence over its KV where it lies:

    pool kv[layer, 0|1]: [KVH, S, D]      a sequence = ordered slot ranges (segments) of the pool
    q: [H, t, D]  ->  grouped [KVH, G*t, D]  (G = H / KVH, no K/V repeat)
    each part (a run of keys) -> (out_p, lse_p) by a fused kernel; parts merged by their logsumexp:
        out = sum_p exp(lse_p - lse) * out_p,   lse = logsumexp_p(lse_p)

Keys at positions <= the first query's position are visible to every query of the step, so they
need no mask; only the step's own new keys (at most t - 1 of them) get a causal mask. A decode
token over one contiguous run is therefore a single unmasked kernel call.

No sequence's cache is copied: the long parts are views of the pool. Sequences whose KV starts
at the same pool slots (intrinsic forks of one conversation) share those keys physically, so their
queries meet the shared prefix in one call and it is read from memory once per step. What each
sequence has past the shared runs (a fork's own blocks: the conversation's copied tail, its
invocation, its tokens; a chunk's own new keys) is short: it is gathered into one padded, masked
call for all of them (`ForkPlan`, built once per step):

    shared runs K [KVH, n, D]  <-  Q of fork 1 | fork 2 | fork 3   (rows stacked)  one part per run
    own keys [F, KVH, N, D]    <-  Q [F, KVH, M, D], mask [F, 1, M, N]               one part

The part kernel on CPU is ATen's flash attention for CPU (it returns the logsumexp); elsewhere a
matmul reference (`_part_matmul`) computes the same. A single-run sequence with many queries
(prefill) goes through torch SDPA on the pool view.

On a GPU (GATHER_DEVICES) the per-sequence calls above cost more in launches than the attention
itself: there the short-query sequences of a step (decode tokens, intrinsic invocations, chunks over
several runs) attend in padded batches instead. Each batch gathers its sequences' keys into a
transient [B, KVH, L, D] copy and makes one SDPA call with a causal-and-padding mask; the plan (slot
and row indices, mask) is built once per step and shared by every layer:

    K pool [KVH, S, D] --index_select(slots [B*L])--> [B, KVH, L, D]  <-  Q [B, KVH, G*Tq, D]
"""

import functools
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from alora_core.model.batch import SeqSpan, StepBatch

ATTN_IMPLEMENTATION = "alora_paged"

# Above this many query rows a contiguous sequence uses SDPA (fused, causal mask built in).
SDPA_MIN_QUERIES = 16
# Bound on the score matrix of the matmul reference path (elements); rows are processed in chunks below it.
MAX_SCORE_ELEMENTS = 1 << 24
# Devices whose short-query sequences attend in gathered, padded batches (one SDPA call per batch).
GATHER_DEVICES = frozenset({"cuda"})
# Bounds on one gathered batch: key elements copied (B * L * KVH * D, as much again for V) and scores.
MAX_GATHER_ELEMENTS = 1 << 26
MAX_GATHER_SCORES = 1 << 28

Segments = tuple[tuple[int, int], ...]
Part = tuple[torch.Tensor, torch.Tensor]  # (out [KVH, rows, D], logsumexp [KVH, rows] float32)

_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


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
    if step_batch.device_step is not None:  # CUDA: one paged Triton kernel over the pool, no gather
        from alora_core.model.paged_attention_triton import attention_forward

        return attention_forward(module, query, key, value, scaling, step_batch, **kwargs)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache = step_batch.kv[layer, 0]  # [KVH, S, D]
    v_cache = step_batch.kv[layer, 1]
    k_cache.index_copy_(1, step_batch.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, step_batch.slot_mapping, value[0].to(v_cache.dtype))

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    num_heads = query.shape[1]
    out = torch.empty(query.shape[2], num_heads, query.shape[3], dtype=query.dtype, device=query.device)
    gather = query.device.type in GATHER_DEVICES
    short: list[SeqSpan] = []  # the gathered path's sequences
    by_first_slot: dict[int, list[tuple[slice, torch.Tensor, Segments, int]]] = defaultdict(list)
    for seq in step_batch.seqs:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        q = query[0, :, rows]  # [H, t, D]
        q_offset = seq.context_len - seq.query_len
        if _use_sdpa(seq.kv_segments, seq.query_len):
            out[rows] = attend(q, k_cache, v_cache, seq.kv_segments, q_offset, scale).transpose(0, 1)
        elif gather:
            short.append(seq)
        else:
            by_first_slot[seq.kv_segments[0][0]].append((rows, q, seq.kv_segments, q_offset))
    if short:
        groups = num_heads // k_cache.shape[0]
        plan = step_batch.derive(  # the first layer of the step plans for all of them
            ("gather", groups),
            lambda: gather_plan(short, groups, k_cache.shape[0] * k_cache.shape[2], query.device),
        )
        for batch in plan:
            attend_gathered(batch, query[0], k_cache, v_cache, scale, out)
    for first_slot, items in by_first_slot.items():
        seqs = [(q, segs, off) for _, q, segs, off in items]
        fork_plan = None
        if not _lone_decode(seqs):
            fork_plan = step_batch.derive(
                ("forks", first_slot), functools.partial(plan_forks, seqs, k_cache.shape[0], query.dtype)
            )
        outs = attend_forks(seqs, k_cache, v_cache, scale, fork_plan)
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
    t = q.shape[1]
    if not _use_sdpa(segments, t):
        return attend_forks([(q, segments, q_offset)], k_cache, v_cache, scale)[0]
    start, end = segments[0]
    k = k_cache[:, start:end].unsqueeze(0)  # [1, KVH, n, D] view
    v = v_cache[:, start:end].unsqueeze(0)
    if q_offset == 0:
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.ones(t, end - start, dtype=torch.bool, device=q.device).tril(q_offset)
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0]


@dataclass(frozen=True)
class GatherBatch:
    """B sequences padded to Tq query rows and L keys each (see the module docstring)."""

    slots: torch.Tensor  # [B*L] pool slots of each sequence's keys in order (padding: its first slot)
    q_rows: torch.Tensor  # [B*Tq] rows of the step's query (padding repeats the sequence's last row)
    # [B, 1, G*Tq, L] bool, True = visible: row g*Tq + i of a sequence sees the keys up to its position
    mask: torch.Tensor
    real: torch.Tensor  # [n] indices into the padded B*Tq rows that are real queries
    out_rows: torch.Tensor  # [n] rows of the step's output they fill
    shape: tuple[int, int, int]  # (B, Tq, L)


def gather_plan(seqs: list[SeqSpan], groups: int, key_width: int, device: torch.device) -> list[GatherBatch]:
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
    return [_gather_batch(batch, groups, device) for batch in batches]


def _padded(n: int) -> int:
    return -(-n // 16) * 16  # keys padded to a multiple of 16: aligned rows for the fused SDPA kernels


def _gather_batch(seqs: list[SeqSpan], groups: int, device: torch.device) -> GatherBatch:
    b, tq, keys = len(seqs), max(s.query_len for s in seqs), _padded(max(s.context_len for s in seqs))
    slots = torch.empty(b, keys, dtype=torch.long)
    for row, s in enumerate(seqs):
        slots[row] = s.kv_segments[0][0]
        slots[row, : s.context_len] = torch.cat([torch.arange(start, end) for start, end in s.kv_segments])
    t = torch.tensor([s.query_len for s in seqs])[:, None]
    offset = torch.tensor([s.context_len - s.query_len for s in seqs])[:, None]
    query = torch.minimum(torch.arange(tq)[None, :], t - 1)  # [B, Tq] padding repeats the last real row
    mask = torch.arange(keys)[None, None, :] <= (offset + query)[:, :, None]  # [B, Tq, L]
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
) -> None:
    """One padded batch: query [H, T, D] (the step's), caches [KVH, S, D]; fills out [T, H, D] at its rows."""
    b, tq, keys = batch.shape
    num_kv_heads, _, dim = k_cache.shape
    heads = query.shape[0]
    k = k_cache.index_select(1, batch.slots).view(num_kv_heads, b, keys, dim).transpose(0, 1)
    v = v_cache.index_select(1, batch.slots).view(num_kv_heads, b, keys, dim).transpose(0, 1)
    q = query.index_select(1, batch.q_rows).view(num_kv_heads, heads // num_kv_heads, b, tq, dim)
    q = q.permute(2, 0, 1, 3, 4).reshape(b, num_kv_heads, -1, dim)  # [B, KVH, G*Tq, D]
    o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=batch.mask, scale=scale)
    o = o.view(b, num_kv_heads, -1, tq, dim).permute(0, 3, 1, 2, 4).reshape(b * tq, heads, dim)
    out.index_copy_(0, batch.out_rows, o.index_select(0, batch.real))


def _use_sdpa(segments: Segments, t: int) -> bool:
    return len(segments) == 1 and t >= SDPA_MIN_QUERIES


Fork = tuple[torch.Tensor, Segments, int]  # (q [H, t, D], segments, q_offset)


@dataclass(frozen=True)
class OwnKeys:
    """The keys of each sequence of a ForkPlan past the shared runs, padded to N, with its query rows
    padded to M, for one masked call (see the module docstring)."""

    slots: torch.Tensor  # [F*N] pool slots, sequence by sequence (padding: a slot of its own, masked)
    run: tuple[int, int] | None  # one sequence whose own keys are one run: a view of it, no gather
    q_rows: torch.Tensor | None  # [F*M] rows of the stacked queries (padding repeats the last); None: all R
    # [F, 1, M, N] additive, 0 = visible: own key j of row g*t + i if j <= offset + i; None: all visible
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


def _lone_decode(items: list[Fork]) -> bool:
    """One decode token over one run, on the CPU flash kernel: one unmasked call, nothing to plan or merge."""
    q, segments, _ = items[0]
    return len(items) == 1 and len(segments) == 1 and q.shape[1] == 1 and _flash_cpu_serves(q)


def attend_forks(
    items: list[Fork],
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    plan: ForkPlan | None = None,
) -> list[torch.Tensor]:
    """Attention of several sequences (q [H, t, D], segments, q_offset) whose segments all start at the
    same pool slot: each run of keys they all share (the conversation's blocks up to the fork), visible
    to all their queries, is one part for all their rows at once; the keys each has past those runs are
    one padded part for all of them (`plan`, from `plan_forks`: pass it to reuse it across layers).
    Returns [H, t, D] each."""
    num_kv_heads, _, dim = k_cache.shape
    if _lone_decode(items):
        q, ((start, end),), _ = items[0]
        out, _ = _flash_cpu(
            q.reshape(num_kv_heads, -1, dim), k_cache[:, start:end], v_cache[:, start:end], None, scale
        )
        return [out.reshape(q.shape)]
    plan = plan or plan_forks(items, num_kv_heads, items[0][0].dtype)
    # q: [H, t, D] -> [KVH, G*t, D]; row g*t + i of kv-head h is head h*G + g at query i (HF repeat_kv order).
    qgs = [q.reshape(num_kv_heads, -1, dim) for q, _, _ in items]
    q_all = qgs[0] if len(qgs) == 1 else torch.cat(qgs, dim=1)  # [KVH, R, D]
    parts = [_part(q_all, k_cache[:, s:e], v_cache[:, s:e], None, scale) for s, e in plan.shared]
    if plan.own is not None:
        parts.append(_own_part(q_all, k_cache, v_cache, plan.own, scale))
    out = _merge(parts)
    results, row = [], 0
    for (q, _, _), rows in zip(items, plan.rows, strict=True):
        results.append(out[:, row : row + rows].reshape(q.shape).to(q.dtype))
        row += rows
    return results


def _own_part(
    q_all: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, own: OwnKeys, scale: float
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
    out, lse = _part(q, k, v, own.mask, scale, own.empty)  # [F, KVH, M, D], [F, KVH, M]
    out, lse = (
        out.transpose(0, 1).reshape(num_kv_heads, f * m, dim),
        lse.transpose(0, 1).reshape(num_kv_heads, f * m),
    )
    if own.real is not None:
        out, lse = out.index_select(1, own.real), lse.index_select(1, own.real)
    return out, lse


def plan_forks(items: list[Fork], num_kv_heads: int, dtype: torch.dtype) -> ForkPlan:
    """The shared runs (visible to every query: key <= the smallest q_offset) and the padded own keys."""
    device = items[0][0].device
    common = _common_runs([segs for _, segs, _ in items], min(off for _, _, off in items) + 1)
    shared = sum(e - s for s, e in common)
    owns = [_skip(segs, shared) for _, segs, _ in items]  # each sequence's keys past the shared runs
    lengths = [sum(e - s for s, e in own) for own in owns]
    queries = [q.shape[1] for q, _, _ in items]
    rows = tuple(q.shape[0] // num_kv_heads * q.shape[1] for q, _, _ in items)
    if max(lengths) == 0:
        return ForkPlan(common, rows, None)
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
        seen = (shared + torch.arange(n))[None, :] <= offset + query[:, None]
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
    return ForkPlan(common, rows, own)


def _part(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    empty: torch.Tensor | None = None,
) -> Part:
    """Attention of q [..., r, D] over one run of keys k, v [..., n, D] (views; leading dims [KVH] or
    [B, KVH]), with an optional additive mask broadcastable to [..., r, n]: (out [..., r, D], logsumexp
    [..., r]). A row that sees no key (the mask's rows marked in `empty`, broadcastable to [..., r])
    gets out 0, lse -inf."""
    if not _flash_cpu_serves(q):
        return _part_matmul(q, k, v, mask, scale)
    out, lse = _flash_cpu(q, k, v, mask, scale)
    lse = lse.float()
    if empty is not None:  # the kernel reports lse 0 for a row with every key masked; it must weigh nothing
        lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def _flash_cpu_serves(q: torch.Tensor) -> bool:
    return _FLASH_CPU is not None and q.device.type == "cpu"


def _flash_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> Part:
    """The one call site of ATen's CPU flash kernel: q [(B,) KVH, r, D], k, v [(B,) KVH, n, D] -> (out,
    lse [(B,) KVH, r]). Called directly, the kernel reads rows as unit-stride without checking (public
    SDPA would check and fall back), so a view with another last-dimension stride is copied first."""
    assert _FLASH_CPU is not None
    unbatched = q.dim() == 3
    q, k, v = (t.unsqueeze(0) if unbatched else t for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = _FLASH_CPU(q, k, v, attn_mask=mask, scale=scale)[:2]
    return (out[0], lse[0]) if unbatched else (out, lse)


def _part_matmul(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> Part:
    """The reference of `_part` in plain matmuls (any device), in row chunks of bounded score size."""
    chunk = max(1, MAX_SCORE_ELEMENTS // k.shape[:-1].numel())
    outs, lses = [], []
    for i in range(0, q.shape[-2], chunk):
        scores = (q[..., i : i + chunk, :] @ k.transpose(-1, -2)).float() * scale  # [..., r, n]
        if mask is not None:
            scores = scores + mask[..., i : i + chunk, :].float()
        lse = torch.logsumexp(scores, dim=-1)
        finite = torch.where(torch.isneginf(lse), 0.0, lse)  # an all-masked row: exp(-inf) = 0, not nan
        outs.append(torch.exp(scores - finite.unsqueeze(-1)).to(v.dtype) @ v)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0], lses[0]
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)


def _merge(parts: list[Part]) -> torch.Tensor:
    """Softmax over the union of the parts' keys, from each part's normalized output and logsumexp."""
    if len(parts) == 1:
        return parts[0][0]
    lse = torch.logsumexp(torch.stack([p_lse for _, p_lse in parts]), dim=0)
    out = None
    for p_out, p_lse in parts:
        weighted = p_out.float() * torch.exp(p_lse - lse).unsqueeze(-1)
        out = weighted if out is None else out + weighted
    assert out is not None
    return out


def _common_runs(lists: list[Segments], limit: int) -> Segments:
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
