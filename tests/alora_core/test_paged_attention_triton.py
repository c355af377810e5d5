"""The paged Triton attention (model/paged_attention_triton.py) against its torch reference over the same
block tables, and the engine on that path against PEFT.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
the module is imported and restored right after, as in test_triton_ops.py); with one they run compiled
on CUDA. Pool slots that no sequence owns are NaN, and so are the output buffer (a strided view inside
a larger NaN buffer) and the split-KV partials: a wrong block lookup, a read past a sequence's keys, a
row left unwritten or a write outside the output shows up. One test compiles the kernels for sm_80 and
sm_90 (no GPU needed) in a clean subprocess.
"""

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from alora_core.model.batch import SeqSpan, StepBatch
from alora_core.model.step_buffers import DeviceStep, StepBuffers
from tests.alora_core.interpreted_triton import pa  # first: the kernels in the tests' Triton mode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

from alora_core import Engine, SamplingParams  # noqa: E402
from alora_core.fixtures import DemoPaths  # noqa: E402
from alora_core.model import attention  # noqa: E402
from tests.alora_core.conftest import PeftOracle, random_ids  # noqa: E402
from tests.alora_core.test_engine_parity import GREEDY, assert_matches, assert_mixed_batch_matches  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |kernel - reference| / max(1, max |reference|): the reference is float32 math on the same inputs
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
BS = 16  # pool block size
Seq = tuple[int, int, list[int]]  # (context_len, query_len, pool blocks holding positions 0..context_len-1)


@pytest.fixture(autouse=True)
def poisoned_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Split-KV partials start as NaN: one the kernel forgets to write poisons the output."""
    monkeypatch.setattr(pa, "_partials", lambda *shape, device: torch.full(shape, math.nan, device=device))


@dataclass
class Case:
    k_cache: torch.Tensor  # [KVH, S, D]: NaN at every slot no sequence owns
    v_cache: torch.Tensor
    batch: StepBatch
    step: DeviceStep
    q: torch.Tensor  # [T, H, D] a strided view, as HF hands it over

    def reference(self, scale: float, **features: object) -> torch.Tensor:
        s = self.step
        return pa.paged_attention_reference(
            self.q, self.k_cache, self.v_cache, s.block_tables, s.seq_lens,
            s.query_start[: s.num_seqs + 1], s.block_size, scale, **features,  # type: ignore[arg-type]
        )  # fmt: skip


def segments(blocks: list[int], n: int) -> tuple[tuple[int, int], ...]:
    """Pool slot runs of positions 0..n-1 held in `blocks` (as BlockTable.segments)."""
    runs: list[tuple[int, int]] = []
    for b in blocks[: -(-n // BS)]:
        if runs and runs[-1][1] == b * BS:
            runs[-1] = (runs[-1][0], b * BS + BS)
        else:
            runs.append((b * BS, b * BS + BS))
    start, end = runs[-1]
    runs[-1] = (start, end - (-(-n // BS) * BS - n))
    return tuple(runs)


def fragmented(gen: torch.Generator, lengths: list[int], num_blocks: int) -> list[list[int]]:
    """Each length's blocks drawn at random from the pool: runs broken everywhere, out of order."""
    free = torch.randperm(num_blocks, generator=gen).tolist()
    return [[free.pop() for _ in range(-(-n // BS))] for n in lengths]


def build_case(
    seqs: list[Seq], kv_heads: int, groups: int, dim: int, dtype: torch.dtype, gen: torch.Generator
) -> Case:
    num_blocks = max(b for _, _, blocks in seqs for b in blocks) + 2
    k = torch.randn(kv_heads, num_blocks * BS, dim, generator=gen)
    v = torch.randn(kv_heads, num_blocks * BS, dim, generator=gen)
    owned = torch.zeros(num_blocks * BS, dtype=torch.bool)
    spans, slots, row = [], [], 0
    for n, t, blocks in seqs:
        assert len(blocks) == -(-n // BS)
        runs = segments(blocks, n)
        for s, e in runs:
            owned[s:e] = True
        spans.append(SeqSpan(row, t, n, runs))
        slots.append(torch.cat([torch.arange(s, e) for s, e in runs])[n - t :])
        row += t
    k[:, ~owned], v[:, ~owned] = math.nan, math.nan
    buffers = StepBuffers(8, len(seqs) + 2, 2, BS, DEVICE)  # grows to the step's tokens and blocks
    zeros = torch.zeros(row, dtype=torch.long)
    batch = buffers.upload(zeros, zeros, torch.cat(slots), zeros - 1, zeros[:0], tuple(spans), torch.empty(0))
    assert batch.device_step is not None
    heads = kv_heads * groups
    q = torch.randn(1, row, heads, dim, generator=gen).transpose(1, 2)  # [1, H, T, D] as HF's projections
    return Case(
        k.to(DEVICE, dtype),
        v.to(DEVICE, dtype),
        batch,
        batch.device_step,
        q[0].transpose(0, 1).to(DEVICE, dtype),
    )


def run_kernel(
    case: Case, scale: float, launch: "pa.Launch | None" = None, **features: object
) -> torch.Tensor:
    """The kernel into a strided view of a NaN buffer; checks that it wrote every row and nothing else."""
    t, h, d = case.q.shape
    buf = torch.full((t + 2, h + 1, d + 3), math.nan, dtype=case.q.dtype, device=DEVICE)
    out = buf[1 : 1 + t, :h, 2 : 2 + d]
    pa.paged_attention(case.q, case.k_cache, case.v_cache, out, case.step, scale, launch=launch, **features)  # type: ignore[arg-type]
    assert not out.isnan().any(), "a row of the step was not written"
    outside = torch.ones_like(buf, dtype=torch.bool)
    outside[1 : 1 + t, :h, 2 : 2 + d] = False
    assert buf[outside].isnan().all(), "the kernel wrote outside its output"
    return out


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, ref.float().abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, (
        f"{dtype}: max error {err:.3g} vs bound {REL_TOL[dtype] * scale:.3g}"
    )


def launch(block_m: int, groups: int, segments: int, tile_n: int = 16) -> "pa.Launch":
    return pa.Launch(block_m, max(1, block_m // groups), tile_n, segments)


def mixed_step(gen: torch.Generator) -> list[Seq]:
    """Prefill chunk over a cached prefix, fresh prefill, decodes (one at position 0), and two intrinsic
    forks sharing a conversation's first two blocks, each with blocks of its own, on a fragmented pool."""
    chunk, fresh, dec, first, fork_a, fork_b = fragmented(gen, [45, 20, 33, 1, 40 - 32, 37 - 32], 40)
    shared = fragmented(gen, [32], 40)[0]
    shared = [b + 40 for b in shared]  # blocks apart from the others'
    return [
        (45, 13, chunk),
        (20, 20, fresh),
        (33, 1, dec),
        (1, 1, first),
        (40, 3, shared + fork_a),
        (37, 1, shared + fork_b),
    ]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("plan", ["auto", "m16", "m16-split3", "m64-split2"])
def test_mixed_step_matches_reference(dtype: torch.dtype, plan: str) -> None:
    gen = torch.Generator().manual_seed(1)
    groups = 4
    case = build_case(mixed_step(gen), 2, groups, 64, dtype, gen)
    plans = {"auto": None, "m16": launch(16, groups, 1), "m16-split3": launch(16, groups, 3)}
    plans["m64-split2"] = launch(64, groups, 2, tile_n=32)
    out = run_kernel(case, 0.125, plans[plan])
    assert_rel_close(out, case.reference(0.125), dtype)


@pytest.mark.parametrize(
    ("groups", "dim"), [(1, 64), (1, 128), (4, 64), (4, 128), (8, 64), (8, 128), (3, 96)]
)  # and Phi-3's head dim 96 (padded to 128 inside) with a ratio that is no power of two
def test_gqa_ratios_and_head_dims(groups: int, dim: int) -> None:
    gen = torch.Generator().manual_seed(groups * 1000 + dim)
    kv_heads = 1 if groups == 8 else 2
    a, b, c = fragmented(gen, [30, 19, 50], 16)
    case = build_case([(30, 9, a), (19, 1, b), (50, 1, c)], kv_heads, groups, dim, torch.bfloat16, gen)
    ref = case.reference(dim**-0.5)
    for plan in (launch(16, groups, 1), launch(16, groups, 2)):
        assert_rel_close(run_kernel(case, dim**-0.5, plan), ref, torch.bfloat16)


@pytest.mark.parametrize(
    "features",
    [{"window": 5}, {"softcap": 2.0}, {"sinks": True}, {"window": 7, "softcap": 1.5, "sinks": True}],
    ids=["window", "softcap", "sinks", "all"],
)
@pytest.mark.parametrize("segments", [1, 4])
def test_sliding_window_softcap_and_sinks(features: dict[str, object], segments: int) -> None:
    """Small caps so tanh bends the logits; contexts several windows and tiles long."""
    gen = torch.Generator().manual_seed(3)
    a, b, c = fragmented(gen, [70, 21, 40], 16)
    case = build_case([(70, 1, a), (21, 12, b), (40, 2, c)], 2, 2, 64, torch.float32, gen)
    kwargs = dict(features)
    if kwargs.pop("sinks", False):
        kwargs["sinks"] = torch.randn(4, generator=gen).to(DEVICE) * 2
    scale = 0.3  # a layer's own scaling, not head_dim ** -0.5
    ref = case.reference(scale, **kwargs)
    plain = case.reference(scale)
    assert (ref - plain).abs().max() > 1e-2, (
        "the features must change the result for this test to mean anything"
    )
    assert_rel_close(run_kernel(case, scale, launch(16, 2, segments), **kwargs), ref, torch.float32)


def test_keys_outside_the_window_are_not_read() -> None:
    """Decode rows over a long context: every key older than the window is NaN in the pool."""
    gen = torch.Generator().manual_seed(4)
    window = 10
    a, b = fragmented(gen, [90, 61], 16)
    case = build_case([(90, 1, a), (61, 1, b)], 2, 4, 64, torch.float32, gen)
    ref = case.reference(0.125, window=window)
    for row, n in enumerate((90, 61)):
        table = case.step.block_tables[row].long().cpu()
        old = torch.arange(n - window)
        case.k_cache[:, (table[old // BS] * BS + old % BS).to(DEVICE)] = math.nan
        case.v_cache[:, (table[old // BS] * BS + old % BS).to(DEVICE)] = math.nan
    for segments in (1, 3):
        assert_rel_close(run_kernel(case, 0.125, launch(16, 4, segments), window=window), ref, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_lengths_from_one_to_several_blocks(dtype: torch.dtype) -> None:
    """Decodes at 1, 2, 15, 16, 17, 32, 33 and 70 keys, next to a chunk of exactly one block; blocks in runs."""
    gen = torch.Generator().manual_seed(5)
    lengths = [1, 2, 15, 16, 17, 32, 33, 70, 48]
    seqs, first = [], 0
    for n in lengths:
        count = -(-n // BS)
        seqs.append((n, 16 if n == 48 else 1, list(range(first, first + count))))
        first += count + 1  # a free block between runs
    case = build_case(seqs, 2, 2, 64, dtype, gen)
    ref = case.reference(0.125)
    assert pa.plan_launch(case.step, 2, 2, pa.target_programs(DEVICE)).block_m == 32  # 16 tokens x 2 heads
    for plan in (None, launch(16, 2, 4)):
        assert_rel_close(run_kernel(case, 0.125, plan), ref, dtype)


def test_padding_sequences_and_spare_programs_are_inert() -> None:
    """A fixed-shape step (as a CUDA graph would replay it): sequences past the real ones have no
    queries and no keys; their programs return without touching anything."""
    gen = torch.Generator().manual_seed(6)
    a, b = fragmented(gen, [25, 18], 8)
    case = build_case([(25, 3, a), (18, 1, b)], 2, 2, 64, torch.float32, gen)
    padded = DeviceStep(**{**case.step.__dict__, "num_seqs": case.step.num_seqs + 2})
    assert padded.query_start[2:5].tolist() == [4, 4, 4] and padded.seq_lens[2:4].tolist() == [0, 0]
    ref = case.reference(0.125)
    case.step = padded
    for segments in (1, 2):
        assert_rel_close(run_kernel(case, 0.125, launch(16, 2, segments)), ref, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_kv_writes_its_slots_skips_padding_and_nothing_else(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(7)
    kv_heads, dim, slots = 3, 40, torch.tensor([17, -1, 3, 40, -1, 8])
    key = torch.randn(1, kv_heads, len(slots), dim, generator=gen).to(DEVICE, dtype)  # HF's [1, KVH, T, D]
    value = torch.randn(1, len(slots), kv_heads, dim, generator=gen).to(DEVICE, dtype).transpose(1, 2)
    k_cache = torch.full((kv_heads, 48, dim), math.nan, dtype=dtype, device=DEVICE)
    v_cache = torch.full((kv_heads, 48, dim), math.nan, dtype=dtype, device=DEVICE)
    pa.write_kv(key[0].transpose(0, 1), value[0].transpose(0, 1), k_cache, v_cache, slots.to(DEVICE))
    real = slots >= 0
    for cache, new in ((k_cache, key), (v_cache, value)):
        assert torch.equal(cache[:, slots[real].to(DEVICE)], new[0][:, real.to(DEVICE)])  # bit for bit
        untouched = torch.ones(48, dtype=torch.bool)
        untouched[slots[real]] = False
        assert cache[:, untouched.to(DEVICE)].isnan().all()


class Layer(nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


def test_attention_backend_routes_device_steps_to_the_kernel() -> None:
    """paged_attention_forward with a step that has device metadata: the step's new K/V land in the pool
    at its slots, then every row attends over its sequence (layer 1 of a two-layer pool)."""
    gen = torch.Generator().manual_seed(8)
    case = build_case(mixed_step(gen), 2, 4, 64, torch.float32, gen)
    t, h, d = case.q.shape
    pool = torch.stack(
        [
            torch.stack([torch.full_like(case.k_cache, math.nan)] * 2),
            torch.stack([case.k_cache, case.v_cache]),
        ]
    )
    slots = case.batch.slot_mapping
    new_k, new_v = pool[1, 0][:, slots].clone(), pool[1, 1][:, slots].clone()  # the step's own keys
    pool[1, :, :, slots] = math.nan  # written by the backend, not before
    batch = StepBatch(**{**case.batch.__dict__, "kv": pool, "derived": {}})
    query = case.q.transpose(0, 1).unsqueeze(0)  # [1, H, T, D]
    out, _ = attention.paged_attention_forward(
        Layer(1),
        query,
        new_k.unsqueeze(0),
        new_v.unsqueeze(0),
        None,
        scaling=0.2,
        step_batch=batch,
        softcap=3.0,
    )
    assert out.shape == (1, t, h, d)
    assert torch.equal(pool[1, 0][:, slots], new_k) and torch.equal(pool[1, 1][:, slots], new_v)
    assert pool[0].isnan().all(), "another layer's pool was touched"
    assert_rel_close(out[0], case.reference(0.2, softcap=3.0), torch.float32)


def test_plan_splits_short_queries_over_long_contexts_only() -> None:
    def step(num_seqs: int, num_tokens: int, max_query: int, max_seq: int) -> DeviceStep:
        empty = torch.empty(0)
        return DeviceStep(empty, empty, empty, 16, num_seqs, num_tokens, max_query, max_seq)

    h100 = 264  # 2 programs per SM
    decode_b1 = pa.plan_launch(step(1, 1, 1, 8192), 8, 4, h100)
    assert (decode_b1.block_m, decode_b1.block_q, decode_b1.segments) == (16, 4, 16)
    extend = pa.plan_launch(step(1, 10, 10, 8202), 8, 4, h100)  # an intrinsic's invocation over 8K keys
    assert (extend.block_m, extend.block_q, extend.segments) == (64, 16, 16)  # its 10 tokens in one block
    assert pa.plan_launch(step(8, 80, 10, 8202), 8, 4, h100).segments == 4
    assert pa.plan_launch(step(4, 7, 4, 8202), 8, 4, h100).block_m == 16  # 4 tokens x 4 heads
    assert pa.plan_launch(step(32, 32, 1, 2048), 8, 4, h100).segments == 1  # 320 programs fill the GPU
    assert pa.plan_launch(step(1, 1, 1, 300), 8, 4, h100).segments == 1  # too few keys to split
    prefill = pa.plan_launch(step(2, 600, 512, 4096), 8, 4, h100)
    assert (prefill.block_m, prefill.segments) == (64, 1)
    assert pa.plan_launch(step(1, 1, 1, 8192), 1, 32, h100).block_m == 32  # 32 heads per kv head: one token


@pytest.mark.slow
def test_engine_on_the_kernel_path_matches_peft(
    make_engine: Callable[..., Engine], oracle: PeftOracle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole engine with the paged kernel forced (under the interpreter on CPU): a base turn, an
    aLoRA intrinsic on the cached conversation (a fork), a LoRA recompute, and all of them batched
    together with chunked prefill, each equal to PEFT's tokens and logits."""
    from alora_core import engine as engine_module

    monkeypatch.setattr(engine_module, "paged_kernel_available", lambda device: True)
    launches: list[int] = []
    real = pa.paged_attention

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        launches.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pa, "paged_attention", spy)
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=48, prefill_chunk_tokens=24)
    assert engine.ctx.buffers is not None
    steps: list[int] = []
    engine.scheduler.step_observers.append(lambda work: steps.append(len(work)))
    history = random_ids(37, seed=700)
    assert_matches(engine.generate("c", history, GREEDY), oracle, None, history)
    history = engine.conversation_tokens("c")
    certainty = list(engine.adapters.get("certainty").spec.invocation_tokens or ())
    assert_matches(engine.intrinsic("certainty", "c", None, GREEDY), oracle, "certainty", history + certainty)
    assert launches, "the kernel was not used"

    assert_mixed_batch_matches(
        engine,
        oracle,
        "c",
        ("certainty", "answerability"),
        random_ids(29, seed=701),
        random_ids(40, seed=702),
    )
    layers = engine.loaded.shape.num_layers
    assert len(launches) == layers * len(steps), "every layer of every step attends on the kernel"
    assert max(steps) >= 3  # base, aLoRA forks and LoRA rows really shared steps


@pytest.mark.slow
@pytest.mark.parametrize("path", ["kernel", "reference"])
def test_bf16_engine_is_as_close_to_float32_as_peft_bf16(
    make_engine: Callable[..., Engine],
    oracle: PeftOracle,
    demo: DemoPaths,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
) -> None:
    """bfloat16 engine logits against the float32 PEFT oracle, beside PEFT's own bfloat16 run: prefill
    (a base turn) and the short-query path (an aLoRA intrinsic over the cached conversation). The two
    bf16 runs round differently, so per-logit errors differ either way; their RMS over every logit of
    4 contexts agrees within ~10% (a wrong key or a lost rescale is 10-100x off). The reference path is
    the CPU one on CPU and the gather+SDPA one on CUDA."""
    from alora_core import engine as engine_module

    monkeypatch.setattr(engine_module, "paged_kernel_available", lambda device: path == "kernel")
    engine = make_engine(dtype="bfloat16")
    assert (engine.ctx.buffers is not None) == (path == "kernel")
    low = PeftOracle(demo, torch.bfloat16)
    one = SamplingParams(max_tokens=1, return_logits=True)
    ours, peft = [], []
    for seed in range(4):
        history = random_ids(70, seed=800 + seed)
        contexts = [(None, history)]
        result = engine.generate(f"c{seed}", history, one)
        assert result.logits is not None
        logits = [result.logits[0]]
        invocation = list(engine.adapters.get("certainty").spec.invocation_tokens or ())
        contexts.append(("certainty", engine.conversation_tokens(f"c{seed}") + invocation))
        result = engine.intrinsic("certainty", f"c{seed}", None, one)
        assert result.logits is not None
        logits.append(result.logits[0])
        for (adapter, context), got in zip(contexts, logits, strict=True):
            exact = oracle.generate(adapter, context, 1)[1][0]
            ours.append(got.float() - exact)
            peft.append(low.generate(adapter, context, 1)[1][0] - exact)
    rms_ours, rms_peft = (torch.cat(e).pow(2).mean().sqrt().item() for e in (ours, peft))
    assert rms_peft > 1e-3, "PEFT's bf16 run should differ from float32"
    assert rms_ours <= 1.2 * rms_peft, f"bf16 engine RMS error {rms_ours:.4f} vs PEFT bf16 {rms_peft:.4f}"


COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from alora_core.model import paged_attention_triton as pa

    def compile(jit, arch, pointers, meta, floats=()):
        names = list(inspect.signature(jit.fn).parameters)
        signature = {
            n: "constexpr" if n in meta else pointers.get(n, "fp32" if n in floats else "i32") for n in names
        }
        compiled = triton.compile(
            ASTSource(fn=jit, signature=signature, constexprs=meta),
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": pa.NUM_WARPS, "num_stages": pa.NUM_STAGES},
        )
        assert compiled.asm["cubin"], (jit, arch, meta)

    # (arch, dtype, head_dim, groups, block_m, split, softcap, window, sinks): the Llama-3-8B shape's
    # decode, extend and prefill tiles on H100 and A100, then other dtypes, head dims and every feature
    CASES = [
        (90, "bf16", 128, 4, 16, True, False, False, False),
        (90, "bf16", 128, 4, 64, True, False, False, False),
        (90, "bf16", 128, 4, 32, False, False, False, False),
        (90, "bf16", 128, 4, 64, False, False, False, False),
        (80, "bf16", 128, 4, 16, True, False, False, False),
        (90, "fp16", 64, 8, 16, False, True, True, True),
        (90, "fp32", 64, 1, 64, True, True, True, False),
        (80, "fp16", 96, 3, 32, True, False, True, False),
    ]
    for arch, dt, dim, groups, block_m, split, softcap, window, sinks in CASES:
        dim_p, groups_p = triton.next_power_of_2(dim), triton.next_power_of_2(groups)
        pointers = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "out_ptr", "sinks_ptr")}
        pointers.update({n: "*fp32" for n in ("part_acc_ptr", "part_max_ptr", "part_sum_ptr")})
        pointers.update({n: "*i32" for n in ("block_tables_ptr", "seq_lens_ptr", "query_start_ptr")})
        meta = {
            "GROUPS": groups, "HEAD_DIM": dim, "HEAD_DIM_P": dim_p, "BLOCK_SIZE": 16, "BLOCK_M": block_m,
            "BLOCK_Q": max(1, block_m // groups), "TILE_N": pa.TILE_N, "SPLIT": split, "SOFTCAP": softcap,
            "WINDOW": window, "SINKS": sinks, "DOT_PRECISION": "ieee" if dt == "fp32" else "tf32", "UPCAST": False,
        }
        compile(pa._attention_kernel, arch, pointers, meta, floats=("scale", "softcap"))
        if split:
            reduce_pointers = {"out_ptr": f"*{dt}", "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32"}
            reduce_meta = {"GROUPS": groups, "GROUPS_P": groups_p, "HEAD_DIM": dim, "HEAD_DIM_P": dim_p, "SEGMENTS_P": 16}
            compile(pa._reduce_kernel, arch, reduce_pointers, reduce_meta)
        kv_pointers = {n: f"*{dt}" for n in ("key_ptr", "value_ptr", "k_cache_ptr", "v_cache_ptr")}
        kv_pointers["slots_ptr"] = "*i64"
        compile(pa._write_kv_kernel, arch, kv_pointers, {"KV_HEADS": 8, "KV_HEADS_P": 8, "HEAD_DIM": dim, "HEAD_DIM_P": dim_p})
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
