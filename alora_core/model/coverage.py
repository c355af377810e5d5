"""Which models the engine serves exactly, decided once at start-up and never per request.

    load_model:  check_config(config)    before the weights load: layer kinds, masks, RoPE, towers
    Engine:      probe(model, forward)   the engine's forward == transformers' own (eager attention)
                                         on a few tokens: a cached prefix continued, a fork of it,
                                         a fresh sequence and a decode, all in one step

What either finds is an UnsupportedModelError naming the model type and the feature. The config
check names what is known not to fit the paged attention (Mamba / linear-attention layers of
hybrids, encoder-decoders, bidirectional masks, multimodal towers, RoPE that depends on the batch);
the probe catches what nobody listed: a layer that bypasses the pool, a layer that mixes the flat
batch's sequences, an attention argument the backend does not implement (it refuses those itself).
Windows longer than the probe are the config's and the tests' to cover (docs/models.md).

The probe also finds which linear layers a masked LoRA can wrap exactly: those the model calls once
per token row of the step (not an MoE expert's subset, not the LM head's last rows).
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from alora_core.errors import UnsupportedModelError
from alora_core.model.attention import ATTN_IMPLEMENTATION
from alora_core.model.batch import SeqSpan, StepBatch
from alora_core.model.fused_cpu import model_class

log = logging.getLogger(__name__)

# Layer kinds (config.layer_types) the paged attention implements.
ATTENTION_LAYERS = frozenset({"full_attention", "sliding_attention", "attention"})
# What the other layer kinds of transformers' configs are, for the refusal message.
LAYER_KINDS = {
    "linear_attention": "Mamba / linear attention: recurrent state",
    "mamba": "Mamba: recurrent state",
    "conv": "short convolution: recurrent state",
    "chunked_attention": "chunked attention",
}
# Model types with no attention to page at all (recurrent state only).
RECURRENT_MODELS = frozenset({"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma"})
# RoPE types whose frequencies are fixed by the config; "dynamic" and "longrope" change them with the
# largest position of the batch, so they are exact only below the length where they start to.
STATIC_ROPE = frozenset({"default", "linear", "yarn", "llama3", "proportional"})
# Logit error of the probe, relative to the reference (row-centred L2), by dtype. What the probe
# catches (a bypassed pool, mixed sequences, a term nobody listed) measured 0.7 to 1.7; rounding
# alone measured up to 1.4e-6 in float32, 2e-3 (3e-3) in float16 and 1.6e-2 (2.5e-2) in bfloat16 on
# random Llamas of 32 layers (the 2-layer test families), 1.9e-2 and 9.4e-2 with activations
# blown up by a 10x initializer range.
PROBE_TOLERANCE = {torch.float32: 1e-3, torch.float16: 5e-2, torch.bfloat16: 2.5e-1}
REFERENCE_ATTENTION = "eager"  # every transformers model defines its attention by its eager path


def check_config(config: PretrainedConfig) -> int | None:
    """Refuse a config the engine cannot serve exactly. Returns the longest context it serves exactly
    when RoPE limits it (dynamic / longrope scaling), else None."""
    model_type = str(config.model_type)
    if config.is_encoder_decoder:
        _refuse(model_type, "an encoder-decoder architecture (only decoder-only causal LMs are served)")
    towers = [
        k for k in getattr(config, "sub_configs", {}) if k != "text_config" and getattr(config, k, None)
    ]
    if towers:
        _refuse(model_type, f"multimodal towers ({', '.join(towers)}); serve its text-only checkpoint")
    if model_type in RECURRENT_MODELS:
        _refuse(model_type, "recurrent (state-space) layers instead of attention")
    text = config.get_text_config()
    kinds = list(getattr(text, "layer_types", None) or [])
    for kind in sorted({k for k in kinds if k not in ATTENTION_LAYERS}):
        where = _ranges([i for i, k in enumerate(kinds) if k == kind])
        _refuse(
            model_type,
            f"{kind} layers ({LAYER_KINDS.get(kind, 'not attention')}, layers {where}): only full and "
            "sliding attention layers are served (docs/models.md: hybrid models)",
        )
    if getattr(text, "use_bidirectional_attention", False) or getattr(text, "is_causal", True) is False:
        _refuse(model_type, "bidirectional (non-causal) attention")
    if getattr(text, "attention_chunk_size", None):
        _refuse(model_type, "chunked attention (attention_chunk_size)")
    return _rope_limit(model_type, text)


def _rope_limit(model_type: str, text: PretrainedConfig) -> int | None:
    params = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    per_layer_kind = (
        params.values() if all(isinstance(v, dict) for v in params.values()) and params else [params]
    )
    limit = None
    for rope in per_layer_kind:
        kind = str(rope.get("rope_type", rope.get("type", "default")))
        if kind in STATIC_ROPE:
            continue
        if kind == "dynamic":
            exact = text.max_position_embeddings
        elif kind == "longrope":
            exact = rope.get("original_max_position_embeddings") or getattr(
                text, "original_max_position_embeddings", None
            )
        else:
            _refuse(model_type, f"RoPE type {kind!r}")
        if not exact:
            _refuse(model_type, f"RoPE type {kind!r} without its original maximum length")
        limit = exact if limit is None else min(limit, exact)
    if limit is not None and limit < text.max_position_embeddings:
        log.warning(
            "%s: dynamic/longrope RoPE changes its frequencies with the longest sequence of a batch past "
            "%d tokens; serving up to %d tokens, where every request is exact on its own",
            model_type,
            limit,
            limit,
        )
    return limit


@dataclass(frozen=True)
class Coverage:
    """What the probe found."""

    lora_targets: frozenset[str]  # linears called once per token row: a masked LoRA wraps them exactly
    error: float  # the probe's largest relative logit error against transformers


# The probe's layout, (tokens, KV slot runs) per step: A is cached in step 1 and continued over a
# second run in step 2; B forks A's first 8 tokens (sharing their slots) and adds its own; C is fresh;
# D decodes one token. Two steps of 19 and 16 rows; 11 rows compared with transformers' 43 tokens.
Work = tuple[str, int, int, tuple[tuple[int, int], ...]]  # (sequence, first, end, runs of 0..end-1)
_LENGTHS = {"A": 14, "B": 13, "C": 6, "D": 10}
_STEPS: tuple[tuple[Work, ...], ...] = (
    (("A", 0, 10, ((0, 10),)), ("D", 0, 9, ((16, 25),))),
    (
        ("A", 10, 14, ((0, 10), (40, 44))),
        ("B", 8, 13, ((0, 8), (56, 61))),
        ("C", 0, 6, ((72, 78),)),
        ("D", 9, 10, ((16, 26),)),
    ),
)
_PROBE_SLOTS = 80


def probe(
    model: PreTrainedModel,
    forward: Callable[[StepBatch], torch.Tensor],
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
) -> Coverage:
    """Run the engine's `forward` (StepBatch -> logits [rows, V]) over the probe layout on a scratch KV
    pool, compare every row's logits with transformers' own forward of each whole sequence, and refuse
    the model on a mismatch."""
    model_type = str(model.config.model_type)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(0)
    tokens = {
        name: torch.randint(0, vocab_size, (n,), generator=gen).tolist() for name, n in _LENGTHS.items()
    }
    tokens["B"][:8] = tokens["A"][:8]  # the fork shares A's first 8 tokens and their slots
    layers = model.config.get_text_config().num_hidden_layers
    kv = torch.zeros(layers, 2, num_kv_heads, _PROBE_SLOTS, head_dim, dtype=dtype, device=device)

    got, checked = [], []  # logits of the engine and the (sequence, position) of each row
    for i, work in enumerate(_STEPS):
        batch = _step(work, tokens, kv, device)
        if i < len(_STEPS) - 1:
            got.append(forward(batch))
        else:
            with _RowAlignment(model, batch.input_ids.numel()) as aligned:
                got.append(forward(batch))
        checked += [(name, p) for name, first, end, _ in work for p in _checked_rows(first, end)]
    engine = torch.cat(got).float()
    positions = {name: sorted({p for n, p in checked if n == name}) for name in tokens}
    whole = {
        name: _reference_logits(model, model_type, ids, positions[name], device)
        for name, ids in tokens.items()
    }
    reference = torch.stack([whole[name][positions[name].index(p)] for name, p in checked])
    error = _relative_error(engine, reference)
    tolerance = PROBE_TOLERANCE.get(dtype, 2.5e-1)
    if error > tolerance:
        _refuse(
            model_type,
            f"its forward through the paged KV cache differs from transformers' own ({REFERENCE_ATTENTION} "
            f"attention) on the start-up probe: relative logit error {error:.2g} > {tolerance:g} (a layer "
            "that bypasses the KV pool or mixes the sequences of a batch; see docs/models.md)",
        )
    log.info("model probe: %s matches transformers (relative logit error %.2g)", model_type, error)
    return Coverage(lora_targets=frozenset(aligned.names), error=error)


def _checked_rows(first: int, end: int) -> list[int]:
    """The positions of a sequence's step whose logits the probe compares: the first and the last it
    feeds (a layer's error in any row reaches the last one through the next layer's keys)."""
    return sorted({first, end - 1})


def _step(
    work: tuple[Work, ...], tokens: dict[str, list[int]], kv: torch.Tensor, device: torch.device
) -> StepBatch:
    """A StepBatch feeding each sequence's [first, end), keeping the logits of its checked rows."""
    ids: list[int] = []
    positions, slots, spans, logits_rows = [], [], [], []
    for name, first, end, segments in work:
        spans.append(SeqSpan(len(ids), end - first, end, segments))
        logits_rows += [len(ids) + p - first for p in _checked_rows(first, end)]
        ids += tokens[name][first:end]
        positions += range(first, end)
        slots.append(torch.cat([torch.arange(s, e) for s, e in segments])[first:end])
    return StepBatch(
        input_ids=torch.tensor(ids, device=device),
        positions=torch.tensor(positions, device=device),
        slot_mapping=torch.cat(slots).to(device),
        seqs=tuple(spans),
        kv=kv,
        lora=None,
        logits_rows=torch.tensor(logits_rows, device=device),
    )


@torch.inference_mode()
def _reference_logits(
    model: PreTrainedModel, model_type: str, tokens: list[int], positions: list[int], device: torch.device
) -> torch.Tensor:
    """transformers' own forward of one whole sequence, with its reference attention: the logits at
    `positions`, [len(positions), V] float32."""
    try:
        model.set_attn_implementation(REFERENCE_ATTENTION)
        if model.config._attn_implementation != REFERENCE_ATTENTION:
            _refuse(
                model_type, f"cannot switch to transformers' {REFERENCE_ATTENTION} attention for the probe"
            )
        ids = torch.tensor([tokens], device=device)
        keep = torch.tensor(positions, device=device)
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, logits_to_keep=keep)
        return out.logits[0].float()
    finally:
        model.set_attn_implementation(ATTN_IMPLEMENTATION)


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest per-row L2 error of the logits, each row centred (a constant shift changes no softmax)."""
    got = got - got.mean(dim=-1, keepdim=True)
    want = want - want.mean(dim=-1, keepdim=True)
    return float(((got - want).norm(dim=-1) / want.norm(dim=-1).clamp_min(1e-6)).max())


class _RowAlignment:
    """Forward pre-hooks on every nn.Linear: which ones see exactly the step's token rows on every call."""

    def __init__(self, model: nn.Module, rows: int) -> None:
        self.model = model
        self.rows = rows
        self.names: set[str] = set()
        self._misaligned: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "_RowAlignment":
        for name, module in self.model.named_modules():
            if isinstance(module, nn.Linear):
                self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[object, ...]], None]:
        def record(_: nn.Module, args: tuple[object, ...]) -> None:
            x = args[0] if args else None
            if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[:-1].numel() == self.rows:
                self.names.add(name)
            else:
                self._misaligned.add(name)

        return record

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        head = self.model.get_output_embeddings() if isinstance(self.model, PreTrainedModel) else None
        self.names -= self._misaligned | {n for n, m in self.model.named_modules() if m is head}


def why_not_a_target(model: nn.Module, module_name: str, targets: frozenset[str]) -> str:
    """Why a masked LoRA cannot serve `module_name` of `model` (for the adapter load error)."""
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return "is not a linear layer of the base model (no such module)"
    if not isinstance(module, nn.Linear):
        return (
            f"is a {model_class(module).__name__}, not a linear layer of the base model: the masked LoRA wraps "
            "nn.Linear layers only (embeddings, Conv1D and fused MoE experts are refused)"
        )
    if module_name not in targets:
        return (
            "is a linear layer the model does not call once per token of a step (an MoE expert, the LM "
            "head, a tower's layer): a masked LoRA cannot serve it exactly"
        )
    return "is not a linear layer of the base model"


def _refuse(model_type: str, feature: str) -> NoReturn:
    raise UnsupportedModelError(model_type, feature)


def _ranges(indices: list[int]) -> str:
    shown = ", ".join(str(i) for i in indices[:8])
    return shown + (f", ... ({len(indices)} in all)" if len(indices) > 8 else "")
