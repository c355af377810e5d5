"""Tiered conversation caches: restore from the host tier and from Redis versus recompute, and a
working set four times larger than the device budget.

Bench model (see bench_core.py: 8 layers, 4 KV heads x 64, float32 on CPU: 16 KiB of KV per token).
A redis-server is started on a free loopback port (or --redis-url). In one run:

    (1) for N in --lengths: a conversation of N tokens, demoted to the host tier (device budget 0),
        restored by an aLoRA intrinsic; the same conversation resumed by a second engine that only
        has Redis, and by a third that only has a Redis Cluster (3 masters, started here or
        --cluster-url) holding the same values (copied key by key: they spread over every master).
        Restore seconds and bytes/s (from the engine's transfer counters), against recompute
        (prefill of the N tokens) and a raw copy of the same bytes measured here.
    (2) working set: --conversations conversations of --conv-tokens tokens, device budget and host
        tier each a quarter of their total KV (the rest lives in Redis), then an aLoRA intrinsic on
        every conversation in random order. Oracle: the same intrinsic run right after the
        conversation was created, while its cache had never left the device. Zero errors, identical
        tokens, idle device KV and host tier within their budgets at every step.

Targets: host restore >= 50% of the raw copy bandwidth; Redis restore >= 1 GB/s and >= 20x faster
than recompute at N = 8192; Cluster restore >= 0.8x the single Redis's bandwidth at N = 8192; (2)
passes. Prints a table, writes JSON, exits 1 if a target fails.

    python -m loadtest.bench_tiers [--lengths 2048 8192] [--conversations 200] [--no-cluster] [--out FILE]
"""

import argparse
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import torch
from redis.cluster import ClusterNode, RedisCluster

from alora_core import Engine, EngineConfig, GenerationResult, SamplingParams
from alora_core.kvcache import redis_url as redis_urls
from loadtest.bench_core import build_assets
from loadtest.common import finish, machine, print_checks
from tests.alora_core.redis_server import RedisClusterSet

ONE = SamplingParams(max_tokens=1, ignore_eos=True)
VISIT = SamplingParams(max_tokens=4, ignore_eos=True, return_logits=True)


def start_redis() -> tuple[subprocess.Popen[bytes], str, Path]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (apt-get install redis-server), or pass --redis-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    return proc, f"redis://127.0.0.1:{port}/0", workdir


def transfer_delta(engine: Engine, kind: str, before: tuple[int, float]) -> tuple[int, float]:
    stats = engine.cache_stats()
    return stats.transfer_bytes.get(kind, 0) - before[0], stats.transfer_seconds.get(kind, 0.0) - before[1]


def transfer_now(engine: Engine, kind: str) -> tuple[int, float]:
    stats = engine.cache_stats()
    return stats.transfer_bytes.get(kind, 0), stats.transfer_seconds.get(kind, 0.0)


def raw_copy_bytes_per_s(nbytes: int, repeats: int) -> float:
    """Median of `repeats` contiguous copies between two buffers, from memory: caches are flushed
    before each (a restore reads blocks demoted long before, after forwards went through the cache)."""
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    scratch = torch.empty(256 << 18)  # 256 MiB: more than any last-level cache
    times = []
    for _ in range(repeats):
        scratch.fill_(1.0)
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times)


def copy_to_cluster(redis_url: str, cluster_url: str) -> dict[str, int]:
    """Every alora:* key of the single Redis, SET into the cluster (each lands on its slot's master);
    returns keys per master."""
    source = redis.Redis.from_url(redis_url)
    seeds = [ClusterNode(host, port) for host, port in redis_urls.parse(cluster_url).addresses]
    cluster = RedisCluster(startup_nodes=seeds)
    per_master: dict[str, int] = {n.name: 0 for n in cluster.get_primaries()}
    for key in source.scan_iter("alora:*", count=1000):
        value = source.get(key)
        assert value is not None
        cluster.set(key, value, ex=86_400)
        per_master[cluster.get_node_from_key(key).name] += 1
    cluster.close()
    return per_master


def restore_rows(
    model: str,
    adapters: dict[str, Path],
    redis_url: str,
    cluster_url: str | None,
    lengths: list[int],
    repeats: int,
) -> list[dict]:
    common = {
        "model": model,
        "device": "cpu",
        "dtype": "float32",
        "block_size": 16,
        "restore_policy": "always",
    }
    pool = max(lengths) * 16 * 1024 * 2
    host = Engine.from_config(
        EngineConfig(
            **common, kv_cache_bytes=pool, device_cache_bytes=0, host_cache_bytes=pool, redis_url=redis_url
        ),
        adapters,
    )
    replica = Engine.from_config(
        EngineConfig(
            **common, kv_cache_bytes=pool, device_cache_bytes=0, host_cache_bytes=0, redis_url=redis_url
        ),
        adapters,
    )
    clustered = None
    if cluster_url is not None:
        clustered = Engine.from_config(
            EngineConfig(
                **common, kv_cache_bytes=pool, device_cache_bytes=0, host_cache_bytes=0, redis_url=cluster_url
            ),
            adapters,
        )
    for engine in (host, replica, clustered):  # first-call overheads stay out of the timings
        if engine is not None:
            engine.generate("bench:warmup", list(range(3, 300)), ONE)
    rows = []
    for n in lengths:
        history = torch.randint(3, 1900, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        conv = f"bench:{n}"
        recompute = host.generate(conv, history, ONE).ttft_s  # prefill of n tokens (+ 1 sampled)
        assert host.tiers.redis is not None
        host.tiers.redis.flush(120)
        assert host.conversation(conv).cache_location == "host"
        per_master = copy_to_cluster(redis_url, cluster_url) if cluster_url is not None else {}

        host_runs, redis_runs, cluster_runs = [], [], []
        for _ in range(repeats):
            before = transfer_now(host, "host->device")
            result = host.intrinsic("alora", conv, None, ONE)
            nbytes, seconds = transfer_delta(host, "host->device", before)
            host_runs.append((nbytes, seconds, result.ttft_s, result.usage.cached_tokens))
            before = transfer_now(replica, "redis->device")
            result = replica.intrinsic("alora", conv, None, ONE)  # the replica only has Redis
            nbytes, seconds = transfer_delta(replica, "redis->device", before)
            redis_runs.append((nbytes, seconds, result.ttft_s, result.usage.cached_tokens))
            if clustered is not None:  # interleaved: all three see the same machine load
                before = transfer_now(clustered, "redis->device")
                result = clustered.intrinsic("alora", conv, None, ONE)  # the cluster only
                nbytes, seconds = transfer_delta(clustered, "redis->device", before)
                cluster_runs.append((nbytes, seconds, result.ttft_s, result.usage.cached_tokens))
        assert all(run[3] == n for run in host_runs + redis_runs + cluster_runs), "expected full restores"
        nbytes = host_runs[0][0]
        host_s = statistics.median(r[1] for r in host_runs)
        redis_s = statistics.median(r[1] for r in redis_runs)
        rows.append(
            {
                "n": n,
                "bytes": nbytes,
                "recompute_s": recompute,
                "host_restore_s": host_s,
                "redis_restore_s": redis_s,
                "host_intrinsic_ttft_s": statistics.median(r[2] for r in host_runs),
                "redis_intrinsic_ttft_s": statistics.median(r[2] for r in redis_runs),
                "host_bytes_per_s": nbytes / host_s,
                "redis_bytes_per_s": nbytes / redis_s,
                "raw_copy_bytes_per_s": raw_copy_bytes_per_s(nbytes, 10),
            }
        )
        if cluster_runs:
            cluster_s = statistics.median(r[1] for r in cluster_runs)
            rows[-1].update(
                {
                    "cluster_restore_s": cluster_s,
                    "cluster_intrinsic_ttft_s": statistics.median(r[2] for r in cluster_runs),
                    "cluster_bytes_per_s": nbytes / cluster_s,
                    "cluster_keys_per_master": per_master,
                }
            )
        print(f"restore N={n} done", file=sys.stderr, flush=True)
    for engine in (host, replica, clustered):
        if engine is not None:
            engine.close()
    return rows


def working_set(
    model: str, adapters: dict[str, Path], redis_url: str, conversations: int, tokens: int, seed: int
) -> dict:
    block_bytes = 16 * 16 * 1024  # 16 tokens x 16 KiB
    total = conversations * (-(-(tokens + 1) // 16)) * block_bytes
    budget = total // 4
    engine = Engine.from_config(
        EngineConfig(
            model=model,
            device="cpu",
            dtype="float32",
            kv_cache_bytes=budget + 8 * -(-(tokens + 8) // 16) * block_bytes,  # + room for running requests
            device_cache_bytes=budget,
            host_cache_bytes=budget,
            redis_url=redis_url,
            max_conversations=10_000,
        ),
        adapters,
    )
    peak = {"idle_device_bytes": 0, "host_bytes": 0}

    def observe(_: object) -> None:
        busy = engine.scheduler.busy_conversations()
        peak["idle_device_bytes"] = max(peak["idle_device_bytes"], engine.tiers.idle_device_bytes(busy))
        peak["host_bytes"] = max(peak["host_bytes"], engine.tiers.host.bytes_used)

    engine.scheduler.step_observers.append(observe)
    rng = random.Random(seed)
    oracle: dict[str, GenerationResult] = {}
    errors = 0
    t0 = time.perf_counter()
    for i in range(conversations):
        key = f"tenant{i % 4}:conv{i}"
        history = [rng.randrange(3, 1900) for _ in range(tokens)]
        try:
            engine.generate(key, history, ONE)
            oracle[key] = engine.intrinsic("alora", key, None, VISIT)  # cache still on the device
        except Exception as exc:  # counted, and the run fails
            errors += 1
            print(f"error creating {key}: {exc!r}", file=sys.stderr)
        if (i + 1) % 25 == 0:
            print(f"working set: {i + 1}/{conversations} created", file=sys.stderr, flush=True)
    create_s = time.perf_counter() - t0
    assert engine.tiers.redis is not None
    engine.tiers.redis.flush(300)
    where = {"device": 0, "host": 0, "redis": 0, "none": 0}
    for key in oracle:
        where[engine.conversation(key).cache_location] += 1

    order = list(oracle)
    rng.shuffle(order)
    mismatches, cached, max_logit_diff = 0, 0, 0.0
    t0 = time.perf_counter()
    for key in order:
        try:
            result = engine.intrinsic("alora", key, None, VISIT)
        except Exception as exc:
            errors += 1
            print(f"error visiting {key}: {exc!r}", file=sys.stderr)
            continue
        want = oracle[key]
        cached += result.usage.cached_tokens
        if result.token_ids != want.token_ids:
            mismatches += 1
        assert result.logits is not None and want.logits is not None
        max_logit_diff = max(max_logit_diff, float((result.logits - want.logits).abs().max()))
    visit_s = time.perf_counter() - t0
    stats = engine.cache_stats()
    engine.close()
    return {
        "conversations": conversations,
        "tokens": tokens,
        "total_kv_bytes": total,
        "device_budget_bytes": budget,
        "host_budget_bytes": budget,
        "before_visits": where,
        "errors": errors,
        "mismatches": mismatches,
        "max_logit_abs_diff": max_logit_diff,
        "visit_cached_tokens": cached,
        "peak_idle_device_bytes": peak["idle_device_bytes"],
        "peak_host_bytes": peak["host_bytes"],
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "create_s": create_s,
        "visit_s": visit_s,
        "hit_tokens": stats.hit_tokens,
        "promoted_blocks": stats.promoted_blocks,
        "redis_errors": stats.redis_errors,
        "discarded_entries": stats.discarded_entries,
    }


def report(rows: list[dict], ws: dict | None) -> list[dict]:
    gb = 1e9
    print(
        f"\n{'N':>6} | {'KV MiB':>7} | {'recompute':>10} | {'host restore':>12} | {'host GB/s':>9} | "
        f"{'raw copy GB/s':>13} | {'host/raw':>8} | {'Redis restore':>13} | {'Redis GB/s':>10} | {'recompute/Redis':>15}"
    )
    print("-" * 136)
    checks = []
    for r in rows:
        host_ratio = r["host_bytes_per_s"] / r["raw_copy_bytes_per_s"]
        speedup = r["recompute_s"] / r["redis_restore_s"]
        print(
            f"{r['n']:>6} | {r['bytes'] / 2**20:>7.0f} | {r['recompute_s'] * 1e3:>7.0f} ms | "
            f"{r['host_restore_s'] * 1e3:>9.1f} ms | {r['host_bytes_per_s'] / gb:>9.2f} | "
            f"{r['raw_copy_bytes_per_s'] / gb:>13.2f} | {host_ratio:>7.0%} | "
            f"{r['redis_restore_s'] * 1e3:>10.1f} ms | {r['redis_bytes_per_s'] / gb:>10.2f} | {speedup:>14.0f}x"
        )
        checks.append(
            {
                "check": f"host restore >= 50% raw copy at N={r['n']}",
                "value": host_ratio,
                "ok": host_ratio >= 0.5,
            }
        )
        if r["n"] == 8192:
            checks.append(
                {
                    "check": "Redis restore >= 1 GB/s at N=8192",
                    "value": r["redis_bytes_per_s"] / gb,
                    "ok": r["redis_bytes_per_s"] >= gb,
                }
            )
            checks.append(
                {
                    "check": "Redis restore >= 20x faster than recompute at N=8192",
                    "value": speedup,
                    "ok": speedup >= 20,
                }
            )
    clustered = [r for r in rows if "cluster_restore_s" in r]
    if clustered:
        print(
            f"\n{'N':>6} | {'Redis restore':>13} | {'Redis GB/s':>10} | {'Cluster restore':>15} | "
            f"{'Cluster GB/s':>12} | {'cluster/Redis':>13} | {'TTFT Redis':>10} | {'TTFT Cluster':>12} | keys per master"
        )
        print("-" * 136)
    for r in clustered:
        ratio = r["cluster_bytes_per_s"] / r["redis_bytes_per_s"]
        print(
            f"{r['n']:>6} | {r['redis_restore_s'] * 1e3:>10.1f} ms | {r['redis_bytes_per_s'] / gb:>10.2f} | "
            f"{r['cluster_restore_s'] * 1e3:>12.1f} ms | {r['cluster_bytes_per_s'] / gb:>12.2f} | {ratio:>12.0%} | "
            f"{r['redis_intrinsic_ttft_s'] * 1e3:>7.0f} ms | {r['cluster_intrinsic_ttft_s'] * 1e3:>9.0f} ms | "
            f"{sorted(r['cluster_keys_per_master'].values())}"
        )
        if r["n"] == 8192:
            spread = len(r["cluster_keys_per_master"]) == 3 and min(r["cluster_keys_per_master"].values()) > 0
            checks.append(
                {
                    "check": "Cluster: values on all three masters at N=8192",
                    "value": float(spread),
                    "ok": spread,
                }
            )
            checks.append(
                {
                    "check": "Cluster restore >= 0.8x single Redis bandwidth at N=8192",
                    "value": ratio,
                    "ok": ratio >= 0.8,
                }
            )
    if ws is not None:
        print(
            f"\nworking set: {ws['conversations']} x {ws['tokens']} tokens = {ws['total_kv_bytes'] / 2**30:.2f} GiB of KV; "
            f"device budget {ws['device_budget_bytes'] / 2**20:.0f} MiB, host {ws['host_budget_bytes'] / 2**20:.0f} MiB, rest in Redis"
        )
        print(f"  before the visits: {ws['before_visits']}")
        print(
            f"  visits: {ws['errors']} errors, {ws['mismatches']} token mismatches, max |logit diff| {ws['max_logit_abs_diff']:.2e}, "
            f"hit tokens {ws['hit_tokens']}"
        )
        print(
            f"  peak idle device KV {ws['peak_idle_device_bytes'] / 2**20:.0f} MiB, peak host tier {ws['peak_host_bytes'] / 2**20:.0f} MiB, "
            f"max RSS {ws['max_rss_bytes'] / 2**30:.2f} GiB; create {ws['create_s']:.0f} s, visit {ws['visit_s']:.1f} s"
        )
        ok = (
            ws["errors"] == 0
            and ws["mismatches"] == 0
            and ws["peak_idle_device_bytes"] <= ws["device_budget_bytes"]
            and ws["peak_host_bytes"] <= ws["host_budget_bytes"]
        )
        checks.append(
            {
                "check": "working set: 0 errors, identical outputs, within budgets",
                "value": float(ok),
                "ok": ok,
            }
        )
    print_checks(checks)
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--conv-tokens", type=int, default=1024)
    parser.add_argument("--skip-working-set", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    parser.add_argument(
        "--cluster-url",
        default=None,
        help="use this Redis Cluster (redis+cluster://h:p,...) instead of starting one",
    )
    parser.add_argument("--no-cluster", action="store_true", help="skip the Redis Cluster comparison")
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_tiers.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model_dir, adapters = build_assets(args.assets)
    proc, url, workdir = (None, args.redis_url, None) if args.redis_url else start_redis()
    cluster = None
    if not args.no_cluster and args.cluster_url is None:  # 3 masters, no replicas: KV bytes once
        cluster = RedisClusterSet(shutil.which("redis-server") or "redis-server", replicas=0).start()
    cluster_url = None if args.no_cluster else args.cluster_url or (cluster and cluster.url)
    try:
        rows = restore_rows(str(model_dir), adapters, url, cluster_url, args.lengths, args.repeats)
        ws = None
        if not args.skip_working_set:
            ws = working_set(str(model_dir), adapters, url, args.conversations, args.conv_tokens, seed=0)
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
        if cluster is not None:
            cluster.stop()

    checks = report(rows, ws)
    info = machine(args.threads, redis=redis.__version__)
    finish(args.out, {"machine": info, "rows": rows, "working_set": ws}, checks)


if __name__ == "__main__":
    main()
