"""The masked-LoRA op over a flat batch of tokens. Semantics (the oracle for every fused kernel):

    for t in tokens:
        if idx[t] >= 0:
            y[t] += scale[idx[t]] * B[idx[t]] @ (A[idx[t]] @ x[t])

Tokens with idx = -1 (base requests, aLoRA tokens before their activation start) are untouched.
This torch reference groups rows by adapter (rows are precomputed once per step in LoraBatch).
"""

import torch

from alora_core.lora.adapters import LoraWeights


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
            y.addmm_(x @ w.a.t(), w.b.t(), alpha=w.scale)
            continue
        xs = x.index_select(0, rows)
        y.index_add_(0, rows, (xs @ w.a.t()) @ w.b.t(), alpha=w.scale)
