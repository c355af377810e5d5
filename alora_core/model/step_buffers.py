"""A step's metadata resident on the device: preallocated once at its maximum sizes, filled each step
from one pinned host buffer with one non-blocking copy. The paged attention kernel reads it in place
(model/paged_attention_triton.py); the StepBatch of the step is made of its views.

    host (pinned) bytes ──one copy──> device bytes, both laid out:
        int64 | input_ids [T] | positions [T] | slot_mapping [T] | adapter_index [T] | lora_rows [T] |
              | logits_rows [S] |
        int32 | seq_lens [S] | query_start [S + 1] | lora_blocks [T, 3] | (pad to 8 bytes) | block_tables [S, B] |
    T = max tokens of a step, S = max sequences, B = max blocks of one sequence
    a step copies the prefix up to its last sequence's block-table row

Entries past the step's own (padding, for fixed-shape launches such as CUDA graphs) are inert: slot -1
(the KV write skips it: no reserved trash slot is needed), adapter -1, seq_len 0, query_start = the
step's token count (empty sequences), logits row 0, LoRA block (NO_SLOT, 0, 0) (the kernels skip it).
A step larger than the buffers grows them.

The LoRA kernels' row grouping (lora_rows, lora_blocks: model/batch.group_rows) is computed here from
the host's adapter index, so no step reads the device index back (torch.unique + nonzero did: a sync).
"""

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch

from alora_core.model.batch import NO_SLOT, LoraBatch, SeqSpan, StepBatch, TokenBlocks, group_rows
from alora_core.model.triton_check import triton_imports

log = logging.getLogger(__name__)

# "triton" (default): CUDA steps attend with the paged Triton kernel; "gather": the gather+SDPA path
# (model/attention_gather.py), kept as the reference for A/B runs.
GPU_ATTENTION_ENV = "ALORA_GPU_ATTENTION"


def paged_kernel_available(device: torch.device) -> bool:
    """CUDA steps go through StepBuffers and the paged Triton kernel, unless ALORA_GPU_ATTENTION=gather."""
    choice = os.environ.get(GPU_ATTENTION_ENV, "triton")
    if choice not in ("triton", "gather"):
        raise ValueError(f"{GPU_ATTENTION_ENV} must be 'triton' or 'gather', got {choice!r}")
    return device.type == "cuda" and choice == "triton" and triton_imports()


@dataclass(frozen=True)
class DeviceStep:
    """What the paged kernel reads: device views (full size, padded) and the host ints its launch needs."""

    block_tables: torch.Tensor  # [S, B] int32: block_tables[s, j] = pool block of positions j*bs.. of s
    seq_lens: torch.Tensor  # [S] int32: keys of each sequence once this step has written its own
    query_start: torch.Tensor  # [S + 1] int32: first row of each sequence in the flat batch
    block_size: int
    num_seqs: int
    num_tokens: int
    max_query_len: int
    max_seq_len: int


class StepBuffers:
    def __init__(
        self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, device: torch.device
    ) -> None:
        self.block_size = block_size
        self.target = device
        self._copied: torch.cuda.Event | None = None  # the last upload's copy (the host buffer is reused)
        self._allocate(max(1, max_tokens), max(1, max_seqs), max(1, max_blocks))

    def _allocate(self, max_tokens: int, max_seqs: int, max_blocks: int) -> None:
        self.max_tokens, self.max_seqs, self.max_blocks = max_tokens, max_seqs, max_blocks
        t, s = max_tokens, max_seqs
        ints64 = 5 * t + s
        ints32 = 2 * s + 1 + 3 * t  # seq_lens, query_start, lora_blocks
        ints32 += ints32 % 2  # one int32 of padding where needed: the table starts 8-byte aligned
        self._table_offset = 8 * ints64 + 4 * ints32  # bytes
        nbytes = self._table_offset + 4 * s * max_blocks
        pin = self.target.type == "cuda"
        self.host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self.device = torch.zeros(nbytes, dtype=torch.uint8, device=self.target)
        self._host_views = self._views(self.host)
        self._device_views = self._views(self.device)

    def _views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        t, s = self.max_tokens, self.max_seqs
        i64 = buf[: 8 * (5 * t + s)].view(torch.int64)
        i32 = buf[8 * (5 * t + s) : self._table_offset].view(torch.int32)
        return {
            "input_ids": i64[:t],
            "positions": i64[t : 2 * t],
            "slot_mapping": i64[2 * t : 3 * t],
            "adapter_index": i64[3 * t : 4 * t],
            "lora_rows": i64[4 * t : 5 * t],
            "logits_rows": i64[5 * t : 5 * t + s],
            "seq_lens": i32[:s],
            "query_start": i32[s : 2 * s + 1],
            "lora_blocks": i32[2 * s + 1 : 2 * s + 1 + 3 * t].view(t, 3),
            "block_tables": buf[self._table_offset :].view(torch.int32).view(s, self.max_blocks),
        }

    def upload(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        adapter_index: torch.Tensor,
        logits_rows: torch.Tensor,
        seqs: tuple[SeqSpan, ...],
        kv: torch.Tensor,
    ) -> StepBatch:
        """One step's host tensors ([T] int64 each, logits_rows [n]) and sequences -> its StepBatch, whose
        tensors are views of the device buffer (kv: the pool, [L, 2, KVH, S, D])."""
        t, s = input_ids.numel(), len(seqs)
        bs = self.block_size
        blocks = [
            np.concatenate([np.arange(start // bs, -(-end // bs)) for start, end in seq.kv_segments])
            for seq in seqs
        ]
        widest = max((len(b) for b in blocks), default=0)
        if t > self.max_tokens or s > self.max_seqs or widest > self.max_blocks:
            grown = (max(t, self.max_tokens), max(s, self.max_seqs), max(widest, self.max_blocks))
            log.warning("step buffers grow from %s to %s (tokens, seqs, blocks)", self.shape, grown)
            self._wait_for_copy()
            self._allocate(*grown)
        self._wait_for_copy()
        h = {name: view.numpy() for name, view in self._host_views.items()}
        for name, values, pad in (
            ("input_ids", input_ids, 0),
            ("positions", positions, 0),
            ("slot_mapping", slot_mapping, -1),
            ("adapter_index", adapter_index, -1),
        ):
            h[name][:t] = values.numpy()
            h[name][t:] = pad
        h["logits_rows"][: logits_rows.numel()] = logits_rows.numpy()
        h["logits_rows"][logits_rows.numel() :] = 0
        h["seq_lens"][:s] = [seq.context_len for seq in seqs]
        h["seq_lens"][s:] = 0
        h["query_start"][:s] = [seq.query_start for seq in seqs]
        h["query_start"][s:] = t
        for row, b in enumerate(blocks):
            h["block_tables"][row, : len(b)] = b
        lora_rows, lora_blocks, block_m, per_slot = group_rows(h["adapter_index"][:t])
        h["lora_rows"][: len(lora_rows)] = lora_rows
        h["lora_rows"][len(lora_rows) :] = 0
        if lora_blocks:
            h["lora_blocks"][: len(lora_blocks)] = lora_blocks
        h["lora_blocks"][len(lora_blocks) :] = (NO_SLOT, 0, 0)
        used = self._table_offset + 4 * s * self.max_blocks
        self.device[:used].copy_(self.host[:used], non_blocking=True)
        if self.device.is_cuda:
            self._copied = torch.cuda.Event()
            self._copied.record()
        d = self._device_views
        step = DeviceStep(
            block_tables=d["block_tables"],
            seq_lens=d["seq_lens"],
            query_start=d["query_start"],
            block_size=bs,
            num_seqs=s,
            num_tokens=t,
            max_query_len=max((seq.query_len for seq in seqs), default=0),
            max_seq_len=max((seq.context_len for seq in seqs), default=0),
        )
        return StepBatch(
            input_ids=d["input_ids"][:t],
            positions=d["positions"][:t],
            slot_mapping=d["slot_mapping"][:t],
            seqs=seqs,
            kv=kv,
            lora=self._lora(per_slot, len(lora_blocks), block_m, t),
            logits_rows=d["logits_rows"][: logits_rows.numel()],
            device_step=step,
        )

    def _lora(self, per_slot: dict[int, int], num_blocks: int, block_m: int, t: int) -> LoraBatch | None:
        """The step's LoraBatch over the device views (what LoraBatch.from_index derives, without a sync)."""
        if not per_slot:
            return None
        d = self._device_views
        rows, first = {}, 0
        for slot, count in per_slot.items():
            rows[slot] = d["lora_rows"][first : first + count]
            first += count
        blocks = TokenBlocks(
            d["lora_rows"][:first], d["lora_blocks"][:num_blocks], block_m, frozenset(per_slot)
        )
        return LoraBatch(adapter_index=d["adapter_index"][:t], rows_by_slot=rows, blocks=blocks)

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.max_tokens, self.max_seqs, self.max_blocks

    def _wait_for_copy(self) -> None:
        """The host buffer is written only once the previous step's copy out of it has finished."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
