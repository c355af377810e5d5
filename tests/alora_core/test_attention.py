"""The paged attention over pool segments against torch SDPA on contiguous K/V (GQA by repetition)."""

import pytest
import torch
import torch.nn.functional as F

from alora_core.model import attention, attention_forks, attention_gather, attention_parts
from alora_core.model.batch import SeqSpan, StepBatch


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int, scale: float) -> torch.Tensor:
    """q: [H, t, D], k/v: [KVH, n, D] contiguous, n = q_offset + t."""
    groups = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(groups, 0)
    v = v.repeat_interleave(groups, 0)
    t, n = q.shape[1], k.shape[1]
    mask = torch.ones(t, n, dtype=torch.bool).tril(q_offset)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("t", [1, 3, 16, 40])
@pytest.mark.parametrize("pieces", [1, 3])
def test_attend_over_segments(t: int, pieces: int, kernel: str) -> None:
    """With 3 pieces and t = 40 the new keys span segments, so some rows of a masked part see no key."""
    gen = torch.Generator().manual_seed(t * 10 + pieces)
    kvh, heads, dim, n = 2, 6, 8, 50
    cache_k = torch.randn(kvh, 400, dim, generator=gen)
    cache_v = torch.randn(kvh, 400, dim, generator=gen)
    # split positions 0..n-1 into `pieces` runs scattered through the cache, out of slot order
    bounds = torch.linspace(0, n, pieces + 1).long().tolist()
    starts = [300, 20, 150][:pieces]
    segments = tuple((s, s + bounds[i + 1] - bounds[i]) for i, s in enumerate(starts))
    k = torch.cat([cache_k[:, s:e] for s, e in segments], dim=1)
    v = torch.cat([cache_v[:, s:e] for s, e in segments], dim=1)
    q = torch.randn(heads, t, dim, generator=gen)

    out = attention_forks.attend(q, cache_k, cache_v, segments, n - t, 0.3)

    torch.testing.assert_close(out, reference(q, k, v, n - t, 0.3), atol=1e-5, rtol=1e-5)


def test_forks_sharing_a_prefix_are_attended_together(kernel: str) -> None:
    """Several sequences whose KV starts at the same slots (forks): one matmul over the shared keys."""
    gen = torch.Generator().manual_seed(7)
    kvh, heads, dim = 2, 4, 8
    cache_k = torch.randn(kvh, 300, dim, generator=gen)
    cache_v = torch.randn(kvh, 300, dim, generator=gen)
    prefix = (10, 74)  # 64 shared slots
    forks = [
        ((10, 80),),  # its own block right after the prefix: one merged segment
        (prefix, (200, 203)),
        (prefix, (150, 166), (120, 125)),
        ((10, 42), (240, 246)),  # shares only the first 32 slots
    ]
    check_forks(forks, [1 if i % 2 else 3 for i in range(len(forks))], cache_k, cache_v, heads, gen)


def check_forks(
    forks: list, queries: list[int], cache_k: torch.Tensor, cache_v: torch.Tensor, heads: int, gen
) -> None:
    """attend_forks over `forks` (segment lists) with `queries` new tokens each equals the reference."""
    items, expected = [], []
    for segments, t in zip(forks, queries, strict=True):
        n = sum(e - s for s, e in segments)
        q = torch.randn(heads, t, cache_k.shape[-1], generator=gen)
        items.append((q, segments, n - t))
        k = torch.cat([cache_k[:, s:e] for s, e in segments], dim=1)
        v = torch.cat([cache_v[:, s:e] for s, e in segments], dim=1)
        expected.append(reference(q, k, v, n - t, 0.25))

    outs = attention_forks.attend_forks(items, cache_k, cache_v, 0.25)

    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bound", [None, 1 << 10])
def test_gathered_batches_equal_the_reference(bound: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU path: sequences of different lengths, query counts and runs (forks included) padded into
    batches; with a tiny bound every sequence is a batch of its own. Padding rows are never written out."""
    if bound is not None:
        monkeypatch.setattr(attention_gather, "MAX_GATHER_ELEMENTS", bound)
    gen = torch.Generator().manual_seed(11)
    kvh, heads, dim = 2, 6, 8
    cache_k = torch.randn(kvh, 400, dim, generator=gen)
    cache_v = torch.randn(kvh, 400, dim, generator=gen)
    layouts = [((10, 80),), ((10, 74), (200, 203)), ((300, 333),), ((150, 166), (120, 125), (250, 290))]
    queries = [1, 3, 1, 17]
    spans, qs, expected, row = [], [], [], 0
    for segments, t in zip(layouts, queries, strict=True):
        n = sum(e - s for s, e in segments)
        q = torch.randn(heads, t, dim, generator=gen)
        k = torch.cat([cache_k[:, s:e] for s, e in segments], dim=1)
        v = torch.cat([cache_v[:, s:e] for s, e in segments], dim=1)
        expected.append(reference(q, k, v, n - t, 0.3))
        spans.append(SeqSpan(query_start=row, query_len=t, context_len=n, kv_segments=segments))
        qs.append(q)
        row += t
    query = torch.cat(qs, dim=1)  # [H, T, D], the step's rows
    out = torch.full((row, heads, dim), float("nan"))

    plan = attention_gather.gather_plan(spans, heads // kvh, kvh * dim, torch.device("cpu"))
    for batch in plan:
        attention_gather.attend_gathered(batch, query, cache_k, cache_v, 0.3, out)

    assert len(plan) == (len(spans) if bound else 1)
    for span, ref in zip(spans, expected, strict=True):
        got = out[span.query_start : span.query_start + span.query_len].transpose(0, 1)
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_forks_share_every_run_of_a_fragmented_prefix(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A conversation whose KV lies in three runs, forked three times: each shared run is one part call
    for all forks' rows (read once), not one per fork; the forks' own keys are one padded part for all."""
    gen = torch.Generator().manual_seed(5)
    kvh, heads, dim = 2, 4, 8
    cache_k = torch.randn(kvh, 400, dim, generator=gen)
    cache_v = torch.randn(kvh, 400, dim, generator=gen)
    prefix = ((10, 42), (100, 132), (200, 216))
    forks = [(*prefix, (300, 306)), (*prefix[:2], (200, 220)), (*prefix, (350, 353))]
    calls: list[int] = []
    real = attention_forks.part
    monkeypatch.setattr(attention_forks, "part", lambda q, *a: calls.append(q.shape[1]) or real(q, *a))
    check_forks(forks, [2, 1, 1], cache_k, cache_v, heads, gen)

    all_rows = 2 * (2 + 1 + 1)  # G = 2 rows per query
    assert calls == [all_rows] * 3 + [kvh]  # three shared runs for every fork, then [F, KVH, M, D] once
    assert attention_parts.common_runs(tuple(forks), 1000) == prefix
    assert attention_parts.common_runs(tuple(forks), 40) == ((10, 42), (100, 108))


@pytest.mark.parametrize("t", [1, 3])
def test_queries_with_a_strided_last_dimension(t: int, kernel: str) -> None:
    """Queries as a column-major projection leaves them (last-dimension stride != 1): the raw CPU flash
    kernel would read them as unit-stride rows; the result must equal the reference anyway."""
    gen = torch.Generator().manual_seed(t)
    kvh, heads, dim, n = 2, 4, 8, 40
    cache_k = torch.randn(kvh, 100, dim, generator=gen)
    cache_v = torch.randn(kvh, 100, dim, generator=gen)
    q = torch.randn(dim, t, heads, generator=gen).permute(2, 1, 0)  # [H, t, D], stride(-1) = t * heads
    assert q.stride(-1) != 1
    segments = ((30, 30 + n),)

    out = attention_forks.attend(q, cache_k, cache_v, segments, n - t, 0.3)

    ref = reference(q.contiguous(), cache_k[:, 30 : 30 + n], cache_v[:, 30 : 30 + n], n - t, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_step_plans_each_fork_group_once_for_all_layers(kernel: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The HF-facing forward over a step of two forks (an invocation of 3 tokens, a decode), a sequence
    over two runs and a lone decode: every layer equals the reference, and each group's plan (shared
    runs, padded own keys) is built by the first layer only; a lone decode on the flash kernel needs none."""
    gen = torch.Generator().manual_seed(3)
    layers, kvh, heads, dim, pool = 2, 2, 4, 8, 300
    kv = torch.randn(layers, 2, kvh, pool, dim, generator=gen)
    layouts = [((10, 60), (200, 204)), ((10, 60), (220, 222)), ((100, 120), (250, 256)), ((130, 170),)]
    queries = [3, 1, 2, 1]
    spans, slots, row = [], [], 0
    for segments, t in zip(layouts, queries, strict=True):
        n = sum(e - s for s, e in segments)
        spans.append(SeqSpan(query_start=row, query_len=t, context_len=n, kv_segments=segments))
        slots.append(torch.cat([torch.arange(s, e) for s, e in segments])[n - t :])  # the new keys' slots
        row += t
    batch = StepBatch(
        input_ids=torch.zeros(row, dtype=torch.long),
        positions=torch.zeros(row, dtype=torch.long),
        slot_mapping=torch.cat(slots),
        seqs=tuple(spans),
        kv=kv,
        lora=None,
        logits_rows=torch.zeros(0, dtype=torch.long),
    )
    plans: list[int] = []
    real = attention.plan_forks
    monkeypatch.setattr(
        attention, "plan_forks", lambda items, *a: plans.append(len(items)) or real(items, *a)
    )
    for layer in range(layers):
        module = torch.nn.Module()
        module.layer_idx = layer  # type: ignore[assignment]
        query = torch.randn(1, heads, row, dim, generator=gen)
        key, value = torch.randn(2, 1, kvh, row, dim, generator=gen)
        out, _ = attention.paged_attention_forward(module, query, key, value, None, 0.3, step_batch=batch)
        for span in spans:
            rows = slice(span.query_start, span.query_start + span.query_len)
            k = torch.cat([kv[layer, 0][:, s:e] for s, e in span.kv_segments], dim=1)
            v = torch.cat([kv[layer, 1][:, s:e] for s, e in span.kv_segments], dim=1)
            ref = reference(query[0, :, rows], k, v, span.context_len - span.query_len, 0.3)
            torch.testing.assert_close(out[0, rows].transpose(0, 1), ref, atol=1e-5, rtol=1e-5)
    lone = [] if kernel == "flash_cpu" else [1]  # the matmul path plans the lone decode too
    assert plans == [2, 1, *lone]  # the forks together, the two-run sequence; built in layer 0 only


def test_fan_out_decode_needs_no_mask(kernel: str) -> None:
    """Forks decoding one token each over own keys of one length (a fan-out after its invocation): every
    row sees every own key, so the own part is one unmasked call; a fork that is one token ahead makes
    the others' padding keys masked again."""
    gen = torch.Generator().manual_seed(13)
    kvh, heads, dim = 2, 4, 8
    cache_k = torch.randn(kvh, 300, dim, generator=gen)
    cache_v = torch.randn(kvh, 300, dim, generator=gen)
    prefix = (10, 74)
    forks = [(prefix, (200, 209)), (prefix, (220, 229)), (prefix, (240, 249))]
    items = [(torch.randn(heads, 1, dim), segs, 64 + 9 - 1) for segs in forks]
    plan = attention_forks.plan_forks(items, kvh, torch.float32)
    assert plan.shared == (prefix,) and plan.own is not None and plan.own.mask is None
    check_forks(forks, [1, 1, 1], cache_k, cache_v, heads, gen)
    ahead = [*forks[:2], (prefix, (240, 250))]
    items = [(torch.randn(heads, 1, dim), segs, sum(e - s for s, e in segs) - 1) for segs in ahead]
    own = attention_forks.plan_forks(items, kvh, torch.float32).own
    assert own is not None and own.mask is not None
    check_forks(ahead, [1, 1, 1], cache_k, cache_v, heads, gen)
