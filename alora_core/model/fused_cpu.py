"""Fused elementwise work of the decoder layers on the CPU (kernels of csrc/, see cpu_kernels.py).

    RMSNorm        y = w * x / sqrt(mean(x^2) + eps)          six ATen ops -> one pass
    gated MLP      down(silu(gate(x)) * up(x))                 silu, mul -> one pass over the gate and
                                                              up views (one GEMM: cpu_linear.py)

Which modules: those whose own forward computes exactly this, checked on random input at start-up (an
RMSNorm variant such as Gemma's w + 1, a GELU MLP or a mixture of experts fails the check and keeps
its forward). The class is swapped in place for a subclass (the module stays an instance of its
family's class); a float32 input with rows of whole 16-float vectors takes the kernel, anything else
the module's own forward.

Not fused: the rotary embedding and the residual adds. They happen inside each family's attention and
decoder-layer forwards, which the engine leaves as transformers wrote them (any HF family works).
"""

import functools
import logging

import torch
from torch import nn

from alora_core.model.cpu_kernels import CpuKernels

log = logging.getLogger(__name__)

CHECK_ROWS = 5  # random rows each candidate module is checked on
TOLERANCE = 1e-5  # relative, against the module's own forward in float32


class FusedRMSNorm(nn.Module):
    """Mixed into an RMSNorm class: the one-pass kernel where it serves."""

    fused_kernels: CpuKernels
    fused_eps: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _serves(x):
            return self.fused_kernels.rms_norm(x, self.weight, self.fused_eps)
        return super().forward(x)  # type: ignore[no-any-return]


class FusedGatedMLP(nn.Module):
    """Mixed into a gated-MLP class (gate_proj, up_proj, down_proj, SiLU): one pass for silu * up."""

    fused_kernels: CpuKernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        if _serves(gate) and _serves(up):
            return self.down_proj(self.fused_kernels.silu_mul(gate, up))  # type: ignore[no-any-return]
        return self.down_proj(self.act_fn(gate) * up)  # type: ignore[no-any-return]


def _serves(x: torch.Tensor) -> bool:
    return x.dtype == torch.float32 and x.device.type == "cpu" and x.shape[-1] % 16 == 0 and x.stride(-1) == 1


def install(model: nn.Module, kernels: CpuKernels) -> int:
    """Swap every RMSNorm and gated MLP of `model` that passes the check; returns how many."""
    swapped = 0
    for module in model.modules():
        if _is_rms_norm(module):
            swapped += _swap(module, FusedRMSNorm, kernels, _norm_input(module))
        elif _is_gated_mlp(module):
            swapped += _swap(module, FusedGatedMLP, kernels, _mlp_input(module))
    log.info("CPU kernels: %d RMSNorm and gated-MLP modules fused", swapped)
    return swapped


def _is_rms_norm(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (
        type(module).__name__.endswith("RMSNorm")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 1
        and weight.dtype == torch.float32
        and weight.device.type == "cpu"
        and isinstance(_eps(module), float)
    )


def _eps(module: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        value = getattr(module, name, None)
        if isinstance(value, float):
            return value
    return None


def _is_gated_mlp(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")
    ) and (getattr(module, "act_fn", None) is not None)


def _norm_input(module: nn.Module) -> torch.Tensor:
    return torch.randn(1, CHECK_ROWS, module.weight.shape[0], generator=torch.Generator().manual_seed(0)) * 3


def _mlp_input(module: nn.Module) -> torch.Tensor:
    width = module.gate_proj.in_features  # type: ignore[union-attr]
    return torch.randn(1, CHECK_ROWS, width, generator=torch.Generator().manual_seed(0))


def _swap(module: nn.Module, mixin: type[nn.Module], kernels: CpuKernels, x: torch.Tensor) -> bool:
    """Swap the class if the fused forward equals the module's own on `x`; else leave it."""
    own = type(module)
    if x.shape[-1] % 16 or not _is_float32(module):
        return False
    with torch.inference_mode():
        expected = module(x)
        module.__class__ = _fused_class(own, mixin)
        object.__setattr__(module, "fused_kernels", kernels)
        if mixin is FusedRMSNorm:
            object.__setattr__(module, "fused_eps", _eps(module))
        try:
            got = module(x)
            same = got.shape == expected.shape and torch.allclose(
                got, expected, rtol=TOLERANCE, atol=TOLERANCE
            )
        except (RuntimeError, TypeError, AttributeError):
            same = False
    if not same:
        module.__class__ = own
        log.debug("%s: its forward is not the fused one; left as it is", own.__name__)
    return same


def _is_float32(module: nn.Module) -> bool:
    params = list(module.parameters())
    return bool(params) and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in params)


def model_class(module: nn.Module) -> type[nn.Module]:
    """The class the model defined for `module` (a swapped module's own class, as error messages name it)."""
    cls = type(module)
    return cls.__mro__[2] if issubclass(cls, (FusedRMSNorm, FusedGatedMLP)) else cls


@functools.cache
def _fused_class(own: type[nn.Module], mixin: type[nn.Module]) -> type[nn.Module]:
    return type(f"Fused{own.__name__}", (mixin, own), {})  # mro: fused, mixin, own, ...
