"""One sequence's grammar state, and the token mask applied to a step's constrained rows.

    state.consumed == len(seq.output) at every sampling point (checked): a preempted sequence keeps
    its tokens and its matcher, so recompute never puts them out of step; each choice of an n > 1
    request has its own matcher (they fork at the start of the output, the grammar's start state).

    mask_rows(logits [B, V], rows, states):
        bitmask [R, ceil(V / 32)] int32   llguidance fills each row's allowed tokens (CPU, no GIL)
        allowed [R, V] bool               bit v % 32 of word v // 32
                 | stop_token_ids          where the grammar may end (EOS is the grammar's own)
        logits[rows] = where(allowed, logits[rows], -inf)
Plain torch ops (no torch.compile: llguidance's helper compiles for seconds on first use).
"""

from dataclasses import dataclass

import llguidance
import llguidance.torch
import torch

_executor: llguidance.LLExecutor | None = None


def executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for filling many rows at once (made on first use)."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


@dataclass(eq=False)
class GrammarState:
    matcher: llguidance.LLMatcher
    consumed: int = 0  # tokens the matcher has accepted: always the sequence's output length

    def accept(self, token: int) -> str | None:
        """Advance past a sampled token; the error message if the grammar rejects it."""
        if not self.matcher.consume_token(token):
            return self.error() or f"the grammar rejected token {token}"
        self.consumed += 1
        return None

    def error(self) -> str | None:
        return (self.matcher.get_error().strip() or "grammar error") if self.matcher.is_error() else None


def unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """bitmask [R, W] int32 -> allowed [R, vocab] bool: token v is allowed iff bit v % 32 of word
    v // 32 is set (ids past 32 W are not)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(bitmask.shape[0], -1).bool()  # [R, 32 W]
    if bits.shape[1] >= vocab:
        return bits[:, :vocab]
    return torch.nn.functional.pad(bits, (0, vocab - bits.shape[1]), value=False)


def fill_bitmask(states: list[GrammarState], vocab: int) -> torch.Tensor:
    """Each state's allowed next tokens -> bitmask [R, ceil(vocab / 32)] int32 (on the CPU)."""
    bitmask = torch.zeros((len(states), (vocab + 31) // 32), dtype=torch.int32)
    if len(states) == 1:
        llguidance.torch.fill_next_token_bitmask(states[0].matcher, bitmask, 0)
    else:
        pairs = [(s.matcher, i) for i, s in enumerate(states)]
        llguidance.torch.fill_next_token_bitmask_par(executor(), pairs, bitmask)
    return bitmask


def mask_rows(
    logits: torch.Tensor, rows: list[int], states: list[GrammarState], stop_ids: list[tuple[int, ...]]
) -> list[str | None]:
    """In place: logits [B, V] rows `rows` keep only the tokens their state allows (-inf elsewhere);
    stop_ids[i] are allowed too where state i's grammar may end. Returns each state's error (a
    matcher in its error state allows nothing: the caller ends that sequence)."""
    vocab = logits.shape[1]
    allowed = unpack(fill_bitmask(states, vocab).to(logits.device, non_blocking=True), vocab)
    for i, (state, ids) in enumerate(zip(states, stop_ids, strict=True)):
        if ids and state.matcher.is_accepting():
            allowed[i, list(ids)] = True
    if len(rows) == logits.shape[0]:
        logits.masked_fill_(~allowed, float("-inf"))
    else:
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
    return [state.error() for state in states]
