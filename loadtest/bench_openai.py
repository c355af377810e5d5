"""OpenAI-API benchmark: 16 agent conversations through the async `openai` client, each call resending
its full history, against the same workload on the native API (conversation ids) in the same run.

One server process (bench model of bench_core.py, CPU, float32; the bench aLoRA under three names:
alora, alora2, alora3). Per agent, after a warm-up call on its history (not timed):

    openai:  chat(history + user turn, 32 tokens) -> 3 aLoRA chats (model=alora*, 4 tokens) at once
             -> chat(... + next user turn, 32 tokens)                 (every call sends the history)
    native:  /generate(conversation_id, same messages) -> /intrinsics fan-out -> /generate

Then the aLoRA TTFT on an 8192-token history: an OpenAI chat call with model=alora (history warmed
by a base chat call on it) versus native /intrinsic/alora on a conversation holding that history,
both as client-side latency of a 1-token answer; the chat templating + tokenization of that history
is timed separately (in this process, the same code the server runs).

Targets: OpenAI throughput >= 0.9x native; OpenAI aLoRA TTFT at 8192 <= 1.3x native /intrinsic.
Until the KV index (automatic prefix caching) lands, OpenAI calls recompute their history on every
call, so these targets are expected to fail: the numbers are the baseline the index must move.

    python -m loadtest.bench_openai [--agents 16] [--history 2048] [--ttft-history 8192] [--out FILE]
    python -m loadtest.bench_openai --smoke        (tiny sizes: proves the script runs, no verdict)
"""

import argparse
import asyncio
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from alora_core.fixtures import corpus
from loadtest.bench_core import build_assets
from loadtest.common import finish, machine, print_checks
from service.inputs import encode_chat

SERVED = "bench"
INTRINSICS = ("alora", "alora2", "alora3")
TURN_TOKENS = 32
USER_TURN = 16
INTRINSIC_TOKENS = 4
Messages = list[dict[str, str]]


class Server:
    """`python -m service.cli` on a free loopback port (the bench model and its adapters)."""

    def __init__(self, model: Path, adapter: Path, max_model_len: int, log: Path) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        args = ["--model", str(model), "--served-model-name", SERVED, "--port", str(self.port)]
        args += ["--max-model-len", str(max_model_len), "--kv-cache-bytes", "3GiB", "--max-waiting", "1024"]
        for name in INTRINSICS:
            args += ["--adapter", f"{name}={adapter}"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ALORA_")} | {"HF_HUB_OFFLINE": "1"}
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "--log-level", "warning", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: see {log}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready: see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


def chat_history(tokenizer: PreTrainedTokenizerBase, tokens: int, seed: int) -> Messages:
    """Alternating user / assistant messages of random corpus text, about `tokens` tokens rendered."""
    lines = corpus(seed, lines=max(64, tokens // 4))
    messages: Messages = [{"role": "system", "content": "You are a helpful agent."}]
    i = 0
    while len(encode_chat(tokenizer, messages, add_generation_prompt=True)) < tokens:
        role = "user" if len(messages) % 2 else "assistant"
        messages.append({"role": role, "content": " ".join(lines[i : i + 4])})
        i = (i + 4) % (len(lines) - 4)
    return messages


def user_turn(tokenizer: PreTrainedTokenizerBase, rng: random.Random) -> dict[str, str]:
    """A user message of USER_TURN tokens."""
    ids = [rng.randrange(3, 1900) for _ in range(USER_TURN)]
    return {"role": "user", "content": str(tokenizer.decode(ids))}


async def openai_agent(
    client: openai.AsyncOpenAI, history: Messages, turns: list[dict[str, str]], stats: dict
) -> None:
    messages = list(history)
    for t, turn in enumerate(turns):
        messages.append(turn)
        start = time.perf_counter()
        reply = await client.chat.completions.create(
            model=SERVED,
            messages=messages,
            max_tokens=TURN_TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        stats["turn_s"].append(time.perf_counter() - start)
        stats["tokens"] += reply.usage.completion_tokens
        stats["cached"].append(reply.usage.prompt_tokens_details.cached_tokens / reply.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
        if t == 0:  # the fan-out between turns: three intrinsics at once, each resending the history

            async def intrinsic(name: str) -> None:
                start = time.perf_counter()
                result = await client.chat.completions.create(
                    model=name, messages=messages, max_tokens=INTRINSIC_TOKENS, temperature=0,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                stats["intrinsic_s"].append(time.perf_counter() - start)
                stats["tokens"] += result.usage.completion_tokens

            await asyncio.gather(*(intrinsic(name) for name in INTRINSICS))


async def native_agent(
    client: httpx.AsyncClient, conversation: str, history: Messages, turns: list[dict[str, str]], stats: dict
) -> None:
    messages = list(history)
    for t, turn in enumerate(turns):
        messages.append(turn)
        start = time.perf_counter()
        body = {
            "conversation_id": conversation,
            "messages": messages,
            "max_tokens": TURN_TOKENS,
            "ignore_eos": True,
        }
        reply = (await client.post("/generate", json=body)).raise_for_status().json()
        stats["turn_s"].append(time.perf_counter() - start)
        stats["tokens"] += reply["usage"]["completion_tokens"]
        stats["cached"].append(reply["usage"]["cached_tokens"] / reply["usage"]["prompt_tokens"])
        messages.append({"role": "assistant", "content": reply["text"]})
        if t == 0:
            start = time.perf_counter()
            body = {"conversation_id": conversation, "intrinsics": list(INTRINSICS), "max_tokens": INTRINSIC_TOKENS, "ignore_eos": True}  # fmt: skip
            fan = (await client.post("/intrinsics", json=body)).raise_for_status().json()
            stats["intrinsic_s"] += [time.perf_counter() - start] * len(INTRINSICS)
            stats["tokens"] += sum(r["usage"]["completion_tokens"] for r in fan["results"])


def new_stats() -> dict[str, Any]:
    return {"tokens": 0, "turn_s": [], "intrinsic_s": [], "cached": []}


def summary(stats: dict[str, Any], elapsed: float) -> dict[str, float]:
    return {
        "output_tokens": stats["tokens"],
        "elapsed_s": elapsed,
        "tokens_per_s": stats["tokens"] / elapsed,
        "turn_p50_s": statistics.median(stats["turn_s"]),
        "intrinsic_p50_s": statistics.median(stats["intrinsic_s"]),
        "cached_share_mean": statistics.fmean(stats["cached"]),
    }


async def run_agents(server: Server, histories: list[Messages], turns: list[list[dict[str, str]]]) -> dict:
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    results = {}
    async with (
        openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=3600
        ) as client,
        httpx.AsyncClient(base_url=server.url, timeout=3600, limits=limits) as native,
    ):
        # warm-up, not timed: one call on each history (native: the conversation's cache; OpenAI:
        # what an automatic prefix cache would keep)
        await asyncio.gather(*(
            client.chat.completions.create(model=SERVED, messages=h, max_tokens=1) for h in histories
        ))  # fmt: skip
        stats = new_stats()
        t0 = time.perf_counter()
        await asyncio.gather(
            *(openai_agent(client, h, t, stats) for h, t in zip(histories, turns, strict=True))
        )
        results["openai"] = summary(stats, time.perf_counter() - t0)
        print(f"openai done: {results['openai']['elapsed_s']:.1f}s", file=sys.stderr, flush=True)

        await asyncio.gather(*(
            native.post("/generate", json={"conversation_id": f"agent{i}", "messages": h, "max_tokens": 1})
            for i, h in enumerate(histories)
        ))  # fmt: skip
        stats = new_stats()
        t0 = time.perf_counter()
        await asyncio.gather(*(
            native_agent(native, f"agent{i}", h, t, stats)
            for i, (h, t) in enumerate(zip(histories, turns, strict=True))
        ))  # fmt: skip
        results["native"] = summary(stats, time.perf_counter() - t0)
        print(f"native done: {results['native']['elapsed_s']:.1f}s", file=sys.stderr, flush=True)
    return results


async def alora_ttft(server: Server, history: Messages, repeats: int) -> dict[str, float]:
    """Client-side latency of a 1-token aLoRA answer on a long history: OpenAI chat vs native."""
    async with (
        openai.AsyncOpenAI(
            base_url=f"{server.url}/v1", api_key="EMPTY", max_retries=0, timeout=3600
        ) as client,
        httpx.AsyncClient(base_url=server.url, timeout=3600) as native,
    ):
        await client.chat.completions.create(model=SERVED, messages=history, max_tokens=1)  # warm
        chat_s = []
        for _ in range(repeats):
            start = time.perf_counter()
            await client.chat.completions.create(model="alora", messages=history, max_tokens=1, temperature=0)
            chat_s.append(time.perf_counter() - start)
        body = {"conversation_id": "long", "messages": history, "max_tokens": 1}
        (await native.post("/generate", json=body)).raise_for_status()
        native_s = []
        for _ in range(repeats):
            start = time.perf_counter()
            response = await native.post(
                "/intrinsic/alora", json={"conversation_id": "long", "max_tokens": 1}
            )
            response.raise_for_status()
            native_s.append(time.perf_counter() - start)
    return {"openai_chat_s": statistics.median(chat_s), "native_intrinsic_s": statistics.median(native_s)}


def templating_s(tokenizer: PreTrainedTokenizerBase, history: Messages, repeats: int = 5) -> dict[str, float]:
    """The chat template and tokenization of the history, as the server does them per call."""
    render, encode = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=False)
        t1 = time.perf_counter()
        tokenizer.encode(text, add_special_tokens=False)
        encode.append(time.perf_counter() - t1)
        render.append(t1 - t0)
    return {"render_s": statistics.median(render), "tokenize_s": statistics.median(encode)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--history", type=int, default=2048, help="tokens of each agent's history")
    parser.add_argument("--turns", type=int, default=2, help="user turns per agent (fan-out after the first)")
    parser.add_argument("--ttft-history", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, no verdict (proves it runs)")
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-core"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_openai.json"))
    args = parser.parse_args()
    if args.smoke:
        args.agents, args.history, args.turns, args.ttft_history, args.repeats = 2, 256, 2, 512, 1
        if args.out == parser.get_default("out"):
            args.out = Path(".cache/bench_openai_smoke.json")

    model_dir, adapter_dirs = build_assets(args.assets)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(0)
    histories = [chat_history(tokenizer, args.history, seed=i) for i in range(args.agents)]
    turns = [[user_turn(tokenizer, rng) for _ in range(args.turns)] for _ in range(args.agents)]
    long_history = chat_history(tokenizer, args.ttft_history, seed=999)
    long_tokens = len(encode_chat(tokenizer, long_history, add_generation_prompt=False))
    max_model_len = max(long_tokens, args.history) + 1024

    server = Server(model_dir, adapter_dirs["alora"], max_model_len, args.out.with_suffix(".server.log"))
    try:
        results = asyncio.run(run_agents(server, histories, turns))
        ttft = asyncio.run(alora_ttft(server, long_history, args.repeats))
    finally:
        server.stop()
    ttft |= templating_s(tokenizer, long_history) | {"history_tokens": long_tokens}
    checks = report(results, ttft)
    info = machine(torch_threads(), agents=args.agents, history=args.history, smoke=args.smoke)
    finish(args.out, {"machine": info, "results": results, "alora_ttft": ttft}, checks, smoke=args.smoke)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def report(results: dict, ttft: dict) -> list[dict]:
    print(f"\n{'API':>7} | {'tokens/s':>9} | {'turn p50':>9} | {'intrinsic p50':>13} | {'cached share':>12}")
    print("-" * 64)
    for name, r in results.items():
        print(
            f"{name:>7} | {r['tokens_per_s']:>9.1f} | {r['turn_p50_s'] * 1e3:>6.0f} ms | "
            f"{r['intrinsic_p50_s'] * 1e3:>10.0f} ms | {r['cached_share_mean']:>12.2f}"
        )
    print(
        f"\naLoRA 1-token call on a {ttft['history_tokens']}-token history: OpenAI chat "
        f"{ttft['openai_chat_s'] * 1e3:.0f} ms, native /intrinsic {ttft['native_intrinsic_s'] * 1e3:.0f} ms "
        f"(chat template {ttft['render_s'] * 1e3:.1f} ms + tokenization {ttft['tokenize_s'] * 1e3:.1f} ms of it)"
    )
    ratio = results["openai"]["tokens_per_s"] / results["native"]["tokens_per_s"]
    ttft_ratio = ttft["openai_chat_s"] / ttft["native_intrinsic_s"]
    checks = [
        {"check": "OpenAI throughput >= 0.9x native", "value": ratio, "ok": ratio >= 0.9},
        {
            "check": "OpenAI aLoRA TTFT <= 1.3x native /intrinsic",
            "value": ttft_ratio,
            "ok": ttft_ratio <= 1.3,
        },
    ]
    print_checks(checks, digits=2)
    return checks


if __name__ == "__main__":
    main()
