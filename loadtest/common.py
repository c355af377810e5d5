"""What every benchmark script ends with: the machine it ran on, the target table, the JSON, the exit code."""

import json
import platform
import sys
from pathlib import Path
from typing import Any, NoReturn

import torch


def machine(threads: int | None = None, **extra: object) -> dict[str, object]:
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if threads is not None:
        info["threads"] = threads
    return {**info, **extra}


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
