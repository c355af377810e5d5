"""Constrained decoding (structured outputs) with llguidance: constraints, their compiled grammars,
and each sequence's matcher and token mask. See docs/structured-outputs.md."""

from alora_core.structured.compiler import CompiledGrammar, GrammarCompiler
from alora_core.structured.constraint import MAX_CONSTRAINT_BYTES, OutputConstraint
from alora_core.structured.matcher import GrammarState, mask_rows

__all__ = [
    "MAX_CONSTRAINT_BYTES",
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarState",
    "OutputConstraint",
    "mask_rows",
]
