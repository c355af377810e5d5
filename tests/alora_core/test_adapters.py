"""Adapter loading: aLoRA detection (new and legacy formats) and a clear typed error for each bad directory."""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alora_core import Engine
from alora_core.errors import AdapterConflictError, AdapterLoadError, UnknownAdapterError
from alora_core.fixtures import DemoPaths


def copy_adapter(demo: DemoPaths, name: str, tmp_path: Path) -> Path:
    dst = tmp_path / name
    shutil.copytree(demo.adapters[name], dst)
    return dst


def edit_config(path: Path, **changes: object) -> None:
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(changes)
    cfg_path.write_text(json.dumps(cfg))


def edit_weights(path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> None:
    file = path / "adapter_model.safetensors"
    save_file(edit(load_file(str(file))), str(file))


def test_kinds_ranks_and_invocations(engine: Engine) -> None:
    certainty = engine.adapters.get("certainty").spec
    legacy = engine.adapters.get("answerability").spec
    rewrite = engine.adapters.get("rewrite").spec
    assert (certainty.kind, legacy.kind, rewrite.kind) == ("alora", "alora", "lora")
    assert certainty.target_modules == ("k_proj", "o_proj", "q_proj", "v_proj")
    assert (certainty.rank, legacy.rank) == (8, 4)
    tok = engine.tokenizer
    # legacy invocation_string: tokenized with the base tokenizer, no special tokens added
    assert legacy.invocation_tokens == tuple(tok.encode(legacy.invocation_text, add_special_tokens=False))
    cfg = json.loads((certainty.path / "adapter_config.json").read_text())
    assert list(certainty.invocation_tokens or ()) == cfg["alora_invocation_tokens"]


def test_slots_are_distinct_and_unload_frees_them(engine: Engine, demo: DemoPaths) -> None:
    slots = {a.slot for a in engine.adapters.all()}
    assert len(slots) == 3
    engine.adapters.unload("rewrite")
    with pytest.raises(UnknownAdapterError):
        engine.adapters.get("rewrite")
    assert engine.adapters.load("rewrite2", demo.adapters["rewrite"]).slot not in {
        engine.adapters.get("certainty").slot,
        engine.adapters.get("answerability").slot,
    }


def test_same_weights_again_is_a_no_op_other_weights_conflict(engine: Engine, demo: DemoPaths) -> None:
    first = engine.adapters.get("certainty")
    assert engine.adapters.load("certainty", demo.adapters["certainty"]) == first
    with pytest.raises(AdapterConflictError, match="different weights"):
        engine.adapters.load("certainty", demo.adapters["rewrite"])


def _dora(p: Path) -> None:
    edit_config(p, use_dora=True)


def _no_weights(p: Path) -> None:
    (p / "adapter_model.safetensors").unlink()


def _bad_json(p: Path) -> None:
    (p / "adapter_config.json").write_text("{not json")


def _wrong_shape(p: Path) -> None:
    edit_weights(p, lambda t: {k: (v[:, :-1].contiguous() if "lora_A" in k else v) for k, v in t.items()})


def _absent_target(p: Path) -> None:
    edit_weights(p, lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})


def _embedding(p: Path) -> None:
    edit_weights(
        p, lambda t: {**t, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(8, 512)}
    )


def _missing_half(p: Path) -> None:
    edit_weights(p, lambda t: {k: v for k, v in t.items() if "layers.0.self_attn.q_proj.lora_B" not in k})


def _truncated(p: Path) -> None:
    file = p / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])


def _bad_invocation(p: Path) -> None:
    edit_config(p, alora_invocation_tokens=[1, 99999])


def _other_peft_type(p: Path) -> None:
    edit_config(p, peft_type="IA3")


def _rank_mismatch(p: Path) -> None:
    edit_config(p, r=16)


BAD_DIRS = [
    (_dora, "DoRA"),
    (_no_weights, "adapter_model.safetensors"),
    (_bad_json, "not valid JSON"),
    (_wrong_shape, "another base model"),
    (_absent_target, "not a linear layer"),
    (_embedding, "embedding"),
    (_missing_half, "without its pair"),
    (_truncated, "not a readable safetensors"),
    (_bad_invocation, "outside the vocabulary"),
    (_other_peft_type, "IA3"),
    (_rank_mismatch, "rank"),
]


@pytest.mark.parametrize(("breaks", "needle"), BAD_DIRS, ids=[b[0].__name__.strip("_") for b in BAD_DIRS])
def test_bad_adapter_directory_raises_clear_error(
    engine: Engine, demo: DemoPaths, tmp_path: Path, breaks: Callable[[Path], None], needle: str
) -> None:
    path = copy_adapter(demo, "certainty", tmp_path)
    breaks(path)
    with pytest.raises(AdapterLoadError, match=needle):
        engine.adapters.load("broken", path)
    with pytest.raises(UnknownAdapterError):
        engine.adapters.get("broken")


def test_missing_directory(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(AdapterLoadError, match="does not exist"):
        engine.adapters.load("x", tmp_path / "nowhere")
