"""Reference decoding for the sampler's fields: the Hugging Face model run step by step on the growing
sequence (full recompute), transformers' logits processors, and torch processors with vLLM's
semantics where transformers has none. Shared by the engine and the OpenAI API tests."""

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from tests.alora_core.conftest import PeftOracle


class OpenAIPenalties(LogitsProcessor):
    """OpenAI's presence / frequency penalties (vLLM's semantics): counts of GENERATED tokens only."""

    def __init__(
        self, prompt_len: int, presence: float, frequency: float, count_prompt: bool = False
    ) -> None:
        self.start = 0 if count_prompt else prompt_len  # count_prompt: the wrong rule, to show it differs
        self.presence, self.frequency = presence, frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        counted = input_ids[:, self.start :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, counted, torch.ones_like(counted, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


@torch.inference_mode()
def reference_greedy(
    oracle: PeftOracle,
    adapter: str | None,
    prompt: list[int],
    max_new: int,
    processors: list[LogitsProcessor],
    stop_ids: tuple[int, ...],
) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding with `processors` applied in order; stops after a stop id. Returns the new
    tokens and the raw logits [n, V] each was chosen from."""
    model = oracle.model(adapter)
    ids = torch.tensor([prompt])
    out, raw = [], []
    for _ in range(max_new):
        logits = model(input_ids=ids).logits[:, -1].float()
        raw.append(logits[0].clone())
        scores = LogitsProcessorList(processors)(ids, logits)
        token = int(scores.argmax(-1))
        out.append(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        if token in stop_ids:
            break
    return out, torch.stack(raw)


class OutputOnly(LogitsProcessor):
    """A processor applied to the generated tokens only (a wrong rule for the repetition penalty)."""

    def __init__(self, prompt_len: int, inner: LogitsProcessor) -> None:
        self.prompt_len, self.inner = prompt_len, inner

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_len :]
        return self.inner(generated, scores) if generated.numel() else scores


class PromptOnly(LogitsProcessor):
    """A processor applied to the prompt's tokens only (another wrong rule for repetition)."""

    def __init__(self, prompt_len: int, inner: LogitsProcessor) -> None:
        self.prompt_len, self.inner = prompt_len, inner

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.inner(input_ids[:, : self.prompt_len], scores)
