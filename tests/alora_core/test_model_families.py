"""Every architecture family the engine claims (tests/alora_core/families.py), against transformers +
PEFT with eager attention on the same random tiny model: greedy base, aLoRA and LoRA tokens equal,
logits within 1e-4, over one conversation whose contexts grow to several times every sliding window.

    turn 1        40 tokens, prefill in chunks of 7 (chunks cross the window's edge)
                  -> the conversation is demoted to the host tier (device budget 0)
    intrinsics    two aLoRA calls at once: forks of the conversation restored from the host, at two
                  lengths (their shared blocks are attended together, masked where the window slid)
    turn 2        20 more tokens on the restored cache
    LoRA          the whole history recomputed with the adapter
"""

from collections.abc import Iterator

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alora_core import Engine, EngineConfig
from alora_core.fixtures import DemoPaths
from alora_core.model import attention
from tests.alora_core.conftest import TEST_DEVICE, PeftOracle, random_ids
from tests.alora_core.families import FAMILIES, WINDOW, write_family
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, invocation

# the GPU's gathered batches (forced onto the CPU) too where a layer asks for more than plain attention
GATHERED = ("mistral", "gemma2", "gemma3", "gpt_oss")
CASES = [(name, "parts") for name in FAMILIES] + [(name, "gathered") for name in GATHERED]


@pytest.fixture(scope="module")
def tokenizer(demo: DemoPaths) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(demo.model))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, tokenizer: PreTrainedTokenizerBase) -> Iterator[dict]:
    """Each family's model and adapters, written once for the module."""
    cache: dict[str, DemoPaths] = {}

    def get(name: str) -> DemoPaths:
        if name not in cache:
            cache[name] = write_family(name, tmp_path_factory.mktemp(name), tokenizer)
        return cache[name]

    yield {"get": get}


def family_engine(paths: DemoPaths) -> Engine:
    config = EngineConfig(
        model=str(paths.model),
        device=TEST_DEVICE,
        dtype="float32",
        num_blocks=96,
        block_size=4,  # a window covers 3 blocks: whole blocks fall out of it, partial ones are masked
        prefill_chunk_tokens=7,
        device_cache_bytes=0,  # every idle conversation lies on the host: each turn restores it
        host_cache_bytes=1 << 20,
        restore_policy="always",
        calibrate_cpu_linears=False,
    )
    return Engine.from_config(config, adapters=paths.adapters)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "path"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_family_matches_peft(name: str, path: str, built: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    if path == "gathered":
        monkeypatch.setattr(attention, "GATHER_DEVICES", frozenset({"cpu", "cuda"}))
    paths = built["get"](name)
    oracle = PeftOracle(paths, attn_implementation="eager")
    engine = family_engine(paths)
    try:
        inv = invocation(engine, "certainty")
        history = random_ids(40, seed=1)
        turn = engine.generate("c", history, GREEDY)
        assert_matches(turn, oracle, None, history)
        history += turn.token_ids
        assert engine.conversation("c").cache_location == "host"

        contexts = [history + inv, history + random_ids(5, seed=2) + inv]
        handles = [engine.submit_intrinsic("certainty", "c", ctx, GREEDY) for ctx in contexts]
        for handle, context in zip(handles, contexts, strict=True):
            result = handle.result(timeout=120)
            assert_matches(result, oracle, "certainty", context)
            assert result.usage.cached_tokens == len(history) - 1  # the restored base KV
        assert max(len(c) for c in contexts) > 4 * WINDOW

        history += random_ids(20, seed=3)
        turn = engine.generate("c", history, GREEDY)
        assert_matches(turn, oracle, None, history)
        assert turn.usage.cached_tokens > 2 * WINDOW
        history += turn.token_ids

        lora = engine.intrinsic("rewrite", "c", history, GREEDY)
        assert_matches(lora, oracle, "rewrite", history)
        assert engine.cache_stats().promoted_blocks["host"] > 0
    finally:
        engine.close()
