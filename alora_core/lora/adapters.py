"""Read a PEFT LoRA directory into an `AdapterSpec`, checking everything we cannot serve exactly.

An adapter is an aLoRA when its config has `alora_invocation_tokens` (PEFT >= 0.18) or, for older
IBM adapters, `invocation_string` (tokenized with the base tokenizer, no special tokens added).
Everything else that PEFT's LoraConfig can express but our masked-LoRA op does not compute
(DoRA, LoRA bias, modules_to_save, embedding targets, ...) is refused with a clear error rather
than served approximately.
"""

import functools
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from transformers import PreTrainedTokenizerBase

from alora_core.errors import AdapterLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# LoraConfig fields that change the computation away from y += scale * B A x. Truthy = unsupported.
_UNSUPPORTED_FIELDS = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
    "modules_to_save": "modules_to_save (fully trained modules)",
    "trainable_token_indices": "trainable token embeddings",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D targets)",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters (parameter LoRA)",
    "use_qalora": "QA-LoRA",
    "velora_config": "VeLoRA",
    "use_bdlora": "BD-LoRA",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    "megatron_config": "Megatron parallel layers",
}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


@dataclass(frozen=True)
class LoraWeights:
    """One target module of one adapter: delta = scale * B @ A @ x."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @functools.cached_property
    def a_t(self) -> torch.Tensor:
        """A^T [in, r], contiguous (made on first use): x @ A^T without a strided operand."""
        return self.a.t().contiguous()

    @functools.cached_property
    def b_t(self) -> torch.Tensor:
        """B^T [r, out], contiguous (made on first use)."""
        return self.b.t().contiguous()


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    path: Path
    kind: Literal["lora", "alora"]
    rank: int  # largest rank over its modules
    alpha: float
    target_modules: tuple[str, ...]  # module-name suffixes, e.g. ("k_proj", "o_proj", "q_proj", "v_proj")
    invocation_tokens: tuple[int, ...] | None
    invocation_text: str | None
    digest: str  # sha256 of config + weights: same name with another digest is a conflict
    weights: dict[str, LoraWeights] = field(repr=False)  # full module name -> weights
    base_model_name_or_path: str | None = None


def read_adapter(
    name: str,
    path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    linear_shapes: dict[str, tuple[int, int]],
    dtype: torch.dtype,
    device: torch.device,
    why_not: Callable[[str], str] | None = None,
) -> AdapterSpec:
    """Read and validate adapter `name` from `path`.

    linear_shapes: full module name -> (in_features, out_features) of every nn.Linear of the base model
    a masked LoRA serves exactly; why_not(module) says why another target is refused.
    """
    root = Path(path)
    config = _read_config(root)
    _reject_unsupported(config, root)

    tensors, digest = _read_weights(root, config)
    pairs = _pair_weights(tensors, root)
    invocation_tokens, invocation_text = _invocation(config, tokenizer, root)

    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    default_alpha = float(config.get("lora_alpha", 8))
    use_rslora = bool(config.get("use_rslora", False))

    weights: dict[str, LoraWeights] = {}
    for module, (a, b) in sorted(pairs.items()):
        if module not in linear_shapes:
            why = why_not(module) if why_not is not None else "is not a linear layer of the base model"
            raise AdapterLoadError(f"adapter {name!r} at {root}: target module {module!r} {why}")
        in_features, out_features = linear_shapes[module]
        rank = a.shape[0]
        if a.shape != (rank, in_features) or b.shape != (out_features, rank):
            raise AdapterLoadError(
                f"adapter {name!r} at {root}: module {module!r} has lora_A {tuple(a.shape)} and lora_B "
                f"{tuple(b.shape)}, the base layer needs [r, {in_features}] and [{out_features}, r]: "
                "was it trained for another base model?"
            )
        expected_rank = rank_pattern.get(_pattern_key(rank_pattern, module), config.get("r", rank))
        if expected_rank != rank:
            raise AdapterLoadError(
                f"adapter {name!r} at {root}: module {module!r} has rank {rank} but the config says {expected_rank}"
            )
        alpha = float(alpha_pattern.get(_pattern_key(alpha_pattern, module), default_alpha))
        scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
        weights[module] = LoraWeights(
            a=a.to(device=device, dtype=dtype).contiguous(),
            b=b.to(device=device, dtype=dtype).contiguous(),
            scale=scale,
        )
    return AdapterSpec(
        name=name,
        path=root,
        kind="alora" if invocation_tokens is not None else "lora",
        rank=max(w.a.shape[0] for w in weights.values()),
        alpha=default_alpha,
        target_modules=tuple(sorted({m.rsplit(".", 1)[-1] for m in weights})),
        invocation_tokens=invocation_tokens,
        invocation_text=invocation_text,
        digest=digest,
        weights=weights,
        base_model_name_or_path=config.get("base_model_name_or_path"),
    )


def _read_config(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise AdapterLoadError(f"adapter directory {root} does not exist")
    cfg_path = root / CONFIG_FILE
    if not cfg_path.is_file():
        raise AdapterLoadError(f"{root} has no {CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"{cfg_path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(f"{cfg_path} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterLoadError(f"{root}: peft_type {peft_type} is not supported, only LORA (and aLoRA)")
    return config


def _reject_unsupported(config: dict[str, Any], root: Path) -> None:
    for key, what in _UNSUPPORTED_FIELDS.items():
        if config.get(key):
            raise AdapterLoadError(f"{root}: {what} ({key}) is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterLoadError(f"{root}: bias={config['bias']!r} is not supported (it retrains base biases)")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterLoadError(f"{root}: task_type {config['task_type']!r} is not supported, only CAUSAL_LM")


def _read_weights(root: Path, config: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    weights_path = root / WEIGHTS_FILE
    if not weights_path.is_file():
        hint = (
            " (adapter_model.bin found: convert it to safetensors)"
            if (root / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterLoadError(f"{root} has no {WEIGHTS_FILE}{hint}")
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    digest.update(weights_path.read_bytes())
    try:
        with safe_open(str(weights_path), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except Exception as exc:  # safetensors raises its own error types for truncated or malformed files
        raise AdapterLoadError(f"{weights_path} is not a readable safetensors file: {exc}") from exc
    if not tensors:
        raise AdapterLoadError(f"{weights_path} holds no tensors")
    return tensors, digest.hexdigest()


def _pair_weights(
    tensors: dict[str, torch.Tensor], root: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if "lora_embedding" in key:
            raise AdapterLoadError(f"{root}: embedding targets ({key}) are not supported")
        match = _KEY.match(key)
        if match is None:
            raise AdapterLoadError(
                f"{root}: unexpected tensor {key!r} (only lora_A / lora_B of linear layers)"
            )
        if tensor.dim() != 2:
            raise AdapterLoadError(f"{root}: tensor {key!r} has {tensor.dim()} dims, expected 2")
        halves.setdefault(match["module"], {})[match["ab"]] = tensor
    pairs = {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise AdapterLoadError(f"{root}: module {module!r} has lora_{''.join(ab)} without its pair")
        pairs[module] = (ab["A"], ab["B"])
    return pairs


def _invocation(
    config: dict[str, Any], tokenizer: PreTrainedTokenizerBase, root: Path
) -> tuple[tuple[int, ...] | None, str | None]:
    tokens = config.get("alora_invocation_tokens")
    text = config.get("invocation_string")
    if tokens is None and text is None:
        return None, None
    if tokens is None:
        if not isinstance(text, str) or not text:
            raise AdapterLoadError(f"{root}: invocation_string must be a non-empty string")
        tokens = tokenizer.encode(text, add_special_tokens=False)
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, int) for t in tokens):
        raise AdapterLoadError(f"{root}: alora_invocation_tokens must be a non-empty list of token ids")
    vocab = len(tokenizer)
    if any(t < 0 or t >= vocab for t in tokens):
        raise AdapterLoadError(
            f"{root}: alora_invocation_tokens {tokens} fall outside the vocabulary (size {vocab})"
        )
    if text is None:
        text = str(tokenizer.decode(tokens))
    return tuple(tokens), text


def _pattern_key(patterns: dict[str, Any], module: str) -> str:
    """PEFT's rule (peft.utils.other.get_pattern_key): a pattern matches a module name suffix."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module
