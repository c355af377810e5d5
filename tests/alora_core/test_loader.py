"""Model loading: device/dtype selection, the paged attention backend, shape and fingerprint."""

import pytest
import torch

from alora_core.fixtures import DemoPaths
from alora_core.model.attention import ATTN_IMPLEMENTATION
from alora_core.model.loader import load_model, resolve_device_dtype


def test_auto_is_cpu_float32_without_cuda() -> None:
    if torch.cuda.is_available():
        assert resolve_device_dtype("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device_dtype("auto", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


def test_bad_device_or_dtype() -> None:
    with pytest.raises(ValueError, match="dtype"):
        resolve_device_dtype("cpu", "float64")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device_dtype("cuda", "auto")


def test_load_demo_model(demo: DemoPaths) -> None:
    loaded = load_model(demo.model, "cpu", "float32")
    assert loaded.model.config._attn_implementation == ATTN_IMPLEMENTATION
    assert loaded.shape.num_layers == loaded.model.config.num_hidden_layers
    assert loaded.shape.num_kv_heads == loaded.model.config.num_key_value_heads
    assert loaded.eos_token_ids == (loaded.tokenizer.eos_token_id,)
    again = load_model(demo.model, "cpu", "float32")
    assert again.fingerprint == loaded.fingerprint
    assert load_model(demo.model, "cpu", "bfloat16").fingerprint != loaded.fingerprint
