"""Automatic prefix caching: agents that resend their whole history without a conversation id, against
the same workload with conversation ids, in one run.

Bench model (bench_core.py: float32, CPU). --agents agents, each with a --history-token history
(cached first, not timed), then --turns turns of: a base turn (16 new tokens, 32 generated) sending
the full history, then a fan-out of 3 aLoRA intrinsics and 1 plain-LoRA intrinsic on the history
(4 tokens each). Two configurations, each on a fresh engine of the same size:
    ids      native conversations (conversation_id); intrinsics run on the conversation
    id-less  every call sends its full history as input_ids, no id (what OpenAI-style clients do)
Also: a plain-LoRA intrinsic on an 8192-token context, first call against a repeated one; the local
index lookup for an 8192-token prompt (hashing included); a Redis probe for the same prompt (a
redis-server on a free port, when installed); the index's own bytes per block at 100k blocks.

Targets: id-less output tokens/s >= 0.95x ids; every id-less turn's cached tokens >= 90% of the
previous turn's prompt; the repeated plain LoRA at 8K >= 20x faster than its first call; the lookup
< 1 ms. Prints a table, writes JSON.

    python -m loadtest.bench_prefix [--agents 16] [--history 2048] [--turns 2] [--out FILE]
    python -m loadtest.bench_prefix --smoke      (small sizes: proves it runs, targets not enforced)
"""

import argparse
import gc
import random
import shutil
import statistics
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import torch

from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.kvcache.index import BlockChain, PrefixIndex
from loadtest.bench_core import build_assets
from loadtest.common import finish, machine, print_checks

ALORAS = ("alora", "alora2", "alora3")  # the bench aLoRA's weights under three names and slots
USER_TURN, TURN_TOKENS, INTRINSIC_TOKENS = 16, 32, 4
TURN = SamplingParams(max_tokens=TURN_TOKENS, ignore_eos=True)
INTRINSIC = SamplingParams(max_tokens=INTRINSIC_TOKENS, ignore_eos=True)
ONE = SamplingParams(max_tokens=1, ignore_eos=True)


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1900, (n,), generator=g).tolist()


def agent(engine: Engine, ids: bool, i: int, history: list[int], turns: int, log: dict[str, list]) -> None:
    conv = f"agent{i}" if ids else None
    invocation = {n: list(engine.adapters.get(n).spec.invocation_tokens or ()) for n in ALORAS}
    previous = len(history)
    for turn in range(turns):
        prompt = history + tokens(10_000 + 100 * i + turn, USER_TURN)
        result = engine.generate(conv, prompt, TURN)
        log["turns"].append((result.usage.cached_tokens, previous, len(prompt)))
        log["output"].append(len(result.token_ids))
        history, previous = prompt + result.token_ids, len(prompt)
        if ids:  # on the conversation: the engine appends the invocations
            handles = [engine.submit_intrinsic(n, conv, None, INTRINSIC) for n in (*ALORAS, "lora")]
        else:
            handles = [engine.submit_intrinsic(n, None, history + invocation[n], INTRINSIC) for n in ALORAS]
            handles.append(engine.submit_intrinsic("lora", None, history, INTRINSIC))
        for h in handles:
            log["output"].append(len(h.result().token_ids))


def workload(engine: Engine, ids: bool, agents: int, history_tokens: int, turns: int) -> dict:
    histories = [tokens(i, history_tokens) for i in range(agents)]
    for i, h in enumerate(histories):  # warm-up (not timed): every history cached
        turn = engine.generate(f"agent{i}" if ids else None, h, ONE)
        histories[i] = h + turn.token_ids
    log: dict[str, list] = {"turns": [], "output": []}
    threads = [
        threading.Thread(target=agent, args=(engine, ids, i, histories[i], turns, log)) for i in range(agents)
    ]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    shares = [cached / previous for cached, previous, _ in log["turns"]]
    return {
        "elapsed_s": elapsed,
        "output_tokens": sum(log["output"]),
        "tokens_per_s": sum(log["output"]) / elapsed,
        "min_cached_share_of_previous_prompt": min(shares),
        "cached_share_of_prompt": sum(c for c, _, _ in log["turns"]) / sum(p for _, _, p in log["turns"]),
        "cache": engine.cache_stats().hit_tokens,
    }


def repeated_lora(engine: Engine, n: int) -> dict:
    context = tokens(77, n)
    first = engine.intrinsic("lora", None, context, ONE)
    again = engine.intrinsic("lora", None, context, ONE)
    return {
        "n": n,
        "first_ttft_s": first.ttft_s,
        "repeated_ttft_s": again.ttft_s,
        "repeated_cached_tokens": again.usage.cached_tokens,
        "speedup": first.ttft_s / again.ttft_s,
    }


def lookup_ms(engine: Engine, n: int, repeats: int = 30) -> float:
    """Median time of the index walk for an n-token prompt whose blocks are all cached (a fresh
    chain each time: its hashes are computed too)."""
    context = tokens(88, n)
    engine.generate(None, [*context, 5], ONE)  # every block of `context` cached
    times = []
    with engine.scheduler.state_lock:
        root = engine.index.root("", None)
        for _ in range(repeats):
            chain = BlockChain(root, engine.pool.block_size)
            t0 = time.perf_counter()
            found = engine.index.match(chain, context, n // engine.pool.block_size)
            times.append(time.perf_counter() - t0)
            assert len(found) == n // engine.pool.block_size
    return statistics.median(times) * 1e3


def redis_probe_ms(model_dir: Path, n: int, repeats: int = 10) -> dict | None:
    """Median time of a Redis probe (which values continue an empty local prefix) for an n-token
    prompt another request wrote behind, on a redis-server started here."""
    from loadtest.bench_tiers import start_redis

    if shutil.which("redis-server") is None:
        return None
    proc, url, workdir = start_redis()
    try:
        engine = Engine.from_config(
            EngineConfig(model=str(model_dir), device="cpu", dtype="float32", redis_url=url)
        )
        context = tokens(99, n)
        engine.generate(None, [*context, 5], ONE)
        assert engine.tiers.redis is not None and engine.remote is not None
        engine.tiers.redis.flush(60)
        limit = n // engine.pool.block_size
        times, reach = [], 0
        for _ in range(repeats):
            chain = BlockChain(engine.index.root("", None), engine.pool.block_size)
            t0 = time.perf_counter()
            job, ends = engine.remote.probe(chain, context, 0, limit)
            engine.tiers.redis.submit_read(job)
            job.done.wait(30)
            times.append(time.perf_counter() - t0)
            reach = engine.remote.probed_end(job, ends, 0)
        engine.close()
        return {"n": n, "probe_ms": statistics.median(times) * 1e3, "keys": len(ends), "blocks_found": reach}
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def index_bytes_per_block(n: int, block_size: int = 16) -> float:
    """Python heap bytes the index holds per entry, at n entries (chains of 1000 random blocks,
    each entry with a device block id as in the pool)."""
    gc.collect()
    tracemalloc.start()
    try:
        index = PrefixIndex("f" * 16, block_size)
        rng = random.Random(0)
        before, _ = tracemalloc.get_traced_memory()
        for c in range(-(-n // 1000)):
            chain = index.chain(index.root("tenant", None))
            count = min(1000, n - 1000 * c)
            ids = [rng.randrange(32000) for _ in range(count * block_size)]
            chain.hash_blocks(ids, count)
            for i in range(count):
                entry, _ = index.add(chain, i)
                entry.device = 1000 * c + i
                chain.entries.append(entry)
        del chain, ids
        gc.collect()
        after, _ = tracemalloc.get_traced_memory()
        assert len(index) == n
        return (after - before) / n
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--history", type=int, default=2048)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--lora-context", type=int, default=8192)
    parser.add_argument("--kv-cache-bytes", type=int, default=3 << 30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="2 agents, 256-token histories, 1024-token LoRA")
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_prefix.json"))
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.history, args.lora_context = 2, 256, 1024
    torch.set_num_threads(args.threads)

    model_dir, adapter_dirs = build_assets(args.assets)
    adapters = {**dict.fromkeys(ALORAS, adapter_dirs["alora"]), "lora": adapter_dirs["lora"]}
    config = EngineConfig(
        model=str(model_dir), device="cpu", dtype="float32", kv_cache_bytes=args.kv_cache_bytes
    )
    results = {}
    for name, ids in (("ids", True), ("id-less", False)):
        engine = Engine.from_config(config, adapters)
        results[name] = workload(engine, ids, args.agents, args.history, args.turns)
        if not ids:
            results["repeated_lora"] = repeated_lora(engine, args.lora_context)
            results["lookup_ms"] = lookup_ms(engine, 8192)
        engine.close()
        print(f"{name} done", file=sys.stderr, flush=True)
    results["redis_probe"] = redis_probe_ms(model_dir, 8192)
    results["index_bytes_per_block"] = index_bytes_per_block(100_000)

    checks = report(results)
    finish(
        args.out,
        {
            "machine": machine(args.threads),
            "args": vars(args) | {"assets": str(args.assets), "out": str(args.out)},
            "results": results,
        },
        checks,
        smoke=args.smoke,
    )


def report(results: dict) -> list[dict]:
    print(
        f"\n{'config':>8} | {'tokens/s':>9} | {'elapsed':>8} | {'cached / prompt':>15} | {'min cached / prev prompt':>24}"
    )
    print("-" * 78)
    for name in ("ids", "id-less"):
        r = results[name]
        print(
            f"{name:>8} | {r['tokens_per_s']:>9.1f} | {r['elapsed_s']:>6.1f} s | {r['cached_share_of_prompt']:>15.3f} | "
            f"{r['min_cached_share_of_previous_prompt']:>24.3f}"
        )
    lora = results["repeated_lora"]
    print(
        f"\nplain LoRA at N={lora['n']}: first {lora['first_ttft_s'] * 1e3:.0f} ms, repeated "
        f"{lora['repeated_ttft_s'] * 1e3:.1f} ms ({lora['repeated_cached_tokens']} tokens cached)"
    )
    print(f"index lookup, 8192-token prompt: {results['lookup_ms']:.3f} ms")
    probe = results["redis_probe"]
    print(
        f"Redis probe, 8192-token prompt: {probe['probe_ms']:.2f} ms ({probe['keys']} keys, {probe['blocks_found']} blocks found)"
        if probe
        else "Redis probe: skipped (no redis-server)"
    )
    print(f"index memory: {results['index_bytes_per_block']:.0f} bytes per block at 100k blocks")
    ratio = results["id-less"]["tokens_per_s"] / results["ids"]["tokens_per_s"]
    share = results["id-less"]["min_cached_share_of_previous_prompt"]
    checks = [
        {"check": "id-less >= 0.95x ids tokens/s", "value": ratio, "ok": ratio >= 0.95},
        {"check": "id-less turn cached >= 90% of previous prompt", "value": share, "ok": share >= 0.9},
        {"check": "repeated plain LoRA >= 20x faster", "value": lora["speedup"], "ok": lora["speedup"] >= 20},
        {
            "check": "index lookup (8192 tokens) < 1 ms",
            "value": results["lookup_ms"],
            "ok": results["lookup_ms"] < 1,
        },
    ]
    print_checks(checks, digits=3)
    return checks


if __name__ == "__main__":
    main()
