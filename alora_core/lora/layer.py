"""`MaskedLoRALinear`: wraps a base nn.Linear of the HF model and adds the per-token LoRA delta.

    y = W x + b                       (the untouched base layer)
    y[t] += s_a B_a A_a x[t]          for every row t whose adapter slot a = idx[t] >= 0

The slot of each row comes from the step's LoraBatch in the shared ForwardContext, so one forward
serves base, LoRA and aLoRA rows together.
"""

import torch
from torch import nn

from alora_core.lora.adapters import LoraWeights
from alora_core.lora.ops import masked_lora_reference
from alora_core.model.batch import ForwardContext


class MaskedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, ctx: ForwardContext) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.slots: dict[int, LoraWeights] = {}

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        batch = self.ctx.batch
        if batch is None or batch.lora is None or not self.slots:
            return y
        masked_lora_reference(
            y.view(-1, self.out_features),
            x.reshape(-1, self.in_features),
            batch.lora.rows_by_slot,
            self.slots,
        )
        return y


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full name -> (in, out) of every linear layer a LoRA may target (wrapped ones by their base)."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, MaskedLoRALinear) or (
            isinstance(module, nn.Linear) and not name.endswith(".base_layer")
        ):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def install(model: nn.Module, module_name: str, ctx: ForwardContext) -> MaskedLoRALinear:
    """Wrap `module_name` once (idempotent) and return its wrapper."""
    module = model.get_submodule(module_name)
    if isinstance(module, MaskedLoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{module_name} is a {type(module).__name__}, not an nn.Linear")
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = MaskedLoRALinear(module, ctx)
    setattr(parent, child, wrapper)
    return wrapper
