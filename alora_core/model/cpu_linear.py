"""Small-batch linears on the CPU: per weight shape and row count, the faster of two GEMM layouts.

A decode step of a few sequences multiplies a handful of rows by every weight. For such shapes MKL's
kernel for `F.linear` (x @ W^T) can run well below what the same product takes as `W @ x^T`
(measured on the 2-core CI VM, 16 rows: 512x512 0.084 vs 0.046 ms, 1408x512 0.249 vs 0.111 ms,
the 32000x512 LM head 6.4 vs 5.5 ms), and at other shapes, row counts or on other CPUs it is the other
way round. So nothing is assumed: at start-up each distinct weight shape of the model is timed both
ways at each row bucket up to MAX_ROWS, and the transposed layout is kept only where it wins by
MARGIN. More rows than MAX_ROWS (prefill) always take `F.linear`.

Decisions are cached per process (shape, dtype, thread count), so every engine of a process computes
the same products the same way. Both layouts compute the same sums in float32; only the rounding of
the accumulation order can differ, as it already does between MKL's kernels for different row counts.
"""

import functools
import logging
import threading
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
MAX_ROWS = ROW_BUCKETS[-1]
MARGIN = 0.85  # the transposed layout is used where it takes at most this share of F.linear's time
REPEATS = 5  # timed calls per layout and bucket (the fastest counts)


class CalibratedLinear(nn.Linear):
    """An nn.Linear (class swapped in place, weights untouched) that multiplies as `W @ x^T` at the row
    buckets where that was measured faster. `transposed[i]` is the choice for ROW_BUCKETS[i]."""

    transposed: tuple[bool, ...]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if 0 < rows <= MAX_ROWS and self.transposed[_bucket(rows)]:
            out = _transposed_product(self.weight, x.reshape(rows, x.shape[-1]))
            if self.bias is not None:
                out = out + self.bias
            return out.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def _bucket(rows: int) -> int:
    return next(i for i, b in enumerate(ROW_BUCKETS) if rows <= b)


def calibrate(model: nn.Module, timer: Callable[[Callable[[], object]], float] | None = None) -> int:
    """Swap every float CPU nn.Linear of `model` to CalibratedLinear with its measured choices.
    Returns how many linears take the transposed layout at some bucket."""
    layers = [
        m
        for m in model.modules()
        if type(m) is nn.Linear and m.weight.device.type == "cpu" and m.weight.dtype.is_floating_point
    ]
    shapes = {(tuple(m.weight.shape), m.weight.dtype) for m in layers}
    if timer is None:
        threads = torch.get_num_threads()
        choices = {}
        # Timed on a short-lived thread: torch compute on a thread that lives on (the caller's) was
        # measured to slow the scheduler thread's forwards by ~50% on a 2-core VM for the rest of the
        # process (two OpenMP thread teams on two cores).
        worker = threading.Thread(
            target=lambda: choices.update({key: _choice(*key, threads) for key in shapes}),
            name="cpu-linear-calibration",
        )
        worker.start()
        worker.join()
    else:
        choices = {key: _measure(*key, timer) for key in shapes}
    changed = 0
    for module in layers:
        choice = choices[(tuple(module.weight.shape), module.weight.dtype)]
        module.__class__ = CalibratedLinear
        object.__setattr__(module, "transposed", choice)  # a plain attribute, not a parameter or buffer
        changed += any(choice)
    return changed


@functools.cache
def _choice(shape: tuple[int, ...], dtype: torch.dtype, threads: int) -> tuple[bool, ...]:
    choice = _measure(shape, dtype, _fastest_ms)
    log.debug("linear %s %s, %d threads: W @ x^T at rows %s", shape, dtype, threads, _rows(choice))
    return choice


def _measure(
    shape: tuple[int, ...], dtype: torch.dtype, timer: Callable[[Callable[[], object]], float]
) -> tuple[bool, ...]:
    out_features, in_features = shape
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen).to(dtype)
    choice = []
    with torch.inference_mode():
        for rows in ROW_BUCKETS:
            x = torch.randn(rows, in_features, generator=gen).to(dtype)
            linear = timer(functools.partial(F.linear, x, weight))
            transposed = timer(functools.partial(_transposed_product, weight, x))
            choice.append(transposed <= MARGIN * linear)
    return tuple(choice)


def _transposed_product(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x @ W^T as W @ x^T, what the forward runs and calibration times. Made contiguous, as F.linear's
    output is: consumers (fused attention kernels among them) may assume unit stride in the last
    dimension."""
    return torch.mm(weight, x.t()).t().contiguous()


def _fastest_ms(fn: Callable[[], object]) -> float:
    fn()  # warm-up: first-call allocation and dispatch
    best = float("inf")
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _rows(choice: tuple[bool, ...]) -> list[int]:
    return [b for b, c in zip(ROW_BUCKETS, choice, strict=True) if c]
