"""Fused masked-LoRA benchmark (CUDA): the Triton kernels against the base GEMM and the unfused torch path,
then end to end on a Llama-3.1-8B-shaped model.

Part 1, one layer, bf16, hidden 4096 (in = out = 4096), for rank 32 and 64, tokens 1 .. 4096, and
1 / 8 / 64 distinct adapters, a quarter of the tokens masked (idx -1: base rows, aLoRA prefixes):
    base     y = x @ W^T                      the layer's own GEMM
    kernel   masked_lora_triton               shrink + expand, every adapter in one launch pair
    torch    masked_lora_reference            per adapter: gather, two GEMMs, index_add (the CPU path)
  plus the q|k|v group (4096 -> 4096 / 1024 / 1024) against three base GEMMs and three torch calls.
  Per-step token grouping (token_blocks, shared by every layer of a forward) is timed on its own.
Targets: kernel <= 15% of base at >= 1024 tokens; torch / kernel >= 2 on mixed batches (8, 64 adapters).

Part 2, end to end: Llama-3.1-8B shape (32 layers, hidden 4096, GQA 32/8, MLP 14336, vocab 128256),
random bf16 weights, rank-32 adapters on q/k/v/o, one 8192-token conversation:
    aLoRA intrinsic TTFT on the cached conversation (base KV reused) vs plain LoRA TTFT (recompute)
    decode tokens/s: base turn, aLoRA intrinsic

    python -m loadtest.bench_lora_kernel [--skip-e2e] [--out loadtest/results/bench_lora_kernel.json]

Needs CUDA. `--cpu-smoke` runs tiny shapes on CPU under Triton's interpreter to check the script
itself (its numbers mean nothing).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.fixtures import build_tokenizer
from alora_core.lora.adapters import LoraWeights
from alora_core.lora.ops import masked_lora_reference
from alora_core.model.attention import ATTN_IMPLEMENTATION
from alora_core.model.batch import LoraBatch
from alora_core.model.loader import LoadedModel, model_shape
from loadtest.common import finish, machine, print_checks

# alora_core.lora.triton_ops is imported inside the functions: --cpu-smoke must set TRITON_INTERPRET first

INVOCATION = "<|start_of_role|>certainty confidence score<|end_of_role|>"
E2E_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_8B: dict[str, Any] = {
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
}
TINY: dict[str, Any] = {  # --cpu-smoke
    "vocab_size": 2000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--masked", type=float, default=0.25, help="fraction of tokens with idx -1")
    parser.add_argument("--context", type=int, default=8192, help="end-to-end conversation length")
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on CPU, Triton interpreter")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_lora_kernel.json"))
    args = parser.parse_args()
    if args.cpu_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton_ops is imported
        args.hidden, args.ranks, args.tokens, args.adapters, args.context = 64, [16], [1, 40], [1, 8], 200
        args.decode_tokens = 4
    elif not torch.cuda.is_available():
        sys.exit(
            "bench_lora_kernel needs a CUDA GPU (the fused kernels are the CUDA path; CPU uses the torch "
            "reference). Run it on a GPU machine: python -m loadtest.bench_lora_kernel  "
            "(--cpu-smoke checks the script itself on CPU)"
        )
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16

    rows, qkv = [], []
    for rank in args.ranks:
        for adapters in args.adapters:
            for tokens in args.tokens:
                rows.append(
                    layer_case(
                        args.hidden, (args.hidden,), rank, adapters, tokens, args.masked, device, dtype
                    )
                )
                print(f"layer r={rank} adapters={adapters} T={tokens} done", file=sys.stderr, flush=True)
        for tokens in (args.tokens[0], *[t for t in args.tokens if t >= 1024]):
            kv = args.hidden // 4
            qkv.append(
                layer_case(args.hidden, (args.hidden, kv, kv), rank, 8, tokens, args.masked, device, dtype)
            )
    e2e = None if args.skip_e2e else end_to_end(TINY if args.cpu_smoke else LLAMA_8B, args, device, dtype)

    checks = report(rows, qkv, e2e)
    info = machine(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)",
        triton=__import__("triton").__version__,
    )
    finish(args.out, {"machine": info, "layer": rows, "qkv": qkv, "e2e": e2e}, checks, smoke=args.cpu_smoke)


def time_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median time of fn in ms as eager code sees it, launch overhead included (after a warm-up call:
    autotuning and compilation are not timed)."""
    fn()
    if device.type == "cuda":
        import triton  # type: ignore[import-untyped]

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    samples = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def device_ms(fn: Callable[[], object], device: torch.device) -> float | None:
    """Median device time of fn in ms: fn captured in a CUDA graph and replayed, so host launch overhead is
    out of the number (what a graph-captured or CPU-ahead caller sees). None off CUDA or if fn cannot be
    captured (a host sync inside)."""
    if device.type != "cuda":
        return None
    import triton  # type: ignore[import-untyped]

    fn()
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))
    except RuntimeError as e:
        print(f"not capturable in a CUDA graph: {e}", file=sys.stderr)
        torch.cuda.synchronize()
        return None


def layer_case(
    d_in: int,
    outs: tuple[int, ...],
    rank: int,
    adapters: int,
    tokens: int,
    masked: float,
    device: torch.device,
    dtype: torch.dtype,
) -> dict:
    """One layer group (a single linear, or q|k|v when outs has three sizes) on one mixed batch."""
    from alora_core.lora.triton_ops import LoraStack, masked_lora_triton, token_blocks

    gen = torch.Generator(device=device).manual_seed(rank * 100_000 + adapters * 10_000 + tokens)
    x = torch.randn(tokens, d_in, generator=gen, device=device, dtype=dtype)
    base_w = [torch.randn(out, d_in, generator=gen, device=device, dtype=dtype) / d_in**0.5 for out in outs]
    idx = torch.randint(0, adapters, (tokens,), generator=gen, device=device)
    idx[torch.rand(tokens, generator=gen, device=device) < masked] = -1
    idx[0] = 0  # at least one adapted token
    batch = LoraBatch.from_index(idx)
    assert batch is not None

    stack = LoraStack(d_in, outs, dtype, device)
    weights: list[dict[int, LoraWeights]] = [{} for _ in outs]
    for slot in range(adapters):
        for i, out in enumerate(outs):
            a = torch.randn(rank, d_in, generator=gen, device=device, dtype=dtype) / d_in**0.5
            b = torch.randn(out, rank, generator=gen, device=device, dtype=dtype) / rank**0.5
            weights[i][slot] = LoraWeights(a, b, 2.0)
            stack.put(slot, i, weights[i][slot])
    ys = [torch.zeros(tokens, out, device=device, dtype=dtype) for out in outs]
    steps = token_blocks(batch)

    def base_path() -> None:
        for w in base_w:
            torch.nn.functional.linear(x, w)

    def kernel_path() -> None:
        masked_lora_triton(ys, x, steps, stack)

    base, kernel = time_ms(base_path, device), time_ms(kernel_path, device)

    def unfused_path() -> None:
        for y, w in zip(ys, weights, strict=True):
            masked_lora_reference(y, x, batch.rows_by_slot, w)

    unfused = time_ms(unfused_path, device)
    graphed = {name: device_ms(fn, device) for name, fn in (("base", base_path), ("kernel", kernel_path))}
    graphed["torch"] = device_ms(unfused_path, device)
    grouping = time_ms(
        lambda: token_blocks(LoraBatch(idx, batch.rows_by_slot)), device
    )  # a new step each call
    return {
        "rank": rank,
        "adapters": adapters,
        "tokens": tokens,
        "adapted_tokens": int((idx >= 0).sum()),
        "outs": list(outs),
        "base_ms": base,
        "kernel_ms": kernel,
        "torch_ms": unfused,
        "base_device_ms": graphed["base"],
        "kernel_device_ms": graphed["kernel"],
        "torch_device_ms": graphed["torch"],
        "step_grouping_ms": grouping,
        "block_m": steps.block_m,
    }


def end_to_end(
    shape: dict[str, Any], args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict:
    engine, invocation = build_engine(
        shape,
        device,
        dtype,
        kv_cache_bytes=(8 << 30) if device.type == "cuda" else (64 << 20),
        prefill_chunk_tokens=2048,
        max_num_batched_tokens=2048,
    )
    try:
        return run_e2e(engine, invocation, args.context, args.decode_tokens)
    finally:
        engine.close()


def build_engine(
    shape: dict[str, Any], device: torch.device, dtype: torch.dtype, **config: Any
) -> tuple[Engine, list[int]]:
    """An engine over a random-weight Llama-3.1-shaped model built on `device` (no download), with a
    rank-32 aLoRA ("alora") and LoRA ("lora") on q/k/v/o. Returns (engine, the aLoRA's invocation)."""
    llama = LlamaConfig(
        **shape,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    )
    tokenizer = build_tokenizer(2000)
    t0 = time.perf_counter()
    with device:
        model = AutoModelForCausalLM.from_config(llama, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION)
    model.eval().requires_grad_(False)
    print(f"random model built in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    loaded = LoadedModel(
        model, tokenizer, model_shape(model), device, dtype, "random-llama", (tokenizer.eos_token_id,)
    )
    engine = Engine(loaded, EngineConfig(model="random Llama-3.1-8B shape", **config))
    invocation = tokenizer.encode(INVOCATION, add_special_tokens=False)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, inv) in enumerate((("alora", invocation), ("lora", None))):
            write_random_adapter(Path(tmp) / name, llama, 32, E2E_TARGETS, inv, seed=i)
            engine.adapters.load(name, Path(tmp) / name)
    return engine, invocation


def run_e2e(engine: Engine, invocation: list[int], context: int, decode_tokens: int) -> dict:
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    many = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
    history = torch.randint(3, 1900, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    warm = history[: min(context, 1024)]  # first calls autotune the kernels (decode and prefill tiles)
    engine.generate("warm", warm, one)
    engine.intrinsic("alora", "warm", None, SamplingParams(max_tokens=2, ignore_eos=True))
    engine.intrinsic("lora", None, warm, SamplingParams(max_tokens=2, ignore_eos=True))
    first = engine.generate("conv", history, one)  # the conversation's base KV, cached
    full = engine.conversation_tokens("conv") + invocation

    def decode_tok_s(run: Callable[[Callable[[int], None]], object]) -> float:
        stamps: list[float] = []
        run(lambda _: stamps.append(time.perf_counter()))
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    result = {
        "context_tokens": context,
        "base_prefill_ttft_s": first.ttft_s,
        "alora_ttft_s": statistics.median(
            engine.intrinsic("alora", "conv", None, one).ttft_s for _ in range(3)
        ),
        "lora_ttft_s": statistics.median(
            engine.intrinsic("lora", "conv", full, one).ttft_s for _ in range(2)
        ),
        "alora_decode_tok_s": decode_tok_s(
            lambda cb: engine.intrinsic("alora", "conv", None, many, on_token=cb)
        ),
        "lora_decode_tok_s": decode_tok_s(lambda cb: engine.intrinsic("lora", None, full, many, on_token=cb)),
    }
    cached = engine.conversation_tokens("conv")  # a base turn that reuses the whole cache but its last token
    result["base_decode_tok_s"] = decode_tok_s(lambda cb: engine.generate("conv", cached, many, on_token=cb))
    return result


def write_random_adapter(
    out: Path,
    config: LlamaConfig,
    rank: int,
    targets: tuple[str, ...],
    invocation: list[int] | None,
    seed: int,
) -> None:
    """A PEFT LoRA / aLoRA directory with random weights, written without materialising the base model
    (fixtures.write_adapter loads the base from disk: 16 GB here)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
        alora_invocation_tokens=invocation,
    ).save_pretrained(str(out))
    gen = torch.Generator().manual_seed(seed)
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = (config.num_key_value_heads or heads) * (hidden // heads)
    shapes = {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
    }
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for name in targets:
            d_in, d_out = shapes[name]
            key = f"base_model.model.model.layers.{layer}.self_attn.{name}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, d_in, generator=gen) / d_in**0.5).to(
                torch.bfloat16
            )
            tensors[f"{key}.lora_B.weight"] = (torch.randn(d_out, rank, generator=gen) * 0.5 / rank**0.5).to(
                torch.bfloat16
            )
    save_file(tensors, str(out / "adapter_model.safetensors"))


def report(rows: list[dict], qkv: list[dict], e2e: dict | None) -> list[dict]:
    """Targets are checked on device time (CUDA-graph replay) where it was measured, else on eager time.
    Eager time includes the host's launch overhead; it is printed beside for what an eager caller sees."""
    header = (
        f"{'rank':>4} {'adapters':>8} {'tokens':>6} | {'base ms':>8} {'kernel ms':>9} {'torch ms':>8} | "
        f"{'kernel/base':>11} {'torch/kernel':>12} | eager: {'base':>6} {'kernel':>6} {'torch':>6}"
    )
    checks = []
    hidden = rows[0]["outs"][0]
    titles = (
        f"one layer {hidden} -> {hidden}",
        f"q|k|v group {hidden} -> {hidden}/{hidden // 4}/{hidden // 4}",
    )
    for title, table in zip(titles, (rows, qkv), strict=True):
        print(f"\n{title} (device time: CUDA-graph replay; eager: launch overhead included)\n{header}")
        print("-" * len(header))
        for r in table:
            base, kernel, unfused = (
                r[f"{k}_device_ms"] if r.get(f"{k}_device_ms") is not None else r[f"{k}_ms"]
                for k in ("base", "kernel", "torch")
            )
            overhead, speedup = kernel / base, unfused / kernel
            print(
                f"{r['rank']:>4} {r['adapters']:>8} {r['tokens']:>6} | {base:>8.4f} {kernel:>9.4f} "
                f"{unfused:>8.4f} | {overhead:>10.1%} {speedup:>11.2f}x | "
                f"{r['base_ms']:>13.4f} {r['kernel_ms']:>6.4f} {r['torch_ms']:>6.4f}"
            )
            label = f"r={r['rank']} adapters={r['adapters']} T={r['tokens']} outs={r['outs']}"
            if r["tokens"] >= 1024:
                checks.append(
                    {"check": f"kernel <= 15% of base, {label}", "value": overhead, "ok": overhead <= 0.15}
                )
            if r["adapters"] >= 8:
                checks.append(
                    {"check": f"torch/kernel >= 2, {label}", "value": speedup, "ok": speedup >= 2.0}
                )
    grouping = max(r["step_grouping_ms"] for r in rows)
    print(f"\nper-step token grouping (once per forward, all layers): <= {grouping:.3f} ms")
    if e2e is not None:
        n = e2e["context_tokens"]
        print(f"\nend to end, {n}-token conversation:")
        print(f"  base prefill TTFT        {e2e['base_prefill_ttft_s'] * 1e3:9.1f} ms")
        print(f"  aLoRA intrinsic TTFT     {e2e['alora_ttft_s'] * 1e3:9.1f} ms   (base KV reused)")
        print(f"  plain LoRA TTFT          {e2e['lora_ttft_s'] * 1e3:9.1f} ms   (full recompute)")
        print(f"  LoRA / aLoRA TTFT        {e2e['lora_ttft_s'] / e2e['alora_ttft_s']:9.1f}x")
        for kind in ("base", "alora", "lora"):
            print(f"  {kind:<6} decode            {e2e[f'{kind}_decode_tok_s']:9.1f} tokens/s")
    print_checks(checks)
    return checks


if __name__ == "__main__":
    main()
