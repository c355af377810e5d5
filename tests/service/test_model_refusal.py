"""A model the engine cannot serve exactly stops `alora-serve` at start-up: a non-zero exit status and
one log line naming the model type and the feature (no traceback), before the listener opens."""

import subprocess
import sys
from pathlib import Path

import pytest
import transformers as tf
from transformers import AutoTokenizer

from alora_core.fixtures import DemoPaths
from tests.alora_core.families import sizes, write_family
from tests.alora_core.test_model_refusals import mamba_hybrid
from tests.service.conftest import server_env

CASES = {
    "mamba_hybrid": (mamba_hybrid, "model type 'granitemoehybrid' is not supported: linear_attention layers"),
    "bidirectional": (
        lambda s: tf.Gemma3TextConfig(**s, head_dim=16, use_bidirectional_attention=True),
        "model type 'gemma3_text' is not supported: bidirectional (non-causal) attention",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_unsupported_model_stops_the_server_with_one_line(kind: str, demo: DemoPaths, tmp_path: Path) -> None:
    build, line = CASES[kind]
    tokenizer = AutoTokenizer.from_pretrained(str(demo.model))
    paths = write_family(kind, tmp_path, tokenizer, build(sizes(tokenizer)))
    cmd = [sys.executable, "-m", "service.cli", "--model", str(paths.model), "--port", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=server_env())

    assert done.returncode == 3
    log = done.stdout + done.stderr
    naming = [row for row in log.splitlines() if line in row]
    assert len(naming) == 1, log
    assert "Traceback" not in log, log
    assert "Uvicorn running" not in log  # the listener never opened
