"""The masked-LoRA op against its per-token definition: y[t] += s[a] * B[a] @ (A[a] @ x[t]) where a = idx[t] >= 0:
the torch paths (reference, stacked, one adapter) and the CPU kernel (csrc/masked_lora_cpu.c)."""

import pytest
import torch

from alora_core.lora import layer as layer_module
from alora_core.lora.adapters import LoraWeights
from alora_core.lora.layer import MaskedLoRALinear
from alora_core.lora.ops import (
    KernelTable,
    StackedLora,
    masked_lora_kernel,
    masked_lora_reference,
    masked_lora_stacked,
)
from alora_core.model import cpu_kernels
from alora_core.model.batch import ForwardContext, LoraBatch, StepBatch
from alora_core.model.cpu_kernels import MASKED_LORA_MAX_RANK, CpuKernels


def test_masked_lora_matches_per_token_definition() -> None:
    gen = torch.Generator().manual_seed(0)
    tokens, d_in, d_out = 23, 12, 9
    weights = {
        0: LoraWeights(torch.randn(4, d_in, generator=gen), torch.randn(d_out, 4, generator=gen), 0.5),
        2: LoraWeights(torch.randn(8, d_in, generator=gen), torch.randn(d_out, 8, generator=gen), 2.0),
        # slot 1 is in the batch but does not target this layer
    }
    idx = torch.randint(-1, 3, (tokens,), generator=gen)
    idx[:3] = torch.tensor([-1, 1, 2])
    x = torch.randn(tokens, d_in, generator=gen)
    y0 = torch.randn(tokens, d_out, generator=gen)

    expected = y0.clone()
    for t in range(tokens):
        a = int(idx[t])
        if a >= 0 and a in weights:
            w = weights[a]
            expected[t] += w.scale * (w.b @ (w.a @ x[t]))

    y = y0.clone()
    batch = LoraBatch.from_index(idx)
    assert batch is not None
    masked_lora_reference(y, x, batch.rows_by_slot, weights)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    untouched = (idx < 0) | (idx == 1)
    assert torch.equal(y[untouched], y0[untouched])


def test_all_base_batch_has_no_lora_work() -> None:
    assert LoraBatch.from_index(torch.full((5,), -1)) is None


def test_single_adapter_covering_every_row() -> None:
    gen = torch.Generator().manual_seed(1)
    w = LoraWeights(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen), 1.5)
    x = torch.randn(7, 6, generator=gen)
    y0 = torch.randn(7, 5, generator=gen)
    batch = LoraBatch.from_index(torch.full((7,), 3))
    assert batch is not None
    y = y0.clone()
    masked_lora_reference(y, x, batch.rows_by_slot, {3: w})
    expected = torch.stack([y0[t] + w.scale * (w.b @ (w.a @ x[t])) for t in range(7)])
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def _per_token(
    y0: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, weights: dict[int, LoraWeights]
) -> torch.Tensor:
    expected = y0.clone()
    for t in range(len(idx)):
        w = weights.get(int(idx[t]))
        if w is not None:
            expected[t] += w.scale * (w.b @ (w.a @ x[t]))
    return expected


@pytest.mark.parametrize("counts", [(1, 1, 1, 1), (7, 7, 7), (5, 1, 3), (16, 2)])
def test_stacked_lora_matches_per_token_definition(counts: tuple[int, ...]) -> None:
    """Several slots in one bmm pair: equal row counts (no padding) and unequal ones, ranks 4 and 8, rows
    of the slots interleaved with base rows."""
    gen = torch.Generator().manual_seed(len(counts))
    d_in, d_out = 12, 9
    weights = {
        slot: LoraWeights(
            torch.randn(rank, d_in, generator=gen), torch.randn(d_out, rank, generator=gen), 0.5 + slot
        )
        for slot, rank in zip(range(len(counts)), (4, 8, 4, 8), strict=False)
    }
    idx = torch.cat([torch.full((n,), slot) for slot, n in enumerate(counts)] + [torch.full((3,), -1)])
    idx = idx[torch.randperm(len(idx), generator=gen)]
    x = torch.randn(len(idx), d_in, generator=gen)
    y0 = torch.randn(len(idx), d_out, generator=gen)
    batch = LoraBatch.from_index(idx)
    assert batch is not None
    slots = tuple(batch.rows_by_slot)
    rows = batch.slot_rows(slots)
    assert (rows.real is None) == (len(set(counts)) == 1)
    assert batch.slot_rows(slots) is rows  # built once a step
    y = y0.clone()
    masked_lora_stacked(y, x, rows, StackedLora.build(tuple(weights[s] for s in slots)))
    torch.testing.assert_close(y, _per_token(y0, x, idx, weights), atol=1e-5, rtol=1e-5)
    assert torch.equal(y[idx < 0], y0[idx < 0])


def test_layer_serves_several_adapters_stacked_and_rebuilds_on_reload(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The wrapped linear takes the stacked path for several slots (reference path for one), and a slot
    reloaded with new weights is never served from the old stack."""
    gen = torch.Generator().manual_seed(5)
    base = torch.nn.Linear(6, 5)
    ctx = ForwardContext()
    layer = MaskedLoRALinear(base, ctx, use_kernel=False)

    def weights() -> LoraWeights:
        return LoraWeights(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen), 2.0)

    ws = {0: weights(), 3: weights()}
    for slot, w in ws.items():
        layer.set_slot(slot, w)
    idx = torch.tensor([0, 3, -1, 3, 0, 0])
    x = torch.randn(6, 6, generator=gen)
    stacked_calls = []
    monkeypatch.setattr(
        layer_module, "masked_lora_stacked", lambda *a: stacked_calls.append(1) or masked_lora_stacked(*a)
    )

    def run() -> torch.Tensor:
        lora = LoraBatch.from_index(idx)
        batch = StepBatch(idx, idx, idx, (), torch.empty(0), lora, idx)
        with torch.no_grad(), ctx.bind(batch):
            return layer(x)

    torch.testing.assert_close(run(), _per_token(base(x).detach(), x, idx, ws), atol=1e-5, rtol=1e-5)
    ws[3] = weights()
    layer.set_slot(3, ws[3])
    torch.testing.assert_close(run(), _per_token(base(x).detach(), x, idx, ws), atol=1e-5, rtol=1e-5)
    assert len(stacked_calls) == 2
    idx = torch.tensor([0] * 19 + [3])  # 18 padded rows for one adapter saved: separate ops instead
    x = torch.randn(20, 6, generator=gen)
    torch.testing.assert_close(run(), _per_token(base(x).detach(), x, idx, ws), atol=1e-5, rtol=1e-5)
    assert len(stacked_calls) == 2
    idx, x = idx[-6:], x[-6:]
    layer.clear_slot(0)
    del ws[0]
    torch.testing.assert_close(run(), _per_token(base(x).detach(), x, idx, ws), atol=1e-5, rtol=1e-5)
    assert len(stacked_calls) == 2  # one adapter left: the reference path


def test_layer_takes_the_one_adapter_fast_path_only_when_every_row_uses_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A step whose every row uses one adapter (a LoRA request, an aLoRA decoding) skips the per-slot
    loop; a step with base rows, or a slot this layer does not serve, still gets the per-token result."""
    gen = torch.Generator().manual_seed(6)
    base = torch.nn.Linear(6, 5)
    ctx = ForwardContext()
    layer = MaskedLoRALinear(base, ctx, use_kernel=False)
    ws = {2: LoraWeights(torch.randn(4, 6, generator=gen), torch.randn(5, 4, generator=gen), 1.5)}
    layer.set_slot(2, ws[2])
    loops = []
    monkeypatch.setattr(
        layer_module, "masked_lora_reference", lambda *a: loops.append(1) or masked_lora_reference(*a)
    )

    def run(idx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        lora = LoraBatch.from_index(idx)
        batch = StepBatch(idx, idx, idx, (), torch.empty(0), lora, idx)
        with torch.no_grad(), ctx.bind(batch):
            return layer(x)

    for idx, loop in [
        (torch.full((5,), 2), False),  # every row: fast path
        (torch.tensor([2, 2, -1, 2]), True),  # a base row among them
        (torch.full((3,), 7), False),  # one slot, not this layer's: base output only
    ]:
        x = torch.randn(len(idx), 6, generator=gen)
        loops.clear()
        assert (LoraBatch.from_index(idx).single is not None) == (len(set(idx.tolist())) == 1)  # type: ignore[union-attr]
        torch.testing.assert_close(
            run(idx, x), _per_token(base(x).detach(), x, idx, ws), atol=1e-5, rtol=1e-5
        )
        assert bool(loops) == loop


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    loaded = cpu_kernels.load()
    assert loaded is not None, "the CPU kernels must build on the test machine (a C compiler is installed)"
    return loaded


@pytest.mark.parametrize(
    ("d_in", "d_out", "ranks", "rows"),
    [
        (12, 9, (4, 8, 17), 23),  # nothing a multiple of the vector width
        (64, 70, (16, 32, 1), 5),  # an output past one block of 64 columns
        (512, 512, (32, 32, 32, 32), 4),  # a fan-out decode step of the bench model
        (40, 33, (MASKED_LORA_MAX_RANK, 3), 64),  # the largest rank the kernel takes; KERNEL_MAX_ROWS rows
        (16, 8, (2,), 1),  # one row: the calling thread
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_matches_per_token_definition(
    kernels: CpuKernels, d_in: int, d_out: int, ranks: tuple[int, ...], rows: int, dtype: torch.dtype
) -> None:
    """The C kernel on every row of every slot; base rows (-1), a slot the layer lacks (one past its
    last) and a slot beyond its table untouched. x with a row stride, y a column view of a wider output
    (a fused q/k/v product). In bfloat16 the result is the exact one rounded once (within one unit in
    the last place: the kernel sums in float32)."""
    gen = torch.Generator().manual_seed(d_in + rows)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype)

    weights = {2 * i: LoraWeights(randn(r, d_in), randn(d_out, r), 0.25 + i) for i, r in enumerate(ranks)}
    slots = [*weights, 1, -1, 2 * len(ranks), 1000]
    idx = torch.tensor([slots[i % len(slots)] for i in range(rows)])[torch.randperm(rows, generator=gen)]
    x = randn(rows, d_in + 3)[:, 2 : 2 + d_in]
    wide = randn(rows, d_out + 7)
    y = wide[:, 5 : 5 + d_out]
    as_double = {s: LoraWeights(w.a.double(), w.b.double(), w.scale) for s, w in weights.items()}
    expected = _per_token(y.double(), x.double(), idx, as_double)  # the oracle in float64
    outside = wide.clone()
    masked_lora_kernel(kernels, y, x, idx, KernelTable(weights))
    largest = float(expected.abs().max())
    if dtype == torch.float32:
        torch.testing.assert_close(y.double(), expected, atol=2e-6 * largest, rtol=1e-5)
    else:
        torch.testing.assert_close(y.double(), expected, atol=1e-5 * largest, rtol=2**-8)
    untouched = ~torch.isin(idx, torch.tensor(list(weights)))
    assert torch.equal(y[untouched], outside[:, 5 : 5 + d_out][untouched])
    assert torch.equal(wide[:, :5], outside[:, :5]) and torch.equal(
        wide[:, 5 + d_out :], outside[:, 5 + d_out :]
    )


def test_cpu_kernel_rows_do_not_depend_on_the_rest_of_the_step(kernels: CpuKernels) -> None:
    """Batch invariance: a row's delta is the same bits alone and among others (threads split rows)."""
    gen = torch.Generator().manual_seed(9)
    weights = {
        s: LoraWeights(torch.randn(8, 48, generator=gen), torch.randn(40, 8, generator=gen), 2.0)
        for s in range(3)
    }
    table = KernelTable(weights)
    idx = torch.tensor([0, 1, -1, 2, 2, 0, 1])
    x = torch.randn(len(idx), 48, generator=gen)
    together = torch.zeros(len(idx), 40)
    masked_lora_kernel(kernels, together, x, idx, table)
    for r in range(len(idx)):
        alone = torch.zeros(1, 40)
        masked_lora_kernel(kernels, alone, x[r : r + 1], idx[r : r + 1], table)
        assert torch.equal(alone[0], together[r])


def test_layer_takes_the_cpu_kernel_for_short_float32_steps(
    kernels: CpuKernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the kernels bound to the step, a float32 or bfloat16 step of up to KERNEL_MAX_ROWS rows with
    several adapters (KERNEL_MAX_ROWS_ONE_ADAPTER with one) is one kernel call; longer steps, float16
    layers and ranks past the kernel's take torch."""
    gen = torch.Generator().manual_seed(10)
    calls = []
    monkeypatch.setattr(
        layer_module, "masked_lora_kernel", lambda *a: calls.append(1) or masked_lora_kernel(*a)
    )

    def check(
        dtype: torch.dtype, rank: int, rows: int, kernel: bool, slots: tuple[int, ...] = (0, 1, -1)
    ) -> None:
        base = torch.nn.Linear(16, 24, dtype=dtype)
        ctx = ForwardContext()
        layer = MaskedLoRALinear(base, ctx, use_kernel=False)
        ws = {
            s: LoraWeights(
                torch.randn(rank, 16, generator=gen).to(dtype),
                torch.randn(24, rank, generator=gen).to(dtype),
                0.5,
            )
            for s in (0, 1)
        }
        for s, w in ws.items():
            layer.set_slot(s, w)
        idx = torch.tensor(slots)[torch.arange(rows) % len(slots)]
        x = torch.randn(rows, 16, generator=gen).to(dtype)
        lora = LoraBatch.from_index(idx)
        batch = StepBatch(idx, idx, idx, (), torch.empty(0), lora, idx, cpu_kernels=kernels)
        calls.clear()
        with torch.no_grad(), ctx.bind(batch):
            y = layer(x)
        tol = 1e-4 if dtype == torch.float32 else 5e-2  # half precision: the torch path rounds A x too
        expected = _per_token(
            base(x).detach().float(),
            x.float(),
            idx,
            {s: LoraWeights(w.a.float(), w.b.float(), w.scale) for s, w in ws.items()},
        )
        torch.testing.assert_close(y.float(), expected, atol=tol, rtol=tol)
        assert bool(calls) == kernel

    check(torch.float32, 8, 7, kernel=True)
    check(torch.float32, 8, layer_module.KERNEL_MAX_ROWS, kernel=True)
    check(torch.float32, 8, layer_module.KERNEL_MAX_ROWS + 1, kernel=False)
    check(torch.float32, 8, layer_module.KERNEL_MAX_ROWS_ONE_ADAPTER, kernel=True, slots=(1,))
    check(torch.float32, 8, layer_module.KERNEL_MAX_ROWS_ONE_ADAPTER + 1, kernel=False, slots=(1,))
    check(torch.float32, MASKED_LORA_MAX_RANK + 1, 5, kernel=False)
    check(torch.bfloat16, 8, 5, kernel=True)
    check(torch.float16, 8, 5, kernel=False)
