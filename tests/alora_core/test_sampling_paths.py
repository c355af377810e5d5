"""One suite for both samplers (issue 21): the host path (sampling.sample, a Generator per request, as
step.sample_rows runs it) and the device path (sampling_device: one batched pass, no host sync).

The oracle is the definition written out here in plain Python over a small vocabulary: which tokens a
row may draw (temperature, min_p, top_k, top_p, the grammar bitmask, min_tokens' bans, logit_bias,
penalties) and with which probability. Each path must draw only allowed tokens, every allowed token,
at frequencies within sampling noise of the definition; greedy rows must be the adjusted argmax; a
seeded row must repeat its tokens. The device pass also runs under the sync guard.
"""

import math
from collections import Counter
from collections.abc import Callable

import pytest
import torch

from alora_core import sampling_device
from alora_core.model.sync_guard import SyncGuard
from alora_core.sampling import SamplingParams, apply_penalties, sample
from alora_core.sampling_device import RowSampling
from tests.alora_core.conftest import TEST_DEVICE

V = 12
DRAWS = 4000
Choose = Callable[[torch.Tensor, list[RowSampling], torch.Tensor | None], list[int]]


def host_choose(logits: torch.Tensor, rows: list[RowSampling], bitmask: torch.Tensor | None) -> list[int]:
    """The host path, row by row: mask, bans, bias, penalties, then sampling.sample with the row's
    Generator (seeded from its seed and counter)."""
    tokens = []
    for i, row in enumerate(rows):
        x = logits[i].float().clone()
        if bitmask is not None:
            for v in range(V):
                if not (int(bitmask[i, v // 32]) >> (v % 32)) & 1:
                    x[v] = float("-inf")
        if row.banned:
            x[torch.tensor(row.banned)] = float("-inf")
        for token, bias in row.params.logit_bias:
            x[token] += bias
        if row.params.penalized:
            p = row.params
            y = x[None]
            apply_penalties(
                y, row.prompt_mask[None], row.output_counts[None],  # type: ignore[index]
                *(torch.tensor([v]) for v in (p.presence_penalty, p.frequency_penalty, p.repetition_penalty)),
            )  # fmt: skip
        generator = torch.Generator().manual_seed((row.seed * 1_000_003 + row.counter) % (1 << 63))
        tokens.append(sample(x, row.params, None if row.params.greedy else generator))
    return tokens


def device_choose(logits: torch.Tensor, rows: list[RowSampling], bitmask: torch.Tensor | None) -> list[int]:
    x = logits.to(TEST_DEVICE).float().clone()
    rows = [
        RowSampling(
            r.params,
            r.seed,
            r.counter,
            r.banned,
            None if r.prompt_mask is None else r.prompt_mask.to(TEST_DEVICE),
            None if r.output_counts is None else r.output_counts.to(TEST_DEVICE),
        )
        for r in rows
    ]
    with SyncGuard(cuda=TEST_DEVICE == "cuda") as guard:
        sampling_device.adjust(x, rows, bitmask)
        tokens = sampling_device.choose(x, rows)
    # the per-step parameter uploads (host data) are allowed: sampling runs after the graph
    assert [name for name, _ in guard.calls if name not in ("tensor", "upload")] == [], guard.report()
    return tokens.tolist()  # the one copy of a step's tokens to the host


PATHS = {"host": host_choose, "device": device_choose}


def definition(logits: list[float], p: SamplingParams, allowed: set[int]) -> dict[int, float]:
    """The probability of each token, written out: / temperature, min_p, top_k, top_p (vLLM's order)."""
    scores = {v: logits[v] / p.temperature for v in allowed}
    top = max(scores.values())
    z = sum(math.exp(s - top) for s in scores.values())
    if p.min_p > 0:
        scores = {v: s for v, s in scores.items() if math.exp(s - top) >= p.min_p}  # p >= min_p * p_max
    if 0 < p.top_k < V:
        kth = sorted(scores.values(), reverse=True)[min(p.top_k, len(scores)) - 1]
        scores = {v: s for v, s in scores.items() if s >= kth}
    z = sum(math.exp(s - top) for s in scores.values())
    probs = {v: math.exp(s - top) / z for v, s in scores.items()}
    kept, mass = {}, 0.0
    for v in sorted(probs, key=lambda v: -probs[v]):
        if mass >= p.top_p:
            break
        kept[v] = probs[v]
        mass += probs[v]
    return {v: q / sum(kept.values()) for v, q in kept.items()}


def logits_row(seed: int) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 1.5


@pytest.mark.parametrize("path", PATHS)
def test_greedy_rows_are_the_adjusted_argmax(path: str) -> None:
    logits = torch.stack([logits_row(s) for s in range(4)])
    counts = torch.zeros(V)
    counts[int(logits[3].argmax())] = 2.0
    rows = [
        RowSampling(SamplingParams(), 0, 0),
        RowSampling(SamplingParams(logit_bias=((5, 30.0),)), 0, 0),
        RowSampling(SamplingParams(), 0, 0, banned=(int(logits[2].argmax()),)),
        RowSampling(
            SamplingParams(frequency_penalty=2.0),
            0,
            0,
            prompt_mask=torch.zeros(V, dtype=torch.bool),
            output_counts=counts,
        ),
    ]
    expected = [int(logits[0].argmax()), 5]
    expected.append(int(logits[2].topk(2).indices[1]))
    penalized = logits[3] - 2.0 * counts
    expected.append(int(penalized.argmax()))
    assert PATHS[path](logits, rows, None) == expected


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_k=4),
        SamplingParams(temperature=1.3, top_p=0.6),
        SamplingParams(temperature=1.0, min_p=0.1),
        SamplingParams(temperature=0.9, top_k=6, top_p=0.8, min_p=0.05),
    ],
    ids=["temperature", "top_k", "top_p", "min_p", "all"],
)
@pytest.mark.parametrize("masked", [False, True], ids=["free", "bitmask"])
def test_draws_follow_the_definition(path: str, params: SamplingParams, masked: bool) -> None:
    logits = logits_row(7)
    allowed = set(range(V))
    bitmask = None
    if masked:  # the grammar allows the even ids only (the top token among them too)
        allowed = set(range(0, V, 2))
        bitmask = torch.full((DRAWS, 1), sum(1 << v for v in allowed), dtype=torch.int32)
    rows = [RowSampling(params, seed, 0) for seed in range(DRAWS)]
    drawn = Counter(PATHS[path](logits.expand(DRAWS, V), rows, bitmask))
    expected = definition(logits.tolist(), params, allowed)
    assert set(drawn) == set(expected), "drew a token the definition drops, or missed one it keeps"
    for v, q in expected.items():  # 5 standard deviations of the binomial count
        assert abs(drawn[v] / DRAWS - q) <= 5 * math.sqrt(q * (1 - q) / DRAWS) + 1e-9, (
            v,
            drawn[v] / DRAWS,
            q,
        )


@pytest.mark.parametrize("path", PATHS)
def test_a_seeded_row_repeats_and_its_draws_vary(path: str) -> None:
    logits = logits_row(3).expand(64, V)
    params = SamplingParams(temperature=2.0, seed=11)
    rows = [RowSampling(params, 11, counter) for counter in range(64)]  # one request's 64 draws
    first = PATHS[path](logits, rows, None)
    assert PATHS[path](logits, rows, None) == first
    assert len(set(first)) > 3  # successive draws of the stream differ
    other = PATHS[path](logits, [RowSampling(params, 12, c) for c in range(64)], None)
    assert other != first


def test_device_draws_do_not_depend_on_the_batch() -> None:
    """A seeded row draws the same token alone or beside other rows (a graph replays any batch)."""
    logits = torch.stack([logits_row(s) for s in range(5)])
    rows = [RowSampling(SamplingParams(temperature=1.0, top_p=0.9), 100 + s, s) for s in range(5)]
    together = device_choose(logits, rows, None)
    alone = [device_choose(logits[i : i + 1], [rows[i]], None)[0] for i in range(5)]
    assert together == alone
