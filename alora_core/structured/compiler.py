"""The tokenizer bridge and the compiled-grammar cache of one engine (so: per tokenizer).

    GrammarCompiler(tokenizer, vocab_size, eos_ids)   llguidance's view of the tokenizer, built once
        .compile(constraint) -> CompiledGrammar      cached (LRU) per constraint; an invalid one
                                                      raises InvalidRequestError naming the problem
        .matcher(constraint) -> GrammarState          a fresh matcher of it, for one sequence

Compiling runs on the caller's thread (the route's worker thread, before submit): a slow schema
delays only its own request, never the scheduler's steps.
"""

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
from transformers import PreTrainedTokenizerBase

from alora_core.errors import InvalidRequestError
from alora_core.structured.constraint import OutputConstraint
from alora_core.structured.matcher import GrammarState

log = logging.getLogger(__name__)

CACHE_SIZE = 256  # compiled grammars kept (LRU)


@dataclass(frozen=True)
class CompiledGrammar:
    constraint: OutputConstraint
    template: llguidance.LLMatcher  # in its start state; each sequence gets a deep copy
    compile_s: float  # seconds the cold compile took


@dataclass
class CompileStats:
    compiled: int = 0  # cold compiles (cache misses)
    hits: int = 0
    compile_s: float = 0.0  # total seconds of cold compiles


class GrammarCompiler:
    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: tuple[int, ...]
    ) -> None:
        """vocab_size: the logits' width (model vocabulary rows, which may exceed the tokenizer's:
        those ids are never allowed). Tokenizers llguidance cannot read leave structured outputs
        unavailable (each constrained request: 400 saying why), the rest of the engine unchanged."""
        self.vocab_size = vocab_size
        self.unavailable: str | None = None
        self.tokenizer: llguidance.LLTokenizer | None = None
        try:
            self.tokenizer = llguidance.hf.from_tokenizer(
                tokenizer,  # type: ignore[arg-type]
                n_vocab=vocab_size,
                eos_token=list(eos_token_ids) or None,
            )
        except (ValueError, TypeError, RuntimeError) as exc:  # a slow (Python) tokenizer, an odd vocabulary
            self.unavailable = f"{type(tokenizer).__name__}: {exc}"
            log.warning("structured outputs are unavailable: %s", self.unavailable)
        self.stats = CompileStats()
        self._cache: OrderedDict[OutputConstraint, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        with self._lock:
            compiled = self._cache.get(constraint)
            if compiled is not None:
                self._cache.move_to_end(constraint)
                self.stats.hits += 1
                return compiled
        compiled = self._compile(constraint)  # outside the lock: other constraints compile meanwhile
        with self._lock:
            self._cache[constraint] = compiled
            self._cache.move_to_end(constraint)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            self.stats.compiled += 1
            self.stats.compile_s += compiled.compile_s
        return compiled

    def matcher(self, constraint: OutputConstraint) -> GrammarState:
        return GrammarState(self.compile(constraint).template.deep_copy())

    def _compile(self, constraint: OutputConstraint) -> CompiledGrammar:
        if self.tokenizer is None:
            raise InvalidRequestError(
                f"structured outputs are unavailable with this tokenizer ({self.unavailable})"
            )
        t0 = time.perf_counter()
        grammar = constraint.grammar_text()
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)  # never raises: error state
        if matcher.is_error():
            raise InvalidRequestError(f"invalid {constraint.kind} constraint: {matcher.get_error().strip()}")
        return CompiledGrammar(constraint, matcher, time.perf_counter() - t0)
