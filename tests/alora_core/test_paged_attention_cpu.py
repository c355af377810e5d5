"""The CPU batched paged-attention kernel (model/paged_attention_cpu.py, csrc/paged_attention_cpu.c)
against the dense float64 reference, over random block layouts, fragmented runs and fork groups that
share a prefix, with every feature a layer may ask for; its plan; and the compiler fallback."""

import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alora_core.model import attention, attention_forks, cpu_kernels, paged_attention_cpu
from alora_core.model.batch import SeqSpan, StepBatch
from alora_core.model.cpu_kernels import CpuKernels

FEATURES: dict[str, dict[str, object]] = {
    "plain": {},
    "window": {"window": 37},
    "window_1": {"window": 1},
    "softcap": {"softcap": 2.5},
    "sinks": {"sinks": True},
    "all": {"window": 300, "softcap": 3.0, "sinks": True},
}


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    loaded = cpu_kernels.load()
    assert loaded is not None, "the CPU kernels must build on the test machine (a C compiler is installed)"
    return loaded


def random_layout(
    rng: random.Random, num_blocks: int, block: int, forks: list[int], lengths: list[int]
) -> list[list[tuple[int, int]]]:
    """Per sequence, its pool slots as segments: the members of a fork group share a random number of
    whole first blocks; every other block continues the previous one where it is free (about half the
    time: runs) or is drawn at random (fragmented)."""
    free = set(range(num_blocks))

    def take(after: int | None) -> int:
        block_id = after + 1 if after is not None and after + 1 in free and rng.random() < 0.5 else None
        if block_id is None:
            block_id = rng.choice(sorted(free))
        free.discard(block_id)
        return block_id

    tables: list[list[int]] = []
    i = 0
    for members in forks:
        shared: list[int] = []
        for _ in range(rng.randint(1, max(1, min(lengths[i : i + members]) // block))):
            shared.append(take(shared[-1] if shared else None))
        for _ in range(members):
            table = list(shared)
            while len(table) * block < lengths[i]:
                table.append(take(table[-1]))
            tables.append(table)
            i += 1
    segments = []
    for table, n in zip(tables, lengths, strict=True):
        segs: list[tuple[int, int]] = []
        for b in table:
            start = b * block
            if segs and segs[-1][1] == start:
                segs[-1] = (segs[-1][0], start + block)
            else:
                segs.append((start, start + block))
        segs[-1] = (segs[-1][0], segs[-1][1] - (len(table) * block - n))
        segments.append(segs)
    return segments


def make_case(
    seed: int, heads: int, kv_heads: int, dim: int
) -> tuple[list[SeqSpan], torch.Tensor, torch.Tensor, torch.Tensor]:
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    block, num_blocks = 16, 256
    forks = [rng.choice([1, 1, 2, 4]) for _ in range(rng.randint(1, 5))]
    count = sum(forks)
    queries = [rng.choice([1, 1, 1, 2, 6, 15, 40, 200]) for _ in range(count)]
    lengths = [rng.randint(q + 1, 700) for q in queries]
    layouts = random_layout(rng, num_blocks, block, forks, lengths)
    spans, row = [], 0
    for segs, t, n in zip(layouts, queries, lengths, strict=True):
        spans.append(SeqSpan(query_start=row, query_len=t, context_len=n, kv_segments=tuple(segs)))
        row += t
    k_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=gen)
    v_cache = torch.randn(kv_heads, num_blocks * block, dim, generator=gen)
    # queries as the model lays them out: a transposed view of [1, T, H, D]
    query = (torch.randn(1, row, heads, dim, generator=gen) * 2).transpose(1, 2)
    return spans, query, k_cache, v_cache


def feature_kwargs(name: str, heads: int) -> dict[str, object]:
    chosen = dict(FEATURES[name])
    if chosen.pop("sinks", False):
        chosen["sinks"] = torch.randn(heads, generator=torch.Generator().manual_seed(3)) * 2
    return chosen


@pytest.mark.parametrize("name", sorted(FEATURES))
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(8, 4, 64), (4, 1, 16), (12, 2, 128), (6, 6, 32), (2, 1, 80)]
)
@pytest.mark.parametrize("seed", range(3))
def test_kernel_matches_the_dense_reference(
    kernels: CpuKernels, name: str, heads: int, kv_heads: int, dim: int, seed: int
) -> None:
    """Random fork groups over fragmented pool layouts; 1 to 200 query rows per sequence: decode rows
    (the kernel's dot path), invocations and chunks (the lanes path, over several chunks of 16 query
    vectors), prefill chunks of more than ITEM_ROWS rows (several row blocks, causal skipping)."""
    spans, query, k_cache, v_cache = make_case(seed * 100 + heads, heads, kv_heads, dim)
    extra = feature_kwargs(name, heads)
    plan, covered = attention.kernel_plan(tuple(spans))
    assert plan is not None and covered == set(range(len(spans)))
    out = torch.full((query.shape[2], heads, dim), float("nan"))

    paged_attention_cpu.attend(kernels, plan, query[0].transpose(0, 1), k_cache, v_cache, out, 0.3, **extra)  # type: ignore[arg-type]

    expected = paged_attention_cpu.reference(spans, query[0].transpose(0, 1), k_cache, v_cache, 0.3, **extra)  # type: ignore[arg-type]
    for row, ref in expected.items():
        torch.testing.assert_close(out[row].double(), ref, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("name", sorted(FEATURES))
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 4, 64), (2, 1, 80)])
def test_kernel_reads_a_bfloat16_pool(
    kernels: CpuKernels, name: str, heads: int, kv_heads: int, dim: int
) -> None:
    """A bfloat16 pool (the serving dtype): each task widens the keys and values it reads, the rest is the
    float32 computation, so the result equals the dense reference on the same bf16 values as tightly."""
    spans, query, k_cache, v_cache = make_case(7 + heads, heads, kv_heads, dim)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    extra = feature_kwargs(name, heads)
    plan, _ = attention.kernel_plan(tuple(spans))
    assert plan is not None
    out = torch.full((query.shape[2], heads, dim), float("nan"))
    paged_attention_cpu.attend(kernels, plan, query[0].transpose(0, 1), k_cache, v_cache, out, 0.3, **extra)  # type: ignore[arg-type]
    expected = paged_attention_cpu.reference(spans, query[0].transpose(0, 1), k_cache, v_cache, 0.3, **extra)  # type: ignore[arg-type]
    for row, ref in expected.items():
        torch.testing.assert_close(out[row].double(), ref, atol=3e-5, rtol=3e-5)


def test_reference_agrees_with_the_eager_path() -> None:
    """The oracle itself against the engine's eager attention (ATen flash parts and merges)."""
    spans, query, k_cache, v_cache = make_case(5, 8, 2, 32)
    expected = paged_attention_cpu.reference(spans, query[0].transpose(0, 1), k_cache, v_cache, 0.25)
    for seq in spans:
        q = query[0, :, seq.query_start : seq.query_start + seq.query_len]
        out = attention_forks.attend(
            q, k_cache, v_cache, seq.kv_segments, seq.context_len - seq.query_len, 0.25
        )
        for i in range(seq.query_len):
            torch.testing.assert_close(
                out[:, i].double(), expected[seq.query_start + i], atol=3e-5, rtol=3e-5
            )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel_prefill", [True, False])
@pytest.mark.parametrize("name", sorted(FEATURES))
def test_layer_forward_equals_the_eager_path(
    kernels: CpuKernels, name: str, kernel_prefill: bool, dtype: torch.dtype
) -> None:
    """paged_attention_forward with the kernel (the K/V write, then the kernel's rows) equals the same
    step on the eager path. Row 0's sequence is a 20-token single-run prefill chunk: the kernel's with
    kernel_prefill, else ATen's SDPA (the eager path's; but soft-capped or with sinks, SDPA cannot, so
    the kernel's again). In bfloat16 both round their outputs to bf16 (the kernel computes in float32)."""
    kv_heads, heads, dim, slots = 2, 4, 32, 2048
    spans = [
        SeqSpan(0, 20, 120, ((100, 220),)),
        SeqSpan(20, 1, 300, ((400, 600), (1000, 1100))),
        SeqSpan(21, 3, 203, ((400, 600), (1200, 1203))),  # a fork of the previous one
        SeqSpan(24, 6, 50, ((1500, 1550),)),
    ]
    rows = 30
    slot_mapping = torch.cat(
        [torch.cat([torch.arange(s, e) for s, e in sp.kv_segments])[-sp.query_len :] for sp in spans]
    )
    extra = feature_kwargs(name, heads)
    outs = []
    for use_kernel in (True, False):
        kv = torch.randn(1, 2, kv_heads, slots, dim, generator=torch.Generator().manual_seed(1)).to(dtype)
        batch = StepBatch(
            input_ids=torch.zeros(rows, dtype=torch.long),
            positions=torch.zeros(rows, dtype=torch.long),
            slot_mapping=slot_mapping,
            seqs=tuple(spans),
            kv=kv,
            lora=None,
            logits_rows=torch.zeros(0, dtype=torch.long),
            cpu_kernels=kernels if use_kernel else None,
            kernel_prefill=kernel_prefill,
        )
        g = torch.Generator().manual_seed(2)
        query = torch.randn(1, rows, heads, dim, generator=g).to(dtype).transpose(1, 2)
        key = torch.randn(1, kv_heads, rows, dim, generator=g).to(dtype)
        value = torch.randn(1, kv_heads, rows, dim, generator=g).to(dtype)
        layer = torch.nn.Module()
        layer.layer_idx = 0
        out, _ = attention.paged_attention_forward(
            layer,
            query,
            key,
            value,
            None,
            scaling=0.3,
            sliding_window=extra.get("window"),  # type: ignore[arg-type]
            softcap=extra.get("softcap"),  # type: ignore[arg-type]
            s_aux=extra.get("sinks"),  # type: ignore[arg-type]
            step_batch=batch,
        )
        outs.append(out)
        if use_kernel:
            sdpa = "softcap" not in extra and "sinks" not in extra
            plan, covered = batch.derived[("kernel", sdpa and not kernel_prefill)]  # type: ignore[misc]
            assert isinstance(plan, paged_attention_cpu.KernelPlan)
            by_kernel = {0, 1, 2, 3} if kernel_prefill or not sdpa else {1, 2, 3}
            assert covered == by_kernel
            first = 0 if 0 in by_kernel else 20
            assert sorted(set(plan.row_q.tolist())) == list(range(first, rows))
    tol = 3e-5 if dtype == torch.float32 else 2e-2
    assert outs[0].dtype == outs[1].dtype == dtype
    torch.testing.assert_close(outs[0], outs[1], atol=tol, rtol=tol)


@pytest.mark.parametrize(("kernel_s", "sdpa_s", "expected"), [(1.0, 2.0, True), (2.0, 1.0, False)])
def test_prefill_goes_to_whichever_was_timed_faster(
    kernels: CpuKernels, kernel_s: float, sdpa_s: float, expected: bool
) -> None:
    """The start-up choice for long single-run chunks runs both paths and keeps the
    faster; the timer is scripted here, the real one is each call's CPU time."""
    outputs = {}

    def timer(fn) -> float:  # type: ignore[no-untyped-def]
        outputs[fn.__name__] = fn()
        return kernel_s if fn.__name__ == "by_kernel" else sdpa_s

    assert attention.kernel_wins_prefill(kernels, 8, 2, 32, timer=timer) is expected
    assert set(outputs) == {"by_kernel", "by_sdpa"}


def test_a_fan_out_reads_its_shared_prefix_once() -> None:
    """Four forks of one 1000-token conversation: the shared runs are items over all their rows (one
    read per step for the whole fan-out), each fork's own keys an item over its own rows."""
    prefix = ((0, 600), (2000, 2400))
    spans = tuple(
        SeqSpan(
            query_start=i * 6,
            query_len=6,
            context_len=1006,
            kv_segments=(*prefix, (4000 + 16 * i, 4006 + 16 * i)),
        )
        for i in range(4)
    )
    plan, _ = attention.kernel_plan(spans)
    assert plan is not None

    items = plan.items.tolist()
    shared = [it for it in items if it[2] < 4000]
    own = [it for it in items if it[2] >= 4000]
    assert all((lo, hi) == (0, 24) for lo, hi, *_ in shared)  # every row of the fan-out
    assert sum(it[3] for it in shared) == 1000  # each shared key in exactly one item
    assert sorted((lo, hi, keys) for lo, hi, _, keys, _, _ in own) == [
        (i * 6, i * 6 + 6, 6) for i in range(4)
    ]
    # runs are cut at positions that are multiples of SPLIT_KEYS, whatever else the step holds
    assert [it[4] for it in shared] == [0, 512, 600]


def test_a_rows_output_does_not_depend_on_the_other_sequences_of_the_step(kernels: CpuKernels) -> None:
    """Bitwise: a decode row alone, and with other sequences in the step (batch invariance)."""
    spans, query, k_cache, v_cache = make_case(7, 8, 2, 64)
    q = query[0].transpose(0, 1)
    alone = [s for s in spans if s.query_len == 1][:1]
    assert alone, "the case has a decode row"
    outs = []
    for seqs in (alone, [s for s in spans if s.kv_segments[0][0] != alone[0].kv_segments[0][0]] + alone):
        plan, _ = attention.kernel_plan(tuple(seqs))
        assert plan is not None
        out = torch.zeros(q.shape)
        paged_attention_cpu.attend(kernels, plan, q, k_cache, v_cache, out, 0.2)
        outs.append(out[alone[0].query_start])
    assert torch.equal(outs[0], outs[1])


def test_without_a_compiler_the_engine_serves_eagerly_after_one_warning(tmp_path: Path) -> None:
    """No compiler on PATH, none in CC, an empty kernel cache: load() warns once and returns None; an
    engine on the tiny demo model then serves with the eager path, the same tokens as with the kernels."""
    script = textwrap.dedent(
        """
        import logging, sys
        from alora_core import Engine, EngineConfig, SamplingParams
        from alora_core.fixtures import write_demo
        from alora_core.model import cpu_kernels
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
        demo = write_demo(sys.argv[1], preset="tiny", seed=0)
        engine = Engine.from_config(EngineConfig(model=str(demo.model), num_blocks=64, calibrate_cpu_linears=False))
        assert engine.ctx.cpu_kernels is None
        assert cpu_kernels.load() is None
        r = engine.generate(None, list(range(3, 40)), SamplingParams(max_tokens=6, ignore_eos=True))
        print("TOKENS", r.token_ids)
        engine.close()
        """
    )
    runs = {}
    for label, env in {
        "bare": {"PATH": str(tmp_path / "empty-bin"), "CC": "", ENV_CACHE: str(tmp_path / "kernels")},
        "compiler": {},
    }.items():
        full_env = {**os.environ, **env, "PYTHONPATH": str(Path(__file__).parents[2])}
        if label == "compiler":
            script_run = script.replace(
                "assert engine.ctx.cpu_kernels is None", "assert engine.ctx.cpu_kernels"
            )
            script_run = script_run.replace("assert cpu_kernels.load() is None", "")
        else:
            script_run = script
        done = subprocess.run(
            [sys.executable, "-c", script_run, str(tmp_path / f"demo-{label}")],
            env=full_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs[label] = done
    warnings = [line for line in runs["bare"].stderr.splitlines() if "no C compiler found" in line]
    assert len(warnings) == 1, runs["bare"].stderr[-2000:]
    tokens = {
        label: [line for line in r.stdout.splitlines() if line.startswith("TOKENS")]
        for label, r in runs.items()
    }
    assert tokens["bare"] == tokens["compiler"]


ENV_CACHE = cpu_kernels.ENV_CACHE


def test_a_compiled_kernel_is_cached_by_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first build compiles (and says how long it took), the second reuses the file."""
    compiler = cpu_kernels.find_compiler()
    assert compiler is not None
    monkeypatch.setenv(ENV_CACHE, str(tmp_path))
    first = cpu_kernels._build(compiler)
    second = cpu_kernels._build(compiler)
    assert first.compile_s > 0 and second.compile_s == 0
    assert first.path == second.path and first.path.parent == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no partial file left behind


def test_switch_turns_the_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.ENV_SWITCH, "0")
    cpu_kernels.load.cache_clear()
    try:
        assert cpu_kernels.load() is None
    finally:
        cpu_kernels.load.cache_clear()
