"""loadtest/bench_cpu_kernel.py: its smoke run builds the kernel of a git revision and of the working
tree, checks that their outputs agree and writes its table as JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_compares_the_two_builds(tmp_path: Path) -> None:
    out = tmp_path / "kernel.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtest.bench_cpu_kernel",
            "--smoke",
            "--baseline",
            "HEAD",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())
    assert [row["shape"] for row in result["rows"]] == ["6:256", "96:512"]
    for row in result["rows"]:
        for build in ("baseline", "tree"):
            assert row[build]["ms"] > 0 and row[build]["gflops"] > 0
