"""The CPU attention kernel of the working tree against the one of a git revision, in one process.

Both sources (csrc/paged_attention_cpu.c) are compiled with the flags the engine uses, loaded side by
side, and called on the same plans, queries and KV, alternately (a load that drifts hits both); their
outputs must agree (float32 rounding). Shapes are the bench model's attention (8 heads, 4 KV heads,
head size 64), one layer:

    T:N      T query rows (one sequence: the last T positions of an N-token context) over its N keys

    python -m loadtest.bench_cpu_kernel --baseline 65b0e45              # default shapes, 2 threads
    python -m loadtest.bench_cpu_kernel --baseline HEAD --shapes 512:8192 6:8192 --repeats 41
    python -m loadtest.bench_cpu_kernel --smoke

Prints milliseconds per layer (median and fastest) and GFLOP/s, writes JSON. No target: a kernel
change cites its rows (docs/cpu-performance.md).
"""

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from alora_core.model import paged_attention_cpu
from alora_core.model.batch import SeqSpan
from alora_core.model.cpu_kernels import FLAGS, SOURCES, CpuKernels, find_compiler, load_library
from loadtest.common import finish, machine

SHAPES = ["6:2048", "6:8192", "64:8192", "512:2048", "512:8192"]
HEADS, KV_HEADS, DIM = 8, 4, 64


def build(attention_source: Path, out: Path) -> CpuKernels:
    """The kernel library with `attention_source` for csrc/paged_attention_cpu.c (the tree's other sources)."""
    compiler = find_compiler()
    if compiler is None:
        raise SystemExit("no C compiler (set CC, or install gcc)")
    sources = [attention_source, *SOURCES[1:]]
    subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, sources), "-lm"], check=True)
    return load_library(out)


def baseline_source(revision: str, directory: Path) -> Path:
    """The kernel source at `revision`, from the git checkout this script lives in."""
    path = SOURCES[0].relative_to(Path(__file__).resolve().parents[1])
    shown = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True)
    if shown.returncode != 0:
        raise SystemExit(
            f"cannot read {path} at {revision!r} (a git checkout is needed): {shown.stderr.strip()}"
        )
    out = directory / "baseline.c"
    out.write_text(shown.stdout)
    return out


def measure(kernels: dict[str, CpuKernels], spec: str, repeats: int) -> dict[str, object]:
    t, n = map(int, spec.split(":"))
    gen = torch.Generator().manual_seed(t * 100003 + n)
    k_cache, v_cache = (torch.randn(KV_HEADS, n, DIM, generator=gen) for _ in range(2))
    query = torch.randn(t, HEADS, DIM, generator=gen)
    seq = SeqSpan(query_start=0, query_len=t, context_len=n, kv_segments=((0, n),))
    plan = paged_attention_cpu.build_plan([paged_attention_cpu.KernelGroup((seq,), seq.kv_segments, ((),))])
    outs = {name: torch.empty(t, HEADS, DIM) for name in kernels}
    runs = {
        name: (
            lambda k=k, o=outs[name]: paged_attention_cpu.attend(
                k, plan, query, k_cache, v_cache, o, DIM**-0.5
            )
        )
        for name, k in kernels.items()
    }
    for run in runs.values():
        run()
    torch.testing.assert_close(outs["baseline"], outs["tree"], rtol=1e-5, atol=1e-5)
    times: dict[str, list[float]] = {name: [] for name in kernels}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    pairs = sum(min(n, n - t + i + 1) for i in range(t))  # causal: row i sees n - t + i + 1 keys
    flop = 4 * pairs * HEADS * DIM  # q.k and p.v, a multiply and an add each
    row: dict[str, object] = {"shape": spec}
    for name, ts in times.items():
        median = statistics.median(ts)
        row[name] = {"ms": median * 1e3, "fastest_ms": min(ts) * 1e3, "gflops": flop / median / 1e9}
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--baseline", default="HEAD", help="git revision of the baseline kernel source")
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--smoke", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_cpu_kernel.json"))
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.repeats = ["6:256", "96:512"], 3
        if args.out == parser.get_default("out"):
            args.out = Path(".cache/bench_cpu_kernel_smoke.json")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        kernels = {
            "baseline": build(baseline_source(args.baseline, directory), directory / "baseline.so"),
            "tree": build(SOURCES[0], directory / "tree.so"),
        }
        print(f"{'shape':<10} | {'baseline':>22} | {'working tree':>22} | tree / baseline")
        rows = []
        for spec in args.shapes:
            row = measure(kernels, spec, args.repeats)
            rows.append(row)
            base, tree = row["baseline"], row["tree"]
            cells = [f"{c['ms']:>8.2f} ms {c['gflops']:>5.0f} GF/s" for c in (base, tree)]  # type: ignore[index]
            print(f"{spec:<10} | {cells[0]:>22} | {cells[1]:>22} | {tree['ms'] / base['ms']:.2f}", flush=True)  # type: ignore[index]
    info = {"baseline": args.baseline, "repeats": args.repeats, "heads": [HEADS, KV_HEADS, DIM]}
    finish(args.out, {"machine": machine(args.threads), "config": info, "rows": rows}, [], smoke=args.smoke)


if __name__ == "__main__":
    main()
