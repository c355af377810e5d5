"""Paged attention backend, registered with transformers' AttentionInterface as "alora_paged".

The HF attention module hands us this step's q/k/v (RoPE applied) for the flat batch. We write the
new K/V into the pool at `slot_mapping`, then attend each sequence over its KV where it lies:

    pool kv[layer, 0|1]: [KVH, S, D]      a sequence = ordered slot ranges (segments) of the pool
    q: [H, t, D]  ->  grouped [KVH, G*t, D]  (G = H / KVH, no K/V repeat)

Which path serves a step (`paged_attention_forward`):
    CUDA with step buffers      one paged Triton kernel over the pool      paged_attention_triton.py
    CPU with the C kernels      one kernel call per layer for the step     paged_attention_cpu.py
    other GPU steps             short-query sequences in gathered batches  attention_gather.py
    CPU without the kernels     parts over the pool's runs, forks share    attention_forks.py
                                their prefix, merged by logsumexp          (attention_parts.py)
    long single-run chunks      torch SDPA on the pool view (CPU: where it beats the kernel)

What a layer asks for, and how it is honoured (anything else is refused, see `_refuse_unhandled`):
    scores = q k^T * scaling                       the layer's own scaling
    scores = softcap * tanh(scores / softcap)      logit soft-capping (Gemma-2)
    key j visible to query i iff j <= i and i - j < sliding_window    (transformers' sliding overlay)
    out *= sigmoid(lse - s_aux[h])                 attention sinks (gpt-oss): one more logit per head
A sliding layer first drops every key older than the window of its step's first query
(`window_spans`, once a step per window): those slots are never read. Keys the later queries of a
chunk no longer see are masked.

Keys at positions <= the first query's position are visible to every query of the step (within a
window: unless it slid past them), so they need no mask; only the step's own new keys (at most
t - 1 of them) get a causal mask. A decode token over one contiguous run is therefore a single
unmasked kernel call.
"""

import dataclasses
import functools
import time
from collections import defaultdict
from collections.abc import Callable

import torch
from transformers import AttentionInterface

from alora_core.errors import UnsupportedModelError
from alora_core.model import paged_attention_cpu
from alora_core.model.attention_forks import attend, attend_forks, lone_decode, plan_forks, use_sdpa
from alora_core.model.attention_gather import attend_gathered, gather_plan
from alora_core.model.attention_parts import Segments, common_runs, skip
from alora_core.model.batch import SeqSpan, StepBatch
from alora_core.model.cpu_kernels import CpuKernels

ATTN_IMPLEMENTATION = "alora_paged"

# Queries of the prefill chunk timed at start-up to choose the CPU kernel or SDPA for long chunks.
PREFILL_PROBE = 256
# Devices whose short-query sequences attend in gathered, padded batches (one SDPA call per batch).
GATHER_DEVICES = frozenset({"cuda"})
# Keyword arguments transformers passes to every attention function that change nothing it computes.
NEUTRAL_KWARGS = frozenset(
    {"position_ids", "cache_position", "use_cache", "output_attentions", "output_router_logits"}
)


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
            if query.dtype == torch.float32:
                paged_attention_cpu.attend(kernels, plan, q_rows, k_cache, v_cache, out, scale, **features)
            else:  # bfloat16: the kernel reads the pool as it is, computes and writes float32
                out32 = torch.empty(out.shape)
                paged_attention_cpu.attend(
                    kernels, plan, q_rows.float(), k_cache, v_cache, out32, scale, **features
                )
                out.copy_(out32)  # rows the kernel did not cover are written below
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
        if sdpa and use_sdpa(seq.kv_segments, seq.query_len):
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
        if not lone_decode(group, softcap, window):
            fork_plan = step_batch.derive(
                ("forks", first_slot, window, sdpa),
                functools.partial(plan_forks, group, k_cache.shape[0], query.dtype, window),
            )
        outs = attend_forks(group, k_cache, v_cache, scale, fork_plan, softcap=softcap, sinks=sinks)
        for (rows, _, _, _), o in zip(items, outs, strict=True):
            out[rows] = o.transpose(0, 1)
    return out.unsqueeze(0), None


def _kernel_serves(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """The CPU kernel computes in float32 on the CPU, over a float32 or bfloat16 pool (queries of the
    pool's dtype), with head sizes in whole vectors of 16."""
    return (
        query.device.type == "cpu"
        and query.dtype == k_cache.dtype
        and k_cache.dtype in paged_attention_cpu.KV_DTYPES
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
        if not (leave_prefill and use_sdpa(seq.kv_segments, seq.query_len)):
            by_first_slot[seq.kv_segments[0][0]].append(i)
    groups = []
    for members in by_first_slot.values():
        spans = tuple(seqs[i] for i in members)
        if len(spans) == 1:
            shared, owns = spans[0].kv_segments, ((),)
        else:
            shared = common_runs([s.kv_segments for s in spans], min(s.context_len for s in spans))
            n = sum(e - s for s, e in shared)
            owns = tuple(skip(s.kv_segments, n) for s in spans)
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
                kv_segments=skip(seq.kv_segments, first_visible),
            )
        spans.append(seq)
    return tuple(spans)


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
