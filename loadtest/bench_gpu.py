"""GPU paged attention benchmark: the Triton kernel (model/paged_attention_triton.py) alone against the
gather+SDPA path, then the engine end to end on a Llama-3.1-8B-shaped model.

Part 1, one layer of the 8B shape (32 heads, 8 KV heads, head dim 128, bf16, 16-token blocks), the same
pool and block tables for both paths (K/V writes excluded from both):
    extend  10 new tokens over 8192 cached keys, batch 1 and 8 (an intrinsic's invocation)
    decode  1 token over 2048 keys, batch 1 and 32
    kernel  paged_attention (one launch, or two when split-KV)   gather  attend_gathered per padded batch
    (its plan, built once a step for all layers, is timed apart); device time = CUDA-graph replay,
    eager = what an eager caller waits; max error of each path against the float32 reference.
Part 2, end to end: random bf16 weights of the Llama-3.1-8B shape built on the device (no download),
rank-32 aLoRA and LoRA on q/k/v/o, eager (no CUDA graphs yet):
    aLoRA intrinsic TTFT on an 8192-token cached conversation; plain-LoRA recompute TTFT
    decode ms/token at batch 1, 8, 32 (2048-token contexts); aLoRA / base decode on the 8K conversation
    hbm_fraction_b1: bytes a batch-1 decode step must read (weights but the embedding, plus KV) / time /
    the device's bandwidth (datasheet, and a measured device-to-device copy)
    the gather path again (ALORA_GPU_ATTENTION=gather's path) for aLoRA TTFT and batch-1 decode
Compile time (first launches) and the warm-up are reported. Targets (H100; H200 decode rows scaled x0.7
for bandwidth): kernel >= 3x the gather path on the 10-token extend at 8K; aLoRA TTFT at 8K <= 25 ms.

    python -m loadtest.bench_gpu [--skip-e2e] [--budget-s 480] [--out loadtest/results/gpu/bench_gpu.json]

Needs CUDA. `--cpu-smoke` runs tiny shapes on CPU under Triton's interpreter to check the script
itself (its numbers mean nothing).
"""

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from alora_core import Engine, SamplingParams
from alora_core.model import cuda_graphs
from alora_core.model.attention_gather import attend_gathered, gather_plan
from alora_core.model.batch import SeqSpan
from alora_core.model.step_buffers import StepBuffers
from loadtest.bench_lora_kernel import LLAMA_8B, TINY, build_engine, device_ms, time_ms
from loadtest.common import finish, machine, print_checks

# alora_core.model.paged_attention_triton is imported inside the functions: --cpu-smoke sets TRITON_INTERPRET

BLOCK = 16
# datasheet HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name()
PEAK_BANDWIDTH = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.04e12, "L40S": 0.864e12}
KERNEL_CASES = [
    ("extend", 1, 10, 8192),
    ("extend", 8, 10, 8192),
    ("decode", 1, 1, 2048),
    ("decode", 32, 1, 2048),
]


class Budget:
    """Wall-clock budget of the run: later parts are skipped (and listed) once it is spent."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.skipped: list[str] = []

    def allows(self, part: str, needs_s: float) -> bool:
        left = self.seconds - (time.perf_counter() - self.start)
        if left < needs_s:
            self.skipped.append(part)
            log(f"skipped {part}: {left:.0f} s left of the budget, it needs ~{needs_s:.0f} s")
            return False
        return True


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--context", type=int, default=8192, help="the cached conversation of part 2")
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="decode batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip later parts past this")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/gpu/bench_gpu.json"))
    args = parser.parse_args()
    cases = KERNEL_CASES
    shape = (8, 4, 128)  # KV heads, query heads per KV head, head dim
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        cases = [("extend", 1, 10, 200), ("extend", 2, 10, 200), ("decode", 1, 1, 100), ("decode", 3, 1, 100)]
        shape, args.context, args.decode_context, args.batches, args.decode_tokens = (
            (2, 2, 16),
            200,
            40,
            [1, 2],
            3,
        )
    elif not torch.cuda.is_available():
        sys.exit(
            "bench_gpu needs a CUDA GPU (the paged kernel is the CUDA path). Run it on a GPU machine: "
            "python -m loadtest.bench_gpu  (--cpu-smoke checks the script itself on CPU)"
        )
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    budget = Budget(args.budget_s)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)"
    payload: dict[str, Any] = {
        "device": name,
        "machine": machine(triton=__import__("triton").__version__),
        "kernel": [],
        "skipped": budget.skipped,
    }

    def save(part: dict[str, Any]) -> None:
        """What is measured so far, on disk (marked partial): a run cut short still leaves it."""
        payload.update(part, total_s=time.perf_counter() - budget.start)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**payload, "partial": True}, indent=2))

    for case, batch, new, context in cases:
        payload["kernel"].append(kernel_case(case, batch, new, context, shape, device, dtype))
        save({})
        log(f"kernel {case} batch {batch} over {context} keys done")
    if not args.skip_e2e and budget.allows("end to end", 150 if device.type == "cuda" else 0):
        end_to_end(TINY if args.cpu_smoke else LLAMA_8B, args, device, dtype, budget, save)

    checks = report(payload["kernel"], payload if "alora_ttft_ms_8192" in payload else None, device)
    payload["total_s"] = time.perf_counter() - budget.start
    finish(args.out, payload, checks, smoke=args.cpu_smoke)


def kernel_case(
    name: str,
    batch: int,
    new: int,
    context: int,
    shape: tuple[int, int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """One layer: `batch` sequences of `new` query tokens over `context` cached keys each, one run of
    blocks per sequence (as the pool lays out a conversation), both paths on the same pool."""
    from alora_core.model import paged_attention_triton as pa

    kv_heads, groups, dim = shape
    heads, keys = kv_heads * groups, context + new - (1 if name == "decode" else 0)
    blocks = -(-keys // BLOCK)
    gen = torch.Generator(device=device).manual_seed(batch * 100_000 + context)
    k_cache = torch.randn(kv_heads, batch * blocks * BLOCK, dim, generator=gen, device=device, dtype=dtype)
    v_cache = torch.randn(kv_heads, batch * blocks * BLOCK, dim, generator=gen, device=device, dtype=dtype)
    spans = tuple(
        SeqSpan(i * new, new, keys, ((i * blocks * BLOCK, i * blocks * BLOCK + keys),)) for i in range(batch)
    )
    tokens = batch * new
    query = torch.randn(1, tokens, heads, dim, generator=gen, device=device, dtype=dtype).transpose(1, 2)[
        0
    ]  # [H, T, D]
    scale = dim**-0.5

    buffers = StepBuffers(tokens, batch, blocks, BLOCK, device)
    zeros = torch.zeros(tokens, dtype=torch.long)
    step = buffers.upload(zeros, zeros, zeros - 1, zeros - 1, zeros[:0], spans, torch.empty(0)).device_step
    assert step is not None
    q = query.transpose(0, 1)  # [T, H, D]
    out_kernel = torch.empty(tokens, heads, dim, device=device, dtype=dtype)
    out_gather = torch.empty_like(out_kernel)

    def kernel() -> None:
        pa.paged_attention(q, k_cache, v_cache, out_kernel, step, scale)

    t0 = time.perf_counter()
    plans = gather_plan(list(spans), groups, kv_heads * dim, device)
    plan_ms = (time.perf_counter() - t0) * 1e3

    def gather() -> None:
        for b in plans:
            attend_gathered(b, query, k_cache, v_cache, scale, out_gather)

    t0 = time.perf_counter()
    kernel()
    sync(device)
    first_call_s = time.perf_counter() - t0  # compile (once per variant) + one run
    launch = pa.plan_launch(step, kv_heads, groups, pa.target_programs(device))
    row: dict[str, Any] = {
        "case": name,
        "batch": batch,
        "new_tokens": new,
        "keys": keys,
        "segments": launch.segments,
        "block_m": launch.block_m,
        "first_call_s": first_call_s,
        "kernel_ms": time_ms(kernel, device),
        "gather_ms": time_ms(gather, device),
        "kernel_device_ms": device_ms(kernel, device),
        "gather_device_ms": device_ms(gather, device),
        "gather_plan_ms": plan_ms,
    }
    reference = pa.paged_attention_reference(
        q, k_cache, v_cache, step.block_tables, step.seq_lens, step.query_start[: batch + 1], BLOCK, scale
    ).float()
    span = max(1.0, reference.abs().max().item())
    kernel()
    gather()
    row["kernel_max_err"] = (out_kernel.float() - reference).abs().max().item() / span
    row["gather_max_err"] = (out_gather.float() - reference).abs().max().item() / span
    dev = {k: row[f"{k}_device_ms"] or row[f"{k}_ms"] for k in ("kernel", "gather")}
    row["speedup"] = dev["gather"] / dev["kernel"]
    if batch == 1:  # tuning data for the split and tile heuristics (untuned so far): device ms by variant
        row["sweep_ms"] = {}
        variants = [(s, launch.tile_n) for s in (1, 2, 4, 8, 16, 32)] + [
            (launch.segments, n) for n in (32, 128)
        ]
        for segments, tile_n in variants:
            forced = pa.Launch(launch.block_m, launch.block_q, tile_n, segments)

            def run(forced: pa.Launch = forced) -> None:
                pa.paged_attention(q, k_cache, v_cache, out_kernel, step, scale, launch=forced)

            ms = device_ms(run, device)
            row["sweep_ms"][f"segments={segments} tile_n={tile_n}"] = (
                ms if ms is not None else time_ms(run, device)
            )
    kv_bytes = 2 * batch * keys * kv_heads * dim * k_cache.element_size()
    row["kernel_tb_s"] = kv_bytes / (dev["kernel"] * 1e-3) / 1e12
    return row


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def use_kernel(engine: Engine, on: bool) -> None:
    """Route the engine's steps through the paged kernel (step buffers on), or the reference path."""
    if not on:
        engine.ctx.buffers = None
    elif engine.ctx.buffers is None:
        config = engine.config
        engine.ctx.buffers = StepBuffers(
            config.max_num_batched_tokens,
            config.max_num_seqs,
            -(-engine.max_model_len // config.block_size),
            config.block_size,
            engine.loaded.device,
        )


def use_graphs(engine: Engine, on: bool) -> None:
    """Replay decode / small extend steps as CUDA graphs (the engine's default on CUDA), or run every
    step eager. On CPU (--cpu-smoke) the runner replays with the stand-in graph (re-run)."""
    if not on:
        engine.ctx.graphs = None
    elif engine.ctx.graphs is None and engine.ctx.buffers is not None:
        cuda = engine.loaded.device.type == "cuda"
        engine.ctx.graphs = engine._graph_runner(
            engine.loaded, engine.ctx.buffers, None if cuda else cuda_graphs.rerun_graph
        )


def end_to_end(
    shape: dict[str, Any],
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    budget: Budget,
    save: Callable[[dict[str, Any]], None],
) -> None:
    cuda = device.type == "cuda"
    t0 = time.perf_counter()
    engine, invocation = build_engine(
        shape,
        device,
        dtype,
        kv_cache_bytes=(24 << 30) if cuda else (64 << 20),
        prefill_chunk_tokens=2048,
        max_num_batched_tokens=2048,
        max_num_seqs=max(64, *args.batches),
        max_model_len=16384 if cuda else 1024,
    )
    result: dict[str, Any] = {"build_and_load_s": time.perf_counter() - t0}  # LoRA kernels tuned at load
    try:
        use_kernel(engine, True)
        result["capture_s"] = engine.graph_capture_s  # base graphs, captured at start-up (0: not on CUDA)
        use_graphs(engine, True)
        t0 = time.perf_counter()
        warm_up(engine, args, invocation)
        result["warmup_s"] = time.perf_counter() - t0  # compiles every kernel variant and tunes the LoRA ones
        log(f"warm-up done in {result['warmup_s']:.0f} s")
        save(result)
        result.update(ttft_and_long_decode(engine, args, invocation, "conv"))
        save(result)
        log("TTFT done")
        decode: dict[str, float] = {}
        for b in args.batches:
            if budget.allows(f"decode batch {b}", 20 + b if cuda else 0):
                decode[str(b)] = decode_ms(engine, b, args.decode_context, args.decode_tokens, seed=b)
                save(result | {"decode_ms_per_token": decode})
                log(f"decode batch {b}: {decode[str(b)]:.2f} ms/token")
        result["decode_ms_per_token"] = decode  # CUDA-graph replays (decode steps fit a graph)
        runner = engine.ctx.graphs
        if runner is not None:
            result["capture_s_total"] = runner.capture_s  # start-up + LoRA graphs captured on first use
            result["graph_replays"] = runner.replays
        eager: dict[str, float] = {}
        if budget.allows("eager decode", 20 + max(args.batches) if cuda else 0):
            use_graphs(engine, False)
            for b in args.batches:
                eager[str(b)] = decode_ms(engine, b, args.decode_context, args.decode_tokens, seed=b)
                log(f"eager decode batch {b}: {eager[str(b)]:.2f} ms/token")
            result["decode_ms_per_token_eager"] = eager
            engine.ctx.graphs = runner
        save(result)
        if "1" in decode:
            result.update(hbm_fraction(engine, decode["1"], args.decode_context, device))
        save(result)
        if budget.allows("gather path A/B", 60 if cuda else 0):
            use_kernel(engine, False)
            use_graphs(engine, False)  # the graphs read the step buffers
            gather = ttft_and_long_decode(engine, args, invocation, "conv-gather")
            gather["decode_ms_per_token_b1"] = decode_ms(
                engine, 1, args.decode_context, args.decode_tokens, seed=1
            )
            result["gather_path"] = gather
            save(result)
            use_kernel(engine, True)
            engine.ctx.graphs = runner
    finally:
        engine.close()


def warm_up(engine: Engine, args: argparse.Namespace, invocation: list[int]) -> None:
    """The first calls compile the kernels (prefill and short-query tiles, split and reduce) off the clock."""
    one = SamplingParams(max_tokens=2, ignore_eos=True)
    warm = history(min(args.context, 1024), seed=99)
    engine.generate("warm", warm, one)
    engine.intrinsic("alora", "warm", None, one)
    engine.intrinsic("lora", None, warm + invocation, one)
    decode_ms(engine, 2, 64, 3, seed=98)


def history(n: int, seed: int) -> list[int]:
    return torch.randint(3, 1900, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def ttft_and_long_decode(
    engine: Engine, args: argparse.Namespace, invocation: list[int], conv: str
) -> dict[str, float]:
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=args.decode_tokens, ignore_eos=True)
    engine.generate(conv, history(args.context, seed=0), one)  # the conversation's base KV, cached
    full = engine.conversation_tokens(conv) + invocation
    alora_ttft = [engine.intrinsic("alora", conv, None, one).ttft_s for _ in range(3)]
    lora_ttft = [engine.intrinsic("lora", None, full, one).ttft_s for _ in range(2)]
    alora = stamped(lambda cb: engine.intrinsic("alora", conv, None, many, on_token=cb))
    cached = engine.conversation_tokens(conv)  # a base turn reusing the whole cache but its last token
    base = stamped(lambda cb: engine.generate(conv, cached, many, on_token=cb))
    return {
        "context_tokens": args.context,
        "alora_ttft_ms_8192": statistics.median(alora_ttft) * 1e3,
        "lora_ttft_ms_8192": statistics.median(lora_ttft) * 1e3,
        "alora_decode_ms_8192": alora,
        "base_decode_ms_8192": base,
        "alora_decode_over_base": alora / base,
    }


def stamped(run: Callable[[Callable[[int], None]], object]) -> float:
    """ms per token between the first and the last token a request streams."""
    stamps: list[float] = []
    run(lambda _: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


def decode_ms(engine: Engine, batch: int, context: int, tokens: int, seed: int) -> float:
    """Median ms/token of `batch` base turns decoding together over `context`-token conversations
    (each cached first, so every request of the batch starts decoding in the same step)."""
    convs = [f"dec-{seed}-{i}" for i in range(batch)]
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    for i, conv in enumerate(convs):
        engine.generate(conv, history(context, seed=seed * 1000 + i), one)
    many = SamplingParams(max_tokens=tokens, ignore_eos=True)
    stamps: list[list[float]] = [[] for _ in convs]
    handles = []
    for conv, times in zip(convs, stamps, strict=True):
        cached = engine.conversation_tokens(conv)
        handles.append(
            engine.submit_generate(
                conv, cached, many, on_token=lambda _, t=times: t.append(time.perf_counter())
            )
        )
    for handle in handles:
        handle.result(timeout=600)
    for conv in convs:
        engine.delete_conversation(conv)
    return statistics.median((t[-1] - t[0]) / (len(t) - 1) * 1e3 for t in stamps)


def hbm_fraction(engine: Engine, step_ms: float, context: int, device: torch.device) -> dict[str, Any]:
    """Bytes a batch-1 decode step must read (every weight but the input embedding, plus the KV of the
    context) over the step time, against the datasheet bandwidth and a measured device copy."""
    model = engine.loaded.model
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters() if p is not embedding)
    s = engine.loaded.shape
    kv = 2 * s.num_layers * s.num_kv_heads * s.head_dim * context * engine.pool.kv.element_size()
    achieved = (weights + kv) / (step_ms * 1e-3)
    result: dict[str, Any] = {"decode_bytes_b1": weights + kv, "achieved_bytes_per_s_b1": achieved}
    if device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak = next((bw for key, bw in PEAK_BANDWIDTH.items() if key in name), None)
        result["peak_bytes_per_s"] = peak
        result["hbm_fraction_b1"] = None if peak is None else achieved / peak
        src = torch.empty(1 << 31, dtype=torch.uint8, device=device)  # 2 GiB, far past the L2
        dst = torch.empty_like(src)
        copy_ms = float(__import__("triton").testing.do_bench(lambda: dst.copy_(src), return_mode="median"))
        result["copy_bytes_per_s"] = 2 * src.numel() / (copy_ms * 1e-3)  # read + write
        result["hbm_fraction_b1_of_copy"] = achieved / result["copy_bytes_per_s"]
        del src, dst
    else:
        result["hbm_fraction_b1"] = None
    return result


def report(rows: list[dict], e2e: dict[str, Any] | None, device: torch.device) -> list[dict]:
    print("\none layer, 8B shape (device time: CUDA-graph replay; eager: launch overhead included), ms")
    header = (
        f"{'case':>7} {'batch':>5} {'keys':>6} {'seg':>3} | {'kernel':>8} {'gather':>8} {'speedup':>7} "
        f"{'TB/s':>5} | eager: {'kernel':>7} {'gather':>7} plan | max err: kernel gather | first call s"
    )
    print(header + "\n" + "-" * len(header))
    checks = []
    for r in rows:
        kernel = r["kernel_device_ms"] or r["kernel_ms"]
        gather = r["gather_device_ms"] or r["gather_ms"]
        print(
            f"{r['case']:>7} {r['batch']:>5} {r['keys']:>6} {r['segments']:>3} | {kernel:>8.4f} {gather:>8.4f} "
            f"{r['speedup']:>6.1f}x {r['kernel_tb_s']:>5.2f} | {r['kernel_ms']:>14.4f} {r['gather_ms']:>7.4f} "
            f"{r['gather_plan_ms']:>4.1f} | {r['kernel_max_err']:>15.1e} {r['gather_max_err']:>6.1e} | "
            f"{r['first_call_s']:>6.1f}"
        )
        label = f"{r['case']} batch {r['batch']} over {r['keys']} keys"
        checks.append({"check": f"kernel close to the reference, {label}", "value": r["kernel_max_err"],
                       "ok": r["kernel_max_err"] <= 2e-2})  # fmt: skip
        if r["case"] == "extend" and r["keys"] >= 8192:
            checks.append(
                {
                    "check": f"kernel >= 3x gather+SDPA, {label}",
                    "value": r["speedup"],
                    "ok": r["speedup"] >= 3,
                }
            )
    if e2e is not None:
        print(f"\nend to end, {e2e['context_tokens']}-token conversation (eager):")
        print(f"  aLoRA intrinsic TTFT   {e2e['alora_ttft_ms_8192']:8.1f} ms   (base KV reused)")
        print(f"  plain LoRA TTFT        {e2e['lora_ttft_ms_8192']:8.1f} ms   (full recompute)")
        print(f"  aLoRA / base decode    {e2e['alora_decode_over_base']:8.2f}x  (on the conversation)")
        eager = e2e.get("decode_ms_per_token_eager", {})
        for b, ms in e2e.get("decode_ms_per_token", {}).items():
            print(
                f"  decode batch {b:>3}       {ms:8.2f} ms/token (CUDA graphs)   eager {eager.get(b, float('nan')):8.2f}"
            )
        print(f"  graph capture          {e2e.get('capture_s', 0.0):8.1f} s at start-up")
        if e2e.get("hbm_fraction_b1") is not None:
            print(f"  HBM fraction, batch 1  {e2e['hbm_fraction_b1']:8.1%}  (of the datasheet bandwidth)")
        if "gather_path" in e2e:
            g = e2e["gather_path"]
            print(
                f"  gather path: aLoRA TTFT {g['alora_ttft_ms_8192']:.1f} ms, decode b1 {g['decode_ms_per_token_b1']:.2f} ms"
            )
        if device.type == "cuda":
            ttft = e2e["alora_ttft_ms_8192"]
            checks.append({"check": "aLoRA intrinsic TTFT at 8K <= 25 ms", "value": ttft, "ok": ttft <= 25})
            # issue 21 (H100 targets; decode rows x0.7 on an H200: the script reports, the reader scales)
            decode = e2e.get("decode_ms_per_token", {})
            if "1" in decode:
                checks.append(
                    {
                        "check": "decode batch 1 <= 10 ms/token (H100)",
                        "value": decode["1"],
                        "ok": decode["1"] <= 10,
                    }
                )
            if "32" in decode:
                checks.append(
                    {
                        "check": "decode batch 32 <= 20 ms/step (H100)",
                        "value": decode["32"],
                        "ok": decode["32"] <= 20,
                    }
                )
            checks.append({"check": "start-up graph capture <= 60 s", "value": e2e.get("capture_s", 0.0),
                           "ok": e2e.get("capture_s", 0.0) <= 60})  # fmt: skip
    print_checks(checks, digits=4)
    return checks


if __name__ == "__main__":
    main()
