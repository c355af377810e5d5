"""One engine step's forward on the CPU, three engine configurations side by side in one process.

    eager     calibrate_cpu_linears=False, cpu_kernels=False: F.linear, ATen's flash attention per run
    linears   + the calibrated, packed and fused linears (model/cpu_linear.py)
    all       + the compiled kernels: batched paged attention, fused RMSNorm / SiLU-and-mul

The engines share nothing but the process; their forwards alternate (a load that drifts hits all
three) and each configuration's median thread CPU time (and wall time) is reported. Steps are built
from real block tables over random KV:

    decode:N:C     N sequences, one decode token each over C cached tokens
    fan:N:C        N conversations of C tokens, 4 aLoRA-style forks each feeding 6 tokens
    chunk:N:C      N sequences, the last 512-token prefill chunk of a C-token prompt

    python -m loadtest.bench_cpu_step [--threads 1] [--steps decode:1:2048 decode:16:2048 ...]
    python -m loadtest.bench_cpu_step --smoke
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.kvcache.block_table import BlockTable
from alora_core.sequence import Sequence
from alora_core.step import Work, build_step_batch, forward
from loadtest.bench_core import build_assets
from loadtest.common import finish, machine

CONFIGS: dict[str, dict[str, bool]] = {
    "eager": {"calibrate_cpu_linears": False, "cpu_kernels": False},
    "linears": {"cpu_kernels": False},
    "all": {},
}
STEPS = [
    "decode:1:2048",
    "decode:16:256",
    "decode:16:2048",
    "fan:4:2048",
    "chunk:1:512",
    "chunk:1:2048",
    "chunk:1:8192",
]


def step_work(engine: Engine, spec: str, tables: list[BlockTable]) -> list[Work]:
    """The step's work list; every block table it made is appended to `tables` (to free them)."""
    kind, count, context = spec.split(":")
    n, ctx = int(count), int(context)
    gen = torch.Generator().manual_seed(0)

    def sequence(length: int, fed: int, parent: Sequence | None = None) -> Sequence:
        ids = torch.randint(3, 1900, (length,), generator=gen).tolist()
        if parent is None:
            table = BlockTable(engine.pool)
        else:
            table = parent.table.fork(parent.table.num_tokens)
            ids = parent.tokens[: parent.table.num_tokens] + ids[parent.table.num_tokens :]
        table.reserve(length)
        table.num_tokens = fed
        tables.append(table)
        return Sequence(ids, table, SamplingParams(max_tokens=1), 1 << 20, ())

    work: list[Work] = []
    for _ in range(n):
        if kind == "decode":
            work.append((sequence(ctx, ctx - 1), ctx - 1, ctx))
        elif kind == "fan":
            conversation = sequence(ctx, ctx)
            work += [(sequence(ctx + 6, ctx, conversation), ctx, ctx + 6) for _ in range(4)]
        elif kind == "chunk":
            start = max(0, ctx - 512)
            work.append((sequence(ctx, start), start, ctx))
        else:
            raise ValueError(f"unknown step {spec!r}: decode, fan or chunk")
    return work


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", nargs="+", default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--smoke", action="store_true", help="one small step, few repeats")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_cpu_step.json"))
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats = ["decode:2:64", "fan:1:64", "chunk:1:96"], 2
        if args.out == parser.get_default("out"):
            args.out = Path(".cache/bench_cpu_step_smoke.json")
    torch.set_num_threads(args.threads)
    model, _ = build_assets(args.assets)
    engines = {
        name: Engine.from_config(
            EngineConfig(model=str(model), device="cpu", dtype="float32", kv_cache_bytes=1 << 30, **overrides)
        )
        for name, overrides in CONFIGS.items()
    }
    for engine in engines.values():
        engine.pool.kv.normal_()  # attention over finite values (the pool starts uninitialized)
    rows = []
    print(f"{'step':<16} | " + " | ".join(f"{name:>16}" for name in engines) + " | all / eager")
    for spec in args.steps:
        runs, tables = {}, {name: [] for name in engines}
        for name, engine in engines.items():
            work = step_work(engine, spec, tables[name])
            runs[name] = lambda e=engine, w=work: forward(
                e.loaded.model, e.ctx, build_step_batch(w, e.pool, e.loaded.device)
            )
            runs[name]()  # warm-up
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
        for _ in range(args.repeats):
            for name, run in runs.items():
                cpu, wall = time.thread_time(), time.perf_counter()
                run()
                times[name].append(((time.thread_time() - cpu) * 1e3, (time.perf_counter() - wall) * 1e3))
        row = {
            name: {
                "cpu_ms": statistics.median(t[0] for t in ts),
                "wall_ms": statistics.median(t[1] for t in ts),
            }
            for name, ts in times.items()
        }
        rows.append({"step": spec, **row})
        cells = " | ".join(f"{row[name]['cpu_ms']:>13.2f} ms" for name in engines)
        print(f"{spec:<16} | {cells} | {row['all']['cpu_ms'] / row['eager']['cpu_ms']:>10.2f}", flush=True)
        for name in engines:
            for table in tables[name]:
                table.free()
    for engine in engines.values():
        engine.close()
    finish(args.out, {"machine": machine(args.threads), "rows": rows}, [], smoke=args.smoke)


if __name__ == "__main__":
    main()
