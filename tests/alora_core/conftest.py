"""Fixtures for the core tests: the tiny demo model, engines over it, and the PEFT oracle.

Engines run on the CPU in float32 unless ALORA_TEST_DEVICE names another device (`cuda` on a GPU
machine): the same checks then prove the CUDA path (Triton kernels, pinned host tier) against the
oracle, which stays on the CPU in float32.
"""

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from alora_core import Engine, EngineConfig
from alora_core.fixtures import DemoPaths, write_demo
from alora_core.model import attention_parts

SPECIAL_IDS = 3  # ids 0..2 are the role / end-of-text specials: random contexts avoid them
TEST_DEVICE = os.environ.get("ALORA_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoPaths:
    return write_demo(tmp_path_factory.mktemp("demo"), preset="tiny", seed=0)


class PeftOracle:
    """Hugging Face transformers + PEFT on the same weights: the reference every output is checked against."""

    def __init__(
        self, demo: DemoPaths, dtype: torch.dtype = torch.float32, attn_implementation: str | None = None
    ) -> None:
        self.demo = demo
        self.dtype = dtype
        self.attn_implementation = attn_implementation  # None: transformers' default for the model
        self.tokenizer = AutoTokenizer.from_pretrained(str(demo.model))
        self._models: dict[str | None, PreTrainedModel] = {}

    def model(self, adapter: str | None) -> PreTrainedModel:
        if adapter not in self._models:
            base = AutoModelForCausalLM.from_pretrained(
                str(self.demo.model), dtype=self.dtype, attn_implementation=self.attn_implementation
            )
            if adapter is None:
                model = base
            else:
                path = self.demo.adapters[self.demo.aliases.get(adapter, adapter)]
                config = LoraConfig.from_pretrained(str(path))
                raw = json.loads((Path(path) / "adapter_config.json").read_text())
                if raw.get("invocation_string") and not raw.get("alora_invocation_tokens"):
                    # legacy IBM format: PEFT would silently load it as a plain LoRA without this
                    config.alora_invocation_tokens = self.tokenizer.encode(
                        raw["invocation_string"], add_special_tokens=False
                    )
                model = PeftModel.from_pretrained(base, str(path), config=config)
            self._models[adapter] = model.eval()
        return self._models[adapter]

    @torch.inference_mode()
    def generate(
        self, adapter: str | None, input_ids: list[int], max_new_tokens: int
    ) -> tuple[list[int], torch.Tensor]:
        """Greedy generation, stopping at EOS like the engine. Returns (new tokens, logits [n, V])."""
        out = self.model(adapter).generate(
            input_ids=torch.tensor([input_ids]),
            attention_mask=torch.ones(1, len(input_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        return out.sequences[0, len(input_ids) :].tolist(), torch.stack(out.logits)[:, 0].float()


@pytest.fixture(scope="session")
def oracle(demo: DemoPaths) -> PeftOracle:
    return PeftOracle(demo)


@pytest.fixture
def make_engine(demo: DemoPaths) -> Iterator[Callable[..., Engine]]:
    engines: list[Engine] = []

    def make(**overrides: object) -> Engine:
        defaults = {"num_blocks": 256, "block_size": 16, "device": TEST_DEVICE, "dtype": "float32"}
        config = EngineConfig(model=str(demo.model), **{**defaults, **overrides})
        engine = Engine.from_config(config, adapters=demo.adapters, aliases=demo.aliases)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


@pytest.fixture
def engine(make_engine: Callable[..., Engine]) -> Engine:
    return make_engine()


def random_ids(n: int, seed: int, vocab: int = 500) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(SPECIAL_IDS, vocab, (n,), generator=g).tolist()


@pytest.fixture(params=["flash_cpu", "matmul", "matmul_chunked"])
def kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each test runs with ATen's CPU flash kernel for the parts, and with the matmul reference
    (the path of other devices), whole and in row chunks of a tiny score bound."""
    if request.param == "flash_cpu":
        assert attention_parts.FLASH_CPU is not None, "this torch has no CPU flash attention op"
    else:
        monkeypatch.setattr(attention_parts, "FLASH_CPU", None)
    if request.param == "matmul_chunked":
        monkeypatch.setattr(attention_parts, "MAX_SCORE_ELEMENTS", 64)
    return str(request.param)
