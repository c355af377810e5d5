"""Resident adapters: each loaded adapter owns a slot index used in the per-token adapter index.

Loading installs a MaskedLoRALinear on each target module (once) and puts the adapter's A, B and
scale into that wrapper under the adapter's slot; unloading removes them and frees the slot. On the
fused CUDA path the wrappers copy the weights into their group's stacked device buffers, so they
are read into host memory first: the device holds one copy.
"""

import functools
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from alora_core.errors import AdapterConflictError, AdapterLoadError, UnknownAdapterError
from alora_core.lora.adapters import AdapterSpec, read_adapter
from alora_core.lora.layer import (
    MaskedLoRALinear,
    install,
    linear_shapes,
    lora_kernel_available,
    warm_up_kernels,
)
from alora_core.model.batch import ForwardContext
from alora_core.model.coverage import why_not_a_target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResidentAdapter:
    spec: AdapterSpec
    slot: int


class AdapterRegistry:
    def __init__(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        ctx: ForwardContext,
        max_adapters: int,
        dtype: torch.dtype,
        device: torch.device,
        lora_targets: frozenset[str] | None = None,
    ) -> None:
        """lora_targets: the linears a masked LoRA serves exactly (model.coverage.probe); None: every one."""
        self._model = model
        self._lora_targets = lora_targets
        self._tokenizer = tokenizer
        self._ctx = ctx
        self._max_adapters = max_adapters
        self._dtype = dtype
        self._device = device
        # where read weights live: the kernel path stacks them on the device itself
        self._weights_device = torch.device("cpu") if lora_kernel_available(device) else device
        self._by_name: dict[str, ResidentAdapter] = {}
        self._aliases: dict[str, str] = {}  # other name -> adapter name
        self._lock = threading.Lock()

    def load(self, name: str, path: str | Path) -> ResidentAdapter:
        """Load adapter `name` from a PEFT directory. Loading the same weights again is a no-op."""
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise AdapterLoadError(f"adapter name {name!r} must be non-empty: letters, digits, '-', '_', '.'")
        shapes = linear_shapes(self._model)
        if self._lora_targets is not None:
            shapes = {n: s for n, s in shapes.items() if n in self._lora_targets}
        why_not = functools.partial(why_not_a_target, self._model, targets=frozenset(shapes))
        spec = read_adapter(name, path, self._tokenizer, shapes, self._dtype, self._weights_device, why_not)
        with self._lock:
            name = self._aliases.get(name, name)  # an alias is its adapter: same weights -> no-op
            existing = self._by_name.get(name)
            if existing is not None:
                if existing.spec.digest == spec.digest:
                    return existing
                raise AdapterConflictError(
                    f"adapter {name!r} is already loaded from {existing.spec.path} with different weights; "
                    "unload it first or pick another name"
                )
            used = {a.slot for a in self._by_name.values()}
            free = [s for s in range(self._max_adapters) if s not in used]
            if not free:
                raise AdapterLoadError(f"all {self._max_adapters} adapter slots are in use")
            resident = ResidentAdapter(spec=spec, slot=free[0])
            for module_name, weights in spec.weights.items():
                install(self._model, module_name, self._ctx).set_slot(resident.slot, weights)
            self._by_name[name] = resident
        if warmed := warm_up_kernels(self._model):  # CUDA: compile now, not in a request's step
            log.info("adapter %s: fused LoRA kernels ready for %d layer shapes", name, warmed)
        log.info(
            "adapter %s: %s rank %d on %s (slot %d)%s",
            name,
            spec.kind,
            spec.rank,
            ",".join(spec.target_modules),
            resident.slot,
            f", invocation {spec.invocation_text!r} = {list(spec.invocation_tokens or ())}"
            if spec.kind == "alora"
            else "",
        )
        return resident

    def unload(self, name: str) -> None:
        """Unload adapter `name` (or the adapter an alias names), with its aliases."""
        with self._lock:
            name = self._aliases.get(name, name)
            resident = self._by_name.pop(name, None)
            self._aliases = {a: n for a, n in self._aliases.items() if n != name}
            if resident is None:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded")
            for module_name in resident.spec.weights:
                wrapper = self._model.get_submodule(module_name)
                assert isinstance(wrapper, MaskedLoRALinear)
                wrapper.clear_slot(resident.slot)

    def add_alias(self, alias: str, name: str) -> None:
        """`alias` names adapter `name` too (e.g. an old name kept after a rename)."""
        with self._lock:
            if alias in self._by_name or alias in self._aliases:
                raise AdapterConflictError(f"alias {alias!r} is already an adapter or alias name")
            if name not in self._by_name:
                raise AdapterLoadError(f"alias {alias!r} names adapter {name!r}, which is not loaded")
            self._aliases[alias] = name

    def aliases_of(self, name: str) -> list[str]:
        return sorted(a for a, n in self._aliases.items() if n == name)

    def get(self, name: str) -> ResidentAdapter:
        resident = self._by_name.get(self._aliases.get(name, name))
        if resident is None:
            known = ", ".join(sorted(self._by_name)) or "none"
            raise UnknownAdapterError(f"unknown adapter {name!r} (loaded: {known})")
        return resident

    def all(self) -> list[ResidentAdapter]:
        return sorted(self._by_name.values(), key=lambda a: a.spec.name)
