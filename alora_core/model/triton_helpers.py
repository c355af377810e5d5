"""Triton helpers shared by the fused kernels (model/paged_attention_triton.py, lora/triton_ops.py).

Kernels call tl builtins and the helpers below only, never triton.language's own @jit helpers
(tl.cdiv, tl.zeros, tl.max, tl.sum, tl.sigmoid): those are fixed compiled-or-interpreted when triton
is first imported, which in a test process may come before TRITON_INTERPRET is set for the kernels'
modules. Whatever imports this module first fixes its mode the same way (see the kernel tests).
"""

import os

import triton  # type: ignore[import-untyped]
import triton.language as tl  # type: ignore[import-untyped]

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # fixed when this module is imported, like triton.jit


@triton.jit
def cdiv(a, b):
    return (a + b - 1) // b


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (float32 acc)."""
    if UPCAST:  # interpreter only: it multiplies bf16 bit patterns (triton#11584), fp32 holds bf16 exactly
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


# Combine functions for tl.reduce: triton's own, which the interpreter recognises (by identity, without
# calling them) and runs as one numpy reduction; a combine of ours would run element by element, ~10x slower.
max_combine = tl.standard._elementwise_max
add_combine = tl.standard._sum_combine


@triton.jit
def tanh(x):
    """tanh from exp alone (no libdevice, so the interpreter runs it too): +-1 at +-inf, never nan."""
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
