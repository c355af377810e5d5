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
