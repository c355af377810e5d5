"""Sampling a step's rows on the device: one batched pass, no host round trip per request.

The semantics and order are sampling.py's (vLLM's); what differs is where the per-row work runs:

    host (once a step): each row's parameters -> a few [B] tensors and one list of (row, token, value)
                        logit edits (logit_bias, min_tokens' banned ids): one upload each
    device:
        logits [B, V] float32
        -> grammar bitmask [B, ceil(V/32)] int32: disallowed tokens -> -inf        (issue 17's format)
        -> edits: logits[row, token] += value (index_put_ accumulate; a ban is -inf)
        -> penalties (sampling.apply_penalties on the penalized rows)
        greedy rows:  argmax
        random rows:  scores = logits / temperature, sorted once (descending)
                      keep: probs >= min_p * max prob,  score >= the k-th score,  mass before < top_p
                      token = argmax_v  p_v / E_v        E_v ~ Exp(1) (exponential race = a draw from p)

Random numbers: E_v comes from a counter-based hash of (the request's seed, how many tokens it has
generated, v), computed on the device, instead of a torch.Generator per request (which would need a
launch and a host call per row). A seeded request draws the same tokens whatever it is batched with;
an unseeded one gets a seed drawn once on the host. The host path (sampling.sample, a Generator per
request) and this one follow the same distribution but not the same random stream: the same seed gives
reproducible, not identical, tokens on the two paths. Greedy rows are identical on both.
"""

import random
from dataclasses import dataclass

import torch

from alora_core.sampling import SamplingParams, apply_penalties
from alora_core.structured.matcher import unpack

_MASK32 = 0xFFFFFFFF
_HASH_MUL = 0x045D9F3B  # < 2^31: products of 32-bit values stay inside int64 (no overflow)


@dataclass(frozen=True)
class RowSampling:
    """What one row samples with: its params, its random stream and its per-step logit edits."""

    params: SamplingParams
    seed: int  # the request's seed (or one drawn once per request: `draw_seed`)
    counter: int  # tokens the request has generated: which draw of its stream this is
    banned: tuple[int, ...] = ()  # min_tokens: EOS and stop ids while too few tokens were generated
    prompt_mask: torch.Tensor | None = None  # [V] bool, penalized rows (sequence.PenaltyState)
    output_counts: torch.Tensor | None = None  # [V] float


def draw_seed() -> int:
    return random.getrandbits(63)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (int64 tensors holding values < 2^32)."""
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    x = ((x >> 16) ^ x) * _HASH_MUL & _MASK32
    return (x >> 16) ^ x


def uniform(seeds: torch.Tensor, counters: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """u in (0, 1), float32, a pure function of (seed [B], counter [B], token [B, N]) -> [B, N]."""
    key = _hash32((seeds & _MASK32) ^ _hash32((seeds >> 32) & _MASK32))
    key = _hash32(key ^ _hash32(counters & _MASK32))
    bits = _hash32(_hash32(key[:, None] ^ tokens) ^ (tokens * 0x9E37 & _MASK32)) >> 8  # 24 bits
    return (bits.float() + 0.5) / float(1 << 24)


def adjust(logits: torch.Tensor, rows: list[RowSampling], bitmask: torch.Tensor | None = None) -> None:
    """In place on logits [B, V] float32: the grammar bitmask, then min_tokens and logit_bias (one
    index_put_), then penalties (one batched call over the penalized rows)."""
    device = logits.device
    if bitmask is not None:
        logits.masked_fill_(~unpack(bitmask.to(device, non_blocking=True), logits.shape[1]), float("-inf"))
    at, ids, values = [], [], []
    for i, row in enumerate(rows):
        for token in row.banned:
            at.append(i), ids.append(token), values.append(float("-inf"))
        for token, bias in row.params.logit_bias:
            at.append(i), ids.append(token), values.append(bias)
    if at:
        index = torch.tensor([at, ids], dtype=torch.long).to(device, non_blocking=True)
        edits = torch.tensor(values, dtype=logits.dtype).to(device, non_blocking=True)
        logits.index_put_((index[0], index[1]), edits, accumulate=True)
    penalized = [i for i, row in enumerate(rows) if row.params.penalized]
    if penalized:
        states = [rows[i] for i in penalized]
        if any(s.prompt_mask is None or s.output_counts is None for s in states):
            raise ValueError("penalized rows need their prompt_mask and output_counts")
        index = torch.tensor(penalized, dtype=torch.long).to(device, non_blocking=True)
        picked = logits[index]
        params = [s.params for s in states]
        apply_penalties(
            picked,
            torch.stack([s.prompt_mask for s in states]),  # type: ignore[misc]
            torch.stack([s.output_counts for s in states]),  # type: ignore[misc]
            *(
                torch.tensor([getattr(p, name) for p in params], dtype=torch.float32).to(
                    device, non_blocking=True
                )
                for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
            ),
        )
        logits[index] = picked


def choose(logits: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """logits [B, V] float32 (adjusted) -> tokens [B] int64 on the device; no host sync.

    Row parameters go up as [B] tensors (one upload each); whether to sort at all is a host decision
    from the parameters (any row with top_k or top_p), never from the logits."""
    device, vocab = logits.device, logits.shape[1]
    greedy_tokens = logits.argmax(dim=-1)
    if all(row.params.greedy for row in rows):
        return greedy_tokens

    def upload(values: list[float] | list[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    params = [row.params for row in rows]
    greedy = upload([p.greedy for p in params], torch.bool)
    temperature = upload([p.temperature if not p.greedy else 1.0 for p in params], torch.float32)
    min_p = upload([p.min_p for p in params], torch.float32)
    top_k = upload([p.top_k if 0 < p.top_k < vocab else vocab for p in params], torch.long)
    top_p = upload([p.top_p for p in params], torch.float32)
    seeds = upload([row.seed for row in rows], torch.long)
    counters = upload([row.counter for row in rows], torch.long)

    scores = logits / temperature[:, None]
    sorted_scores, order = torch.sort(scores, dim=-1, descending=True)  # [B, V]
    probs = torch.softmax(sorted_scores, dim=-1)
    keep = probs >= min_p[:, None] * probs[:, :1]  # min_p (0: every token)
    kth = sorted_scores.gather(1, (top_k - 1)[:, None])
    keep &= sorted_scores >= kth  # top_k: ties with the k-th score stay (as sampling.warp)
    masked = sorted_scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the tokens ranked before each one
    keep &= before < top_p[:, None]  # the top token always stays
    probs = probs.masked_fill(~keep, 0.0)
    race = probs / -torch.log(uniform(seeds, counters, order))  # exponential race: argmax = a draw
    sampled = order.gather(1, race.argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(greedy, greedy_tokens, sampled)
