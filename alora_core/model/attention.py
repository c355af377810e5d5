"""Paged attention backend, registered with transformers' AttentionInterface as "alora_paged".

The HF attention module hands us this step's q/k/v (RoPE applied) for the flat batch. We write the
new K/V into the pool at `slot_mapping`, then attend each sequence over its KV where it lies:

    pool kv[layer, 0|1]: [KVH, S, D]      a sequence = ordered slot ranges (segments) of the pool
    q: [H, t, D]  ->  grouped [KVH, G*t, D]  (G = H / KVH, no K/V repeat)
    each part (a run of keys) -> (out_p, lse_p) by a fused kernel; parts merged by their logsumexp:
        out = sum_p exp(lse_p - lse) * out_p,   lse = logsumexp_p(lse_p)

What a layer asks for, and how it is honoured (anything else is refused, see `_refuse_unhandled`):
    scores = q k^T * scaling                       the layer's own scaling
    scores = softcap * tanh(scores / softcap)      logit soft-capping (Gemma-2): the matmul part kernel
    key j visible to query i iff j <= i and i - j < sliding_window    (transformers' sliding overlay)
    out *= sigmoid(lse - s_aux[h])                 attention sinks (gpt-oss): one more logit per head
A sliding layer first drops every key older than the window of its step's first query
(`window_spans`, once a step per window): those slots are never read. Keys the later queries of a
chunk no longer see are masked.

Keys at positions <= the first query's position are visible to every query of the step (within a
window: unless it slid past them), so they need no mask; only the step's own new keys (at most
t - 1 of them) get a causal mask. A decode token over one contiguous run is therefore a single
unmasked kernel call.

No sequence's cache is copied: the long parts are views of the pool. Sequences whose KV starts
at the same pool slots (intrinsic forks of one conversation) share those keys physically, so their
queries meet the shared prefix in one call and it is read from memory once per step. What each
sequence has past the shared runs (a fork's own blocks: the conversation's copied tail, its
invocation, its tokens; a chunk's own new keys) is short: it is gathered into one padded, masked
call for all of them (`ForkPlan`, built once per step):

    shared runs K [KVH, n, D]  <-  Q of fork 1 | fork 2 | fork 3   (rows stacked)  one part per run
    own keys [F, KVH, N, D]    <-  Q [F, KVH, M, D], mask [F, 1, M, N]               one part

The part kernel on CPU is ATen's flash attention for CPU (it returns the logsumexp); elsewhere, and
for soft-capped layers, a matmul reference (`_part_matmul`) computes the same. A single-run sequence
with many queries (prefill) goes through torch SDPA on the pool view.

On a GPU (GATHER_DEVICES) the per-sequence calls above cost more in launches than the attention
itself: there the short-query sequences of a step (decode tokens, intrinsic invocations, chunks over
several runs) attend in padded batches instead. Each batch gathers its sequences' keys into a
transient [B, KVH, L, D] copy and makes one SDPA call (matmuls for soft-capping or sinks) with a
causal-window-and-padding mask; the plan (slot and row indices, mask) is built once per step and
shared by every layer:

    K pool [KVH, S, D] --index_select(slots [B*L])--> [B, KVH, L, D]  <-  Q [B, KVH, G*Tq, D]
"""

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from alora_core.errors import UnsupportedModelError
from alora_core.model import paged_attention_cpu
from alora_core.model.batch import SeqSpan, StepBatch
from alora_core.model.cpu_kernels import CpuKernels

ATTN_IMPLEMENTATION = "alora_paged"

# Above this many query rows a contiguous sequence uses SDPA (fused, causal mask built in).
SDPA_MIN_QUERIES = 16
# Queries of the prefill chunk timed at start-up to choose the CPU kernel or SDPA for long chunks.
PREFILL_PROBE = 256
# Bound on the score matrix of the matmul reference path (elements); rows are processed in chunks below it.
MAX_SCORE_ELEMENTS = 1 << 24
# Devices whose short-query sequences attend in gathered, padded batches (one SDPA call per batch).
GATHER_DEVICES = frozenset({"cuda"})
# Bounds on one gathered batch: key elements copied (B * L * KVH * D, as much again for V) and scores.
MAX_GATHER_ELEMENTS = 1 << 26
MAX_GATHER_SCORES = 1 << 28
# Keyword arguments transformers passes to every attention function that change nothing it computes.
NEUTRAL_KWARGS = frozenset(
    {"position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits"}
)

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
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    step_batch: StepBatch | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """query: [1, H, T, D]; key, value: [1, KVH, T, D]. Returns ([1, T, H, D], None).
    sliding_window: keys within this distance (transformers' convention: i - j < window), None = all;
    softcap: attention logit soft-capping; s_aux: [H] attention sink logits."""
    if step_batch is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs the step_batch forward kwarg")
    if (
        attention_mask is not None
        or dropout
        or not NEUTRAL_KWARGS.issuperset(kwargs)
        or is_causal is False
        or getattr(module, "is_causal", True) is False
    ):
        _refuse_unhandled(module, attention_mask, dropout, is_causal, kwargs)
    if step_batch.device_step is not None:  # CUDA: one paged Triton kernel over the pool, no gather
        from alora_core.model.paged_attention_triton import attention_forward

        return attention_forward(
            module, query, key, value, scaling, step_batch, sliding_window, softcap, s_aux
        )
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache = step_batch.kv[layer, 0]  # [KVH, S, D]
    v_cache = step_batch.kv[layer, 1]
    k_cache.index_copy_(1, step_batch.slot_mapping, key[0].to(k_cache.dtype))
    v_cache.index_copy_(1, step_batch.slot_mapping, value[0].to(v_cache.dtype))

    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window
    sinks = None if s_aux is None else s_aux.float()
    seqs = step_batch.seqs
    if window is not None:  # the first layer of each window drops the slots no query of the step sees
        seqs = step_batch.derive(("window", window), functools.partial(window_spans, seqs, window))
    num_heads = query.shape[1]
    out = torch.empty(query.shape[2], num_heads, query.shape[3], dtype=query.dtype, device=query.device)
    gather = query.device.type in GATHER_DEVICES
    # which sequences take SDPA depends on these too: plans are per (window, sdpa) routing
    sdpa = softcap is None and sinks is None
    kernels = step_batch.cpu_kernels
    covered: frozenset[int] = frozenset()  # the sequences the CPU kernel served
    if kernels is not None and _kernel_serves(query, k_cache):  # CPU: one kernel call for the step
        leave_prefill = sdpa and not step_batch.kernel_prefill  # long single-run chunks: ATen's SDPA
        plan, covered = step_batch.derive(
            ("kernel", leave_prefill), lambda: kernel_plan(step_batch.seqs, leave_prefill)
        )
        if plan is not None:
            q_rows = query[0].transpose(0, 1)  # [T, H, D]
            features = {"window": window, "softcap": softcap, "sinks": sinks}
            paged_attention_cpu.attend(kernels, plan, q_rows, k_cache, v_cache, out, scale, **features)
        if len(covered) == len(seqs):
            return out.unsqueeze(0), None
    short: list[SeqSpan] = []  # the gathered path's sequences
    by_first_slot: dict[int, list[tuple[slice, torch.Tensor, Segments, int]]] = defaultdict(list)
    for i, seq in enumerate(seqs):
        if i in covered:
            continue
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        q = query[0, :, rows]  # [H, t, D]
        q_offset = seq.context_len - seq.query_len
        if sdpa and _use_sdpa(seq.kv_segments, seq.query_len):
            o = attend(q, k_cache, v_cache, seq.kv_segments, q_offset, scale, window=window)
            out[rows] = o.transpose(0, 1)
        elif gather:
            short.append(seq)
        else:
            by_first_slot[seq.kv_segments[0][0]].append((rows, q, seq.kv_segments, q_offset))
    if short:
        groups = num_heads // k_cache.shape[0]
        plan = step_batch.derive(  # the first layer of the step plans for all of them
            ("gather", groups, window, sdpa),
            lambda: gather_plan(short, groups, k_cache.shape[0] * k_cache.shape[2], query.device, window),
        )
        for batch in plan:
            attend_gathered(batch, query[0], k_cache, v_cache, scale, out, softcap=softcap, sinks=sinks)
    for first_slot, items in by_first_slot.items():
        group = [(q, segs, off) for _, q, segs, off in items]
        fork_plan = None
        if not _lone_decode(group, softcap, window):
            fork_plan = step_batch.derive(
                ("forks", first_slot, window, sdpa),
                functools.partial(plan_forks, group, k_cache.shape[0], query.dtype, window),
            )
        outs = attend_forks(group, k_cache, v_cache, scale, fork_plan, softcap=softcap, sinks=sinks)
        for (rows, _, _, _), o in zip(items, outs, strict=True):
            out[rows] = o.transpose(0, 1)
    return out.unsqueeze(0), None


def _kernel_serves(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The CPU kernel computes float32 on the CPU with head sizes in whole vectors of 16."""
    return (
        query.device.type == "cpu"
        and query.dtype == torch.float32
        and k_cache.dtype == torch.float32
        and query.shape[-1] % 16 == 0
        and query.stride(-1) == 1
    )


def kernel_plan(
    seqs: tuple[SeqSpan, ...], leave_prefill: bool = False
) -> tuple[paged_attention_cpu.KernelPlan | None, frozenset[int]]:
    """The CPU kernel's plan for a step: its sequences grouped by first pool slot (forks share their
    prefix), and the indices of those it serves: every sequence, or with `leave_prefill` all but the
    single-run chunks of SDPA_MIN_QUERIES tokens or more (ATen's SDPA takes them). Built once a step;
    positions are the spans' own (the kernel applies any window)."""
    by_first_slot: dict[int, list[int]] = defaultdict(list)
    for i, seq in enumerate(seqs):
        if not (leave_prefill and _use_sdpa(seq.kv_segments, seq.query_len)):
            by_first_slot[seq.kv_segments[0][0]].append(i)
    groups = []
    for members in by_first_slot.values():
        spans = tuple(seqs[i] for i in members)
        if len(spans) == 1:
            shared, owns = spans[0].kv_segments, ((),)
        else:
            shared = _common_runs([s.kv_segments for s in spans], min(s.context_len for s in spans))
            n = sum(e - s for s, e in shared)
            owns = tuple(_skip(s.kv_segments, n) for s in spans)
        groups.append(paged_attention_cpu.KernelGroup(spans, shared, owns))
    covered = frozenset(i for members in by_first_slot.values() for i in members)
    return (paged_attention_cpu.build_plan(groups) if groups else None), covered


def kernel_wins_prefill(
    kernels: CpuKernels,
    heads: int,
    kv_heads: int,
    head_dim: int,
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> bool:
    """Whether the CPU kernel computes a prefill chunk (PREFILL_PROBE queries over as many cached keys
    and their own) faster than ATen's SDPA does for this head layout, timed once at start-up in this
    thread's CPU time: the kernel won on the AMD CI VM (512 queries over 8192 keys 1.4x); ATen's SDPA
    runs on MKL's GEMMs, which other CPUs serve better."""
    t, n = PREFILL_PROBE, 2 * PREFILL_PROBE
    gen = torch.Generator().manual_seed(0)
    k_cache, v_cache = (torch.randn(kv_heads, n, head_dim, generator=gen) for _ in range(2))
    query = torch.randn(1, t, heads, head_dim, generator=gen).transpose(1, 2)  # the model's layout
    seq = SeqSpan(query_start=0, query_len=t, context_len=n, kv_segments=((0, n),))
    plan = paged_attention_cpu.build_plan([paged_attention_cpu.KernelGroup((seq,), seq.kv_segments, ((),))])
    out = torch.empty(t, heads, head_dim)
    scale = head_dim**-0.5

    def by_kernel() -> None:
        paged_attention_cpu.attend(kernels, plan, query[0].transpose(0, 1), k_cache, v_cache, out, scale)

    def by_sdpa() -> None:
        attend(query[0], k_cache, v_cache, seq.kv_segments, n - t, scale)

    timer = timer or _fastest_cpu_s
    with torch.inference_mode():
        return timer(by_kernel) <= timer(by_sdpa)


def _fastest_cpu_s(fn: Callable[[], object], repeats: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def _refuse_unhandled(
    module: torch.nn.Module,
    attention_mask: torch.Tensor | None,
    dropout: float,
    is_causal: bool | None,
    kwargs: dict[str, object],
) -> None:
    """Whatever the layer asks for that the paged attention does not compute is refused, never dropped.
    The start-up probe runs every layer once, so a model that asks for any of it is refused there."""
    unhandled = [
        f"{name}={_short(v)}" for name, v in kwargs.items() if name not in NEUTRAL_KWARGS and v is not None
    ]
    if attention_mask is not None:
        unhandled.append("a custom attention mask")
    if dropout:
        unhandled.append(f"attention dropout {dropout}")
    if is_causal is False or getattr(module, "is_causal", True) is False:
        unhandled.append("non-causal (bidirectional) attention")
    if unhandled:
        model_type = getattr(getattr(module, "config", None), "model_type", type(module).__name__)
        raise UnsupportedModelError(str(model_type), f"attention with {', '.join(unhandled)}")


def _short(value: object) -> str:
    return f"tensor{tuple(value.shape)}" if isinstance(value, torch.Tensor) else repr(value)[:40]


def window_spans(seqs: tuple[SeqSpan, ...], window: int) -> tuple[SeqSpan, ...]:
    """Each sequence without the keys older than its step's first query's window: none of its queries
    sees them (query i sees key j iff i - j < window), so they are not read at all. Positions stay
    relative (the first kept key becomes key 0), which is all attention depends on."""
    spans = []
    for seq in seqs:
        first_visible = seq.context_len - seq.query_len - window + 1
        if first_visible > 0:
            seq = dataclasses.replace(
                seq,
                context_len=seq.context_len - first_visible,
                kv_segments=_skip(seq.kv_segments, first_visible),
            )
        spans.append(seq)
    return tuple(spans)


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
    if not _use_sdpa(segments, t, softcap, sinks):
        features = {"window": window, "softcap": softcap, "sinks": sinks}
        return attend_forks([(q, segments, q_offset)], k_cache, v_cache, scale, **features)[0]
    start, end = segments[0]
    k = k_cache[:, start:end].unsqueeze(0)  # [1, KVH, n, D] view
    v = v_cache[:, start:end].unsqueeze(0)
    window = _binding(window, end - start)
    if q_offset == 0 and window is None:
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        positions = torch.arange(end - start, device=q.device)
        mask = _visible(positions[q_offset:], positions, window)  # [t, n]
        o = F.scaled_dot_product_attention(q.unsqueeze(0), k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return o[0]


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[..., r] query positions, [n] key positions -> [..., r, n] bool: key <= query, within the window
    (transformers' sliding overlay: query - key < window)."""
    seen = key_pos <= query_pos.unsqueeze(-1)
    if window is not None:
        seen &= key_pos > query_pos.unsqueeze(-1) - window
    return seen


def _binding(window: int | None, keys: int) -> int | None:
    """The window, if it hides anything among `keys` positions 0..keys-1; None if every pair is closer."""
    return window if window is not None and keys > window else None


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
    window = _binding(window, max(s.context_len for s in seqs))
    slots = torch.empty(b, keys, dtype=torch.long)
    for row, s in enumerate(seqs):
        slots[row] = s.kv_segments[0][0]
        slots[row, : s.context_len] = torch.cat([torch.arange(start, end) for start, end in s.kv_segments])
    t = torch.tensor([s.query_len for s in seqs])[:, None]
    offset = torch.tensor([s.context_len - s.query_len for s in seqs])[:, None]
    query = torch.minimum(torch.arange(tq)[None, :], t - 1)  # [B, Tq] padding repeats the last real row
    mask = _visible(offset + query, torch.arange(keys), window)  # [B, Tq, L]
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
        o, lse = _part_matmul(q, k, v, mask.masked_fill_(~batch.mask, float("-inf")), scale, softcap)
        if sinks is not None:
            o = o * _sink_weight(lse, sinks, tq)
        o = o.to(q.dtype)
    o = o.view(b, num_kv_heads, -1, tq, dim).permute(0, 3, 1, 2, 4).reshape(b * tq, heads, dim)
    out.index_copy_(0, batch.out_rows, o.index_select(0, batch.real))


def _use_sdpa(
    segments: Segments, t: int, softcap: float | None = None, sinks: torch.Tensor | None = None
) -> bool:
    return len(segments) == 1 and t >= SDPA_MIN_QUERIES and softcap is None and sinks is None


def _sink_weight(lse: torch.Tensor, sinks: torch.Tensor, t: int) -> torch.Tensor:
    """What attention sinks leave of each row's output: lse [..., KVH, G*t] (rows g*t + i are head
    h*G + g), sinks [H] -> [..., KVH, G*t, 1] = exp(lse) / (exp(lse) + exp(sink))."""
    num_kv_heads = lse.shape[-2]
    sink_rows = sinks.view(num_kv_heads, -1, 1).expand(-1, -1, t).reshape(num_kv_heads, -1)
    return torch.sigmoid(lse - sink_rows).unsqueeze(-1)


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


def _lone_decode(items: list[Fork], softcap: float | None = None, window: int | None = None) -> bool:
    """One decode token over one run, on the CPU flash kernel: one unmasked call, nothing to plan or merge."""
    q, segments, _ = items[0]
    if len(items) != 1 or len(segments) != 1 or q.shape[1] != 1 or softcap is not None:
        return False
    return _binding(window, segments[0][1] - segments[0][0]) is None and _flash_cpu_serves(q)


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
    if _lone_decode(items, softcap, window):
        q, ((start, end),), _ = items[0]
        out, lse = _flash_cpu(
            q.reshape(num_kv_heads, -1, dim), k_cache[:, start:end], v_cache[:, start:end], None, scale
        )
        if sinks is not None:
            out = (out * _sink_weight(lse.float(), sinks, 1)).to(q.dtype)
        return [out.reshape(q.shape)]
    plan = plan or plan_forks(items, num_kv_heads, items[0][0].dtype, window)
    # q: [H, t, D] -> [KVH, G*t, D]; row g*t + i of kv-head h is head h*G + g at query i (HF repeat_kv order).
    qgs = [q.reshape(num_kv_heads, -1, dim) for q, _, _ in items]
    q_all = qgs[0] if len(qgs) == 1 else torch.cat(qgs, dim=1)  # [KVH, R, D]
    masks = plan.shared_masks or (None,) * len(plan.shared)
    parts = []
    for (s, e), shared_mask in zip(plan.shared, masks, strict=True):
        mask, empty = shared_mask or (None, None)
        parts.append(_part(q_all, k_cache[:, s:e], v_cache[:, s:e], mask, scale, empty, softcap))
    if plan.own is not None:
        parts.append(_own_part(q_all, k_cache, v_cache, plan.own, scale, softcap))
    out, lse = _merge(parts)
    results, row = [], 0
    for (q, _, _), rows in zip(items, plan.rows, strict=True):
        o = out[:, row : row + rows]
        if sinks is not None:
            o = o * _sink_weight(lse[:, row : row + rows], sinks, q.shape[1])
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
    out, lse = _part(q, k, v, own.mask, scale, own.empty, softcap)  # [F, KVH, M, D], [F, KVH, M]
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
    window = _binding(window, max(off + q.shape[1] for q, _, off in items))
    common = _common_runs([segs for _, segs, _ in items], min(off for _, _, off in items) + 1)
    shared = sum(e - s for s, e in common)
    owns = [_skip(segs, shared) for _, segs, _ in items]  # each sequence's keys past the shared runs
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
        seen = _visible(offset + query, shared + torch.arange(n), window)
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
        seen = _visible(positions, torch.arange(first, first + end - start), window)  # [R, n]
        first += end - start
        if bool(seen.all()):
            masks.append(None)
            continue
        mask = torch.zeros(seen.shape, dtype=dtype).masked_fill_(~seen, float("-inf"))
        empty = ~seen.any(dim=-1)
        masks.append((mask.to(device), empty.to(device) if bool(empty.any()) else None))
    return tuple(masks)


def _part(
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
    if softcap is not None or not _flash_cpu_serves(q):
        return _part_matmul(q, k, v, mask, scale, softcap)
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
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    softcap: float | None = None,
) -> Part:
    """The reference of `_part` in plain matmuls (any device), in row chunks of bounded score size."""
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


def _merge(parts: list[Part]) -> Part:
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
