"""Triton is optional: a plain `pip install .` lacks it (only the test extra and PyPI's CUDA torch
wheels bring it). The service runs with `import triton` failing (the module hidden in the server
process): on CPU without a word, and on CUDA (the LoRA layers' and the attention's device decisions
forced, the tensors stay on CPU) on the torch paths with one warning at start-up. Outputs are PEFT's
either way.

The no-extras install itself is tested in tests/ops/test_install.py."""

import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from alora_core.fixtures import DemoPaths
from tests.alora_core.conftest import PeftOracle, random_ids
from tests.service.conftest import FREE_TEXT, ServerProcess, invocation_ids

WARNING = "triton is not importable"

# `python -c` prelude of the server process: hide triton, optionally make the LoRA layers' and the
# attention's backend decisions see a CUDA device, then run the CLI (argv after -c are its flags).
PRELUDE = textwrap.dedent(
    """
    import sys
    sys.modules["triton"] = None  # `import triton` raises ImportError, as without the package
    if {force_cuda}:
        import torch
        from alora_core import engine
        from alora_core.lora import layer, registry
        lora_decision, attention_decision = layer.lora_kernel_available, engine.paged_kernel_available
        layer.lora_kernel_available = registry.lora_kernel_available = (
            lambda device: lora_decision(torch.device("cuda"))
        )
        engine.paged_kernel_available = lambda device: attention_decision(torch.device("cuda"))
    from service.cli import main
    main()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(("device", "warnings"), [("cpu", 0), ("cuda", 1)])
def test_serves_without_triton(
    device: str, warnings: int, demo: DemoPaths, oracle: PeftOracle, tmp_path: Path
) -> None:
    code = PRELUDE.format(force_cuda=device == "cuda")
    args = ["--model", str(demo.model), "--adapters-dir", str(demo.root / "adapters")]
    server = ServerProcess(args, tmp_path / "server.log", command=[sys.executable, "-c", code]).start()
    at_start = server.log()
    try:
        with httpx.Client(base_url=server.url, timeout=60.0) as client:
            history = random_ids(20, seed=1300)
            turn = client.post(
                "/generate", json={"conversation_id": "t", "input_ids": history, "max_tokens": 3}
            )
            assert turn.status_code == 200, turn.text
            assert turn.json()["token_ids"] == oracle.generate(None, history, 3)[0]
            full = history + turn.json()["token_ids"]
            for name in ("certainty", "rewrite"):  # an aLoRA on the cached conversation, a plain LoRA
                response = client.post(
                    f"/intrinsic/{name}",
                    json={"conversation_id": "t", "max_tokens": 3, "response_format": FREE_TEXT},
                )
                assert response.status_code == 200, response.text
                context = full + invocation_ids(client, name)
                assert response.json()["token_ids"] == oracle.generate(name, context, 3)[0], name
    finally:
        server.stop()
    assert at_start.count(WARNING) == warnings, at_start  # logged once, before the service is ready
    log = server.log()
    assert [line for line in log.splitlines() if "triton" in line.lower()] == [
        line for line in at_start.splitlines() if WARNING in line
    ], log  # and nothing else about triton, then or later
    assert "fused LoRA kernels ready" not in log  # the torch path served
