"""`MaskedLoRALinear`: wraps a base nn.Linear of the HF model and adds the per-token LoRA delta.

    y = W x + b                       (the untouched base layer)
    y[t] += s_a B_a A_a x[t]          for every row t whose adapter slot a = idx[t] >= 0

The slot of each row comes from the step's LoraBatch in the shared ForwardContext, so one forward
serves base, LoRA and aLoRA rows together. On CPU the delta of a short float32 or bfloat16 step (see
KERNEL_MAX_ROWS) is one call of the C kernel (ops.masked_lora_kernel), other steps take the torch
ops (ops.py: one adapter's rows in one addmm, several adapters in one bmm pair). On CUDA (decided
once, when the wrapper is built) the wrappers of one attention or MLP block that read the same x form
a `SharedInputGroup`: the first of them called runs every member's base layer and one fused Triton
shrink + expand for all of them (triton_ops.py); the others return their output when the model calls
them with that same x.

    q_proj(x) -> [q, k, v base GEMMs] -> shrink + expand over q|k|v -> q   (k, v kept for their calls)
    k_proj(x) -> k
    v_proj(x) -> v
"""

import logging

import torch
from torch import nn

from alora_core.lora.adapters import LoraWeights
from alora_core.lora.ops import (
    KernelTable,
    StackedLora,
    masked_lora_kernel,
    masked_lora_reference,
    masked_lora_stacked,
)
from alora_core.model.batch import ForwardContext, LoraBatch, StepBatch
from alora_core.model.cpu_linear import SHARED_INPUT_NAMES
from alora_core.model.triton_check import triton_imports

log = logging.getLogger(__name__)

# Torch path: padded rows the stacked LoRA may compute per adapter it saves the separate ops of. On
# the bench model a padded row costs ~1 us of GEMM, one adapter's gather/shrink/expand/scatter ~15 us.
MAX_PADDING_PER_SLOT = 16
# CPU kernel: steps of up to KERNEL_MAX_ROWS rows with several adapters (fan-outs, mixed batches), and
# of up to KERNEL_MAX_ROWS_ONE_ADAPTER where every row uses one adapter (decode, an invocation). The
# kernel computes row by row; one adapter's rows are one addmm pair for MKL, which wins from ~16 rows
# (bench model, 2 threads: 8 rows 13 vs 14 us, 16 rows 22 vs 16 us, 64 rows 80 vs 35 us).
KERNEL_MAX_ROWS = 64
KERNEL_MAX_ROWS_ONE_ADAPTER = 8


def lora_kernel_available(device: torch.device) -> bool:
    """The fused Triton path serves CUDA layers when triton imports; the rest use the torch reference.
    Only a CUDA device asks for triton: CPU serving never imports it (a plain `pip install .` lacks it)."""
    return device.type == "cuda" and triton_imports()


class MaskedLoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Linear, ctx: ForwardContext, use_kernel: bool | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.ctx = ctx
        self.slots: dict[int, LoraWeights] = {}
        device = base_layer.weight.device
        self.use_kernel = lora_kernel_available(device) if use_kernel is None else use_kernel
        self.group: SharedInputGroup | None = None  # set by install() on the kernel path
        self._stacks: dict[tuple[int, ...], StackedLora] = {}  # torch path: slot set -> stacked weights
        self._table: KernelTable | None = None  # the CPU kernel's view of `slots`, where it serves them

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def set_slot(self, slot: int, weights: LoraWeights) -> None:
        """Install an adapter's weights for this layer under `slot` (and into the group's stack)."""
        if not self.use_kernel and weights.a.device != self.base_layer.weight.device:
            device = self.base_layer.weight.device
            weights = LoraWeights(weights.a.to(device), weights.b.to(device), weights.scale)
        self.slots[slot] = weights
        self._slots_changed()
        if self.group is not None:
            self.group.stack.put(slot, self.group.index(self), weights)

    def clear_slot(self, slot: int) -> None:
        self.slots.pop(slot, None)
        self._slots_changed()
        if self.group is not None:
            self.group.stack.drop(slot, self.group.index(self))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = self.ctx.batch
        if self.group is not None and batch is not None and batch.lora is not None:
            return self.group.forward(self, x, batch.lora)
        y = self.base_layer(x)
        if batch is None or batch.lora is None or not self.slots:
            return y
        y2, x2 = y.view(-1, self.out_features), x.reshape(-1, self.in_features)
        kernels, table = batch.cpu_kernels, self._table  # one read: a concurrent unload swaps the table
        limit = KERNEL_MAX_ROWS if batch.lora.single is None else KERNEL_MAX_ROWS_ONE_ADAPTER
        if (
            kernels is not None
            and table is not None
            and x2.shape[0] <= limit
            and _kernel_takes(x2, y2, batch, table.dtype)
        ):
            masked_lora_kernel(kernels, y2, x2, batch.lora.adapter_index, table)
            return y
        if batch.lora.single is not None:  # every row uses one adapter (a LoRA request, an aLoRA decoding)
            w = self.slots.get(batch.lora.single)
            if w is not None:
                y2.addmm_(torch.mm(x2, w.a_t), w.b_t, alpha=w.scale)
            return y
        slots = tuple(s for s in batch.lora.rows_by_slot if s in self.slots)
        if len(slots) > 1:  # several adapters: one bmm pair, unless the padding costs more than it saves
            rows = batch.lora.slot_rows(slots)
            if rows.padding <= MAX_PADDING_PER_SLOT * (len(slots) - 1):
                masked_lora_stacked(y2, x2, rows, self._stack(slots))
                return y
        masked_lora_reference(y2, x2, batch.lora.rows_by_slot, self.slots)
        return y

    def _slots_changed(self) -> None:
        self._stacks.clear()
        self._table = KernelTable(self.slots) if KernelTable.serves(self.slots) else None

    def _stack(self, slots: tuple[int, ...]) -> StackedLora:
        weights = tuple(self.slots[s] for s in slots)
        stack = self._stacks.get(slots)
        if stack is None or any(a is not b for a, b in zip(stack.weights, weights, strict=True)):
            stack = self._stacks[slots] = StackedLora.build(weights)
        return stack


def _kernel_takes(x: torch.Tensor, y: torch.Tensor, batch: StepBatch, dtype: torch.dtype) -> bool:
    """Rows in the weights' dtype with unit column stride (y may be a column view), the step's int64 index."""
    index = batch.lora.adapter_index  # type: ignore[union-attr]
    return (
        x.dtype == dtype
        and y.dtype == dtype
        and x.stride(1) == 1
        and y.stride(1) == 1
        and index.dtype == torch.int64
        and index.is_contiguous()
    )


class SharedInputGroup:
    """Wrapped linears of one block that read the same input, with their adapters in one LoraStack.

    `slots` of the members stay the source of truth (host copies on this path); the stack is their
    device copy, rebuilt when a member joins and patched in place on load and unload.
    """

    def __init__(self, members: list[MaskedLoRALinear]) -> None:
        from alora_core.lora.triton_ops import LoraStack

        weight = members[0].base_layer.weight
        self.members = members
        self.stack = LoraStack(
            members[0].in_features, [m.out_features for m in members], weight.dtype, weight.device
        )
        for i, member in enumerate(members):
            member.group = self
            for slot, weights in member.slots.items():
                self.stack.put(slot, i, weights)
        # cleared if the model turns out to call them on different inputs
        self.shares_input = len(members) > 1
        self._x: torch.Tensor | None = None  # input of the outputs below (held, so identity is reliable)
        self._lora: LoraBatch | None = None
        self._pending: dict[int, torch.Tensor] = {}  # member index -> output its call has not taken yet

    def index(self, member: MaskedLoRALinear) -> int:
        return next(i for i, m in enumerate(self.members) if m is member)

    def forward(self, member: MaskedLoRALinear, x: torch.Tensor, lora: LoraBatch) -> torch.Tensor:
        from alora_core.lora.triton_ops import masked_lora_triton, token_blocks

        i = self.index(member)
        if self._pending:
            if x is self._x and lora is self._lora and i in self._pending:
                y = self._pending.pop(i)
                if not self._pending:
                    self._x = self._lora = None
                return y
            if i in self._pending:  # called again before this output was taken: inputs are not shared
                log.warning("linears %s do not share their input: serving them one by one", self._shapes())
                self.shares_input = False
            self._pending.clear()
            self._x = self._lora = None

        tokens = token_blocks(lora)
        if tokens.slots.isdisjoint(self.stack.slots):
            return member.base_layer(x)  # no row of this step uses an adapter of this group
        serve = list(range(len(self.members))) if self.shares_input else [i]
        ys = {j: self.members[j].base_layer(x) for j in serve}
        masked_lora_triton(
            [ys[j].view(-1, self.members[j].out_features) for j in serve],
            x.reshape(-1, member.in_features),
            tokens,
            self.stack,
            first_slice=serve[0],
        )
        y = ys.pop(i)
        if ys:
            self._x, self._lora, self._pending = x, lora, ys
        return y

    def _shapes(self) -> str:
        return ", ".join(f"{m.in_features}->{m.out_features}" for m in self.members)


def warm_up_kernels(model: nn.Module) -> int:
    """Compile and tune the fused kernels for every LoRA group shape of `model` now, instead of in the
    step of the first request that needs them (a stall of seconds: autotuning compiles every config).
    Covers both token-block sizes and odd and even token counts, the launch variants Triton specializes
    on. Once per distinct (shapes, dtype, rank block); returns how many were warmed (0 on the torch
    path, which never imports triton)."""
    groups = [
        m.group
        for m in model.modules()
        if isinstance(m, MaskedLoRALinear) and m.group is not None and m.group.stack.slots
    ]
    if not groups:
        return 0
    from alora_core.lora.triton_ops import LARGE_BLOCK_M, masked_lora_triton, token_blocks

    seen: set[tuple[object, ...]] = set()
    for group in groups:
        stack = group.stack
        weight = group.members[0].base_layer.weight
        key = (stack.in_features, tuple(stack.out_features), weight.dtype, stack.weights.rank_block)
        if key in seen:
            continue
        seen.add(key)
        slot = min(stack.slots)
        outs = stack.out_features
        calls = [(0, outs)] if group.shares_input else [(i, outs[i : i + 1]) for i in range(len(outs))]
        with torch.inference_mode():
            for n in (1, 2, LARGE_BLOCK_M, LARGE_BLOCK_M + 1):
                x = torch.zeros(n, stack.in_features, dtype=weight.dtype, device=weight.device)
                lora = LoraBatch.from_index(torch.full((n,), slot, dtype=torch.long, device=weight.device))
                assert lora is not None
                for first, sizes in calls:
                    ys = [torch.zeros(n, out, dtype=weight.dtype, device=weight.device) for out in sizes]
                    masked_lora_triton(ys, x, token_blocks(lora), stack, first_slice=first)
    return len(seen)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Full name -> (in, out) of every linear layer a LoRA may target (wrapped ones by their base)."""
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, MaskedLoRALinear) or (
            isinstance(module, nn.Linear) and not name.endswith(".base_layer")
        ):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def install(
    model: nn.Module, module_name: str, ctx: ForwardContext, use_kernel: bool | None = None
) -> MaskedLoRALinear:
    """Wrap `module_name` once (idempotent) and return its wrapper."""
    module = model.get_submodule(module_name)
    if isinstance(module, MaskedLoRALinear):
        return module
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{module_name} is a {type(module).__name__}, not an nn.Linear")
    parent_name, _, child = module_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    wrapper = MaskedLoRALinear(module, ctx, use_kernel)
    setattr(parent, child, wrapper)
    if wrapper.use_kernel:
        _regroup(parent, child)
    return wrapper


def _regroup(parent: nn.Module, child: str) -> None:
    """(Re)build the SharedInputGroup of `child` from its wrapped siblings that read the same input."""
    names = next((group for group in SHARED_INPUT_NAMES if child in group), (child,))
    new = getattr(parent, child)
    members = [
        m
        for name in names
        if isinstance(m := getattr(parent, name, None), MaskedLoRALinear)
        and m.use_kernel
        and m.in_features == new.in_features
    ]
    SharedInputGroup(members)
