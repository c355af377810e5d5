"""Offline demo assets: a small random Llama-family model, a real BPE tokenizer with a chat template,
and PEFT adapters (aLoRA, legacy aLoRA, plain LoRA) with non-zero weights. No hub access needed.

    OUT/model/                       config.json, model.safetensors, tokenizer.json, chat template
    OUT/adapters/uncertainty/        aLoRA, `alora_invocation_tokens` (PEFT >= 0.18 format)
    OUT/adapters/answerability/      aLoRA, legacy `invocation_string` only (older IBM format)
    OUT/adapters/query_rewrite/      plain LoRA, attention + MLP targets
    OUT/adapters/*/io.yaml           granite-common's intrinsic I/O file, in the shapes of IBM's
                                     intrinsics of the same names (the service applies it)

Named after IBM's intrinsics (what Mellea and granite-common call); the names these adapters had
before (certainty, rewrite) stay as aliases (ALIASES).

The weights are random: outputs are gibberish, but every code path and parity check is real.
Command: `alora-make-demo OUT [--preset tiny|bench]`.
"""

import argparse
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

Preset = Literal["tiny", "bench"]

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>"]
CHAT_TEMPLATE = (  # Granite-style; documents (RAG) as `document` turns before the conversation
    "{%- for document in documents or [] -%}"
    '<|start_of_role|>document {"document_id": "{{ document[\'doc_id\'] or loop.index }}"}<|end_of_role|>'
    "{{ document['text'] }}{{ '<|end_of_text|>\\n' }}"
    "{%- endfor -%}"
    "{%- for message in messages -%}"
    "<|start_of_role|>{{ message['role'] }}<|end_of_role|>{{ message['content'] }}{{ '<|end_of_text|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|start_of_role|>assistant<|end_of_role|>{%- endif -%}"
)
_WORDS = (
    "the a an of to in and is are was were be been it this that for on with as by at from or not no "
    "yes user assistant system question answer context document conversation model agent tool call "
    "result certainty answerability rewrite query hallucination jailbreak check confidence score "
    "label true false what why how when where who which can could would should will may might "
    "please tell me about explain weather city river mountain number value list item time day year "
    "people world data cache memory block token sequence adapter base request response service "
    "server latency throughput fast slow good bad "
).split()


@dataclass(frozen=True)
class ModelPreset:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int  # model embedding rows; the tokenizer may use fewer
    tokenizer_vocab: int
    max_position_embeddings: int
    initializer_range: float
    adapter_rank: int


PRESETS: dict[Preset, ModelPreset] = {
    # tests and the service's offline default: fast on 2 CPU cores
    "tiny": ModelPreset(64, 128, 2, 4, 2, 512, 512, 4096, 0.2, 8),
    # the core benchmark's model (see loadtest/bench_core.py)
    "bench": ModelPreset(512, 1408, 8, 8, 4, 32000, 2000, 16384, 0.02, 32),
}


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    kind: Literal["alora", "alora_legacy", "lora"]
    invocation: str | None
    targets: tuple[str, ...]
    rank_divisor: int = 1


ADAPTERS = (
    AdapterRecipe(
        "uncertainty",
        "alora",
        "<|start_of_role|>certainty<|end_of_role|>",
        ("q_proj", "k_proj", "v_proj", "o_proj"),
    ),
    AdapterRecipe(
        "answerability",
        "alora_legacy",
        "<|start_of_role|>answerability<|end_of_role|>",
        ("q_proj", "v_proj"),
        2,
    ),
    AdapterRecipe("query_rewrite", "lora", None, ("q_proj", "v_proj", "o_proj", "down_proj")),
)
ALIASES = {"certainty": "uncertainty", "rewrite": "query_rewrite"}  # the demo adapters' old names
ALIASES_FILE = "aliases.json"  # in an adapters dir: {other name: adapter} (read by --adapters-dir)


# io.yaml files (granite-common's schema, see docs/intrinsics.md) in the shapes of IBM's intrinsics.
# Bump DEMO_VERSION whenever the written tree changes, so existing trees are rewritten.
DEMO_VERSION = 3
IO_CONFIG_FILE = "io.yaml"
IO_CONFIGS: dict[str, str] = {
    # certainty 0-9 -> the probability-weighted mean of 0.05..0.95 over the top-10 logprobs
    "uncertainty": """\
model: ~
response_format: |
  {"type": "integer", "enum": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]}
transformations:
  - type: likelihood
    categories_to_values: {0: 0.05, 1: 0.15, 2: 0.25, 3: 0.35, 4: 0.45, 5: 0.55, 6: 0.65, 7: 0.75, 8: 0.85, 9: 0.95}
    input_path: []
  - type: nest
    input_path: []
    field_name: "certainty"
instruction: ~
parameters:
  max_completion_tokens: 6
sentence_boundaries: ~
""",
    # a label; `answerability` = the probability of "answerable" (likelihood over the label's tokens)
    "answerability": """\
model: ~
response_format: |
  {"type": "string", "enum": ["answerable", "unanswerable"]}
transformations:
  - type: likelihood
    categories_to_values: {"answerable": 1.0, "unanswerable": 0.0}
    input_path: []
  - type: nest
    input_path: []
    field_name: "answerability"
instruction: ~
parameters:
  max_completion_tokens: 12
sentence_boundaries: ~
""",
    # a JSON object (maxLength keeps the random demo's string short enough to close)
    "query_rewrite": """\
model: ~
response_format: '{"properties": {"rewritten_question": {"title": "Rewritten Question", "type": "string", "maxLength": 40}}, "required": ["rewritten_question"], "title": "QueryRewriteOutput", "type": "object"}'
transformations: ~
instruction: ~
parameters:
  max_completion_tokens: 64
sentence_boundaries: ~
""",
}


class AdapterPaths(dict[str, Path]):
    """name -> adapter directory; an old demo name (ALIASES) finds its adapter's directory too."""

    def __missing__(self, name: str) -> Path:
        if name in ALIASES:
            return self[ALIASES[name]]
        raise KeyError(name)


@dataclass(frozen=True)
class DemoPaths:
    root: Path
    model: Path
    adapters: dict[str, Path]
    aliases: dict[str, str] = field(default_factory=dict)  # other name -> adapter (the old names)


def corpus(seed: int, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]))
    return out


def build_tokenizer(vocab_size: int, seed: int = 0) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on a synthetic corpus, with Granite-style role tokens as specials."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|end_of_text|>",
        bos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        chat_template=CHAT_TEMPLATE,
        model_max_length=1 << 20,
    )


def build_model(preset: ModelPreset, tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(preset.vocab_size, len(tokenizer)),
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_hidden_layers,
        num_attention_heads=preset.num_attention_heads,
        num_key_value_heads=preset.num_key_value_heads,
        max_position_embeddings=preset.max_position_embeddings,
        initializer_range=preset.initializer_range,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def write_adapter(
    base_dir: Path, recipe: AdapterRecipe, tokenizer: PreTrainedTokenizerFast, rank: int, out: Path, seed: int
) -> None:
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    r = max(1, rank // recipe.rank_divisor)
    invocation_tokens = (
        tokenizer.encode(recipe.invocation, add_special_tokens=False) if recipe.invocation else None
    )
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=list(recipe.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        alora_invocation_tokens=invocation_tokens,
    )
    peft_model = get_peft_model(base, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # PEFT initialises B to zero: make the adapter actually change outputs
                param.normal_(0.0, 0.5 / r**0.5)
    peft_model.save_pretrained(str(out))
    if recipe.kind == "alora_legacy":  # rewrite as an older IBM adapter: invocation_string only
        cfg_path = out / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("alora_invocation_tokens", None)
        cfg["invocation_string"] = recipe.invocation
        cfg_path.write_text(json.dumps(cfg, indent=2))


def write_demo(out_dir: str | Path, preset: Preset = "tiny", seed: int = 0) -> DemoPaths:
    """Write the model, tokenizer and demo adapters under out_dir (idempotent: reuses a complete tree)."""
    root = Path(out_dir)
    paths = DemoPaths(
        root,
        root / "model",
        AdapterPaths({a.name: root / "adapters" / a.name for a in ADAPTERS}),
        dict(ALIASES),
    )
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == f"{preset}:{seed}:v{DEMO_VERSION}":
        return paths
    spec = PRESETS[preset]
    if (root / "adapters").is_dir():  # an older tree: drop adapters it had under other names
        shutil.rmtree(root / "adapters")
    tokenizer = build_tokenizer(spec.tokenizer_vocab, seed)
    model = build_model(spec, tokenizer, seed)
    model.save_pretrained(str(paths.model))
    tokenizer.save_pretrained(str(paths.model))
    for i, recipe in enumerate(ADAPTERS):
        write_adapter(
            paths.model, recipe, tokenizer, spec.adapter_rank, paths.adapters[recipe.name], seed + 1 + i
        )
        (paths.adapters[recipe.name] / IO_CONFIG_FILE).write_text(IO_CONFIGS[recipe.name])
    (root / "adapters" / ALIASES_FILE).write_text(json.dumps(ALIASES, indent=2) + "\n")
    marker.write_text(f"{preset}:{seed}:v{DEMO_VERSION}")
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a random demo model, tokenizer and PEFT adapters.")
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    paths = write_demo(args.out, args.preset, args.seed)
    print(f"model: {paths.model}")
    for name, path in paths.adapters.items():
        print(f"adapter {name}: {path}")
    print("aliases: " + ", ".join(f"{old} -> {new}" for old, new in paths.aliases.items()))
    print("the weights are RANDOM: outputs are meaningless, the code paths are real")


if __name__ == "__main__":
    main()
