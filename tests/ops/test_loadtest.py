"""loadtest/locustfile.py: a 30-second headless smoke run of the agent workload against the tiny
demo on loopback. Any failed request fails the test; the server's own counters must agree."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.ops.conftest import API_KEY, ROOT, require_installed, scrape
from tests.service.conftest import ServerProcess, server_env

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
RUN_S = 30
WORKLOAD = [
    "--turns", "3",
    "--max-tokens", "8",
    "--intrinsic-prob", "0.8",
    "--fanout-prob", "0.5",
    "--idle-prob", "0.2",
    "--idle-s", "2",
    "--think-s", "0.3",
]  # fmt: skip


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_agent_workload_smoke_run_has_no_failures(
    ops_server: ServerProcess, ops_client: httpx.Client, tmp_path: Path
) -> None:
    require_installed("locust")
    before = scrape(ops_client)
    command = [
        sys.executable, "-m", "locust",
        "-f", str(LOCUSTFILE),
        "--host", ops_server.url,
        "--headless", "-u", "4", "-r", "2",
        "--run-time", f"{RUN_S}s",
        "--stop-timeout", "30",
        "--csv", str(tmp_path / "smoke"),
        "--json-file", str(tmp_path / "final"),
        "--api-key", API_KEY,
        *WORKLOAD,
    ]  # fmt: skip
    run = subprocess.run(
        command,
        cwd=tmp_path,
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=RUN_S + 120,
        check=False,
    )
    output = run.stdout + run.stderr
    after = scrape(ops_client)
    assert run.returncode == 0, output

    # locust's exit code and CSV files are settled when --run-time ends; the JSON file is written
    # after the users stopped (their last turns and deletes included): it is the complete count
    final = json.loads((tmp_path / "final.json").read_text())
    stats = {(entry["method"], entry["name"]): entry for entry in final}
    failing = {key: entry["num_failures"] for key, entry in stats.items() if entry["num_failures"]}
    assert not failing, output
    assert read_csv(tmp_path / "smoke_failures.csv") == [], output
    assert read_csv(tmp_path / "smoke_exceptions.csv") == [], output
    assert {(row["Type"], row["Name"]) for row in read_csv(tmp_path / "smoke_stats.csv")} >= {
        ("POST", "/generate")
    }
    # every kind of call of the workload happened
    expected = [
        ("POST", "/generate"),
        ("TTFT", "/generate"),
        ("TPOT", "/generate"),
        ("POST", "/intrinsics"),
        ("DELETE", "/conversations/[id]"),
    ]
    for key in expected:
        assert key in stats and stats[key]["num_requests"] > 0, (key, output)
    assert any(name.startswith("/intrinsic/") for _, name in stats), output
    # the client and the server count the same turns (each was a success on both sides)
    generates = stats[("POST", "/generate")]["num_requests"]
    served = after.value("alora_request_success_total", endpoint="generate") - before.value(
        "alora_request_success_total", endpoint="generate"
    )
    assert served == generates
    assert stats[("TTFT", "/generate")]["num_requests"] == generates
    # no conversation is left behind: every one the workload started was deleted
    assert after.value("alora_kv_cache_usage_bytes", tier="device") == 0
