"""What every benchmark script ends with: the machine it ran on, the target table, the JSON, the exit code."""

import json
import platform
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch

from alora_core import Engine, EngineConfig, threads


def machine(threads: int | None = None, **extra: object) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if threads is not None:
        info["threads"] = threads
    return {**info, **extra}


def served_engine(config: EngineConfig, adapters: dict[str, Path] | None = None, threads_: int = 2) -> Engine:
    """The engine as the service runs it: the thread policy applied, then loaded on a short-lived thread,
    so the scheduler's OpenMP team is the process's only one (alora_core/threads.py). An engine loaded
    on the main thread leaves a second team there (the model probe and start-up timings run torch ops),
    which made every forward pay OpenMP wake-ups: benchmarks measured a slower engine than users get."""
    threads.configure(threads_, None)
    return threads.run_on_short_lived_thread(lambda: Engine.from_config(config, adapters))


def print_checks(checks: list[dict[str, Any]], digits: int = 3) -> None:
    print("\ntargets:")
    for c in checks:
        print(f"  [{'PASS' if c['ok'] else 'FAIL'}] {c['check']}: {c['value']:.{digits}f}")


def finish(out: Path, payload: dict[str, Any], checks: list[dict[str, Any]], smoke: bool = False) -> NoReturn:
    """Write payload + checks as JSON to `out`; exit 1 if a target was missed (never for a smoke run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**payload, "checks": checks}, indent=2))
    print(f"\nJSON: {out}")
    sys.exit(0 if smoke or all(c["ok"] for c in checks) else 1)
