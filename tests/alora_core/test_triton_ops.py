"""The fused masked-LoRA kernels (lora/triton_ops.py) against the torch reference (lora/ops.py).

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set
before triton_ops is imported and restored right after: triton fixes the mode when a kernel is
decorated, so no other test sees it); with one they run compiled on CUDA. Inputs and outputs are
strided views inside NaN-filled buffers, and the kernel's partial sums are NaN-filled too, so any
read or write outside its rows, and any partial left unwritten, shows up. One test compiles the
kernels for sm_80 and sm_90 (PTX + cubin, no GPU needed) in a clean subprocess.
"""

import math
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from alora_core.lora.adapters import LoraWeights
from alora_core.lora.ops import masked_lora_reference
from alora_core.model.batch import ForwardContext, LoraBatch, StepBatch
from tests.alora_core.interpreted_triton import triton_ops  # first: the kernels in the tests' Triton mode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")

from alora_core import Engine, SamplingParams  # noqa: E402
from alora_core.lora import layer, registry  # noqa: E402
from alora_core.lora.layer import MaskedLoRALinear, install, warm_up_kernels  # noqa: E402
from alora_core.lora.triton_ops import LoraStack, masked_lora_triton, token_blocks  # noqa: E402
from tests.alora_core.conftest import PeftOracle, random_ids  # noqa: E402
from tests.alora_core.test_engine_parity import assert_mixed_batch_matches  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# max |kernel - reference| / max(1, max |reference|): about two roundings of the output dtype
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


@pytest.fixture(autouse=True)
def poisoned_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Shrink partial sums start as NaN: one the kernel forgets to write poisons the output."""
    monkeypatch.setattr(
        triton_ops, "_partials", lambda *shape, device: torch.full(shape, math.nan, device=device)
    )


def random_weights(
    ranks: dict[int, int], d_in: int, d_out: int, dtype: torch.dtype, gen: torch.Generator
) -> dict[int, LoraWeights]:
    return {
        slot: LoraWeights(
            (torch.randn(r, d_in, generator=gen) / d_in**0.5).to(DEVICE, dtype),
            (torch.randn(d_out, r, generator=gen) / r**0.5).to(DEVICE, dtype),
            float(torch.empty(1).uniform_(0.25, 2.0, generator=gen)),
        )
        for slot, r in ranks.items()
    }


def poisoned_copy(t: torch.Tensor, transpose: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(view, buffer): t copied into a strided view of a NaN-filled buffer."""
    rows, cols = t.shape
    if transpose:  # column stride != 1
        buf = torch.full((cols + 3, rows + 2), math.nan, dtype=t.dtype, device=t.device)
        view = buf[1 : 1 + cols, 2 : 2 + rows].t()
    else:  # row stride != cols
        buf = torch.full((rows + 2, cols + 5), math.nan, dtype=t.dtype, device=t.device)
        view = buf[1 : 1 + rows, 3 : 3 + cols]
    view.copy_(t)
    return view, buf


def outside_is_nan(view: torch.Tensor, buf: torch.Tensor) -> bool:
    """Every element of buf that view does not cover is still NaN."""
    covered = torch.zeros_like(buf, dtype=torch.bool)
    covered.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
    return bool(buf[~covered].isnan().all())


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    scale = max(1.0, ref.float().abs().max().item())
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, (
        f"{dtype}: max error {err:.3g} vs bound {REL_TOL[dtype] * scale:.3g}"
    )


def run_and_check(
    idx: torch.Tensor,
    weights: dict[int, LoraWeights],
    d_in: int,
    d_out: int,
    dtype: torch.dtype,
    gen: torch.Generator,
    x_transposed: bool = False,
    y_transposed: bool = False,
) -> LoraStack:
    """Kernel on poisoned views vs the reference: adapted rows close, other rows and bytes untouched."""
    tokens = idx.numel()
    x_data = torch.randn(tokens, d_in, generator=gen).to(DEVICE, dtype)
    y0 = torch.randn(tokens, d_out, generator=gen).to(DEVICE, dtype)
    stack = LoraStack(d_in, [d_out], dtype, DEVICE)
    for slot, w in weights.items():
        stack.put(slot, 0, w)
    x, x_buf = poisoned_copy(x_data, x_transposed)
    y, y_buf = poisoned_copy(y0, y_transposed)
    x_before = x_buf.clone()

    batch = LoraBatch.from_index(idx.to(DEVICE))
    ref = y0.clone()
    if batch is not None:
        masked_lora_reference(ref, x_data, batch.rows_by_slot, weights)
        masked_lora_triton([y], x, token_blocks(batch), stack)

    assert_rel_close(y, ref, dtype)
    untouched = (idx < 0) | torch.tensor([int(a) not in weights for a in idx])
    assert torch.equal(y[untouched.to(DEVICE)], y0[untouched.to(DEVICE)])  # bit for bit
    assert outside_is_nan(y, y_buf), "the kernel wrote outside y"
    assert torch.equal(x_buf.isnan(), x_before.isnan()) and torch.equal(
        x_buf.nan_to_num(), x_before.nan_to_num()
    )
    return stack


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seed", range(5))
def test_random_shapes_ranks_and_adapter_mixes(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    d_in, d_out = (int(v) for v in torch.randint(16, 129, (2,), generator=gen))
    tokens = int(torch.randint(1, 41, (1,), generator=gen))
    n_adapters = int(torch.randint(1, 5, (1,), generator=gen))
    slots = torch.randperm(6, generator=gen)[:n_adapters].tolist()
    rank_choices = torch.tensor([1, 4, 8, 16, 24, 33, 64])
    ranks = {s: int(rank_choices[torch.randint(0, 7, (1,), generator=gen)]) for s in slots}
    weights = random_weights(ranks, d_in, d_out, dtype, gen)
    # -1 rows, adapters with weights here, and slot 7: in the batch but not targeting this layer
    choices = torch.tensor([-1, 7, *slots])
    idx = choices[torch.randint(0, len(choices), (tokens,), generator=gen)]
    run_and_check(idx, weights, d_in, d_out, dtype, gen, x_transposed=seed % 2 == 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rank_128_next_to_rank_8_with_few_tokens(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(10)
    weights = random_weights({0: 128, 3: 8}, 96, 80, dtype, gen)
    stack = run_and_check(torch.tensor([3, 0, -1, 0, 3]), weights, 96, 80, dtype, gen)
    assert stack.weights.rank_block == 128


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_token(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    run_and_check(torch.tensor([2]), random_weights({2: 16}, 64, 48, dtype, gen), 64, 48, dtype, gen)


def test_no_masked_token_one_adapter_and_many() -> None:
    gen = torch.Generator().manual_seed(12)
    weights = random_weights({0: 8, 1: 4, 5: 32}, 40, 72, torch.float32, gen)
    run_and_check(torch.full((17,), 5), weights, 40, 72, torch.float32, gen)
    run_and_check(torch.tensor([0, 1, 5] * 7), weights, 40, 72, torch.float32, gen)


def test_all_masked_batches_leave_y_untouched() -> None:
    gen = torch.Generator().manual_seed(13)
    weights = random_weights({0: 8}, 32, 32, torch.float32, gen)
    assert LoraBatch.from_index(torch.full((9,), -1)) is None  # nothing to launch at all
    run_and_check(torch.full((9,), -1), weights, 32, 32, torch.float32, gen)
    no_adapter_here = torch.tensor([4, -1, 4, 6])
    run_and_check(no_adapter_here, weights, 32, 32, torch.float32, gen)


def test_non_unit_column_stride_output() -> None:
    gen = torch.Generator().manual_seed(14)
    weights = random_weights({1: 12}, 48, 40, torch.float16, gen)
    run_and_check(torch.tensor([1, -1, 1, 1]), weights, 48, 40, torch.float16, gen, True, True)


def test_long_segments_use_wide_blocks_and_short_ones_split_work(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(15)
    weights = random_weights({0: 16, 1: 32}, 64, 64, torch.bfloat16, gen)
    long_idx = torch.tensor([0] * 70 + [1] * 66 + [-1] * 5)[torch.randperm(141, generator=gen)]
    batch = LoraBatch.from_index(long_idx)
    assert batch is not None and token_blocks(batch).block_m == triton_ops.LARGE_BLOCK_M
    run_and_check(long_idx, weights, 64, 64, torch.bfloat16, gen)

    shapes: list[tuple[int, ...]] = []
    real = triton_ops._partials
    monkeypatch.setattr(
        triton_ops, "_partials", lambda *s, device: shapes.append(s) or real(*s, device=device)
    )
    run_and_check(torch.tensor([1, -1]), weights, 64, 64, torch.bfloat16, gen)
    if not CUDA:  # one block on a small "GPU": the reduction is split across programs
        assert shapes[-1][0] > 1


def test_stack_follows_load_unload_slot_reuse_and_growth() -> None:
    gen = torch.Generator().manual_seed(16)
    d_in, d_out, dtype = 56, 24, torch.float32
    big, small, far = (
        random_weights({s: r}, d_in, d_out, dtype, gen)[s] for s, r in ((0, 64), (0, 8), (5, 100))
    )
    stack = LoraStack(d_in, [d_out], dtype, DEVICE)
    idx = torch.tensor([0, 5, -1, 0, 5, 0]).to(DEVICE)
    x = torch.randn(6, d_in, generator=gen).to(DEVICE, dtype)

    def check(loaded: dict[int, LoraWeights]) -> None:
        y0 = torch.randn(6, d_out, generator=gen).to(DEVICE, dtype)
        ref, y = y0.clone(), y0.clone()
        batch = LoraBatch.from_index(idx)
        assert batch is not None
        masked_lora_reference(ref, x, batch.rows_by_slot, loaded)
        masked_lora_triton([y], x, token_blocks(batch), stack)
        assert_rel_close(y, ref, dtype)

    stack.put(0, 0, big)
    check({0: big})
    stack.drop(0, 0)
    check({})
    stack.put(0, 0, small)  # a smaller rank in a reused slot: the old adapter's tail must be gone
    check({0: small})
    stack.put(5, 0, far)  # grows to 8 slots and rank 128 (a copy), keeping slot 0
    assert (stack.weights.num_slots, stack.weights.rank_block) == (8, 128)
    check({0: small, 5: far})
    assert stack.slots == {0, 5}


class Attention(nn.Module):
    def __init__(self, hidden: int, kv: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, kv)
        self.v_proj = nn.Linear(hidden, kv, bias=False)
        self.o_proj = nn.Linear(hidden, hidden)


def step_batch(idx: torch.Tensor) -> StepBatch:
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    return StepBatch(empty, empty, empty, (), empty, LoraBatch.from_index(idx.to(DEVICE)), empty)


@pytest.fixture
def launches(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Number of slices served by each masked_lora_triton call."""
    calls: list[int] = []
    real = triton_ops.masked_lora_triton

    def spy(ys: list[torch.Tensor], *args: object, **kwargs: object) -> None:
        calls.append(len(ys))
        real(ys, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(triton_ops, "masked_lora_triton", spy)
    yield calls


def attention_with_adapters(dtype: torch.dtype) -> tuple[Attention, ForwardContext]:
    gen = torch.Generator().manual_seed(17)
    torch.manual_seed(17)
    block = Attention(64, 32).to(DEVICE, dtype)
    ctx = ForwardContext()
    targets = {0: ("q_proj", "v_proj"), 3: ("q_proj", "k_proj", "v_proj"), 1: ("o_proj",)}
    ranks = {0: 8, 3: 20, 1: 4}
    for name in ("q_proj", "o_proj", "v_proj", "k_proj"):  # k joins the group last: the stack is rebuilt
        wrapper = install(block, name, ctx, use_kernel=True)
        for slot, names in targets.items():
            if name in names:
                w = random_weights({slot: ranks[slot]}, 64, wrapper.out_features, dtype, gen)[slot]
                wrapper.set_slot(slot, w)
    return block, ctx


def reference_outputs(
    block: Attention, x: torch.Tensor, idx: torch.Tensor, names: tuple[str, ...]
) -> list[torch.Tensor]:
    batch = LoraBatch.from_index(idx.to(DEVICE))
    out = []
    for name in names:
        wrapper = getattr(block, name)
        assert isinstance(wrapper, MaskedLoRALinear)
        y = wrapper.base_layer(x)
        if batch is not None:
            masked_lora_reference(
                y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]), batch.rows_by_slot, wrapper.slots
            )
        out.append(y)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_q_k_v_share_one_launch(dtype: torch.dtype, launches: list[int]) -> None:
    block, ctx = attention_with_adapters(dtype)
    idx = torch.tensor([0, 3, -1, 3, 1, 2, 0, 3, -1, 1, 1])  # slot 2: in the batch, no weights here
    x = torch.randn(1, idx.numel(), 64).to(DEVICE, dtype)
    with ctx.bind(step_batch(idx)):
        q, k, v = block.q_proj(x), block.k_proj(x), block.v_proj(x)
        o = block.o_proj(q)
    assert launches == [3, 1]  # q|k|v in one launch pair, o_proj alone
    for out, ref in zip(
        (q, k, v, o),
        reference_outputs(block, x, idx, ("q_proj", "k_proj", "v_proj"))
        + reference_outputs(block, q, idx, ("o_proj",)),
        strict=True,
    ):
        assert_rel_close(out, ref, dtype)


def test_group_skips_launch_without_its_adapters_and_serves_unshared_inputs(launches: list[int]) -> None:
    block, ctx = attention_with_adapters(torch.float32)
    x = torch.randn(1, 6, 64).to(DEVICE)
    idx = torch.tensor([1, 2, -1, 2, 1, 1])  # only o_proj's adapter and a slot without weights
    with ctx.bind(step_batch(idx)):
        q = block.q_proj(x)
    assert launches == []
    assert torch.equal(q, block.q_proj.base_layer(x))

    idx = torch.tensor([0, 3, 3, -1, 0, 3])
    x1, x2 = torch.randn(2, 1, 6, 64).to(DEVICE)
    with ctx.bind(step_batch(idx)):  # a model that feeds k and v another tensor than q
        outs = block.q_proj(x), block.k_proj(x1), block.v_proj(x2)
    refs = [
        reference_outputs(block, inp, idx, (name,))[0]
        for inp, name in zip((x, x1, x2), ("q_proj", "k_proj", "v_proj"), strict=True)
    ]
    for out, ref in zip(outs, refs, strict=True):
        assert_rel_close(out, ref, torch.float32)
    group = block.q_proj.group
    assert group is not None and not group.shares_input and launches == [3, 1, 1]


def test_warm_up_launches_every_group_shape_once_per_variant(launches: list[int]) -> None:
    """q|k|v (one shared-input group) and o_proj (its own): each warmed at 1, 2, 64 and 65 tokens (both
    token-block sizes, odd and even counts), and served exactly as before afterwards."""
    block, ctx = attention_with_adapters(torch.float32)

    assert warm_up_kernels(block) == 2
    assert sorted(launches) == [1] * 4 + [3] * 4
    launches.clear()
    idx = torch.tensor([0, 3, -1, 3, 1, 2, 0, 3, -1, 1, 1])
    x = torch.randn(1, idx.numel(), 64).to(DEVICE)
    with ctx.bind(step_batch(idx)):
        q = block.q_proj(x)
    assert_rel_close(q, reference_outputs(block, x, idx, ("q_proj",))[0], torch.float32)
    assert warm_up_kernels(nn.Linear(4, 4)) == 0  # no fused-kernel layers: nothing to do


@pytest.mark.slow
def test_engine_mixed_batch_on_the_kernel_path_matches_peft(
    make_engine: Callable[..., Engine],
    oracle: PeftOracle,
    monkeypatch: pytest.MonkeyPatch,
    launches: list[int],
) -> None:
    """Base, aLoRA (two formats) and LoRA requests batched together, through the fused path: PEFT's tokens and logits."""
    monkeypatch.setattr(layer, "lora_kernel_available", lambda device: True)
    monkeypatch.setattr(registry, "lora_kernel_available", lambda device: True)
    engine = make_engine(max_num_seqs=8, max_num_batched_tokens=64, prefill_chunk_tokens=32)
    wrappers = [m for m in engine.loaded.model.modules() if isinstance(m, MaskedLoRALinear)]
    assert wrappers and all(m.group is not None for m in wrappers)

    adapters_per_step: list[set[int]] = []
    engine.scheduler.step_observers.append(
        lambda work: adapters_per_step.append({seq.adapter_slot for seq, _, _ in work} - {None})
    )
    history = random_ids(21, seed=600)
    engine.generate("c", history, SamplingParams(max_tokens=2, ignore_eos=True))
    assert_mixed_batch_matches(
        engine,
        oracle,
        "c",
        ("certainty", "answerability"),
        random_ids(13, seed=601),
        random_ids(9, seed=602),
        timeout=300,
    )
    assert 3 in launches  # q|k|v groups served together
    assert max(len(slots) for slots in adapters_per_step) >= 2  # adapters really shared forwards


COMPILE_CHECK = textwrap.dedent(
    """
    import inspect
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from alora_core.lora import triton_ops

    POINTERS = {
        "x_ptr": "*{dt}", "a_ptr": "*{dt}", "b_ptr": "*{dt}", "y0_ptr": "*{dt}", "y1_ptr": "*{dt}",
        "y2_ptr": "*{dt}", "part_ptr": "*fp32", "scale_ptr": "*fp32", "blocks_ptr": "*i32", "rows_ptr": "*i64",
    }
    # every autotune config once (bf16, H100), then other dtypes / tile shapes / A100 on the first config
    CASES = [(90, "bf16", 16, 32, "tf32", None), (80, "fp16", 64, 128, "tf32", 1), (90, "fp32", 16, 64, "ieee", 1)]
    for arch, dt, block_m, rank, precision, configs in CASES:
        for kernel, tile in ((triton_ops._shrink_kernel, "BLOCK_K"), (triton_ops._expand_kernel, "BLOCK_N")):
            for config in kernel.configs[:configs]:
                jit = kernel.fn
                names = list(inspect.signature(jit.fn).parameters)
                meta = {"BLOCK_M": block_m, "BLOCK_R": rank, tile: config.kwargs[tile], "DOT_PRECISION": precision, "UPCAST": False}
                signature = {n: "constexpr" if n in meta else POINTERS.get(n, "i32").format(dt=dt) for n in names}
                compiled = triton.compile(
                    ASTSource(fn=jit, signature=signature, constexprs=meta),
                    target=GPUTarget("cuda", arch, 32),
                    options={"num_warps": config.num_warps, "num_stages": config.num_stages},
                )
                assert compiled.asm["cubin"], (arch, dt, tile)
    print("compiled")
    """
)


@pytest.mark.slow
def test_kernels_compile_for_sm80_and_sm90(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DEFAULT_FP_FUSION="1")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_CHECK], cwd=root, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-4000:]
