"""The masked-LoRA op over a flat batch of tokens. Semantics (the oracle for every fused kernel):

    for t in tokens:
        if idx[t] >= 0:
            y[t] += scale[idx[t]] * B[idx[t]] @ (A[idx[t]] @ x[t])

Tokens with idx = -1 (base requests, aLoRA tokens before their activation start) are untouched.
This torch reference groups rows by adapter (rows are precomputed once per step in LoraBatch).
With several adapters in a step, `masked_lora_stacked` computes the same for all of them in one bmm
pair (weights stacked once per slot set), instead of four small ops per adapter. With the CPU kernels
(model/cpu_kernels.py), short float32 or bfloat16 steps take `masked_lora_kernel` (lora/layer.py
says which): one C call per layer, whatever the mix of adapters.
"""

import ctypes
from dataclasses import dataclass

import torch

from alora_core.lora.adapters import LoraWeights
from alora_core.model.batch import SlotRows
from alora_core.model.cpu_kernels import MASKED_LORA_MAX_RANK, CpuKernels, LoraArgs


def masked_lora_reference(
    y: torch.Tensor,
    x: torch.Tensor,
    rows_by_slot: dict[int, torch.Tensor],
    weights: dict[int, LoraWeights],
) -> None:
    """y: [T, out] (updated in place); x: [T, in]; rows_by_slot: slot -> row indices; weights: slot -> A, B, scale.

    Slots without weights for this layer (the adapter does not target it) are skipped. x, y and the
    adapter weights share the model's dtype (the registry stores them so). The scale rides on the
    GEMM's alpha: one kernel fewer than PEFT's `lora_B(lora_A(x)) * scaling`, equal up to rounding.
    """
    for slot, rows in rows_by_slot.items():
        w = weights.get(slot)
        if w is None:
            continue
        if rows.numel() == x.shape[0]:  # every row uses this adapter: no gather / scatter
            y.addmm_(torch.mm(x, w.a_t), w.b_t, alpha=w.scale)
            continue
        xs = x.index_select(0, rows)
        y.index_add_(0, rows, torch.mm(xs, w.a_t) @ w.b_t, alpha=w.scale)


@dataclass(frozen=True)
class StackedLora:
    """Several slots' weights of one layer, ranks zero-padded to the largest (the padding adds 0)."""

    weights: tuple[LoraWeights, ...]  # what it was built from, slot by slot (checked by identity)
    a: torch.Tensor  # [S, r, in]
    b: torch.Tensor  # [S, r, out] = (scale * B)^T

    @classmethod
    def build(cls, weights: tuple[LoraWeights, ...]) -> "StackedLora":
        rank = max(w.a.shape[0] for w in weights)
        first = weights[0].a
        a = torch.zeros(len(weights), rank, first.shape[1], dtype=first.dtype, device=first.device)
        b = torch.zeros(len(weights), rank, weights[0].b.shape[0], dtype=first.dtype, device=first.device)
        for i, w in enumerate(weights):
            a[i, : w.a.shape[0]] = w.a
            b[i, : w.a.shape[0]] = (w.b * w.scale).t()
        return cls(weights, a, b)


def masked_lora_stacked(y: torch.Tensor, x: torch.Tensor, rows: SlotRows, stack: StackedLora) -> None:
    """`masked_lora_reference` for the slots of `rows` (weights stacked in their order), in one bmm pair.
    The scale is folded into B: equal to the reference up to rounding."""
    xs = x.index_select(0, rows.gather).view(len(rows.slots), rows.per_slot, x.shape[1])
    delta = torch.bmm(torch.bmm(xs, stack.a.transpose(1, 2)), stack.b).view(-1, y.shape[1])
    if rows.real is not None:
        delta = delta.index_select(0, rows.real)
    y.index_add_(0, rows.rows, delta)


KERNEL_DTYPES = frozenset({torch.float32, torch.bfloat16})


class KernelTable:
    """One layer's adapter slots as the CPU kernel reads them (csrc/masked_lora_cpu.c): per slot number,
    A^T, B^T, rank and scale; slots the layer has no weights for stay empty. Built when the layer's slots
    change; holds the weights it points to."""

    def __init__(self, weights: dict[int, LoraWeights]) -> None:
        n = max(weights) + 1
        self.weights = tuple(weights.values())  # keeps every pointer below alive
        self.a_t = (ctypes.c_void_p * n)()
        self.b_t = (ctypes.c_void_p * n)()
        self.rank = (ctypes.c_int64 * n)()
        self.scale = (ctypes.c_float * n)()
        for slot, w in weights.items():
            self.a_t[slot], self.b_t[slot] = w.a_t.data_ptr(), w.b_t.data_ptr()
            self.rank[slot], self.scale[slot] = w.a.shape[0], w.scale
        first = next(iter(weights.values()))
        self.dtype = first.a.dtype  # of x, y and every weight
        self.args = LoraArgs(
            in_features=first.a.shape[1],
            out_features=first.b.shape[0],
            num_slots=n,
            a_t=self.a_t,
            b_t=self.b_t,
            rank=self.rank,
            scale=self.scale,
            bf16=int(self.dtype == torch.bfloat16),
        )

    @staticmethod
    def serves(weights: dict[int, LoraWeights]) -> bool:
        """CPU weights of one dtype the kernel computes (float32, bfloat16), of ranks it takes."""
        dtypes = {w.a.dtype for w in weights.values()} | {w.b.dtype for w in weights.values()}
        return (
            len(dtypes) == 1
            and dtypes <= KERNEL_DTYPES
            and all(
                w.a.device.type == "cpu" and w.a.shape[0] <= MASKED_LORA_MAX_RANK for w in weights.values()
            )
        )


def masked_lora_kernel(
    kernels: CpuKernels, y: torch.Tensor, x: torch.Tensor, index: torch.Tensor, table: KernelTable
) -> None:
    """`masked_lora_reference` by the CPU kernel: y [T, out], x [T, in] in the table's dtype with unit
    column stride (y may be a column view of a fused product); index [T] int64 contiguous, the step's
    adapter slots. In bfloat16, A x stays float32 and y is rounded once (torch rounds A x too)."""
    args = table.args
    args.x, args.x_stride = x.data_ptr(), x.stride(0)
    args.y, args.y_stride = y.data_ptr(), y.stride(0)
    args.rows, args.index = x.shape[0], index.data_ptr()
    args.threads = torch.get_num_threads()
    kernels.masked_lora(args)
