"""The CPU thread policy (alora_core/threads.py): thread counts from the affinity mask and the cgroup
quota, CPU lists, start-up work on short-lived threads, and pinning of the scheduler's OpenMP team
(in a subprocess: pinning is process state)."""

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
import torch

from alora_core import threads


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("0", (0,)), ("0-3", (0, 1, 2, 3)), ("2,0-1,7", (2, 0, 1, 7)), (" 4 - 5 ,9", (4, 5, 9))],
)
def test_cpu_lists(text: str, cpus: tuple[int, ...]) -> None:
    assert threads.parse_cpu_list(text) == cpus


@pytest.mark.parametrize("text", ["", "a", "3-1", "0,0", "1-", "-2"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="CPU"):
        threads.parse_cpu_list(text)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({}, None),
    ],
)
def test_cgroup_quota_v2_and_v1(tmp_path: Path, files: dict[str, str], expected: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert threads.cgroup_quota(tmp_path) == expected


def test_available_cpus_is_the_affinity_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: set(range(64)))
    monkeypatch.setattr(threads, "cgroup_quota", lambda root=None: 1.5)
    assert threads.available_cpus() == 2  # a 1.5-CPU container on a 64-core node: 2 threads, not 64
    monkeypatch.setattr(threads, "cgroup_quota", lambda root=None: None)
    assert threads.available_cpus() == 64


def test_configure_sets_the_thread_count_and_refuses_a_short_cpu_list() -> None:
    before = torch.get_num_threads()
    try:
        policy = threads.configure(threads=1)
        assert policy == threads.ThreadPolicy(1, None) and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="lists 1 CPUs for 2 threads"):
            threads.configure(threads=2, bind="0")
    finally:
        torch.set_num_threads(before)
        threads._policy = None


def test_short_lived_thread_returns_or_raises_and_is_gone() -> None:
    seen: list[threading.Thread] = []

    def work() -> int:
        seen.append(threading.current_thread())
        return 7

    assert threads.run_on_short_lived_thread(work) == 7
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(KeyError, match="boom"):
        threads.run_on_short_lived_thread(lambda: {}["boom"])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning two threads needs two CPUs")
def test_bind_pins_the_schedulers_team_and_nothing_else(tmp_path: Path) -> None:
    """An engine serving under cpu_bind = the first two allowed CPUs: after a request, the scheduler
    thread runs on the first only, one OpenMP worker on the second only, and the main thread (where
    HTTP would run) is not pinned."""
    first, second = sorted(os.sched_getaffinity(0))[:2]
    script = textwrap.dedent(
        f"""
        import os, threading
        from alora_core import Engine, EngineConfig, SamplingParams, threads
        from alora_core.fixtures import write_demo
        threads.configure(threads=2, bind="{first},{second}")
        demo = write_demo({str(tmp_path)!r}, preset="tiny", seed=0)
        engine = Engine.from_config(EngineConfig(model=str(demo.model), num_blocks=64, calibrate_cpu_linears=False))
        engine.generate(None, list(range(3, 300)), SamplingParams(max_tokens=3, ignore_eos=True))
        scheduler = engine.scheduler._thread.native_id
        for task in sorted(os.listdir("/proc/self/task")):
            status = open(f"/proc/self/task/{{task}}/status").read()
            allowed = [l.split()[1] for l in status.splitlines() if l.startswith("Cpus_allowed_list")][0]
            role = "main" if int(task) == os.getpid() else "scheduler" if int(task) == scheduler else "other"
            print("TASK", role, allowed)
        engine.close()
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    tasks = [line.split()[1:] for line in done.stdout.splitlines() if line.startswith("TASK")]
    assert ["scheduler", str(first)] in tasks
    assert ["other", str(second)] in tasks  # the team's worker
    (main,) = [allowed for role, allowed in tasks if role == "main"]
    assert main != str(first) and main != str(second)  # HTTP / event loop: free to run anywhere
