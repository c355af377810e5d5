"""CPU: every short-query sequence of a step (decode tokens, intrinsic invocations, short chunks) in one
kernel call per layer, reading K/V from the pool where they lie (csrc/paged_attention_cpu.c).

A step's plan (built once, shared by every layer) lists items: a run of pool slots and the rows that
attend to it. Sequences that start at the same pool slot (forks of one conversation) form a group; the
runs they all share are items over all the group's rows, so the shared prefix is read once per step
for the whole fan-out; each member's own keys are items over its own rows. Runs are cut at positions
that are multiples of SPLIT_KEYS (parallel tasks; where a row's keys are cut does not depend on which
other sequences are in the step). Per row, the kernel merges its items' partial softmaxes:

    group of forks A, B (same first slot):
      item 0: shared run [s0, e0)  x rows A0 A1 B0     -> partials p0 p1 p2
      item 1: A's own run [a, a')  x rows A0 A1        -> partials p3 p4
      item 2: B's own run [b, b')  x row  B0           -> partial  p5
      row A0 = merge(p0, p3), A1 = merge(p1, p4), B0 = merge(p2, p5)

Masks come from positions: key j of an item (position pos + j) is visible to a row at position p iff
pos + j <= p and p - (pos + j) < window; soft-capping and sinks as in attention.py. `reference` is the
dense torch oracle the tests compare against.
"""

from dataclasses import dataclass

import torch

from alora_core.model.batch import SeqSpan
from alora_core.model.cpu_kernels import CpuKernels, PagedArgs

Segments = tuple[tuple[int, int], ...]

SPLIT_KEYS = 512  # runs are cut at positions that are multiples of this
KV_DTYPES = (torch.float32, torch.bfloat16)  # of the pool; queries and outputs are float32
ITEM_ROWS = 128  # an item holds at most this many rows: a longer prefill chunk is several (parallel) tasks


@dataclass(frozen=True)
class KernelGroup:
    """Sequences that start at one pool slot: the runs all of them read, then each one's own runs."""

    seqs: tuple[SeqSpan, ...]
    shared: Segments  # keys at positions 0..n-1 of every member
    owns: tuple[Segments, ...]  # each member's keys from position n on


@dataclass
class KernelPlan:
    """The items and merge lists of a step (see the module docstring), and the scratch for partials."""

    items: torch.Tensor  # [I, 6] int64: row_lo, row_hi, first slot, keys, first key position, first partial
    row_q: torch.Tensor  # [R] int64: the step row (of q and out) of each plan row
    row_pos: torch.Tensor  # [R] int64: its position in its sequence
    part_ptr: torch.Tensor  # [R + 1] int64: CSR of each plan row's partials
    part_idx: torch.Tensor  # [P] int64
    args: PagedArgs  # the plan's fields filled in once; each layer sets its tensors
    scratch: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (H, D) -> partials acc, (m, l)

    @property
    def num_parts(self) -> int:
        return int(self.part_idx.numel())


def build_plan(groups: list[KernelGroup]) -> KernelPlan:
    """Items, plan rows and merge lists of `groups`, in group order (plain Python over the spans: a few
    list appends per run, one tensor per array)."""
    items: list[tuple[int, int, int, int, int, int]] = []
    row_q: list[int] = []
    row_pos: list[int] = []
    parts: list[list[int]] = []
    for group in groups:
        group_lo = len(row_q)
        bounds = []
        for seq in group.seqs:
            lo = len(row_q)
            row_q.extend(range(seq.query_start, seq.query_start + seq.query_len))
            row_pos.extend(range(seq.context_len - seq.query_len, seq.context_len))
            parts.extend([] for _ in range(seq.query_len))
            bounds.append((lo, len(row_q)))
        _add_runs(items, parts, row_pos, group.shared, 0, group_lo, len(row_q))
        shared = sum(e - s for s, e in group.shared)
        for (lo, hi), own in zip(bounds, group.owns, strict=True):
            _add_runs(items, parts, row_pos, own, shared, lo, hi)
    ptr = [0]
    for p in parts:
        ptr.append(ptr[-1] + len(p))
    plan = KernelPlan(
        items=torch.tensor(items, dtype=torch.long).reshape(-1, 6),
        row_q=torch.tensor(row_q, dtype=torch.long),
        row_pos=torch.tensor(row_pos, dtype=torch.long),
        part_ptr=torch.tensor(ptr, dtype=torch.long),
        part_idx=torch.tensor([i for p in parts for i in p], dtype=torch.long),
        args=PagedArgs(),
        scratch={},
    )
    a = plan.args
    a.num_items, a.items = len(items), plan.items.data_ptr()
    a.num_rows, a.row_q, a.row_pos = len(row_q), plan.row_q.data_ptr(), plan.row_pos.data_ptr()
    a.part_ptr, a.part_idx = plan.part_ptr.data_ptr(), plan.part_idx.data_ptr()
    return plan


def _add_runs(
    items: list[tuple[int, int, int, int, int, int]],
    parts: list[list[int]],
    row_pos: list[int],
    runs: Segments,
    position: int,
    row_lo: int,
    row_hi: int,
) -> None:
    """Items for `runs` (first key at `position`) over plan rows [row_lo, row_hi) (in blocks of at most
    ITEM_ROWS), cut at multiples of SPLIT_KEYS; a row block whose rows all precede the keys gets no
    item. Each item's partials are numbered after the last one's."""
    part = items[-1][5] + items[-1][1] - items[-1][0] if items else 0
    for start, end in runs:
        while start < end:
            cut = min(end, start + SPLIT_KEYS - position % SPLIT_KEYS)
            for lo in range(row_lo, row_hi, ITEM_ROWS):
                hi = min(row_hi, lo + ITEM_ROWS)
                if max(row_pos[lo:hi]) < position:  # no row of the block sees these keys (causal)
                    continue
                items.append((lo, hi, start, cut - start, position, part))
                for r in range(lo, hi):
                    parts[r].append(part + r - lo)
                part += hi - lo
            position += cut - start
            start = cut


def attend(
    kernels: CpuKernels,
    plan: KernelPlan,
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> None:
    """The plan's rows of out [T, H, D] (float32, contiguous) from query [T, H, D] (float32, unit
    stride in D) over the caches [KVH, S, D] (float32 or bfloat16, contiguous)."""
    heads, dim = query.shape[1], query.shape[2]
    assert (
        query.stride(2) == 1 and out.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    )
    assert query.dtype == out.dtype == torch.float32 and k_cache.dtype == v_cache.dtype in KV_DTYPES
    scratch = plan.scratch.get((heads, dim))
    if scratch is None:  # one set of partials for every layer of the step
        scratch = plan.scratch[(heads, dim)] = (
            torch.empty(plan.num_parts, heads, dim),
            torch.empty(plan.num_parts, heads, 2),
        )
    sinks_f32 = None if sinks is None else sinks.float().contiguous()
    a = plan.args
    a.q, a.q_stride_t, a.q_stride_h = query.data_ptr(), query.stride(0), query.stride(1)
    a.k, a.v, a.kv_stride_h = k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0)
    a.out = out.data_ptr()
    a.heads, a.kv_heads, a.dim = heads, k_cache.shape[0], dim
    a.scale, a.softcap, a.window = scale, softcap or 0.0, window or 0
    a.sinks = None if sinks_f32 is None else sinks_f32.data_ptr()
    a.part_acc, a.part_ml = scratch[0].data_ptr(), scratch[1].data_ptr()
    a.threads = torch.get_num_threads()
    a.kv_bf16 = int(k_cache.dtype == torch.bfloat16)
    kernels.paged_attention(a)


def reference(
    seqs: list[SeqSpan],
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    *,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> dict[int, torch.Tensor]:
    """Dense oracle: per sequence, its keys gathered from its segments, the scores in float64 with the
    causal-window mask, soft-capping and sinks. Returns {step row: out [H, D]}."""
    groups = query.shape[1] // k_cache.shape[0]
    result = {}
    for seq in seqs:
        slots = torch.cat([torch.arange(s, e) for s, e in seq.kv_segments])
        k = k_cache[:, slots].double().repeat_interleave(groups, dim=0)  # [H, n, D]
        v = v_cache[:, slots].double().repeat_interleave(groups, dim=0)
        key_pos = torch.arange(seq.context_len)
        for i in range(seq.query_len):
            row, pos = seq.query_start + i, seq.context_len - seq.query_len + i
            s = torch.einsum("hd,hnd->hn", query[row].double(), k) * scale  # [H, n]
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            visible = key_pos <= pos
            if window is not None:
                visible &= pos - key_pos < window
            s = s.masked_fill(~visible, float("-inf"))
            lse = torch.logsumexp(s, dim=-1, keepdim=True)
            o = torch.einsum("hn,hnd->hd", torch.exp(s - lse), v)
            if sinks is not None:
                o = o * torch.sigmoid(lse - sinks.double()[:, None])
            result[row] = o
    return result
