"""Load any Hugging Face decoder-only causal LM and its tokenizer, with the paged attention backend.

`auto` device/dtype: CUDA + bfloat16 when a GPU is present, else CPU + float32.
"""

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from alora_core.model.attention import ATTN_IMPLEMENTATION
from alora_core.model.coverage import check_config

log = logging.getLogger(__name__)

DType = Literal["auto", "float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device_dtype(device: str = "auto", dtype: DType = "auto") -> tuple[torch.device, torch.dtype]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {dtype!r}")
    return dev, _DTYPES[dtype]


@dataclass(frozen=True)
class ModelShape:
    """What the KV pool and the adapter checks need to know about the model."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int  # the longest context served exactly (RoPE scaling may lower it)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    fingerprint: str  # identifies these weights + dtype: caches of another model are never reused
    eos_token_ids: tuple[int, ...]


def load_model(
    path: str | Path, device: str = "auto", dtype: DType = "auto", trust_remote_code: bool = False
) -> LoadedModel:
    """Load `path` (a local directory, or a hub id where the network allows) for serving. Its config is
    checked first (model/coverage.py): what the engine cannot serve exactly is refused before the
    weights load."""
    dev, dt = resolve_device_dtype(device, dtype)
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    exact_len = check_config(config)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(path),
        config=config,
        dtype=dt,
        attn_implementation=ATTN_IMPLEMENTATION,
        trust_remote_code=trust_remote_code,
    )
    model.to(dev)  # type: ignore[arg-type]  # transformers' stub types .to() narrowly
    model.eval()
    model.requires_grad_(False)
    shape = model_shape(model, exact_len)
    log.info(
        "loaded %s: %d layers, %d kv heads x %d, vocab %d, on %s/%s",
        path,
        shape.num_layers,
        shape.num_kv_heads,
        shape.head_dim,
        shape.vocab_size,
        dev,
        dt,
    )
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        shape=shape,
        device=dev,
        dtype=dt,
        fingerprint=model_fingerprint(path, model, dt),
        eos_token_ids=_eos_token_ids(model, tokenizer),
    )


def model_shape(model: PreTrainedModel, exact_len: int | None = None) -> ModelShape:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    return ModelShape(
        num_layers=cfg.num_hidden_layers,
        num_kv_heads=getattr(cfg, "num_key_value_heads", None) or heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        vocab_size=cfg.vocab_size,
        max_position_embeddings=min(cfg.max_position_embeddings, exact_len or cfg.max_position_embeddings),
    )


def model_fingerprint(path: str | Path, model: PreTrainedModel, dtype: torch.dtype) -> str:
    """Hash of the config and the weight files' sizes and names, cheap enough for multi-GB models."""
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
    h.update(str(dtype).encode())
    root = Path(path)
    if root.is_dir():
        for f in sorted(root.glob("*.safetensors")) + sorted(root.glob("*.bin")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
            with f.open("rb") as fh:  # the safetensors header (tensor names, shapes, offsets) and a sample
                h.update(fh.read(1 << 20))
    else:
        h.update(str(path).encode())
    return h.hexdigest()[:16]


def _eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    for value in (eos, tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(value)
    return tuple(sorted(ids))
