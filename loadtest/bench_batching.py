"""Batching benchmark: 16 agent conversations at once, base turns and intrinsic fan-out in mixed batches.

Workload per conversation (its 2048-token history already cached, as for a live agent):
    generate(user turn + 32 tokens) -> 3 intrinsics as one fan-out -> generate(user turn + 32 tokens)
Configurations, in one run, on the bench model of bench_core.py (CPU; float32 unless --dtype):
    batched   this engine, continuous batching (16 client threads, fan-out submitted together)
    batch1    the same engine with max_num_seqs = 1
    peft      sequential PEFT / HF `generate` per request (the issue's baseline), reusing each conversation's
              base DynamicCache where PEFT allows (base turns continue the cache; aLoRA intrinsics run
              on the invocation over it, then it is cut back)
    peft_loop the same with a hand-written greedy loop instead of `generate` (no generate overhead: a
              stricter baseline, reported beside)
Also: fan-out of 4 intrinsics on one 8192-token conversation versus a single intrinsic.

The intrinsics are distinct adapters (alora, alora2, ...: the bench aLoRA's weights under their own
names and slots), so no two requests of a fan-out are the same computation.

Targets: batched >= 4x PEFT and >= 3x batch1 output tokens/s; batched p50 intrinsic TTFT <= batch1's;
fan-out(4) latency <= 1.5x single. Prints a table, writes JSON.

    python -m loadtest.bench_batching [--conversations 16] [--history 2048] [--out FILE]
    python -m loadtest.bench_batching --dtype bfloat16   (engine and PEFT in bf16: the serving dtype)
    python -m loadtest.bench_batching --device cuda      (the same workload on a GPU, float32)
"""

import argparse
import dataclasses
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache

from alora_core import Engine, EngineConfig, SamplingParams
from loadtest.bench_core import build_assets, crop, timed_generate
from loadtest.common import finish, machine, print_checks, served_engine

INTRINSICS = ("alora", "alora2", "alora3")  # three aLoRA intrinsics per fan-out
FAN_OUT = ("alora", "alora2", "alora3", "alora4")
TURN_TOKENS = 32
INTRINSIC_TOKENS = 4
USER_TURN = 16


def history(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1900, (n,), generator=g).tolist()


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def agent(engine: Engine, conv: str, seed: int, ttfts: dict[str, list[float]], tokens: list[int]) -> None:
    turn = SamplingParams(max_tokens=TURN_TOKENS, ignore_eos=True)
    intrinsic = SamplingParams(max_tokens=INTRINSIC_TOKENS, ignore_eos=True)
    for i in range(2):
        ids = engine.conversation_tokens(conv) + history(seed * 10 + i, USER_TURN)
        r = engine.generate(conv, ids, turn)
        ttfts["generate"].append(r.ttft_s)
        tokens.append(len(r.token_ids))
        if i == 0:  # the fan-out: all three submitted at once, like POST /intrinsics
            handles = [engine.submit_intrinsic(name, conv, None, intrinsic) for name in INTRINSICS]
            for h in handles:
                res = h.result()
                ttfts["intrinsic"].append(res.ttft_s)
                tokens.append(len(res.token_ids))


def run_engine(engine: Engine, convs: list[str], max_num_seqs: int) -> dict:
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_seqs=max_num_seqs)
    ttfts: dict[str, list[float]] = {"generate": [], "intrinsic": []}
    tokens: list[int] = []
    threads = [
        threading.Thread(target=agent, args=(engine, c, 1000 + i + 100 * max_num_seqs, ttfts, tokens))
        for i, c in enumerate(convs)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    return summarize(sum(tokens), elapsed, ttfts)


def summarize(tokens: int, elapsed: float, ttfts: dict[str, list[float]]) -> dict:
    out = {"output_tokens": tokens, "elapsed_s": elapsed, "tokens_per_s": tokens / elapsed}
    for endpoint, values in ttfts.items():
        out[f"{endpoint}_ttft_p50_s"] = statistics.median(values)
        out[f"{endpoint}_ttft_p99_s"] = percentile(values, 0.99)
    return out


@torch.inference_mode()
def run_peft(
    base,
    aloras: dict[str, PeftModel],
    invocations: dict[str, list[int]],
    convs: int,
    n: int,
    use_generate: bool,
) -> dict:
    """Sequential PEFT: base turns continue each conversation's DynamicCache; intrinsics run over it and
    it is cut back after them."""
    decode = generate if use_generate else greedy
    ttfts: dict[str, list[float]] = {"generate": [], "intrinsic": []}
    tokens = 0
    caches, histories = [], []
    for i in range(convs):  # warm-up (not timed): each conversation's history in its own base cache
        ids = history(i, n)
        cache = DynamicCache(config=base.config)
        base(input_ids=torch.tensor([ids[:-1]], device=base.device), past_key_values=cache, use_cache=True)
        caches.append(cache)
        histories.append(ids)
    t0 = time.perf_counter()
    for i in range(convs):
        for turn in range(2):
            ids = histories[i] + history(i * 10 + turn, USER_TURN)
            start = time.perf_counter()
            new, first = decode(base, ids, caches[i], TURN_TOKENS, None)
            ttfts["generate"].append(first - start)
            tokens += len(new)
            histories[i] = ids + new
            crop(caches[i], len(histories[i]) - 1)
            if turn == 0:
                for name in INTRINSICS:
                    start = time.perf_counter()
                    new, first = decode(
                        aloras[name], histories[i] + invocations[name], caches[i], INTRINSIC_TOKENS, True
                    )
                    crop(caches[i], len(histories[i]) - 1)  # PEFT appended the adapter's KV: cut it off again
                    ttfts["intrinsic"].append(first - start)
                    tokens += len(new)
    return summarize(tokens, time.perf_counter() - t0, ttfts)


def generate(
    model, ids: list[int], cache: DynamicCache, steps: int, alora: bool | None
) -> tuple[list[int], float]:
    """HF / PEFT `generate`, greedy, continuing `cache` (PEFT finds an aLoRA's invocation in `ids`
    itself); returns (new tokens, time of the first)."""
    out, times = timed_generate(model, torch.tensor([ids], device=model.device), cache, steps)
    return out[0, len(ids) :].tolist(), times[1]  # times[0] is the prompt


def greedy(
    model, ids: list[int], cache: DynamicCache, steps: int, alora: bool | None
) -> tuple[list[int], float]:
    """Greedy decode continuing `cache` (which holds ids[:cached]); returns (new tokens, time of the first)."""
    cached = cache.get_seq_length()
    feed = torch.tensor([ids[cached:]], device=model.device)
    kwargs = {}
    out: list[int] = []
    first = 0.0
    for step in range(steps):
        if alora and step > 0:  # PEFT finds the invocation in the first feed itself; later tokens all adapt
            kwargs["alora_offsets"] = [1]
        logits = model(input_ids=feed, past_key_values=cache, use_cache=True, **kwargs).logits
        token = int(logits[0, -1].argmax())
        if step == 0:
            first = time.perf_counter()
        out.append(token)
        feed = torch.tensor([[token]], device=model.device)
    return out, first


def fan_out(engine: Engine, n: int, repeats: int) -> dict:
    engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_seqs=64)
    engine.generate("fan", history(99, n), SamplingParams(max_tokens=1, ignore_eos=True))
    params = SamplingParams(max_tokens=INTRINSIC_TOKENS, ignore_eos=True)

    def single() -> float:
        t0 = time.perf_counter()
        engine.intrinsic("alora", "fan", None, params)
        return time.perf_counter() - t0

    def four() -> float:
        t0 = time.perf_counter()
        handles = [engine.submit_intrinsic(name, "fan", None, params) for name in FAN_OUT]
        for h in handles:
            h.result()
        return time.perf_counter() - t0

    # interleaved, the order flipped every repeat: this VM drifts by 10-30% within minutes, so back-to-back
    # blocks of each (as this measured before) compared different machine states
    ones: list[float] = []
    manys: list[float] = []
    for i in range(repeats):
        for run in (single, four) if i % 2 == 0 else (four, single):
            (ones if run is single else manys).append(run())
    one, many = statistics.median(ones), statistics.median(manys)
    return {
        "n": n,
        "single_s": one,
        "fan_out_4_s": many,
        "ratio": many / one,
        "single_runs_s": ones,
        "fan_out_4_runs_s": manys,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--peft-conversations", type=int, default=4, help="sequential: tokens/s needs few")
    parser.add_argument("--history", type=int, default=2048)
    parser.add_argument("--fan-out-history", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (the targets' setting) or cuda")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_batching.json"))
    args = parser.parse_args()

    model_dir, adapter_dirs = build_assets(args.assets)
    names = sorted({*INTRINSICS, *FAN_OUT})
    adapter_dirs = {name: adapter_dirs["alora"] for name in names}  # same weights, own slots and names
    dtype = getattr(torch, args.dtype)
    engine = served_engine(
        EngineConfig(model=str(model_dir), device=args.device, dtype=args.dtype, max_num_batched_tokens=512),
        adapter_dirs,
        args.threads,
    )
    convs = [f"agent{i}" for i in range(args.conversations)]
    t0 = time.perf_counter()
    for i, c in enumerate(convs):  # warm-up (not timed): each conversation's history cached
        engine.generate(c, history(i, args.history), SamplingParams(max_tokens=1, ignore_eos=True))
    print(f"warm-up: {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)

    results = {"batch1": run_engine(engine, convs, 1)}
    print("batch1 done", file=sys.stderr, flush=True)
    results["batched"] = run_engine(engine, convs, 64)
    print("batched done", file=sys.stderr, flush=True)
    fan = fan_out(engine, args.fan_out_history, repeats=7)
    print("fan-out done", file=sys.stderr, flush=True)
    engine.close()

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device).eval()
    alora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(args.device),
        str(adapter_dirs["alora"]),
    ).eval()
    invocations = {name: list(alora.peft_config["default"].alora_invocation_tokens) for name in names}
    aloras = dict.fromkeys(names, alora)
    for name, use_generate in (("peft", True), ("peft_loop", False)):
        results[name] = run_peft(
            base, aloras, invocations, args.peft_conversations, args.history, use_generate
        )

    checks = report(results, fan)
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    info = machine(args.threads, device=device, dtype=args.dtype)
    finish(args.out, {"machine": info, "results": results, "fan_out": fan}, checks)


def report(results: dict, fan: dict) -> list[dict]:
    print(
        f"\n{'config':>8} | {'tokens/s':>9} | {'gen TTFT p50':>12} | {'gen TTFT p99':>12} | {'intr TTFT p50':>13} | {'intr TTFT p99':>13}"
    )
    print("-" * 84)
    for name, r in results.items():
        print(
            f"{name:>8} | {r['tokens_per_s']:>9.1f} | {r['generate_ttft_p50_s'] * 1e3:>9.0f} ms | "
            f"{r['generate_ttft_p99_s'] * 1e3:>9.0f} ms | {r['intrinsic_ttft_p50_s'] * 1e3:>10.0f} ms | "
            f"{r['intrinsic_ttft_p99_s'] * 1e3:>10.0f} ms"
        )
    print(
        f"\nfan-out at N={fan['n']}: single {fan['single_s'] * 1e3:.0f} ms, 4 in one call {fan['fan_out_4_s'] * 1e3:.0f} ms"
    )
    b, one, p = results["batched"], results["batch1"], results["peft"]
    print(
        f"batched / peft_loop (hand-written greedy loop, no generate overhead): "
        f"{b['tokens_per_s'] / results['peft_loop']['tokens_per_s']:.2f}x"
    )
    checks = [
        {
            "check": "batched >= 4x PEFT tokens/s",
            "value": b["tokens_per_s"] / p["tokens_per_s"],
            "ok": b["tokens_per_s"] >= 4 * p["tokens_per_s"],
        },
        {
            "check": "batched >= 3x batch1 tokens/s",
            "value": b["tokens_per_s"] / one["tokens_per_s"],
            "ok": b["tokens_per_s"] >= 3 * one["tokens_per_s"],
        },
        {
            "check": "batched p50 intrinsic TTFT <= batch1's",
            "value": b["intrinsic_ttft_p50_s"] / one["intrinsic_ttft_p50_s"],
            "ok": b["intrinsic_ttft_p50_s"] <= one["intrinsic_ttft_p50_s"],
        },
        {"check": "fan-out of 4 <= 1.5x single intrinsic", "value": fan["ratio"], "ok": fan["ratio"] <= 1.5},
    ]
    print_checks(checks, digits=2)
    return checks


if __name__ == "__main__":
    main()
