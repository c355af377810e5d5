"""What the start-up model probe (alora_core/model/coverage.py) adds to start-up, on the demo models.

For each preset (tiny: the offline demo; bench: bench_core's model, 8 layers, hidden 512, vocab 32000),
float32 on CPU: the model load, then the probe alone (median of --repeats runs: the engine's forward
over 2 steps of 19 + 16 tokens, transformers' eager forward of 4 sequences of 6-14 tokens), against the
engine's whole construction. The probe runs once per process; requests never pay for it.

    python -m loadtest.bench_probe [--presets tiny bench] [--repeats 5] [--threads N] [--out FILE]
"""

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from alora_core import Engine, EngineConfig
from alora_core.fixtures import write_demo
from alora_core.model.batch import ForwardContext
from alora_core.model.coverage import probe
from alora_core.model.loader import load_model
from alora_core.step import forward
from loadtest.common import finish, machine

DEFAULT_OUT = Path(__file__).parent / "results" / "bench_probe.json"


def measure(preset: str, root: Path, repeats: int) -> dict[str, float]:
    paths = write_demo(root / preset, preset=preset)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    loaded = load_model(paths.model, "cpu", "float32")
    load_s = time.perf_counter() - t0
    shape, ctx = loaded.shape, ForwardContext()
    run = functools.partial(forward, loaded.model, ctx)
    probes = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        probe(loaded.model, run, shape.num_kv_heads, shape.head_dim, shape.vocab_size)
        probes.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    Engine(loaded, EngineConfig(model=str(paths.model), device="cpu", dtype="float32", num_blocks=64)).close()
    engine_s = time.perf_counter() - t0
    return {"load_s": load_s, "probe_s": statistics.median(probes), "engine_init_s": engine_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "bench"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets:
            results[preset] = measure(preset, Path(tmp), args.repeats)
    print(f"{'preset':8s} {'load s':>8s} {'probe ms':>9s} {'engine init s':>14s}")
    for preset, r in results.items():
        print(f"{preset:8s} {r['load_s']:8.2f} {1e3 * r['probe_s']:9.1f} {r['engine_init_s']:14.2f}")
    payload = {"machine": machine(threads=torch.get_num_threads()), "presets": results}
    finish(args.out, payload, [])


if __name__ == "__main__":
    main()
