"""loadtest/bench_gpu.py, the GPU paged-attention benchmark, run end to end on CPU (`--cpu-smoke`: tiny
shapes, Triton's interpreter), so the script a GPU session runs cannot fail on anything but the GPU.
Its numbers mean nothing; its correctness columns (kernel and gather path against the reference) do."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.ops.conftest import ROOT, require_installed


@pytest.mark.slow
def test_bench_gpu_smoke_run_writes_every_result_key(tmp_path: Path) -> None:
    require_installed("triton")
    out = tmp_path / "bench_gpu.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "loadtest.bench_gpu", "--cpu-smoke", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    result = json.loads(out.read_text())
    for key in (
        "device",
        "alora_decode_over_base",
        "alora_ttft_ms_8192",
        "lora_ttft_ms_8192",
        "hbm_fraction_b1",
    ):
        assert key in result, key
    assert set(result["decode_ms_per_token"]) == {"1", "2"}  # replayed (on CPU: the stand-in graph)
    assert set(result["decode_ms_per_token_eager"]) == {"1", "2"}
    assert all(ms > 0 for ms in result["decode_ms_per_token_eager"].values())
    assert result["capture_s"] == 0.0  # no start-up capture off CUDA
    assert result["graph_replays"] > 0 and result["capture_s_total"] > 0
    assert all(ms > 0 for ms in result["decode_ms_per_token"].values())
    assert result["gather_path"]["alora_ttft_ms_8192"] > 0
    assert [(r["case"], r["batch"]) for r in result["kernel"]] == [
        ("extend", 1),
        ("extend", 2),
        ("decode", 1),
        ("decode", 3),
    ]
    for row in result["kernel"]:
        assert row["kernel_max_err"] < 1e-5 and row["gather_max_err"] < 1e-5, row
    assert all(c["ok"] for c in result["checks"]) and result["skipped"] == []
    assert "partial" not in result  # the final write replaces the checkpoints
