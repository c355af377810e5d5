"""Sampling parameters and the per-row sampling ops, with vLLM's semantics and order:

    logits [B, V] float32 of the sampling rows
      -> output constraint: tokens its grammar does not allow -> -inf (structured/, before anything
                      reads the logits, as vLLM applies its grammar bitmask)
      -> raw logprobs = log_softmax(logits)          what `logprobs` reports (vLLM's raw_logprobs)
      -> min_tokens:  EOS and stop ids -> -inf while fewer than min_tokens tokens were generated
      -> + logit_bias
      -> penalties:   repetition (tokens of prompt + output: positive / p, negative * p),
                      frequency (- f * count in output), presence (- p if in output)
      -> greedy:      argmax
         random:      / temperature -> min_p -> top_k -> top_p -> multinomial(request's generator)

The batched driver over a step's sequences is `step.sample_rows`; this module holds the
parameters and the tensor ops it applies.
"""

import math
from dataclasses import dataclass, fields

import torch

from alora_core.errors import InvalidRequestError
from alora_core.structured.constraint import OutputConstraint

MAX_TOKENS_LIMIT = 1 << 16
MAX_N = 16  # choices of one request (n)
MAX_LOGPROBS = 20  # top logprobs per position (vLLM's default --max-logprobs)
MAX_PENALTY = 2.0  # presence / frequency penalties lie in [-2, 2] (OpenAI's range)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept; 1 = off
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # drop tokens whose probability < min_p * the top token's; 0 = off
    seed: int | None = None  # fixes the sampled tokens of a request with temperature > 0
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0  # EOS and stop_token_ids cannot be sampled (nor stop strings end) before this
    presence_penalty: float = 0.0  # generated tokens only
    frequency_penalty: float = 0.0  # generated tokens only
    repetition_penalty: float = 1.0  # prompt and generated tokens; 1 = off
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias) added to the logits
    logprobs: int | None = None  # per generated token: its raw logprob and this many top ones
    prompt_logprobs: int | None = None  # the same for every prompt token but the first
    n: int = 1  # choices: n - 1 forks of the prompt's KV at its first sampling point
    return_logits: bool = False  # keep each step's raw logits (for parity checks and debugging)
    constraint: OutputConstraint | None = None  # the output must match it (constrained decoding)

    def validate(self, vocab_size: int) -> None:
        if not 1 <= self.max_tokens <= MAX_TOKENS_LIMIT:
            raise InvalidRequestError(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}], got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise InvalidRequestError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"stop_token_ids {bad} fall outside the vocabulary (size {vocab_size})")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be in [0, max_tokens = {self.max_tokens}], got {self.min_tokens}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}")
        if not (0.0 < self.repetition_penalty <= 100.0):
            raise InvalidRequestError(
                f"repetition_penalty must be in (0, 100], got {self.repetition_penalty}"
            )
        bad = [t for t, _ in self.logit_bias if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequestError(f"logit_bias token ids {bad[:8]} fall outside the vocabulary")
        if any(not math.isfinite(b) for _, b in self.logit_bias):
            raise InvalidRequestError("logit_bias values must be finite")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be in [1, {MAX_N}], got {self.n}")
        if self.constraint is not None and self.ignore_eos:
            raise InvalidRequestError(
                "ignore_eos cannot be combined with an output constraint: the end of the grammar "
                "is the end-of-text token"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """Anything between the raw logits and the sampler (min_tokens, logit_bias, penalties)."""
        return self.min_tokens > 0 or bool(self.logit_bias) or self.penalized

    def choice(self, index: int) -> "SamplingParams":
        """The params of choice `index` of an n-choice request: one choice each, seeds seed + index
        (vLLM's rule), so a seeded request's choices are reproducible and differ from each other."""
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(
            **{**{f.name: getattr(self, f.name) for f in fields(self)}, "n": 1, "seed": seed}
        )

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.temperature == 0.0:
            return None
        gen = torch.Generator(device=device)
        if self.seed is not None:
            gen.manual_seed(self.seed)
        else:
            gen.seed()
        return gen


@dataclass(frozen=True)
class TokenLogprobs:
    """One position's logprobs: of the token there, and the `k` most likely tokens (raw logprobs)."""

    logprob: float
    rank: int  # 1 + how many tokens are strictly more likely
    top: tuple[tuple[int, float], ...]  # (token id, logprob), most likely first


def gather_logprobs(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprobs]:
    """logprobs [R, V] (log-softmax of R rows), tokens [R] -> each row's TokenLogprobs with its top k.

        for r in rows: logprob = lp[r, tok[r]]; rank = 1 + #{v: lp[r, v] > logprob}; top = topk(lp[r], k)
    One batched gather / compare / topk, one copy to the host."""
    chosen = logprobs.gather(1, tokens[:, None])  # [R, 1]
    ranks = (logprobs > chosen).sum(dim=1) + 1
    top_values, top_ids = torch.topk(logprobs, k, dim=1)
    chosen_l, ranks_l = chosen[:, 0].tolist(), ranks.tolist()
    ids_l, values_l = top_ids.tolist(), top_values.tolist()
    return [
        TokenLogprobs(lp, rank, tuple(zip(ids, values, strict=True)))
        for lp, rank, ids, values in zip(chosen_l, ranks_l, ids_l, values_l, strict=True)
    ]


def apply_penalties(
    logits: torch.Tensor,
    prompt_mask: torch.Tensor,
    output_counts: torch.Tensor,
    presence: torch.Tensor,
    frequency: torch.Tensor,
    repetition: torch.Tensor,
) -> None:
    """In place, on rows [b, V] (vLLM's apply_penalties; OpenAI's definition for the first two):

        seen       = prompt_mask | output_counts > 0
        logits     = where(seen, where(logits > 0, logits / rep, logits * rep), logits)
        logits    -= frequency * output_counts + presence * (output_counts > 0)
    prompt_mask [b, V] bool, output_counts [b, V] float, presence / frequency / repetition [b]."""
    in_output = output_counts > 0
    penalty = torch.where(prompt_mask | in_output, repetition[:, None], 1.0)
    logits *= torch.where(logits > 0, 1.0 / penalty, penalty)
    logits -= frequency[:, None] * output_counts + presence[:, None] * in_output


def warp(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the scores random sampling draws from: / temperature, then min_p, top_k and
    top_p each set the tokens they drop to -inf (vLLM's order)."""
    scores = logits.float() / params.temperature
    if params.min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(), float("-inf"))
    if params.top_k > 0 and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # drop a token when the mass before it already reaches top_p (the top token always stays)
        drop_sorted = cumulative - torch.softmax(sorted_scores, dim=-1) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits: [V] of one sequence's last position (after min_tokens, bias and penalties) -> the
    next token id: argmax when greedy, else a draw from softmax(warp(logits))."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(warp(logits, params), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
