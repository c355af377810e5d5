"""CPU small-batch linear dispatch: the same products as F.linear, and the layout chosen by measurement."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alora_core.model import cpu_linear
from alora_core.model.cpu_linear import ROW_BUCKETS, CalibratedLinear


def scripted_timer(fast_rows: set[int]):
    """A timer that reports the transposed layout twice as fast at `fast_rows` and slower elsewhere.
    It tells the two layouts apart by running them: only the transposed one returns a copy of W @ x^T."""

    def timer(fn) -> float:
        out = fn()
        rows = out.shape[0]
        transposed = getattr(fn, "func", None) is cpu_linear._transposed_product
        if transposed:
            return 0.5 if rows in fast_rows else 1.2
        return 1.0

    return timer


def test_layout_is_the_measured_faster_one_per_row_bucket() -> None:
    model = nn.Sequential(nn.Linear(32, 48, bias=False), nn.Linear(48, 32))

    changed = cpu_linear.calibrate(model, timer=scripted_timer({4, 16}))

    assert changed == 2
    for layer in model:
        assert isinstance(layer, CalibratedLinear) and isinstance(layer, nn.Linear)
        assert [b for b, t in zip(ROW_BUCKETS, layer.transposed, strict=True) if t] == [4, 16]


def test_within_the_margin_stays_on_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_linear, "MARGIN", 0.4)  # 0.5 is not fast enough now
    model = nn.Sequential(nn.Linear(8, 8))
    assert cpu_linear.calibrate(model, timer=scripted_timer({1, 2})) == 0
    assert not any(model[0].transposed)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 3, 16, 33, 64, 65, 200])
def test_products_equal_f_linear_at_every_row_count(rows: int, bias: bool) -> None:
    gen = torch.Generator().manual_seed(rows)
    layer = nn.Linear(96, 80, bias=bias)
    cpu_linear.calibrate(layer, timer=scripted_timer(set(ROW_BUCKETS)))  # transposed wherever it may be
    x = torch.randn(1, rows, 96, generator=gen)

    out = layer(x)

    assert out.shape == (1, rows, 80)
    torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    # laid out as F.linear's: consumers (fused attention kernels) may assume unit-stride rows
    assert out.is_contiguous()


def test_real_measurement_is_cached_per_shape_and_skips_other_layers() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Embedding(4, 16))
    cpu_linear._choice.cache_clear()

    cpu_linear.calibrate(model)

    assert cpu_linear._choice.cache_info().misses == 1  # one shape, timed once
    cpu_linear.calibrate(nn.Sequential(nn.Linear(16, 16)))
    assert cpu_linear._choice.cache_info().hits == 1  # a later engine of the process reuses it
    assert model[0].transposed == model[1].transposed and type(model[2]) is nn.Embedding


def packed_timer(packed_times: dict[int, float]):
    """A timer that reports the packed layout at `packed_times[rows]` (default 0.9) of F.linear's 1.0 and
    the transposed one slower than both."""

    def timer(fn) -> float:
        rows = fn().shape[0]
        func = getattr(fn, "func", None)
        if func is cpu_linear._packed_product:
            return packed_times.get(rows, 0.9)
        return 1.2 if func is cpu_linear._transposed_product else 1.0

    return timer


def test_once_packed_the_weight_takes_the_packed_layout_wherever_it_is_fastest() -> None:
    model = nn.Sequential(nn.Linear(32, 48, bias=False))
    # packed wins by the margin only at 8 rows, is slightly faster elsewhere but at 64 rows
    cpu_linear.calibrate(model, timer=packed_timer({8: 0.5, 64: 1.1}))
    expected = ["linear" if b == 64 else "packed" for b in ROW_BUCKETS]
    assert list(model[0].methods) == expected and model[0].packed is not None


def test_a_weight_packed_nowhere_by_the_margin_stays_on_f_linear() -> None:
    model = nn.Sequential(nn.Linear(32, 48, bias=False))
    cpu_linear.calibrate(model, timer=packed_timer({}))  # 0.9 everywhere: within the margin
    assert set(model[0].methods) == {"linear"} and model[0].packed is None


def test_steps_above_the_largest_bucket_take_the_prefill_buckets_layout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = nn.Sequential(nn.Linear(32, 48, bias=False))
    cpu_linear.calibrate(model, timer=packed_timer({cpu_linear.PREFILL_ROWS: 0.5, 1: 1.5, 2: 1.5, 4: 1.5}))
    assert model[0].methods[-1] == "packed" and model[0].methods[:3] == ("linear",) * 3
    calls = []
    real = cpu_linear._packed_product
    monkeypatch.setattr(cpu_linear, "_packed_product", lambda *a: calls.append(a[1].shape[0]) or real(*a))
    x = torch.randn(3 * cpu_linear.PREFILL_ROWS, 32)

    torch.testing.assert_close(model(x), F.linear(x, model[0].weight), rtol=1e-5, atol=1e-5)
    model(torch.randn(2, 32))

    assert calls == [3 * cpu_linear.PREFILL_ROWS]  # the 2-row call took F.linear
