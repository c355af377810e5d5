"""One running request: its tokens, its KV table, which rows get which adapter, and when it stops.

tokens = prompt + output                      (output grows by one sampled token per step)
table.num_tokens = positions with KV          (the next step feeds tokens[num_tokens:])
adapter rows: positions >= activation_start   (0 for a LoRA, the invocation start for an aLoRA)
"""

from dataclasses import dataclass, field
from typing import Literal

import torch
from transformers import PreTrainedTokenizerBase

from alora_core.kvcache.block_table import BlockTable
from alora_core.kvcache.index import BlockChain
from alora_core.sampling import SamplingParams

FinishReason = Literal["stop", "length"]
NO_ACTIVATION = 1 << 62  # activation_start of a base request: no position gets an adapter


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
    logits: list[torch.Tensor] = field(default_factory=list)
    generator: torch.Generator | None = None
    chain: BlockChain | None = None  # the KV index's view of its blocks (the scheduler sets it)

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

    def append(self, token: int, tokenizer: PreTrainedTokenizerBase) -> None:
        """Record a sampled token and decide whether the sequence is finished."""
        self.output.append(token)
        p = self.params
        if (
            (not p.ignore_eos and token in self.eos_token_ids)
            or token in p.stop_token_ids
            or (p.stop and self._match_stop_string(tokenizer))
        ):
            self.finish_reason = "stop"
        elif len(self.output) >= p.max_tokens or self.num_tokens >= self.max_model_len:
            self.finish_reason = "length"

    def _match_stop_string(self, tokenizer: PreTrainedTokenizerBase) -> bool:
        text = str(tokenizer.decode(self.output, skip_special_tokens=True))
        hits = [i for i in (text.find(s) for s in self.params.stop) if i >= 0]
        if hits:
            self.stop_text_end = min(hits)
        return bool(hits)

    def text(self, tokenizer: PreTrainedTokenizerBase) -> str:
        ids = self.output
        if self.finish_reason == "stop" and self.stop_text_end is None and ids:
            ids = ids[:-1]  # the EOS / stop token is not part of the text
        text = str(tokenizer.decode(ids, skip_special_tokens=True))
        return text[: self.stop_text_end] if self.stop_text_end is not None else text
