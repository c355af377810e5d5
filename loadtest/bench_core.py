"""Core benchmark: an aLoRA intrinsic on a cached conversation versus a plain LoRA recompute and PEFT.

Bench model (random weights, float32, CPU): Llama hidden 512, intermediate 1408, 8 layers, 8 heads,
4 KV heads, vocab 32000; rank-32 adapters on q/k/v/o; a 6-token invocation. For each context length N:

    (a) ours, aLoRA intrinsic TTFT on the cached conversation (base KV reused, 6 new tokens)
    (b) ours, plain LoRA intrinsic TTFT (every position adapted: full recompute)
    (c) PEFT, its own base-cache reuse: base-model past_key_values, then the aLoRA on the invocation
    (d) at the largest N: decode ms/token for base and aLoRA, ours and PEFT's (HF generate + DynamicCache)

Targets: (a) <= (c) at every N; (b)/(a) >= 80 at N = 8192; our aLoRA decode <= 1.10x our base
decode and <= 0.8x PEFT's aLoRA decode. Prints a table, writes JSON.

    python -m loadtest.bench_core [--lengths 512 2048 8192] [--decode-tokens 32] [--out FILE]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.generation.streamers import BaseStreamer

from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.fixtures import AdapterRecipe, write_adapter, write_demo
from loadtest.common import finish, machine, print_checks, served_engine

INVOCATION = "<|start_of_role|>certainty confidence score<|end_of_role|>"  # 6 tokens with the bench tokenizer
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RANK = 32


class Stamps(BaseStreamer):
    """Time of every token HF generate emits (the first put() is the prompt)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def build_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    demo = write_demo(root / "demo", preset="bench")
    adapters = {"alora": root / "alora", "lora": root / "lora"}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo.model))
    recipes = {
        "alora": AdapterRecipe("alora", "alora", INVOCATION, TARGETS),
        "lora": AdapterRecipe("lora", "lora", None, TARGETS),
    }
    for i, (name, recipe) in enumerate(recipes.items()):
        if not (adapters[name] / "adapter_model.safetensors").exists():
            write_adapter(demo.model, recipe, tok, RANK, adapters[name], seed=100 + i)
    return demo.model, adapters


def timed_generate(
    model, ids: torch.Tensor, cache: DynamicCache, steps: int
) -> tuple[torch.Tensor, list[float]]:
    """Greedy HF / PEFT `generate` of exactly `steps` tokens continuing `cache`: (sequences, the time of
    every put() of the streamer: [0] the prompt, then each new token)."""
    stamps = Stamps()
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        past_key_values=cache,
        max_new_tokens=steps,
        min_new_tokens=steps,
        do_sample=False,
        streamer=stamps,
        pad_token_id=0,
    )
    return out, stamps.times


def crop(cache: DynamicCache, length: int) -> None:
    """Cut the cache back to its first `length` positions (transformers 5 takes the count to remove)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def median_time(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def ours(
    engine: Engine, n: int, decode_tokens: int, repeats: int, decode_repeats: int, measure_decode: bool
) -> dict[str, float]:
    g = torch.Generator().manual_seed(n)
    history = torch.randint(3, 1900, (n,), generator=g).tolist()
    conv = f"bench-{n}"
    engine.generate(conv, history, SamplingParams(max_tokens=1, ignore_eos=True))  # conversation cached
    context = engine.conversation_tokens(conv) + list(
        engine.adapters.get("alora").spec.invocation_tokens or ()
    )
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    out = {
        "alora_ttft_s": median_time(lambda: engine.intrinsic("alora", conv, None, one).ttft_s, repeats),
        "lora_ttft_s": median_time(
            lambda: engine.intrinsic("lora", conv, context, one).ttft_s, max(1, repeats // 2)
        ),
    }
    if measure_decode:
        # alternated, the order flipped every repeat (A B, B A, A B, ...): run back to back, the second
        # of a pair measured ~5% slower whichever it was, and measured one after the other (all aLoRA
        # runs, then all base runs) the ratio read 1.13 where alternated runs read 0.97-1.06. More
        # repeats than the TTFT rows: with 3, one slow spell of this VM during one run moved the ratio
        # from 0.95 to 1.29 between two runs of the same code
        many = SamplingParams(max_tokens=decode_tokens, ignore_eos=True)
        runs: dict[str | None, list[float]] = {"alora": [], None: []}
        for i in range(decode_repeats):
            for adapter in ("alora", None) if i % 2 == 0 else (None, "alora"):
                runs[adapter].append(_our_decode_ms(engine, adapter, conv, many))
        out["alora_decode_ms"] = statistics.median(runs["alora"])
        out["base_decode_ms"] = statistics.median(runs[None])
    return out


def _our_decode_ms(engine: Engine, adapter: str | None, conv: str, params: SamplingParams) -> float:
    stamps: list[float] = []
    if adapter is None:  # the same history again: all of it but the last token comes from the cache
        tokens = engine.conversation_tokens(conv)[: engine.conversation(conv).cached_tokens + 1]
        engine.generate(conv, tokens, params, on_token=lambda _: stamps.append(time.perf_counter()))
    else:
        engine.intrinsic(adapter, conv, None, params, on_token=lambda _: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1e3


@torch.inference_mode()
def peft(
    base, alora, invocation: list[int], n: int, decode_tokens: int, repeats: int, measure_decode: bool
) -> dict[str, float]:
    g = torch.Generator().manual_seed(n)
    history = torch.tensor([torch.randint(3, 1900, (n,), generator=g).tolist()])
    cache = DynamicCache(config=base.config)
    base(input_ids=history, past_key_values=cache, use_cache=True)  # the conversation's base cache
    full = torch.cat([history, torch.tensor([invocation])], dim=1)

    def alora_ttft() -> float:
        t0 = time.perf_counter()
        out = alora(input_ids=torch.tensor([invocation]), past_key_values=cache, use_cache=True)
        int(out.logits[0, -1].argmax())
        elapsed = time.perf_counter() - t0
        crop(cache, n)  # back to the conversation's cache for the next call
        return elapsed

    result = {"alora_ttft_s": median_time(alora_ttft, repeats)}
    if measure_decode:

        def decode_ms(model, ids: torch.Tensor, keep: int) -> float:
            crop(cache, keep)  # HF generate needs at least one uncached input token
            _, times = timed_generate(model, ids, cache, decode_tokens)
            t = times[1:]  # [0] is the prompt
            return (t[-1] - t[0]) / (len(t) - 1) * 1e3

        result["alora_decode_ms"] = median_time(lambda: decode_ms(alora, full, n), repeats)
        result["base_decode_ms"] = median_time(lambda: decode_ms(base, history, n - 1), repeats)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--decode-repeats", type=int, default=7, help="alternated runs per decode row")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_core.json"))
    args = parser.parse_args()

    model_dir, adapter_dirs = build_assets(args.assets)
    engine = served_engine(
        EngineConfig(model=str(model_dir), device="cpu", dtype="float32", kv_cache_bytes=1 << 30),
        adapter_dirs,
        args.threads,
    )
    invocation = list(engine.adapters.get("alora").spec.invocation_tokens or ())
    assert len(invocation) == 6, f"bench invocation should be 6 tokens, got {len(invocation)}"
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    alora = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32), str(adapter_dirs["alora"])
    ).eval()

    # All of ours first, then all of PEFT's: torch work from the main thread (PEFT) leaves its OpenMP
    # team behind, which slows the engine's scheduler thread by ~50% on 2 cores if interleaved. A
    # server runs only the engine, so each side is measured on its own.
    top = max(args.lengths)
    rows = [
        {"n": n, "ours": ours(engine, n, args.decode_tokens, args.repeats, args.decode_repeats, n == top)}
        for n in args.lengths
    ]
    print("ours done", file=sys.stderr, flush=True)
    engine.close()
    for row in rows:
        row["peft"] = peft(
            base, alora, invocation, row["n"], args.decode_tokens, args.repeats, row["n"] == top
        )
    print("PEFT done", file=sys.stderr, flush=True)

    checks = report(rows)
    finish(args.out, {"machine": machine(args.threads), "rows": rows}, checks)


def report(rows: list[dict]) -> list[dict]:
    print(
        f"\n{'N':>6} | {'(a) ours aLoRA TTFT':>20} | {'(b) ours LoRA TTFT':>19} | {'(c) PEFT aLoRA TTFT':>20} | "
        f"{'(b)/(a)':>8} | {'(c)/(a)':>8}"
    )
    print("-" * 96)
    checks = []
    for row in rows:
        a, b, c = row["ours"]["alora_ttft_s"], row["ours"]["lora_ttft_s"], row["peft"]["alora_ttft_s"]
        print(
            f"{row['n']:>6} | {a * 1e3:>17.1f} ms | {b * 1e3:>16.1f} ms | {c * 1e3:>17.1f} ms | {b / a:>7.1f}x | {c / a:>7.2f}x"
        )
        checks.append({"check": f"(a) <= (c) at N={row['n']}", "value": a / c, "ok": a <= c})
        if row["n"] == 8192:
            checks.append({"check": "(b)/(a) >= 80 at N=8192", "value": b / a, "ok": b / a >= 80})
    last = rows[-1]
    if "alora_decode_ms" in last["ours"]:
        o, p = last["ours"], last["peft"]
        print(f"\ndecode ms/token at N={last['n']}:")
        print(f"{'':>8} | {'ours':>8} | {'PEFT':>8}")
        print(f"{'base':>8} | {o['base_decode_ms']:>8.2f} | {p['base_decode_ms']:>8.2f}")
        print(f"{'aLoRA':>8} | {o['alora_decode_ms']:>8.2f} | {p['alora_decode_ms']:>8.2f}")
        ratio_base = o["alora_decode_ms"] / o["base_decode_ms"]
        ratio_peft = o["alora_decode_ms"] / p["alora_decode_ms"]
        checks.append(
            {"check": "ours aLoRA decode <= 1.10x ours base", "value": ratio_base, "ok": ratio_base <= 1.10}
        )
        checks.append(
            {"check": "ours aLoRA decode <= 0.8x PEFT aLoRA", "value": ratio_peft, "ok": ratio_peft <= 0.8}
        )
    print_checks(checks)
    return checks


if __name__ == "__main__":
    main()
