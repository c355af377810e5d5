"""What a layer asks of the paged attention beyond plain causal softmax: sliding windows, logit
soft-capping, attention sinks, MQA, against a direct float64 reference built from transformers'
definitions (sliding overlay: query i sees key j iff j <= i and i - j < window; Gemma-2's
`softcap * tanh(scores / softcap)`; gpt-oss's sink logit per head in the softmax)."""

import pytest
import torch
from transformers.masking_utils import causal_mask_function, sliding_window_causal_mask_function

from alora_core.errors import UnsupportedModelError
from alora_core.model import attention, attention_forks, attention_gather
from alora_core.model.batch import SeqSpan, StepBatch

Features = dict[str, object]
FEATURES: dict[str, Features] = {
    "window": {"window": 7},
    "window_1": {"window": 1},
    "softcap": {"softcap": 1.5},
    "sinks": {"sinks": True},
    "all": {"window": 5, "softcap": 2.0, "sinks": True},
}


def hf_mask(q_offset: int, t: int, n: int, window: int | None) -> torch.Tensor:
    """[t, n] bool from transformers' own mask functions (the definition the engine must follow)."""
    fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    rows, keys = torch.arange(q_offset, q_offset + t)[:, None], torch.arange(n)[None, :]
    return fn(torch.tensor(0), torch.tensor(0), rows, keys).expand(t, n)


def reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_offset: int,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """q: [H, t, D], k/v: [KVH, n, D] contiguous, n = q_offset + t; eager attention in float64."""
    groups = q.shape[0] // k.shape[0]
    k = k.double().repeat_interleave(groups, 0)
    v = v.double().repeat_interleave(groups, 0)
    scores = q.double() @ k.transpose(1, 2) * scale  # [H, t, n]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~hf_mask(q_offset, q.shape[1], k.shape[1], window), float("-inf"))
    if sinks is not None:
        sink = sinks.double().view(-1, 1, 1).expand(-1, q.shape[1], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).float()


def features(name: str, heads: int, gen: torch.Generator) -> Features:
    chosen = dict(FEATURES[name])
    if chosen.pop("sinks", False):
        chosen["sinks"] = torch.randn(heads, generator=gen) * 2
    return chosen


def contiguous(cache: torch.Tensor, segments: tuple[tuple[int, int], ...]) -> torch.Tensor:
    return torch.cat([cache[:, s:e] for s, e in segments], dim=1)


@pytest.mark.parametrize("name", sorted(FEATURES))
@pytest.mark.parametrize("t", [1, 3, 20])
@pytest.mark.parametrize("pieces", [1, 3])
def test_attend_honours_each_feature(name: str, t: int, pieces: int, kernel: str) -> None:
    """One sequence over 1 or 3 runs; t = 20 on one run is the SDPA prefill path (window only)."""
    gen = torch.Generator().manual_seed(t * 10 + pieces)
    kvh, heads, dim, n = 2, 6, 8, 45
    cache_k = torch.randn(kvh, 400, dim, generator=gen)
    cache_v = torch.randn(kvh, 400, dim, generator=gen)
    bounds = torch.linspace(0, n, pieces + 1).long().tolist()
    segments = tuple((s, s + bounds[i + 1] - bounds[i]) for i, s in enumerate([300, 20, 150][:pieces]))
    q = torch.randn(heads, t, dim, generator=gen) * 2
    extra = features(name, heads, gen)

    out = attention_forks.attend(q, cache_k, cache_v, segments, n - t, 0.5, **extra)  # type: ignore[arg-type]

    ref = reference(q, contiguous(cache_k, segments), contiguous(cache_v, segments), n - t, 0.5, **extra)  # type: ignore[arg-type]
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_forks_honour_each_feature(name: str, kernel: str) -> None:
    """Forks of one conversation at different lengths: the shared runs are masked for the rows the
    window slid past, and each fork's own keys too."""
    gen = torch.Generator().manual_seed(17)
    kvh, heads, dim = 1, 4, 8  # MQA
    cache_k = torch.randn(kvh, 300, dim, generator=gen)
    cache_v = torch.randn(kvh, 300, dim, generator=gen)
    prefix = ((10, 42), (100, 116))
    forks = [(*prefix, (200, 203)), (*prefix, (220, 229)), ((10, 42), (100, 110)), (*prefix,)]
    queries = [3, 1, 4, 2]
    extra = features(name, heads, gen)
    items, expected = [], []
    for segments, t in zip(forks, queries, strict=True):
        n = sum(e - s for s, e in segments)
        q = torch.randn(heads, t, dim, generator=gen) * 2
        items.append((q, segments, n - t))
        ref = reference(q, contiguous(cache_k, segments), contiguous(cache_v, segments), n - t, 0.4, **extra)  # type: ignore[arg-type]
        expected.append(ref)

    outs = attention_forks.attend_forks(items, cache_k, cache_v, 0.4, **extra)  # type: ignore[arg-type]

    for out, ref in zip(outs, expected, strict=True):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_gathered_batches_honour_each_feature(name: str) -> None:
    gen = torch.Generator().manual_seed(19)
    kvh, heads, dim = 2, 4, 8
    cache_k = torch.randn(kvh, 400, dim, generator=gen)
    cache_v = torch.randn(kvh, 400, dim, generator=gen)
    layouts = [((10, 80),), ((10, 74), (200, 203)), ((300, 306),), ((150, 166), (120, 125), (250, 290))]
    queries = [1, 3, 1, 17]
    extra = features(name, heads, gen)
    window = extra.pop("window", None)
    spans, qs, expected, row = [], [], [], 0
    for segments, t in zip(layouts, queries, strict=True):
        n = sum(e - s for s, e in segments)
        q = torch.randn(heads, t, dim, generator=gen) * 2
        k, v = contiguous(cache_k, segments), contiguous(cache_v, segments)
        expected.append(reference(q, k, v, n - t, 0.3, window=window, **extra))  # type: ignore[arg-type]
        spans.append(SeqSpan(query_start=row, query_len=t, context_len=n, kv_segments=segments))
        qs.append(q)
        row += t
    query = torch.cat(qs, dim=1)
    out = torch.full((row, heads, dim), float("nan"))

    for batch in attention_gather.gather_plan(spans, heads // kvh, kvh * dim, torch.device("cpu"), window):  # type: ignore[arg-type]
        attention_gather.attend_gathered(batch, query, cache_k, cache_v, 0.3, out, **extra)  # type: ignore[arg-type]

    for span, ref in zip(spans, expected, strict=True):
        got = out[span.query_start : span.query_start + span.query_len].transpose(0, 1)
        torch.testing.assert_close(got, ref, atol=2e-5, rtol=2e-5)


class Layer(torch.nn.Module):
    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx


@pytest.mark.parametrize("path", ["parts", "gathered"])
@pytest.mark.parametrize("window", [6, 16])
def test_keys_outside_the_window_are_never_read(
    path: str, window: int, kernel: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HF-facing forward over a step (a decode, two forks, a chunk across runs, a long prefill) of a
    sliding layer with soft-capping: every pool slot older than the window of its sequence's first
    query of the step holds NaN, so reading one (even masked) would poison the output."""
    if path == "gathered":
        monkeypatch.setattr(attention, "GATHER_DEVICES", frozenset({"cpu"}))
    gen = torch.Generator().manual_seed(window)
    kvh, heads, dim, pool = 2, 4, 8, 400
    kv = torch.randn(1, 2, kvh, pool, dim, generator=gen)
    layouts = [
        ((10, 60),),  # a decode over one run
        ((100, 132), (200, 204)),  # forks of a conversation at [100, 132)
        ((100, 132), (220, 227)),
        ((140, 150), (250, 262), (300, 305)),  # a chunk of 9 over three runs
        ((320, 360),),  # a prefill of 20 after 20 cached (the SDPA path when uncapped)
    ]
    queries = [1, 3, 2, 9, 20]
    spans, slots, hidden, seen, row = [], [], set(), set(), 0
    for segments, t in zip(layouts, queries, strict=True):
        n = sum(e - s for s, e in segments)
        spans.append(SeqSpan(query_start=row, query_len=t, context_len=n, kv_segments=segments))
        order = torch.cat([torch.arange(s, e) for s, e in segments])
        slots.append(order[n - t :])
        first_visible = max(0, n - t - window + 1)
        hidden.update(order[:first_visible].tolist())
        seen.update(
            order[first_visible:].tolist()
        )  # forks share slots: one may still see what another does not
        row += t
    clean = kv.clone()
    kv[0, :, :, sorted(hidden - seen)] = float("nan")
    batch = StepBatch(
        input_ids=torch.zeros(row, dtype=torch.long),
        positions=torch.zeros(row, dtype=torch.long),
        slot_mapping=torch.cat(slots),
        seqs=tuple(spans),
        kv=kv,
        lora=None,
        logits_rows=torch.zeros(0, dtype=torch.long),
    )
    query = torch.randn(1, heads, row, dim, generator=gen)
    key, value = torch.randn(2, 1, kvh, row, dim, generator=gen)
    for softcap in (None, 3.0):
        out, _ = attention.paged_attention_forward(
            Layer(0), query, key, value, None, 0.3, sliding_window=window, softcap=softcap, step_batch=batch
        )
        clean[0, 0, :, batch.slot_mapping] = key[0]
        clean[0, 1, :, batch.slot_mapping] = value[0]
        for span in spans:
            rows = slice(span.query_start, span.query_start + span.query_len)
            k, v = contiguous(clean[0, 0], span.kv_segments), contiguous(clean[0, 1], span.kv_segments)
            ref = reference(query[0, :, rows], k, v, span.context_len - span.query_len, 0.3, window, softcap)
            torch.testing.assert_close(out[0, rows].transpose(0, 1), ref, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"attn_temperature": 2.0}, "attn_temperature=2.0"),
        ({"dropout": 0.1}, "dropout"),
        ({"is_causal": False}, "non-causal"),
        ({"attention_mask": torch.zeros(1, 1, 2, 2)}, "attention mask"),
    ],
)
def test_unhandled_attention_arguments_are_refused(kwargs: dict[str, object], named: str) -> None:
    """No argument is silently dropped: neutral ones (positions, cache flags) pass, anything else with
    a value is an UnsupportedModelError naming it."""
    layer = Layer(0)
    kv = torch.zeros(1, 2, 1, 8, 4)
    batch = StepBatch(
        input_ids=torch.zeros(2, dtype=torch.long),
        positions=torch.arange(2),
        slot_mapping=torch.arange(2),
        seqs=(SeqSpan(0, 2, 2, ((0, 2),)),),
        kv=kv,
        lora=None,
        logits_rows=torch.ones(1, dtype=torch.long),
    )
    q, k, v = torch.randn(1, 2, 2, 4), torch.randn(1, 1, 2, 4), torch.randn(1, 1, 2, 4)
    neutral = {"position_ids": torch.arange(2)[None], "use_cache": False, "output_router_logits": False}
    mask = kwargs.pop("attention_mask", None)
    attention.paged_attention_forward(layer, q, k, v, None, step_batch=batch, sliding_window=None, **neutral)
    with pytest.raises(UnsupportedModelError, match=named):
        attention.paged_attention_forward(layer, q, k, v, mask, step_batch=batch, **neutral, **kwargs)  # type: ignore[arg-type]
