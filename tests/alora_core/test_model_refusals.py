"""What the engine cannot compute exactly is refused at start-up with a typed error naming the model
type and the feature: by the config check (before the weights load), by the attention backend (an
argument it does not implement), by the start-up probe (an architecture nobody listed), and at
adapter load (a target the masked LoRA cannot wrap exactly)."""

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers as tf
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama import modeling_llama

from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.errors import AdapterLoadError, ContextTooLongError, UnsupportedModelError
from alora_core.fixtures import DemoPaths
from alora_core.model.attention import ATTN_IMPLEMENTATION
from alora_core.model.loader import load_model
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.alora_core.families import sizes, write_family
from tests.alora_core.test_engine_parity import GREEDY, assert_matches


def mamba_hybrid(s: dict[str, object]) -> PretrainedConfig:
    """Granite-4.0-H's shape: Mamba-2 layers between attention layers."""
    return tf.GraniteMoeHybridConfig(
        **{**s, "num_hidden_layers": 3},
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        num_local_experts=0,
        shared_intermediate_size=96,
        mamba_n_heads=4,
        mamba_d_head=32,
        mamba_d_state=16,
    )


REFUSED: dict[str, tuple[Callable[[dict[str, object]], PretrainedConfig], str]] = {
    "mamba_hybrid": (mamba_hybrid, r"'granitemoehybrid'.*linear_attention layers \(Mamba.*layers 0, 2\)"),
    "bidirectional": (
        lambda s: tf.Gemma3TextConfig(**s, head_dim=16, use_bidirectional_attention=True),
        r"'gemma3_text'.*bidirectional",
    ),
    "multimodal": (
        lambda s: tf.Gemma3Config(text_config=tf.Gemma3TextConfig(**s, head_dim=16).to_dict()),
        r"'gemma3'.*multimodal towers \(vision_config\)",
    ),
    "mamba": (
        lambda s: tf.MambaConfig(vocab_size=s["vocab_size"], hidden_size=64, num_hidden_layers=2),
        r"'mamba'.*recurrent",
    ),
    "encoder_decoder": (
        lambda s: tf.T5Config(vocab_size=s["vocab_size"], d_model=64, d_ff=96, num_layers=2, num_heads=4),
        r"'t5'.*encoder-decoder",
    ),
}


@pytest.fixture(scope="module")
def tokenizer(demo: DemoPaths) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(demo.model))


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_config_check_refuses_before_the_weights_load(
    kind: str, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    """Only config.json is written: the refusal comes from the config, not from loading or running."""
    build, named = REFUSED[kind]
    build(sizes(tokenizer)).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedModelError, match=named):
        Engine.from_config(EngineConfig(model=str(tmp_path), device="cpu", dtype="float32", num_blocks=8))


def test_a_mamba_hybrid_with_weights_is_refused_by_load_model(
    tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    paths = write_family("mamba_hybrid", tmp_path, tokenizer, mamba_hybrid(sizes(tokenizer)))
    with pytest.raises(UnsupportedModelError) as info:
        load_model(paths.model, "cpu", "float32")
    assert (info.value.model_type, "Mamba" in info.value.feature) == ("granitemoehybrid", True)


@pytest.mark.parametrize(
    ("build", "limit"),
    [
        (
            lambda s: tf.LlamaConfig(
                **{**s, "max_position_embeddings": 96}, rope_scaling={"rope_type": "dynamic", "factor": 4.0}
            ),
            96,
        ),
        (
            lambda s: tf.Phi3Config(
                **{**s, "max_position_embeddings": 256},
                original_max_position_embeddings=80,
                rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [3.0] * 8},
            ),
            80,
        ),
    ],
    ids=["dynamic", "longrope"],
)
def test_batch_dependent_rope_is_served_only_where_it_is_exact(
    build: Callable[[dict[str, object]], PretrainedConfig],
    limit: int,
    tokenizer: PreTrainedTokenizerBase,
    tmp_path: Path,
) -> None:
    """dynamic / longrope RoPE recompute their frequencies from the largest position of a batch past
    `limit`: below it every request is exact alone and in a flat batch, beyond it a request is refused
    (413) instead of depending on its neighbours."""
    paths = write_family("rope", tmp_path, tokenizer, build(sizes(tokenizer)))
    engine = Engine.from_config(
        EngineConfig(model=str(paths.model), device="cpu", dtype="float32", num_blocks=64)
    )
    try:
        assert engine.max_model_len == limit
        oracle = PeftOracle(paths, attn_implementation="eager")
        contexts = [random_ids(limit - 8, seed=1), random_ids(20, seed=2)]
        handles = [engine.submit_generate(None, ctx, GREEDY) for ctx in contexts]  # one flat batch
        for handle, context in zip(handles, contexts, strict=True):
            assert_matches(handle.result(timeout=120), oracle, None, context)
        with pytest.raises(ContextTooLongError):
            engine.generate(None, random_ids(limit + 1, seed=3), SamplingParams(max_tokens=1))
    finally:
        engine.close()


def test_probe_refuses_an_attention_nobody_listed(demo: DemoPaths, monkeypatch: pytest.MonkeyPatch) -> None:
    """An architecture whose own attention (its eager definition) adds a term the paged attention does
    not know, here an ALiBi-like distance penalty passed to no one: the probe sees the engine differ."""
    eager = modeling_llama.eager_attention_forward

    def alibi(module, query, key, value, attention_mask, **kwargs):  # type: ignore[no-untyped-def]
        n = key.shape[-2]
        distance = (torch.arange(n)[None, :] - torch.arange(n)[-query.shape[-2] :, None]).clamp(max=0)
        bias = 0.5 * distance.to(query.dtype)  # [t, n]
        mask = bias if attention_mask is None else attention_mask + bias
        return eager(module, query, key, value, mask, **kwargs)

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", alibi)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*start-up probe: relative logit error"):
        Engine.from_config(EngineConfig(model=str(demo.model), device="cpu", dtype="float32", num_blocks=8))


def test_probe_refuses_an_attention_that_bypasses_the_pool(
    demo: DemoPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer that attends within the tokens it is given (causal over the flat batch) instead of over
    each sequence's KV in the pool, as custom code may: cached prefixes vanish, sequences mix."""

    def flat(module, query, key, value, attention_mask, step_batch=None, **kwargs):  # type: ignore[no-untyped-def]
        return sdpa_attention_forward(
            module, query, key, value, None, is_causal=True, scaling=kwargs["scaling"]
        )

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTN_IMPLEMENTATION, flat)
    with pytest.raises(UnsupportedModelError, match="start-up probe"):
        Engine.from_config(EngineConfig(model=str(demo.model), device="cpu", dtype="float32", num_blocks=8))


def test_probe_refuses_an_attention_argument_the_backend_does_not_implement(
    demo: DemoPaths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No argument silently dropped: a layer passing one the backend has no parameter for."""
    paged = ALL_ATTENTION_FUNCTIONS[ATTN_IMPLEMENTATION]

    def with_temperature(*args, **kwargs):  # type: ignore[no-untyped-def]
        return paged(*args, attn_temperature=0.7, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ATTN_IMPLEMENTATION, with_temperature)
    with pytest.raises(UnsupportedModelError, match=r"'llama'.*attn_temperature=0.7"):
        Engine.from_config(EngineConfig(model=str(demo.model), device="cpu", dtype="float32", num_blocks=8))


def peft_adapter(base: Path, out: Path, **config: object) -> Path:
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base)), LoraConfig(r=4, **config))  # type: ignore[arg-type]
    model.save_pretrained(str(out), save_embedding_layers=False)  # the LoRA only, not the head's weights
    return out


def test_adapters_on_modules_the_masked_lora_cannot_wrap_are_refused(
    engine: Engine, demo: DemoPaths, tmp_path: Path
) -> None:
    """The LM head is an nn.Linear, but the model calls it on the sampled rows only; an RMSNorm is no
    linear layer at all. Both are refused at load, naming the module."""
    head = peft_adapter(demo.model, tmp_path / "head", target_modules=["lm_head"])
    with pytest.raises(
        AdapterLoadError, match=r"'lm_head' is a linear layer the model does not call once per token"
    ):
        engine.adapters.load("head", head)

    norm = peft_adapter(demo.model, tmp_path / "norm", target_modules=["q_proj"])
    weights = norm / "adapter_model.safetensors"
    renamed = {k.replace("self_attn.q_proj", "input_layernorm"): v for k, v in load_file(weights).items()}
    save_file(renamed, weights)
    with pytest.raises(
        AdapterLoadError, match=r"'model.layers.0.input_layernorm' is a LlamaRMSNorm, not a linear"
    ):
        engine.adapters.load("norm", norm)
    assert [a.spec.name for a in engine.adapters.all()] == ["answerability", "query_rewrite", "uncertainty"]
    json.loads((norm / "adapter_config.json").read_text())  # the directory itself was a valid PEFT one


REMOTE_CODE = '''
import torch
from transformers import LlamaConfig
from transformers.models.llama import modeling_llama as ml


class CustomConfig(LlamaConfig):
    model_type = "custom_llama"


class CustomForCausalLM(ml.LlamaForCausalLM):
    config_class = CustomConfig


class OwnAttention(ml.LlamaAttention):
    """Attention written out by hand over the tokens it is given, as much remote code does."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        b, t, _ = hidden_states.shape
        shape = (b, t, -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = ml.apply_rotary_pos_emb(q, k, *position_embeddings)
        o = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.scaling, enable_gqa=True
        )
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1)), None


class OwnAttentionForCausalLM(CustomForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        for layer in self.model.layers:
            layer.self_attn = OwnAttention(config, layer.self_attn.layer_idx)
'''


def remote_code_model(demo: DemoPaths, root: Path, model_class: str) -> Path:
    """The demo's weights under a custom model type whose code lives in the model directory."""
    root.mkdir()
    for file in demo.model.iterdir():
        (root / file.name).write_bytes(file.read_bytes())
    (root / "custom.py").write_text(REMOTE_CODE)
    config = json.loads((root / "config.json").read_text())
    config.update(
        model_type="custom_llama",
        architectures=[model_class],
        auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": f"custom.{model_class}"},
    )
    (root / "config.json").write_text(json.dumps(config))
    return root


def test_remote_code_models_are_probed_too(demo: DemoPaths, oracle: PeftOracle, tmp_path: Path) -> None:
    """--trust-remote-code: a custom model type built on the attention interface is served (and equals
    the Llama it is); one whose code computes attention by hand over the flat batch is refused."""
    served = remote_code_model(demo, tmp_path / "custom", "CustomForCausalLM")
    engine = Engine.from_config(
        EngineConfig(model=str(served), trust_remote_code=True, device="cpu", dtype="float32", num_blocks=32)
    )
    try:
        assert engine.loaded.model.config.model_type == "custom_llama"
        context = random_ids(30, seed=4)
        assert_matches(engine.generate(None, context, GREEDY), oracle, None, context)
    finally:
        engine.close()

    own = remote_code_model(demo, tmp_path / "own", "OwnAttentionForCausalLM")
    with pytest.raises(UnsupportedModelError, match=r"'custom_llama'.*start-up probe"):
        Engine.from_config(
            EngineConfig(model=str(own), trust_remote_code=True, device="cpu", dtype="float32", num_blocks=32)
        )
