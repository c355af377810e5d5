"""Linears on the CPU: per weight shape and row count, the fastest of three ways to compute x @ W^T,
and one GEMM for sibling projections that read the same input.

    linear      F.linear (MKL)
    transposed  W @ x^T (MKL's other kernel: faster for some small-batch shapes on some CPUs)
    packed      oneDNN on the weight reordered once, at start-up, into its blocked layout. Fewer than
                PAD_ROWS rows are padded to PAD_ROWS: oneDNN's kernels for 1-2 rows ran ~1.5x slower
                than for 4 on the CI VM (AMD EPYC), and a row's result then does not depend on how many
                rows the step has up to PAD_ROWS (batch invariance for small steps)

Measured on the 2-core CI VM, one thread, a decode step's linears of the bench model (8 layers + LM
head, weights streamed from memory): 1 row 14.7 ms F.linear, 9.7 ms packed (padded); 16 rows 32.0 vs
16.6 ms; 64 rows 75 vs 52 ms; 512 rows 487 vs 420 ms. Nothing is assumed: at start-up each distinct
weight shape is timed all three ways at each row bucket, and a layout other than F.linear is kept only
where it wins by MARGIN; once some bucket packs the weight (its memory is spent), the packed layout
takes every bucket where it is the fastest. The last bucket, PREFILL_ROWS, stands for every step of
more than 64 rows (prefill chunks). Such steps once took the 64-row choice, which flipped between runs
for some shapes: a linear left on F.linear cost a 512-row chunk ~25% of its time (CI VM, 512 rows:
F.linear 130-157 GFLOP/s, packed 178-192).

Fused groups (`SHARED_INPUT_NAMES`: q/k/v, gate/up): the members' weights are concatenated once (each
member's weight becomes a view of the concatenation, no extra memory) and the first member called with
an input computes every member's product in one GEMM; the others get their column view when the model
calls them with that same tensor:

    q_proj(x) -> y = x @ [Wq; Wk; Wv]^T  [T, Nq+Nk+Nv]  -> y[:, :Nq]   (k, v views kept for their calls)
    k_proj(x) -> y[:, Nq:Nq+Nk]
    v_proj(x) -> y[:, Nq+Nk:]

A LoRA wrapper around a member (lora/layer.py) adds its delta to the member's view, unchanged. Decisions
are cached per process (shape, dtype, thread count), so every engine of a process computes the same
products the same way. All layouts compute the same sums in float32; only the rounding of the
accumulation order differs, as it already does between MKL's kernels for different row counts.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

Method = Literal["linear", "transposed", "packed"]
PREFILL_ROWS = 256  # the bucket of every step above 64 rows (prefill chunks): timed at this many rows
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, PREFILL_ROWS)
MARGIN = 0.85  # another layout is used where it takes at most this share of F.linear's time
REPEATS = 3  # timed sweeps per layout and bucket (the fastest counts)
STREAMED_ROWS = 8  # up to this many rows a product is timed over weights streamed from memory
PAD_ROWS = 4  # the packed layout computes at least this many rows (see the module docstring)
TRANSPOSED_PAD_ROWS = 2  # and W @ x^T at least this many
# Sibling linears that HF decoder blocks call on the same input tensor (also the fused LoRA groups on CUDA).
SHARED_INPUT_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
_PACKED_DTYPES = (torch.float32, torch.bfloat16)


class CalibratedLinear(nn.Linear):
    """An nn.Linear (class swapped in place, weights untouched) that multiplies the way measured fastest
    at its row bucket. `methods[i]` is the choice for ROW_BUCKETS[i]; `packed` the oneDNN weight where a
    bucket uses it; `group` the fused group it belongs to, if any."""

    methods: tuple[Method, ...]
    packed: torch.Tensor | None
    group: "FusedGroup | None"

    @property
    def transposed(self) -> tuple[bool, ...]:
        return tuple(m == "transposed" for m in self.methods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.group is not None:
            return self.group.output(self, x)
        return product(x, self.weight, self.bias, self.methods, self.packed)


def product(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    methods: tuple[Method, ...],
    packed: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] @ weight^T [K, N] (+ bias) by the method of x's row bucket -> [..., N], contiguous."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows == 0:
        return F.linear(x, weight, bias)
    method = methods[_bucket(rows)]
    if method == "linear":
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if method == "packed":
        assert packed is not None
        out = _packed_product(packed, x2, bias)
    else:
        out = _transposed_product(weight, x2)
        if bias is not None:
            out = out + bias
    return out.view(*x.shape[:-1], out.shape[-1])


class FusedGroup:
    """Sibling linears that read one input, computed as one GEMM over their concatenated weights."""

    def __init__(self, members: list[CalibratedLinear], methods: tuple[Method, ...]) -> None:
        self.members = members
        weight = torch.cat([m.weight.detach() for m in members])  # [sum N, K]
        self.weight = weight
        self.bias = None
        if any(m.bias is not None for m in members):
            self.bias = torch.cat(
                [m.bias.detach() if m.bias is not None else weight.new_zeros(m.out_features) for m in members]
            )
        self.methods = methods
        self.packed = _pack(weight) if "packed" in methods else None
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for m in members:
            self.bounds.append((start, start + m.out_features))
            # the member's weight becomes a view of the concatenation: its own copy is freed
            m.weight = nn.Parameter(weight[start : start + m.out_features], requires_grad=False)
            start += m.out_features
        self.shares_input = True  # cleared if the model calls the members on different inputs
        self._x: torch.Tensor | None = None  # input of the pending outputs (held: identity stays valid)
        self._pending: dict[int, torch.Tensor] = {}  # member index -> output not yet taken

    def output(self, member: CalibratedLinear, x: torch.Tensor) -> torch.Tensor:
        i = next(j for j, m in enumerate(self.members) if m is member)
        if not self.shares_input:
            return F.linear(x, member.weight, member.bias)
        if self._pending:
            if x is self._x and i in self._pending:
                y = self._pending.pop(i)
                if not self._pending:
                    self._x = None
                return y
            if i in self._pending:  # called again before its output was taken: the inputs differ
                log.warning("linears %s do not share their input: computed one by one", self._shapes())
                self.shares_input = False
                self._pending.clear()
                self._x = None
                return F.linear(x, member.weight, member.bias)
        y = product(x, self.weight, self.bias, self.methods, self.packed)  # [..., sum N]
        views = [y[..., s:e] for s, e in self.bounds]
        self._pending = {j: v for j, v in enumerate(views) if j != i}
        self._x = x if self._pending else None
        return views[i]

    def _shapes(self) -> str:
        return ", ".join(f"{m.in_features}->{m.out_features}" for m in self.members)


def _bucket(rows: int) -> int:
    """The index of the smallest bucket of at least `rows` rows; the last one above it."""
    return next((i for i, b in enumerate(ROW_BUCKETS) if rows <= b), len(ROW_BUCKETS) - 1)


def calibrate(
    model: nn.Module, timer: Callable[[Callable[[], object]], float] | None = None, fuse: bool = True
) -> int:
    """Swap every float CPU nn.Linear of `model` to CalibratedLinear with its measured choices, fusing
    the sibling groups of SHARED_INPUT_NAMES (when `fuse`). Returns how many linears (a fused group
    counts once) take a layout other than F.linear at some bucket."""
    layers = [m for m in model.modules() if _eligible(m)]
    groups = _groups(model, set(map(id, layers))) if fuse else []
    grouped = {id(m) for g in groups for m in g}
    keys = {_key(m.weight) for m in layers if id(m) not in grouped}
    keys |= {_group_key(g) for g in groups}
    if timer is None:
        threads = torch.get_num_threads()
        choices = {}
        # Timed on a short-lived thread: torch compute on a thread that lives on (the caller's) was
        # measured to slow the scheduler thread's forwards by ~50% on a 2-core VM for the rest of the
        # process (two OpenMP thread teams on two cores).

        def measure_all() -> None:
            torch.set_num_threads(threads)  # a new thread's OpenMP (and so MKL) team would take every core
            choices.update({key: _choice(*key, threads) for key in keys})

        worker = threading.Thread(target=measure_all, name="cpu-linear-calibration")
        worker.start()
        worker.join()
    else:
        choices = {key: _measure(*key, timer) for key in keys}
    changed = 0
    for module in layers:
        module.__class__ = CalibratedLinear
        methods = choices.get(_key(module.weight), ("linear",) * len(ROW_BUCKETS))
        object.__setattr__(module, "methods", methods)  # plain attributes, not parameters or buffers
        packed = None if id(module) in grouped or "packed" not in methods else _pack(module.weight)
        object.__setattr__(module, "packed", packed)
        object.__setattr__(module, "group", None)
        changed += id(module) not in grouped and any(m != "linear" for m in methods)
    for group in groups:
        methods = choices[_group_key(group)]
        fused = FusedGroup(group, methods)  # type: ignore[arg-type]
        for module in group:
            object.__setattr__(module, "group", fused)
        changed += any(m != "linear" for m in methods)
    return changed


def _eligible(m: nn.Module) -> bool:
    return type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype.is_floating_point


def _groups(model: nn.Module, eligible: set[int]) -> list[list[nn.Linear]]:
    """Sibling linears of SHARED_INPUT_NAMES under one parent with the same input width and dtype."""
    groups = []
    for parent in model.modules():
        for names in SHARED_INPUT_NAMES:
            members = [getattr(parent, n, None) for n in names]
            members = [m for m in members if isinstance(m, nn.Linear) and id(m) in eligible]
            if len(members) < 2:
                continue
            first = members[0].weight
            if all(
                m.in_features == members[0].in_features and m.weight.dtype == first.dtype for m in members
            ):
                groups.append(members)
    return groups


def _key(weight: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(weight.shape), weight.dtype


def _group_key(group: list[nn.Linear]) -> tuple[tuple[int, ...], torch.dtype]:
    return (sum(m.out_features for m in group), group[0].in_features), group[0].weight.dtype


@functools.cache
def _choice(shape: tuple[int, ...], dtype: torch.dtype, threads: int) -> tuple[Method, ...]:
    choice = _measure(shape, dtype, _fastest_ms)
    log.debug(
        "linear %s %s, %d threads: %s", shape, dtype, threads, dict(zip(ROW_BUCKETS, choice, strict=True))
    )
    return choice


def _measure(
    shape: tuple[int, ...], dtype: torch.dtype, timer: Callable[[Callable[[], object]], float]
) -> tuple[Method, ...]:
    """Each layout timed over enough copies of a random weight to exceed the last-level cache: a decode
    step streams every weight of the model from memory, and a weight timed alone in cache would favour
    the kernels that are fast only there."""
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weights = [
        torch.randn(out_features, in_features, generator=gen).to(dtype)
        for _ in range(_copies(out_features * in_features * dtype.itemsize))
    ]
    packed = [p for p in map(_pack, weights) if p is not None]
    choice: list[Method] = []
    timings: list[dict[Method, float]] = []
    with torch.inference_mode():
        for rows in ROW_BUCKETS:
            x = torch.randn(rows, in_features, generator=gen).to(dtype)
            n = len(weights) if rows <= STREAMED_ROWS else 1  # more rows: bound by compute, not memory
            times: dict[Method, float] = {
                "linear": timer(_Sweep(F.linear, [(x, w) for w in weights[:n]])),
                "transposed": timer(_Sweep(_transposed_product, [(w, x) for w in weights[:n]])),
            }
            if len(packed) == len(weights):
                times["packed"] = timer(_Sweep(_packed_product, [(p, x, None) for p in packed[:n]]))
            best = min(times, key=lambda m: times[m])
            choice.append(best if times[best] <= MARGIN * times["linear"] else "linear")
            timings.append(times)
    if "packed" in choice:  # its memory is spent: every bucket where it is the fastest takes it, no margin
        fastest = [min(t, key=lambda m: t[m]) for t in timings]
        choice = ["packed" if f == "packed" else c for c, f in zip(choice, fastest, strict=True)]
    return tuple(choice)


class _Sweep:
    """`func` over each argument tuple in turn (one weight copy each); returns the last output."""

    def __init__(self, func: Callable[..., torch.Tensor], calls: list[tuple[object, ...]]) -> None:
        self.func = func
        self.calls = calls

    def __call__(self) -> torch.Tensor:
        for args in self.calls:
            out = self.func(*args)
        return out


def _copies(weight_bytes: int) -> int:
    """Weight copies whose sweep overflows the last-level cache (twice its size)."""
    return max(1, min(64, -(-2 * _llc_bytes() // max(1, weight_bytes))))


@functools.cache
def _llc_bytes() -> int:
    try:
        caches = Path("/sys/devices/system/cpu/cpu0/cache")
        last = max(caches.glob("index*"), key=lambda p: int((p / "level").read_text()))
        size = (last / "size").read_text().strip()
        return int(size[:-1]) * {"K": 1 << 10, "M": 1 << 20}[size[-1]] if size[-1] in "KM" else int(size)
    except (OSError, ValueError):
        return 32 << 20  # a typical server's L3


def _pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The oneDNN blocked layout of weight [N, K] (None where oneDNN does not serve this dtype)."""
    if weight.dtype not in _PACKED_DTYPES or not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    except RuntimeError as e:  # e.g. bfloat16 on a CPU without the instructions
        log.debug("no oneDNN packing for %s %s: %s", tuple(weight.shape), weight.dtype, e)
        return None


def _packed_product(packed: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] @ W^T with the packed weight, M padded to PAD_ROWS: [M, N] contiguous."""
    rows = x.shape[0]
    if rows < PAD_ROWS:
        x = F.pad(x, (0, 0, 0, PAD_ROWS - rows))
    out = torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")
    return out[:rows] if rows < PAD_ROWS else out


def _transposed_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T as W @ x^T, what the forward runs and calibration times; one row is padded to
    TRANSPOSED_PAD_ROWS (MKL's kernel for a single column ran at half the bandwidth of its kernel for
    two on the CI VM). Made contiguous, as F.linear's output is: consumers (fused attention kernels
    among them) may assume unit stride in the last dimension."""
    rows = x.shape[0]
    if rows < TRANSPOSED_PAD_ROWS:
        x = F.pad(x, (0, 0, 0, TRANSPOSED_PAD_ROWS - rows))
    out = torch.mm(weight, x.t()).t()
    return out[:rows].contiguous()


def _fastest_ms(fn: Callable[[], object]) -> float:
    """The fastest of REPEATS calls in this thread's CPU time: on a shared machine, time other processes
    take from it would otherwise decide the layout."""
    fn()  # warm-up: first-call allocation and dispatch
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best * 1e3
