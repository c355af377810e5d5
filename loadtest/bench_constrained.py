"""Constrained-decoding benchmark: the cost of the grammar mask in the batched decode step.

Workload, in one run, on the bench model (CPU; float32), 16 concurrent requests (--requests):
    constrained    every request constrained by a nested JSON schema (sampled, seed i)
    unconstrained  the same prompts, each generating exactly as many tokens as its constrained run
                   did (ignore_eos, max_tokens = that length), so both runs step the same batch sizes
Measured: the median time of a pure decode step (every row feeds one token: no prefill in it) of
each, over --repeats alternated runs of both (wall seconds summed), and their ratio; grammar compile time per schema, cold (first compile) and cached.

Target: constrained decode step <= 1.10x the unconstrained one. Prints a table, writes JSON.

    python -m loadtest.bench_constrained [--requests 16] [--max-tokens 96] [--out FILE]
    python -m loadtest.bench_constrained --preset tiny --requests 4 --max-tokens 32 --smoke   (proves it runs)
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import jsonschema
import torch

import alora_core.scheduler as scheduler_module
from alora_core import Engine, EngineConfig, SamplingParams
from alora_core.fixtures import write_demo
from alora_core.step import Work
from alora_core.structured import OutputConstraint
from loadtest.common import finish, machine, print_checks

NESTED = {
    "type": "object",
    "properties": {
        "answer": {"enum": ["yes", "no", "unsure"]},
        "certainty": {"type": "number", "minimum": 0, "maximum": 1},
        "citations": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "doc": {"type": "integer"},
                    "begin": {"type": "integer"},
                    "end": {"type": "integer"},
                },
                "required": ["doc", "begin", "end"],
            },
            "maxItems": 4,
        },
        "note": {"type": "string", "maxLength": 24},
    },
    "required": ["answer", "certainty", "citations", "note"],
}
SCHEMAS = {
    "nested_object": NESTED,
    "array_of_strings": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 8},
    "enum_label": {"type": "object", "properties": {"label": {"enum": ["answerable", "unanswerable"]}}},
}


class StepClock:
    """Wraps the scheduler's run_step: the duration of every step whose rows all feed one token."""

    def __init__(self) -> None:
        self.decode_s: list[float] = []
        self._run = scheduler_module.run_step

    def __enter__(self) -> "StepClock":
        def timed(work: list[Work], *args: object) -> None:
            t0 = time.perf_counter()
            self._run(work, *args)
            if all(end - start == 1 for _, start, end in work):
                self.decode_s.append(time.perf_counter() - t0)

        scheduler_module.run_step = timed  # type: ignore[assignment]
        return self

    def __exit__(self, *exc: object) -> None:
        scheduler_module.run_step = self._run


def prompt(seed: int, n: int, vocab: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def run(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams], texts: list[str] | None = None
) -> tuple[list[int], list[float], float]:
    """All requests at once -> (output lengths, pure decode step seconds, wall seconds); the texts of
    those that ended with "stop" go to `texts`."""
    with StepClock() as clock:
        t0 = time.perf_counter()
        handles = [engine.submit_completion(None, p, s) for p, s in zip(prompts, params, strict=True)]
        results = [h.result(timeout=3600) for h in handles]
        wall = time.perf_counter() - t0
    if texts is not None:
        texts.extend(r.text for r in results if r.finish_reason == "stop")
    return [len(r.token_ids) for r in results], clock.decode_s, wall


def compile_times(engine: Engine) -> dict[str, dict[str, float]]:
    out = {}
    for name, schema in SCHEMAS.items():
        constraint = OutputConstraint.json_schema(
            {**schema, "title": f"bench-{time.time_ns()}"}
        )  # never cached yet
        t0 = time.perf_counter()
        engine.grammars.compile(constraint)
        cold = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.grammars.matcher(constraint)  # what a request pays once compiled: lookup + matcher copy
        out[name] = {"cold_ms": cold * 1e3, "cached_ms": (time.perf_counter() - t0) * 1e3}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["bench", "tiny"], default="bench")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each, alternated (steps pooled)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--assets", type=Path, default=Path(".cache/bench-constrained"))
    parser.add_argument("--out", type=Path, default=Path("loadtest/results/bench_constrained.json"))
    parser.add_argument(
        "--smoke", action="store_true", help="small sizes: proves it runs, never fails on targets"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = args.assets / args.preset
    model = root / "model"
    demo = write_demo(root, preset=args.preset) if not (model / "config.json").exists() else None
    config = EngineConfig(
        model=str(demo.model if demo else model), device="cpu", dtype="float32", num_blocks=1024
    )
    engine = Engine.from_config(config)
    vocab = len(engine.tokenizer)
    prompts = [prompt(100 + i, args.prompt_tokens, vocab) for i in range(args.requests)]
    schema = OutputConstraint.json_schema(NESTED)
    compiled = compile_times(engine)

    engine.generate(None, prompts[0], SamplingParams(max_tokens=4, constraint=schema))  # warm-up
    constrained = [
        SamplingParams(max_tokens=args.max_tokens, temperature=1.0, seed=i, constraint=schema)
        for i in range(args.requests)
    ]
    texts: list[str] = []
    lengths, c_steps, c_wall = run(engine, prompts, constrained, texts)
    for text in texts:  # the outputs are what the schema says (random weights: only thanks to the mask)
        jsonschema.validate(json.loads(text), NESTED)
    free = [
        SamplingParams(max_tokens=n, ignore_eos=True, temperature=1.0, seed=i) for i, n in enumerate(lengths)
    ]
    free_lengths, u_steps, u_wall = run(engine, prompts, free)
    assert free_lengths == lengths
    for _ in range(args.repeats - 1):  # alternate the two runs: load drifting on the machine hits both
        again, steps, wall = run(engine, prompts, constrained)
        assert again == lengths  # same seeds: the same outputs
        c_steps, c_wall = c_steps + steps, c_wall + wall
        _, steps, wall = run(engine, prompts, free)
        u_steps, u_wall = u_steps + steps, u_wall + wall
    engine.close()

    c_med, u_med = statistics.median(c_steps), statistics.median(u_steps)
    ratio = c_med / u_med
    rows = [("constrained", c_med, len(c_steps), c_wall), ("unconstrained", u_med, len(u_steps), u_wall)]
    print(
        f"{args.requests} requests, {args.prompt_tokens}-token prompts, {sum(lengths)} output tokens ({args.preset} model)"
    )
    print(
        f"constrained: {len(texts)} of {args.requests} completed the schema (the rest: max_tokens), all valid"
    )
    print(f"{'run':<15}{'decode step p50 ms':>20}{'decode steps':>14}{'wall s':>10}")
    for name, med, n, wall in rows:
        print(f"{name:<15}{med * 1e3:>20.2f}{n:>14}{wall:>10.2f}")
    print("\ngrammar compile (ms):")
    for name, t in compiled.items():
        print(f"  {name:<18} cold {t['cold_ms']:8.2f}   cached {t['cached_ms']:6.3f}")
    checks = [
        {"check": "constrained / unconstrained decode step p50 <= 1.10", "value": ratio, "ok": ratio <= 1.10}
    ]
    print_checks(checks)
    payload = {
        "machine": machine(args.threads),
        "config": vars(args) | {"assets": str(args.assets), "out": str(args.out)},
        "output_lengths": lengths,
        "completed_and_valid": len(texts),
        "constrained": {"decode_step_p50_s": c_med, "decode_steps": len(c_steps), "wall_s": c_wall},
        "unconstrained": {"decode_step_p50_s": u_med, "decode_steps": len(u_steps), "wall_s": u_wall},
        "ratio": ratio,
        "compile_ms": compiled,
        "schema": json.dumps(NESTED),
    }
    finish(args.out, payload, checks, smoke=args.smoke)


if __name__ == "__main__":
    main()
