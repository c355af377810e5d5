"""The masked-LoRA op against its per-token definition: y[t] += s[a] * B[a] @ (A[a] @ x[t]) where a = idx[t] >= 0."""

import torch

from alora_core.lora.adapters import LoraWeights
from alora_core.lora.ops import masked_lora_reference
from alora_core.model.batch import LoraBatch


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
