"""One running request: its tokens, its KV table, which rows get which adapter, and when it stops.

tokens = prompt + output                      (output grows by one sampled token per step)
table.num_tokens = positions with KV          (the next step feeds tokens[num_tokens:])
adapter rows: positions >= activation_start   (0 for a LoRA, the invocation start for an aLoRA)

Sampling state rides along: the logprobs of generated (and, when asked, prompt) tokens, the
penalty counts, the grammar matcher of a constrained output (it has consumed exactly `output`),
and for an n-choice request the logits its choices fork from.
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.index import BlockChain
from alora_core.sampling import SamplingParams, TokenLogprobs
from alora_core.structured.matcher import GrammarState

FinishReason = Literal["stop", "length", "error"]  # error: the output constraint reached a dead end
NO_ACTIVATION = 1 << 62  # activation_start of a base request: no position gets an adapter


@dataclass
class PenaltyState:
    """What the penalties need of one sequence, built on its first penalized sampling step."""

    prompt_mask: torch.Tensor  # [V] bool: ids in the prompt (repetition penalty)
    output_counts: torch.Tensor  # [V] float32: occurrences of each id in the output so far

    @classmethod
    def build(cls, prompt: list[int], output: list[int], vocab: int, device: torch.device) -> "PenaltyState":
        mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        mask[torch.tensor(prompt, dtype=torch.long, device=device)] = True
        counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=vocab).float()
        return cls(mask, counts.to(device))


@dataclass
class Sequence:
    prompt: list[int]
    table: BlockTable
    params: SamplingParams
    max_model_len: int
    eos_token_ids: tuple[int, ...]
    adapter_slot: int | None = None
    activation_start: int = NO_ACTIVATION
    output: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_text_end: int | None = None  # where the text ends when a stop string matched
    # what ended a "stop" (vLLM's stop_reason): the stop token id or stop string; None for EOS
    stop_reason: int | str | None = None
    logits: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None
    chain: BlockChain | None = None  # the KV index's view of its blocks (the scheduler sets it)
    logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per output token (params.logprobs)
    prompt_logprobs: list[TokenLogprobs] = field(default_factory=list)  # prompt tokens 1, 2, ... so far
    penalties: PenaltyState | None = None
    fork_logits: torch.Tensor | None = None  # n > 1: raw logits [V] of the first sampling point
    grammar: GrammarState | None = None  # params.constraint's matcher
    error: str | None = None  # finish_reason "error": why no token could follow

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end the sequence (what min_tokens holds back)."""
        eos = () if self.params.ignore_eos else self.eos_token_ids
        return eos + self.params.stop_token_ids

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output if self.output else self.prompt

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def next_feed(self, budget: int) -> tuple[int, int]:
        """Positions [start, end) to feed in the next step, at most `budget` of them."""
        start = self.table.num_tokens
        return start, min(self.num_tokens, start + budget)

    def prompt_rows(self, start: int, end: int) -> range:
        """Positions in [start, end) whose logits score the next prompt token (params.prompt_logprobs):
        position q predicts token q + 1, for q < len(prompt) - 1 not scored yet."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, len(self.prompt_logprobs)), min(end, len(self.prompt) - 1))

    def fork(
        self, params: SamplingParams, table: BlockTable, device: torch.device, grammar: GrammarState | None
    ) -> "Sequence":
        """Another choice of this sequence's prompt (n > 1): same context and adapter rows, its own
        sampling params, generator, grammar matcher and output, the KV of `table` (and the index
        entries of the prompt's full blocks it shares)."""
        assert self.chain is not None
        return Sequence(
            prompt=self.prompt,
            table=table,
            params=params,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            adapter_slot=self.adapter_slot,
            activation_start=self.activation_start,
            generator=params.generator(device),
            chain=self.chain.fork(table.num_tokens // table.pool.block_size),
            prompt_logprobs=list(self.prompt_logprobs),
            grammar=grammar,
        )

    def append(self, token: int, tokenizer: PreTrainedTokenizerBase) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.output.append(token)
        p = self.params
        if not p.ignore_eos and token in self.eos_token_ids:
            self.finish_reason = "stop"
        elif token in p.stop_token_ids:
            self.finish_reason, self.stop_reason = "stop", token
        elif p.stop and len(self.output) > p.min_tokens and self._match_stop_string(tokenizer):
            self.finish_reason = "stop"
        elif len(self.output) >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"

    def fail(self, error: str) -> None:
        """End without a next token: the output constraint allows none (a dead end)."""
        self.finish_reason = "error"
        self.error = error

    def _match_stop_string(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        text = str(tokenizer.decode(self.output, skip_special_tokens=True))
        hits = [(i, s) for s in self.params.stop if (i := text.find(s)) >= 0]
        if hits:
            self.stop_text_end, self.stop_reason = min(hits, key=lambda hit: hit[0])  # the earliest
        return bool(hits)

    def text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        ids = self.output
        if self.finish_reason == "stop" and self.stop_text_end is None and ids:
            ids = ids[:-1]  # the EOS / stop token is not part of the text
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        return text[: self.stop_text_end] if self.stop_text_end is not None else text
