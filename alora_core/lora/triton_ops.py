"""Fused masked-LoRA for CUDA: two Triton launches (shrink, expand) serve every adapter of a step.

    for t in tokens:                                   # = ops.masked_lora_reference, the oracle
        if idx[t] >= 0:
            y[t] += scale[idx[t]] * B[idx[t]] @ (A[idx[t]] @ x[t])

Tokens are grouped by adapter once per step (`token_blocks`); each layer group (one linear, or the
q/k/v or gate/up linears that read the same x) keeps its adapters stacked (`LoraStack`):

    rows:   flat-batch rows with idx >= 0, sorted by slot       [n]             per step
    blocks: (slot, first, count): <= BLOCK_M consecutive rows   [n_blocks, 3]   per step
    stack:  a [S, NS, R, in]  b [S, sum(out_s), R]  scale [S, NS]   R = padded rank, zeros past rank

    shrink  grid (NS, n_blocks, split_k):  part[k, s, i] = x[rows[i], K_k] @ A[slot, s, :, K_k]^T
    expand  grid (NS, n_blocks, split_n):  y_s[rows[i], N_j] += scale[slot, s] * (sum_k part[k, s, i]) @ B_s[slot, N_j]^T

Rows with idx = -1 appear in no block, so they cost nothing. A block whose adapter does not target a
slice (scale 0) returns at once. Tile shapes are autotuned per (layer shape, BLOCK_M, padded rank,
dtype): neither the token count nor a newly loaded adapter changes the key, so neither recompiles.
"""

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

from alora_core.lora.adapters import LoraWeights

# the grouping's constants and type live in model/batch.py (StepBuffers groups on the host too)
from alora_core.model.batch import LARGE_BLOCK_M, SMALL_BLOCK_M, LoraBatch, TokenBlocks
from alora_core.model.triton_helpers import INTERPRET as _INTERPRET
from alora_core.model.triton_helpers import cdiv as _cdiv
from alora_core.model.triton_helpers import dot as _dot

MIN_RANK_BLOCK = 16  # tl.dot needs every tile dimension >= 16


def _configs(name: str, sizes: Sequence[tuple[int, int, int]]) -> list[triton.Config]:
    if _INTERPRET:  # the interpreter cannot time configs; small tiles exercise the loops in tests
        return [triton.Config({name: 32}, num_warps=4, num_stages=1)]
    return [triton.Config({name: size}, num_warps=warps, num_stages=stages) for size, warps, stages in sizes]


# Kernels call tl builtins and the helpers of model/triton_helpers.py only (why: see there).
@triton.autotune(
    configs=_configs("BLOCK_K", [(64, 4, 2), (128, 4, 3), (128, 8, 2), (256, 8, 2)]),
    key=["in_features", "BLOCK_M", "BLOCK_R"],
)
@triton.jit(do_not_specialize=["num_slots", "first_slice"])
def _shrink_kernel(
    x_ptr,  # [T, in]
    part_ptr,  # [split_k, NS, n, BLOCK_R] float32
    a_ptr,  # [S, NS_stack, BLOCK_R, in]
    scale_ptr,  # [S, NS_stack] float32
    blocks_ptr,  # [n_blocks, 3] int32
    rows_ptr,  # [n] int64
    num_slots, first_slice, in_features,
    stride_xm, stride_xk, stride_as, stride_ai, stride_ss, stride_pk, stride_pi,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    slice_pid = tl.program_id(0)
    block = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(blocks_ptr + block * 3)
    if slot >= num_slots:
        return  # the adapter has no weights in this layer group
    stack_slice = first_slice + slice_pid
    if tl.load(scale_ptr + slot * stride_ss + stack_slice) == 0.0:
        return  # the adapter does not target this slice
    first = tl.load(blocks_ptr + block * 3 + 1)
    count = tl.load(blocks_ptr + block * 3 + 2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < count
    rows = tl.load(rows_ptr + first + offs_m, mask=m_mask, other=0)

    k_per_split = _cdiv(_cdiv(in_features, BLOCK_K), tl.num_programs(2)) * BLOCK_K
    k_begin = split * k_per_split
    k_end = tl.minimum(in_features, k_begin + k_per_split)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    a_ptrs = (  # A^T tile [BLOCK_K, BLOCK_R]
        a_ptr
        + slot.to(tl.int64) * stride_as
        + stack_slice * stride_ai
        + offs_r[None, :] * in_features
        + (k_begin + offs_k)[:, None]
    )
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k in range(k_begin, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k
        xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        at = tl.load(a_ptrs, mask=k_mask[:, None], other=0.0)
        acc = _dot(xt, at, acc, DOT_PRECISION, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K
    # an empty split (k_begin >= in) still writes its zeros: expand sums every split
    p_ptrs = part_ptr + split * stride_pk + slice_pid * stride_pi + (first + offs_m)[:, None] * BLOCK_R
    tl.store(p_ptrs + offs_r[None, :], acc, mask=m_mask[:, None])


@triton.autotune(
    configs=_configs("BLOCK_N", [(64, 4, 2), (128, 4, 2), (128, 8, 3), (256, 8, 2)]),
    key=["out0", "BLOCK_M", "BLOCK_R"],
    restore_value=["y0_ptr", "y1_ptr", "y2_ptr"],  # tuning runs accumulate into y: undo them
)
@triton.jit(do_not_specialize=["num_slots", "first_slice", "split_k"])
def _expand_kernel(
    part_ptr,  # [split_k, NS, n, BLOCK_R] float32
    y0_ptr, y1_ptr, y2_ptr,  # [T, out_i] of slices first_slice + i (unused ones: y0 again)
    b_ptr,  # [S, sum(out), BLOCK_R]
    scale_ptr, blocks_ptr, rows_ptr,  # as in shrink
    num_slots, first_slice, split_k,
    out0, out1, out2,
    b_row0, b_row1, b_row2,  # first row of each slice in b's out dimension
    stride_y0, stride_y1, stride_y2, stride_bs, stride_ss, stride_pk, stride_pi,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    slice_pid = tl.program_id(0)
    block = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(blocks_ptr + block * 3)
    if slot >= num_slots:
        return
    scale = tl.load(scale_ptr + slot * stride_ss + first_slice + slice_pid)
    if scale == 0.0:
        return
    y_ptr = y0_ptr
    if slice_pid == 1:
        y_ptr = y1_ptr
    if slice_pid == 2:
        y_ptr = y2_ptr
    out = tl.where(slice_pid == 0, out0, tl.where(slice_pid == 1, out1, out2))
    b_row = tl.where(slice_pid == 0, b_row0, tl.where(slice_pid == 1, b_row1, b_row2))
    stride_ym = tl.where(slice_pid == 0, stride_y0, tl.where(slice_pid == 1, stride_y1, stride_y2))

    n_per_split = _cdiv(_cdiv(out, BLOCK_N), tl.num_programs(2)) * BLOCK_N
    n_begin = split * n_per_split
    if n_begin >= out:
        return
    n_end = tl.minimum(out, n_begin + n_per_split)
    first = tl.load(blocks_ptr + block * 3 + 1)
    count = tl.load(blocks_ptr + block * 3 + 2)
    offs_m = tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < count
    rows = tl.load(rows_ptr + first + offs_m, mask=m_mask, other=0)

    p_ptrs = part_ptr + slice_pid * stride_pi + (first + offs_m)[:, None] * BLOCK_R + offs_r[None, :]
    h = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k in range(0, split_k):
        h += tl.load(p_ptrs + k * stride_pk, mask=m_mask[:, None], other=0.0)
    h16 = h.to(y_ptr.dtype.element_ty)  # the rank-r intermediate in the model dtype, as in the reference

    b_ptrs = (  # B^T tile [BLOCK_R, BLOCK_N]
        b_ptr
        + slot.to(tl.int64) * stride_bs
        + (b_row + n_begin + offs_n)[None, :] * BLOCK_R
        + offs_r[:, None]
    )
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (n_begin + offs_n)[None, :]
    for n in range(n_begin, n_end, BLOCK_N):
        n_mask = offs_n < n_end - n
        bt = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        delta = _dot(h16, bt, tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), DOT_PRECISION, UPCAST)
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + scale * delta).to(y.dtype), mask=mask)
        b_ptrs += BLOCK_N * BLOCK_R
        y_ptrs += BLOCK_N


_last_step: tuple[LoraBatch, TokenBlocks] | None = None  # every layer of a forward reads the same LoraBatch


def token_blocks(lora: LoraBatch) -> TokenBlocks:
    """Group the step's rows by adapter (once per LoraBatch: later layers of the forward reuse it)."""
    if lora.blocks is not None:  # grouped on the host and uploaded with the step (model/step_buffers.py)
        return lora.blocks
    global _last_step
    last = _last_step
    if last is not None and last[0] is lora:
        return last[1]
    slots = sorted(lora.rows_by_slot)
    counts = [lora.rows_by_slot[s].numel() for s in slots]  # shapes: no device sync
    total = sum(counts)
    block_m = LARGE_BLOCK_M if total >= LARGE_BLOCK_M * len(slots) else SMALL_BLOCK_M
    blocks, first = [], 0
    for slot, count in zip(slots, counts, strict=True):
        blocks += [(slot, first + i, min(block_m, count - i)) for i in range(0, count, block_m)]
        first += count
    device = lora.adapter_index.device
    result = TokenBlocks(
        rows=torch.cat([lora.rows_by_slot[s] for s in slots]).to(torch.int64),
        blocks=torch.tensor(blocks, dtype=torch.int32).reshape(-1, 3).to(device),
        block_m=block_m,
        slots=frozenset(slots),
    )
    _last_step = (lora, result)
    return result


@dataclass(frozen=True)
class StackedWeights:
    a: torch.Tensor  # [S, NS, R, in] zero past each adapter's rank
    b: torch.Tensor  # [S, sum(out), R]
    scale: torch.Tensor  # [S, NS] float32; 0 = that slot does not target that slice

    @property
    def num_slots(self) -> int:
        return self.a.shape[0]

    @property
    def rank_block(self) -> int:
        return self.a.shape[2]


class LoraStack:
    """The adapters of one layer group, stacked so that one launch reads any of them by slot.

    Slices are the group's linears (q, k, v): they share `in_features`, each has its own `out`.
    Ranks are zero-padded to a power of two >= 16 (the largest loaded); slots grow by doubling.
    Only growth reallocates (then `weights` is swapped whole, so a forward on another thread sees
    the old or the new buffers, never a mix); loading into a free slot writes in place.
    """

    def __init__(
        self, in_features: int, out_features: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.in_features = in_features
        self.out_features = tuple(out_features)
        self.b_rows = tuple(sum(self.out_features[:i]) for i in range(len(self.out_features)))
        ns, rank = len(self.out_features), MIN_RANK_BLOCK
        self.weights = StackedWeights(
            a=torch.zeros(0, ns, rank, in_features, dtype=dtype, device=device),
            b=torch.zeros(0, sum(self.out_features), rank, dtype=dtype, device=device),
            scale=torch.zeros(0, ns, dtype=torch.float32, device=device),
        )
        self.slots: frozenset[int] = frozenset()  # slots with weights in any slice (replaced, never mutated)
        self._active: frozenset[tuple[int, int]] = frozenset()

    def put(self, slot: int, index: int, weights: LoraWeights) -> None:
        """Install one adapter's weights for slice `index` under `slot` (padding zeroed)."""
        rank = weights.a.shape[0]
        if weights.a.shape != (rank, self.in_features) or weights.b.shape != (self.out_features[index], rank):
            raise ValueError(
                f"LoRA weights A {tuple(weights.a.shape)}, B {tuple(weights.b.shape)} do not fit slice "
                f"{index} ({self.in_features} -> {self.out_features[index]})"
            )
        self._grow(slot + 1, rank)
        w = self.weights
        rows = slice(self.b_rows[index], self.b_rows[index] + self.out_features[index])
        w.a[slot, index].zero_()
        w.a[slot, index, :rank].copy_(weights.a)
        w.b[slot, rows].zero_()
        w.b[slot, rows, :rank].copy_(weights.b)
        w.scale[slot, index] = weights.scale
        self._set_active(self._active | {(slot, index)})

    def drop(self, slot: int, index: int) -> None:
        if (slot, index) in self._active:
            self.weights.scale[slot, index] = 0.0  # the kernels skip the slot for this slice
            self._set_active(self._active - {(slot, index)})

    def _set_active(self, active: frozenset[tuple[int, int]]) -> None:
        self._active = active
        self.slots = frozenset(slot for slot, _ in active)

    def _grow(self, num_slots: int, rank: int) -> None:
        old = self.weights
        slots = max(old.num_slots, 1 << max(0, num_slots - 1).bit_length())
        rank_block = max(old.rank_block, 1 << max(0, rank - 1).bit_length())
        if (slots, rank_block) == (old.num_slots, old.rank_block):
            return
        new = StackedWeights(
            a=old.a.new_zeros(slots, old.a.shape[1], rank_block, self.in_features),
            b=old.b.new_zeros(slots, old.b.shape[1], rank_block),
            scale=old.scale.new_zeros(slots, old.scale.shape[1]),
        )
        new.a[: old.num_slots, :, : old.rank_block] = old.a
        new.b[: old.num_slots, :, : old.rank_block] = old.b
        new.scale[: old.num_slots] = old.scale
        self.weights = new


def masked_lora_triton(
    ys: Sequence[torch.Tensor],
    x: torch.Tensor,
    tokens: TokenBlocks,
    stack: LoraStack,
    first_slice: int = 0,
) -> None:
    """ys[i]: [T, out] of stack slice first_slice + i, updated in place; x: [T, in], any strides.

    One shrink and one expand launch serve every adapter and every slice in ys (at most 3).
    """
    w = stack.weights  # one snapshot: a load on another thread may swap in grown buffers
    num_slices, num_blocks = len(ys), tokens.blocks.shape[0]
    if not 1 <= num_slices <= 3 or first_slice + num_slices > len(stack.out_features):
        raise ValueError(f"{num_slices} outputs from slice {first_slice} do not fit {stack.out_features}")
    if num_blocks == 0 or w.num_slots == 0:
        return
    outs = stack.out_features[first_slice : first_slice + num_slices]
    b_rows = stack.b_rows[first_slice : first_slice + num_slices]
    targets = [y if y.stride(-1) == 1 else y.contiguous() for y in ys]  # the kernel writes unit-stride rows
    for y, out in zip(targets, outs, strict=True):
        if y.shape != (x.shape[0], out) or not y.dtype == x.dtype == w.a.dtype:
            raise ValueError(
                f"y {tuple(y.shape)} {y.dtype} does not fit x {tuple(x.shape)} {x.dtype} -> {out}"
            )

    per_program = math.ceil(_target_programs(x.device) / (num_slices * num_blocks))
    split_k = max(1, min(per_program, stack.in_features // _min_k_per_split(x.device)))
    split_n = max(1, min(per_program, math.ceil(max(outs) / 32)))
    part = _partials(split_k, num_slices, tokens.rows.numel(), w.rank_block, device=x.device)
    meta = {
        "BLOCK_M": tokens.block_m,
        "BLOCK_R": w.rank_block,
        "DOT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",  # fp32 models: no TF32 rounding
        "UPCAST": _INTERPRET and x.dtype == torch.bfloat16,
    }
    _shrink_kernel[(num_slices, num_blocks, split_k)](
        x, part, w.a, w.scale, tokens.blocks, tokens.rows,
        w.num_slots, first_slice, stack.in_features,
        x.stride(0), x.stride(1), w.a.stride(0), w.a.stride(1), w.scale.stride(0), part.stride(0), part.stride(1),
        **meta,
    )  # fmt: skip

    def pad(values: Sequence[int]) -> list[int]:  # expand takes 3 slices; unused ones repeat slice 0
        return [*values, *[values[0]] * (3 - num_slices)]

    def grid(config: dict[str, int]) -> tuple[int, int, int]:
        return (num_slices, num_blocks, min(split_n, triton.cdiv(max(outs), config["BLOCK_N"])))

    y_args = [*targets, *[targets[0]] * (3 - num_slices)]
    _expand_kernel[grid](
        part, *y_args, w.b, w.scale, tokens.blocks, tokens.rows,
        w.num_slots, first_slice, split_k, *pad(outs), *pad(b_rows), *(y.stride(0) for y in y_args),
        w.b.stride(0), w.scale.stride(0), part.stride(0), part.stride(1),
        **meta,
    )  # fmt: skip
    for y, target in zip(ys, targets, strict=True):
        if target is not y:
            y.copy_(target)


def _partials(*shape: int, device: torch.device) -> torch.Tensor:
    """Shrink output [split_k, NS, n, R]: every element is written before expand reads it."""
    return torch.empty(shape, dtype=torch.float32, device=device)


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Enough programs to fill the GPU twice over; on CPU (the interpreter) a few, to exercise splits."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _min_k_per_split(device: torch.device) -> int:
    return 256 if device.type == "cuda" else 32
