"""Paged attention for CUDA in Triton: one launch per layer, for a whole mixed step (prefill chunks
over their cached prefix, decode tokens, intrinsic forks sharing blocks), reading K/V where they lie
in the pool: no gather, no mask tensor, GQA without repeating K/V.

    for s in sequences:                                           # = paged_attention_reference
        slot(s, j) = block_tables[s, j // B] * B + j % B           # pool slot of key j of s (B = block size)
        for i in range(query_len(s)):   t = query_start[s] + i,  pos = seq_lens[s] - query_len(s) + i
            for h in heads:             kv = h // G                # G = query heads per kv head
                visible j:   j <= pos   and (window == 0 or pos - j < window)
                x_j = scale * q[t, h] . K[kv, slot(s, j)]         then softcap * tanh(x_j / softcap) if softcap
                out[t, h] = sum_j e^x_j V[kv, slot(s, j)] / (sum_j e^x_j + (e^sinks[h] if sinks else 0))

Work split (after vLLM's unified Triton attention; our own code):

    grid (T // BLOCK_Q + num_seqs, KVH, segments)          static in (T, num_seqs): no per-step host work
    program (b, kv, seg):  query block b -> its sequence by a binary search over query_start (sequence s
        owns blocks query_start[s] // BLOCK_Q + s ...; spare programs return at once)
        rows: BLOCK_Q tokens x G heads of kv head `kv` = BLOCK_M rows, so K/V tiles are loaded once per kv head
        keys: the block's visible range [lo, hi) (lo > 0 only under a sliding window) in tiles of TILE_N,
              block-table lookup per key; online softmax in float32
        segments == 1:  out = acc / l                                                   (one launch)
        segments  > 1:  each segment a contiguous share of the tiles -> (acc, max, sum) partials,
                        then reduce: out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s   (split-KV)

Tiling and split heuristic (`plan_launch`): a program's rows are the G heads of its kv head times as
many of a sequence's tokens as fit in 16..64 rows (a decode with G = 4: 16 rows; a 10-token invocation:
64 rows, all its tokens, so its keys are read once per kv head). Short-query steps (decode, an
intrinsic's invocation: every query <= 16 tokens) over long contexts have few programs (batch 1 with 8
KV heads: 8), each streaming the whole context; they split the keys into up to 16 segments until the
grid fills the GPU (2 programs per SM), keeping >= 256 keys per segment. Long queries: 64 rows, no split.

New K/V are written by `write_kv` (one launch for K and V) at slot_mapping; slot -1 (padding) is skipped.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]
from torch import nn

from alora_core.model.batch import StepBatch
from alora_core.model.step_buffers import DeviceStep
from alora_core.model.triton_helpers import INTERPRET, add_combine, cdiv, dot, max_combine, tanh

SHORT_QUERY = 16  # steps whose queries are all this short fit 16..64-row blocks and may split the keys
MAX_SEGMENTS = 16
MIN_KEYS_PER_SEGMENT = 256
TILE_N = 64  # keys per inner iteration
NUM_WARPS, NUM_STAGES = 4, 2  # not autotuned: one compile per variant, nothing to tune inside a capture


@dataclass(frozen=True)
class Launch:
    block_m: int  # rows of a program: block_q tokens x G heads (padded to a power of two >= 16)
    block_q: int
    tile_n: int
    segments: int  # 1: one launch; > 1: split-KV partials + a reduce launch


def plan_launch(step: DeviceStep, num_kv_heads: int, groups: int, target_programs: int) -> Launch:
    """Block shape and key split of one step (host ints only: the same for every layer)."""
    short = step.max_query_len <= SHORT_QUERY
    # a short query's tokens in one block where they fit: each block re-reads its sequence's keys
    rows = min(64, max(16, triton.next_power_of_2(groups * step.max_query_len))) if short else 64
    block_m = max(rows, triton.next_power_of_2(groups))
    block_q = max(1, block_m // groups)
    segments = 1
    if short:
        programs = (step.num_tokens // block_q + step.num_seqs) * num_kv_heads
        wanted = triton.next_power_of_2(max(1, math.ceil(target_programs / programs)))
        by_keys = max(1, step.max_seq_len // MIN_KEYS_PER_SEGMENT)
        segments = min(MAX_SEGMENTS, wanted, 1 << (by_keys.bit_length() - 1))
    return Launch(block_m, block_q, TILE_N, segments)


@functools.cache
def target_programs(device: torch.device) -> int:
    """Programs that fill the GPU (2 per SM); on CPU (the interpreter) a few, to exercise the split."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


@triton.jit
def _find_sequence(query_start_ptr, num_seqs, q_block, BLOCK_Q: tl.constexpr):
    """The last sequence s whose first query block (query_start[s] // BLOCK_Q + s) is <= q_block."""
    lo = 0
    hi = num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        starts_before = tl.load(query_start_ptr + mid) // BLOCK_Q + mid <= q_block
        lo = tl.where(starts_before, mid, lo)
        hi = tl.where(starts_before, hi, mid)
    return lo


@triton.jit(do_not_specialize=["num_seqs", "window"])
def _attention_kernel(
    q_ptr,  # [T, H, D] (any token / head strides, unit dim stride)
    k_ptr, v_ptr,  # [KVH, S, D] one layer's pool
    out_ptr,  # [T, H, D]
    part_acc_ptr, part_max_ptr, part_sum_ptr,  # [T, H, segments, HEAD_DIM_P], [T, H, segments] x2 float32
    block_tables_ptr, seq_lens_ptr, query_start_ptr,  # [>=num_seqs, stride_bt], [>=num_seqs], [num_seqs + 1]
    sinks_ptr,  # [H] (SINKS only)
    num_seqs, scale, softcap, window,
    stride_qt, stride_qh, stride_kh, stride_ks, stride_vh, stride_vs, stride_ot, stride_oh, stride_bt,
    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, TILE_N: tl.constexpr, SPLIT: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SINKS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    q_block = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _find_sequence(query_start_ptr, num_seqs, q_block, BLOCK_Q)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    first = (q_block - (q_start // BLOCK_Q + seq)) * BLOCK_Q  # first query of this block in its sequence
    if first >= q_len:
        return  # a spare program of the static grid
    offset = tl.load(seq_lens_ptr + seq) - q_len  # position of the sequence's first query

    rows = tl.arange(0, BLOCK_M)
    token = first + rows // GROUPS
    head = kv_head * GROUPS + rows % GROUPS  # row = token-major, then the G heads of this kv head
    row_ok = (rows < BLOCK_Q * GROUPS) & (token < q_len)
    pos = offset + token
    t = (q_start + token).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM_P)
    dim_ok = dims < HEAD_DIM
    q = tl.load(
        q_ptr + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )

    hi = offset + tl.minimum(q_len, first + BLOCK_Q)  # keys [lo, hi): visible to some row of the block
    lo = 0
    if WINDOW:
        lo = tl.maximum(0, offset + first - window + 1)
    tile_lo = lo // TILE_N
    tiles = cdiv(hi, TILE_N) - tile_lo
    per_segment = cdiv(tiles, tl.num_programs(2))
    tile_begin = tile_lo + segment * per_segment
    tile_end = tl.minimum(tile_lo + tiles, tile_begin + per_segment)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    if SINKS:  # the sink is one more logit in the denominator: start from it (in segment 0 only)
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
        m_i = tl.where(row_ok & (segment == 0), sink, m_i)
        l_i = tl.where(row_ok & (segment == 0), 1.0, l_i)
    acc = tl.full((BLOCK_M, HEAD_DIM_P), 0.0, tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_ptr + kv_head.to(tl.int64) * stride_kh
    v_head = v_ptr + kv_head.to(tl.int64) * stride_vh
    cols = tl.arange(0, TILE_N)
    for tile in range(tile_begin, tile_end):
        key = tile * TILE_N + cols
        key_ok = (key >= lo) & (key < hi)
        block = tl.load(table + key // BLOCK_SIZE, mask=key_ok, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + key % BLOCK_SIZE
        kt = tl.load(  # K^T tile [HEAD_DIM_P, TILE_N]
            k_head + slot[None, :] * stride_ks + dims[:, None],
            mask=dim_ok[:, None] & key_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_head + slot[:, None] * stride_vs + dims[None, :],
            mask=key_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        x = dot(q, kt, tl.full((BLOCK_M, TILE_N), 0.0, tl.float32), DOT_PRECISION, UPCAST) * scale
        if SOFTCAP:
            x = softcap * tanh(x / softcap)
        visible = row_ok[:, None] & key_ok[None, :] & (key[None, :] <= pos[:, None])
        if WINDOW:
            visible = visible & (pos[:, None] - key[None, :] < window)
        x = tl.where(visible, x, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(x, 1, max_combine))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet: no nan
        p = tl.exp(x - m_ref[:, None])
        alpha = tl.exp(m_i - m_ref)
        l_i = l_i * alpha + tl.reduce(p, 1, add_combine)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION, UPCAST)
        m_i = m_new

    if SPLIT:  # every segment writes its partials, an empty one too (max -inf, sum 0)
        part = (t * (tl.num_programs(1) * GROUPS) + head) * tl.num_programs(2) + segment
        tl.store(part_max_ptr + part, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part, l_i, mask=row_ok)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_P + dims[None, :], acc, mask=row_ok[:, None])
    else:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )


@triton.jit
def _reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    num_segments, stride_ot, stride_oh,
    GROUPS: tl.constexpr, GROUPS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
    SEGMENTS_P: tl.constexpr,
):  # fmt: skip
    """Program (t, kv): the G heads of kv head `kv` at row t, over every segment's partials."""
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1) * GROUPS + tl.arange(0, GROUPS_P)
    head_ok = tl.arange(0, GROUPS_P) < GROUPS
    segs = tl.arange(0, SEGMENTS_P)
    ok = head_ok[:, None] & (segs < num_segments)[None, :]
    part = (t * (tl.num_programs(1) * GROUPS) + head)[:, None] * num_segments + segs[None, :]  # [G, SEG]
    m = tl.load(part_max_ptr + part, mask=ok, other=float("-inf"))
    l = tl.load(part_sum_ptr + part, mask=ok, other=0.0)  # noqa: E741
    m_all = tl.reduce(m, 1, max_combine)
    weight = tl.exp(m - tl.where(m_all == float("-inf"), 0.0, m_all)[:, None])  # empty segments: 0
    total = tl.reduce(l * weight, 1, add_combine)
    dims = tl.arange(0, HEAD_DIM_P)
    acc = tl.load(  # [G, SEG, HEAD_DIM_P]
        part_acc_ptr + part[:, :, None] * HEAD_DIM_P + dims[None, None, :], mask=ok[:, :, None], other=0.0
    )
    out = tl.reduce(acc * weight[:, :, None], 1, add_combine) / tl.where(total == 0.0, 1.0, total)[:, None]
    tl.store(
        out_ptr + t * stride_ot + head[:, None] * stride_oh + dims[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & (dims < HEAD_DIM)[None, :],
    )


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr,  # [T, KVH, D] (any token / head strides)
    k_cache_ptr, v_cache_ptr,  # [KVH, S, D]
    slots_ptr,  # [T] int64, -1 = padding: nothing written
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ch, stride_cs, stride_vch, stride_vcs,
    KV_HEADS: tl.constexpr, KV_HEADS_P: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + t)
    if slot < 0:
        return
    heads = tl.arange(0, KV_HEADS_P)
    dims = tl.arange(0, HEAD_DIM_P)
    mask = (heads < KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(key_ptr + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    k_dst = k_cache_ptr + heads[:, None] * stride_ch + slot * stride_cs + dims[None, :]
    v_dst = v_cache_ptr + heads[:, None] * stride_vch + slot * stride_vcs + dims[None, :]
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """k_cache[:, slots[t]] = key[t] (and V), for every t with slots[t] >= 0. key, value: [T, KVH, D]."""
    num_tokens, kv_heads, dim = key.shape
    if num_tokens == 0:
        return
    for x in (key, value, k_cache, v_cache):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        KV_HEADS=kv_heads, KV_HEADS_P=triton.next_power_of_2(kv_heads),
        HEAD_DIM=dim, HEAD_DIM_P=triton.next_power_of_2(dim),
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    step: DeviceStep,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    launch: Launch | None = None,
) -> torch.Tensor:
    """out[t, h] for every query row of the step (see the module docstring). q, out: [T, H, D];
    caches: [KVH, S, D]; sinks: [H] or None. `launch` overrides the plan (tests)."""
    num_tokens, heads, dim = q.shape
    kv_heads = k_cache.shape[0]
    groups = heads // kv_heads
    if num_tokens == 0:
        return out
    for x in (q, k_cache, v_cache, out):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    launch = launch or plan_launch(step, kv_heads, groups, target_programs(q.device))
    dim_p = max(16, triton.next_power_of_2(dim))
    split = launch.segments > 1
    if split:
        part_acc = _partials(num_tokens, heads, launch.segments, dim_p, device=q.device)
        part_max = _partials(num_tokens, heads, launch.segments, device=q.device)
        part_sum = _partials(num_tokens, heads, launch.segments, device=q.device)
    else:
        part_acc = part_max = part_sum = out  # not read
    grid = (num_tokens // launch.block_q + step.num_seqs, kv_heads, launch.segments)
    _attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_max, part_sum,
        step.block_tables, step.seq_lens, step.query_start, sinks if sinks is not None else out,
        step.num_seqs, scale, softcap or 0.0, window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), step.block_tables.stride(0),
        GROUPS=groups, HEAD_DIM=dim, HEAD_DIM_P=dim_p, BLOCK_SIZE=step.block_size,
        BLOCK_M=launch.block_m, BLOCK_Q=launch.block_q, TILE_N=launch.tile_n, SPLIT=split,
        SOFTCAP=bool(softcap), WINDOW=bool(window), SINKS=sinks is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        UPCAST=INTERPRET and q.dtype == torch.bfloat16,
        num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    if split:
        _reduce_kernel[(num_tokens, kv_heads)](
            out, part_acc, part_max, part_sum, launch.segments, out.stride(0), out.stride(1),
            GROUPS=groups, GROUPS_P=triton.next_power_of_2(groups), HEAD_DIM=dim, HEAD_DIM_P=dim_p,
            SEGMENTS_P=triton.next_power_of_2(launch.segments),
        )  # fmt: skip
    return out


def _partials(*shape: int, device: torch.device) -> torch.Tensor:
    """Split-KV partials: every element of a real row is written before the reduce reads it."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    step_batch: StepBatch,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """The CUDA path of attention.paged_attention_forward: query [1, H, T, D], key/value [1, KVH, T, D]
    -> ([1, T, H, D], None). The layer's sliding window, soft-capping and sinks are honoured."""
    step = step_batch.device_step
    assert step is not None, "the paged kernel reads the step's device metadata (model/step_buffers.py)"
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    k_cache, v_cache = step_batch.kv[layer, 0], step_batch.kv[layer, 1]
    write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, step_batch.slot_mapping)
    q = query[0].transpose(0, 1)  # [T, H, D] view
    out = torch.empty(q.shape, dtype=query.dtype, device=query.device)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    paged_attention(q, k_cache, v_cache, out, step, scale, softcap, sliding_window, s_aux)
    return out.unsqueeze(0), None


def paged_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    block_size: int,
    scale: float,
    softcap: float | None = None,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The module docstring's semantics in plain torch (float32 math), over the same block tables:
    q [T, H, D], caches [KVH, S, D], block_tables [>=n, B], seq_lens [>=n], query_start [n + 1]."""
    heads, kv_heads = q.shape[1], k_cache.shape[0]
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    starts = query_start.tolist()
    for s in range(len(starts) - 1):
        rows = slice(starts[s], starts[s + 1])
        n, t = int(seq_lens[s]), starts[s + 1] - starts[s]
        if t == 0:
            continue
        j = torch.arange(n, device=q.device)
        slots = block_tables[s].long()[j // block_size] * block_size + j % block_size
        k = k_cache[:, slots].float().repeat_interleave(heads // kv_heads, 0)  # [H, n, D]
        v = v_cache[:, slots].float().repeat_interleave(heads // kv_heads, 0)
        x = q[rows].float().transpose(0, 1) @ k.transpose(1, 2) * scale  # [H, t, n]
        if softcap:
            x = softcap * torch.tanh(x / softcap)
        pos = (n - t + torch.arange(t, device=q.device))[:, None]
        visible = j[None, :] <= pos
        if window:
            visible &= pos - j[None, :] < window
        x = x.masked_fill(~visible, float("-inf"))
        if sinks is not None:  # one more logit per head in the softmax, with no value
            x = torch.cat([x, sinks.float()[:, None, None].expand(heads, t, 1)], dim=-1)
        p = torch.softmax(x, dim=-1)[..., :n]
        out[rows] = (p @ v).transpose(0, 1)
    return out.to(q.dtype)
