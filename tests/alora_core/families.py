"""Tiny random models of every architecture family the engine claims (and of some it refuses), built
locally with the demo tokenizer, with PEFT adapters made by PEFT itself on each of them.

Each family turns on what makes it differ from Llama, at sizes where it shows on random weights:
sliding windows of WINDOW tokens (contexts in the tests are several times longer), soft-capping
low enough to bend the scores, its own scaling, MQA / GQA / MHA ratios.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers as tf
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from alora_core.fixtures import AdapterRecipe, DemoPaths, write_adapter

WINDOW = 12  # tokens of every sliding window below
INVOCATION = "<|start_of_role|>certainty<|end_of_role|>"
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    config: Callable[[dict[str, object]], PretrainedConfig]  # from the common sizes
    targets: tuple[str, ...]  # LoRA target modules of its adapters
    features: str  # what it exercises (the docs table repeats it)


def sizes(tokenizer: PreTrainedTokenizerBase) -> dict[str, object]:
    """The sizes every tiny model shares (the refused kinds' configs use them too)."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.2,
        "tie_word_embeddings": False,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


ALTERNATING = ["sliding_attention", "full_attention", "sliding_attention"]

FAMILIES: dict[str, Family] = {
    "llama": Family(lambda s: tf.LlamaConfig(**s), ATTENTION + LLAMA_MLP, "GQA 2:1"),
    "granite": Family(
        lambda s: tf.GraniteConfig(
            **s,
            embedding_multiplier=6.0,
            attention_multiplier=0.09,
            residual_multiplier=0.5,
            logits_scaling=4.0,
        ),
        ATTENTION + LLAMA_MLP,
        "own attention scaling (attention_multiplier), embedding / residual / logits multipliers",
    ),
    "granitemoehybrid": Family(
        lambda s: tf.GraniteMoeHybridConfig(
            **s,
            layer_types=["full_attention"] * 2,
            num_local_experts=0,
            shared_intermediate_size=96,
            position_embedding_type="rope",
            attention_multiplier=0.2,
            mamba_n_heads=4,
            mamba_d_head=32,
            mamba_d_state=16,
        ),
        (*ATTENTION, "input_linear", "output_linear"),
        "dense Granite 4 (granite-4.0-micro's shape): attention layers only, shared MLP, RoPE",
    ),
    "qwen2": Family(
        lambda s: tf.Qwen2Config(**{**s, "num_key_value_heads": 4}),
        ATTENTION + LLAMA_MLP,
        "q/k/v biases, MHA",
    ),
    "qwen3": Family(lambda s: tf.Qwen3Config(**s, head_dim=16), ATTENTION + LLAMA_MLP, "q/k RMS norm"),
    "mistral": Family(
        lambda s: tf.MistralConfig(**s, sliding_window=WINDOW),
        ATTENTION + LLAMA_MLP,
        f"sliding window ({WINDOW}) on every layer",
    ),
    "gemma2": Family(
        lambda s: tf.Gemma2Config(
            **{**s, "num_hidden_layers": 3, "num_key_value_heads": 1},
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=ALTERNATING,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=4.0,
            query_pre_attn_scalar=8,
        ),
        ATTENTION + LLAMA_MLP,
        "attention logit soft-capping, alternating sliding / full layers, own scaling "
        "(query_pre_attn_scalar), final logit soft-capping, MQA",
    ),
    "gemma3": Family(
        lambda s: tf.Gemma3TextConfig(
            **{**s, "num_hidden_layers": 3},
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=ALTERNATING,
            final_logit_softcapping=4.0,
            query_pre_attn_scalar=8,
        ),
        ATTENTION + LLAMA_MLP,
        "alternating sliding / full layers, local RoPE base on sliding layers, q/k norm, own scaling, "
        "final logit soft-capping",
    ),
    "phi3": Family(
        lambda s: tf.Phi3Config(**s),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
        "fused qkv_proj / gate_up_proj as LoRA targets",
    ),
    "gpt_oss": Family(
        lambda s: tf.GptOssConfig(
            **s,
            head_dim=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            num_local_experts=4,
            num_experts_per_tok=2,
        ),
        ATTENTION,
        "attention sinks (s_aux), alternating sliding / full layers, q/k/v/o biases, MoE (experts are "
        "not LoRA targets), YaRN RoPE",
    ),
}


def write_family(
    name: str, root: Path, tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig | None = None
) -> DemoPaths:
    """The family's random model (or `config`'s) under root/model, with an aLoRA ("certainty", invoked
    by INVOCATION) and a LoRA ("rewrite") made by PEFT on it."""
    family = FAMILIES.get(name)
    torch.manual_seed(0)
    cfg = config if config is not None else FAMILIES[name].config(sizes(tokenizer))
    model = AutoModelForCausalLM.from_config(cfg)
    paths = DemoPaths(root, root / "model", {"certainty": root / "certainty", "rewrite": root / "rewrite"})
    model.save_pretrained(str(paths.model))
    tokenizer.save_pretrained(str(paths.model))
    if family is not None:
        recipes = [
            AdapterRecipe("certainty", "alora", INVOCATION, family.targets),
            AdapterRecipe("rewrite", "lora", None, family.targets),
        ]
        for seed, recipe in enumerate(recipes, start=1):
            write_adapter(paths.model, recipe, tokenizer, 8, paths.adapters[recipe.name], seed)  # type: ignore[arg-type]
    return paths
