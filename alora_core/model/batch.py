"""The per-step batch: every new token of every running sequence, flattened into one row each.

The scheduler (or the engine) builds one `StepBatch` per forward pass; the attention backend and
the LoRA layers only read it. Rows are grouped by sequence:

    rows:      | seq 0: prefill chunk (t0 rows) | seq 1: 1 decode row | seq 2: ... |
    positions: | c0-t0 ... c0-1                | c1-1                | ...        |   (c = context_len)
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar, cast

import numpy as np
import torch

if TYPE_CHECKING:
    from alora_core.model.cpu_kernels import CpuKernels
    from alora_core.model.cuda_graphs import GraphRunner
    from alora_core.model.step_buffers import DeviceStep, StepBuffers

T = TypeVar("T")


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's slice of the flat batch and where its KV lies in the pool."""

    query_start: int  # first row of this sequence in the flat batch
    query_len: int  # new tokens of this sequence in this step
    context_len: int  # tokens with KV once this step has written its own (cached + new)
    kv_segments: tuple[
        tuple[int, int], ...
    ]  # [start, end) pool slot ranges covering positions 0..context_len-1


SMALL_BLOCK_M, LARGE_BLOCK_M = 16, 64  # LoRA kernel rows per block: decode-like steps / long prefill segments
NO_SLOT = 2**31 - 1  # the slot of a padding block: >= every stack's slot count, so the kernels skip it


@dataclass(frozen=True)
class TokenBlocks:
    """The step's LoRA rows grouped by slot and cut into blocks of at most `block_m` rows (the fused
    kernels' input, lora/triton_ops.py)."""

    rows: torch.Tensor  # [n] int64 flat-batch rows with idx >= 0, sorted by slot
    blocks: torch.Tensor  # [n_blocks, 3] int32 (slot, first index into rows, row count)
    block_m: int
    slots: frozenset[int]


def group_rows(index: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int, int]], int, dict[int, int]]:
    """Host-side grouping of a step's adapter index [T] (no device read):
    rows with idx >= 0 sorted by slot (stable), their blocks (slot, first, count <= block_m), block_m,
    and {slot: row count}, slots ascending."""
    used = np.flatnonzero(index >= 0)
    rows = used[np.argsort(index[used], kind="stable")]
    slots, counts = np.unique(index[used], return_counts=True)
    per_slot = {int(s): int(c) for s, c in zip(slots, counts, strict=True)}
    block_m = LARGE_BLOCK_M if len(rows) >= LARGE_BLOCK_M * max(1, len(slots)) else SMALL_BLOCK_M
    blocks, first = [], 0
    for slot, count in per_slot.items():
        blocks += [(slot, first + i, min(block_m, count - i)) for i in range(0, count, block_m)]
        first += count
    return rows, blocks, block_m, per_slot


@dataclass(frozen=True)
class LoraBatch:
    """Per-token adapter slots. -1 = no LoRA (base requests, aLoRA tokens before activation)."""

    adapter_index: torch.Tensor  # [T] int64
    rows_by_slot: dict[int, torch.Tensor]  # slot -> rows of the flat batch that use it (computed once a step)
    derived: dict[tuple[int, ...], "SlotRows"] = field(default_factory=dict, compare=False, repr=False)
    # CUDA steps through StepBuffers: the kernels' blocks, grouped on the host and uploaded with the step
    blocks: TokenBlocks | None = None
    single: int | None = None  # the slot, when every row of the step uses that one adapter

    @classmethod
    def from_index(cls, adapter_index: torch.Tensor) -> "LoraBatch | None":
        slots = [int(s) for s in torch.unique(adapter_index).tolist() if s >= 0]
        if not slots:
            return None
        rows = {s: (adapter_index == s).nonzero().squeeze(1) for s in slots}
        single = slots[0] if len(slots) == 1 and rows[slots[0]].numel() == adapter_index.numel() else None
        return cls(adapter_index=adapter_index, rows_by_slot=rows, single=single)

    def slot_rows(self, slots: tuple[int, ...]) -> "SlotRows":
        """The rows of `slots` laid out [S, R] for one batched GEMM; built once a step per slot tuple."""
        cached = self.derived.get(slots)
        if cached is None:
            cached = self.derived[slots] = SlotRows.build(slots, [self.rows_by_slot[s] for s in slots])
        return cached


@dataclass(frozen=True)
class SlotRows:
    """Rows of several adapter slots as S groups of R (the largest group; shorter groups padded by
    repeating their first row), so the LoRA of all of them is one bmm pair:

        x[gather].view(S, R, in)  ->  bmm A^T, bmm B^T  ->  [S*R, out][real]  ->  y.index_add_(rows)
    """

    slots: tuple[int, ...]
    per_slot: int  # R
    gather: torch.Tensor  # [S*R] rows of x, slot by slot
    real: torch.Tensor | None  # [n] positions of gather that are not padding (None: no padding)
    rows: torch.Tensor  # [n] rows of y the real positions update

    @classmethod
    def build(cls, slots: tuple[int, ...], groups: list[torch.Tensor]) -> "SlotRows":
        per_slot = max(len(g) for g in groups)
        padded = [torch.cat([g, g[:1].expand(per_slot - len(g))]) for g in groups]
        real = None
        if any(len(g) < per_slot for g in groups):
            real = torch.cat(
                [torch.arange(len(g), device=g.device) + i * per_slot for i, g in enumerate(groups)]
            )
        return cls(slots, per_slot, torch.cat(padded), real, torch.cat(groups))

    @property
    def padding(self) -> int:
        return len(self.gather) - len(self.rows)


@dataclass(frozen=True)
class StepBatch:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T] position of each row inside its own sequence
    slot_mapping: torch.Tensor  # [T] pool slot where each row's K/V is written
    seqs: tuple[SeqSpan, ...]
    kv: torch.Tensor  # [L, 2, KVH, S, D] the whole pool (see kvcache.block_pool)
    lora: LoraBatch | None
    logits_rows: torch.Tensor  # [n] rows whose logits are needed (last new row of sequences that sample)
    # what the attention layers derive from the spans once per step and share (e.g.
    # attention_gather.gather_plan)
    derived: dict[object, object] = field(default_factory=dict, compare=False, repr=False)
    # CUDA: the step's metadata on the device, read by the paged Triton kernel (model/step_buffers.py)
    device_step: "DeviceStep | None" = None
    # CPU: the compiled kernels (model/cpu_kernels.py), None = the eager torch path
    cpu_kernels: "CpuKernels | None" = None
    # CPU: long single-run prefill chunks by the kernel too (else ATen's SDPA); measured at start-up
    kernel_prefill: bool = True

    def derive(self, key: object, build: Callable[[], T]) -> T:
        """What `build` derives from this step's layout, built by the first layer that asks for `key`."""
        if key not in self.derived:
            self.derived[key] = build()
        return cast(T, self.derived[key])


@dataclass
class ForwardContext:
    """Shared by the wrapped LoRA layers of one model: the batch of the forward in flight (and, on CUDA,
    the device buffers every step's batch is uploaded through)."""

    batch: StepBatch | None = field(default=None)
    buffers: "StepBuffers | None" = field(default=None)
    # handed to every StepBatch this context runs (see StepBatch)
    cpu_kernels: "CpuKernels | None" = field(default=None)
    kernel_prefill: bool = field(default=True)
    # CUDA: decode / small extend steps replayed as CUDA graphs (model/cuda_graphs.py)
    graphs: "GraphRunner | None" = field(default=None)

    @contextmanager
    def bind(self, batch: StepBatch) -> Iterator[None]:
        self.batch = batch
        try:
            yield
        finally:
            self.batch = None
