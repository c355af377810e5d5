"""What a request's output must match, and the llguidance grammar that enforces it.

    OutputConstraint(kind, spec)     kind: json_schema | json_object | regex | choice | grammar
        -> grammar_text()            llguidance's grammar (JSON text) for LLMatcher

JSON defaults differ from JSON Schema's on two points, both as vLLM's default backend (xgrammar)
and OpenAI's strict mode behave, and both so that a model cannot wander forever:
- an object schema that lists `properties` and says nothing of `additionalProperties` accepts no
  other keys (`additional_properties=True`: JSON Schema's default, any other key);
- between JSON tokens goes exactly json.dumps' separators (`", "`, `": "`, no other whitespace);
  `whitespace="any"` allows any JSON whitespace (vLLM's default), `whitespace_pattern` a regex.
"""

import json
from dataclasses import dataclass
from typing import Any, Literal

import llguidance

from alora_core.errors import InvalidRequestError

ConstraintKind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
MAX_CONSTRAINT_BYTES = 32 * 1024  # the schema / regex / grammar text (real intrinsic schemas: < 2 KiB)
MAX_CHOICES = 1024

# keywords whose value is a schema, a list of schemas, or a map of name -> schema
_SCHEMA = ("items", "additionalItems", "additionalProperties", "contains", "propertyNames", "not")
_SCHEMA += ("if", "then", "else", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


@dataclass(frozen=True)
class OutputConstraint:
    """A request's output constraint; hashable, so it keys the compiled-grammar cache."""

    kind: ConstraintKind
    spec: str = ""  # json_schema: the schema as JSON text; regex; grammar (Lark or GBNF); choice: JSON list
    whitespace: Literal["fixed", "any"] = "fixed"  # JSON: json.dumps' separators | any JSON whitespace
    whitespace_pattern: str | None = None  # JSON: this regex between tokens (wins over `whitespace`)
    additional_properties: bool = False  # JSON: objects with `properties` accept other keys when unsaid

    @classmethod
    def json_schema(cls, schema: Any, **options: Any) -> "OutputConstraint":
        if not isinstance(schema, dict | bool):
            raise InvalidRequestError(
                f"a JSON schema must be an object (or a boolean), got {type(schema).__name__}"
            )
        return cls("json_schema", json.dumps(schema, ensure_ascii=False), **options)

    @classmethod
    def choice(cls, options: list[str]) -> "OutputConstraint":
        return cls("choice", json.dumps(options, ensure_ascii=False))

    def check(self) -> None:
        """Size and shape limits (the grammar engine checks the rest when it compiles)."""
        size = len(self.spec.encode()) + len((self.whitespace_pattern or "").encode())
        if size > MAX_CONSTRAINT_BYTES:
            raise InvalidRequestError(
                f"the {self.kind} constraint is {size} bytes; at most {MAX_CONSTRAINT_BYTES} are accepted"
            )
        if self.kind in ("regex", "grammar") and not self.spec.strip():
            raise InvalidRequestError(f"the {self.kind} constraint is empty")
        if self.kind == "choice":
            options = json.loads(self.spec)
            if not isinstance(options, list) or not options or len(options) > MAX_CHOICES:
                raise InvalidRequestError(f"choice must be a list of 1 to {MAX_CHOICES} strings")
            if not all(isinstance(o, str) and o for o in options):
                raise InvalidRequestError("every choice must be a non-empty string")

    def grammar_text(self) -> str:
        """llguidance's grammar for this constraint (InvalidRequestError when it cannot be built;
        errors found while compiling it come from LLMatcher, see compiler.py)."""
        self.check()
        try:
            if self.kind == "json_schema":
                schema = json.loads(self.spec)
                if not self.additional_properties:
                    schema = closed_objects(schema)
                return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=self._json_options())
            if self.kind == "json_object":
                return llguidance.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, defaults=self._json_options()
                )
            if self.kind == "regex":
                return llguidance.LLMatcher.grammar_from_regex(self.spec)
            if self.kind == "choice":
                options = json.loads(self.spec)
                return llguidance.LLMatcher.grammar_from_lark(
                    "start: " + " | ".join(json.dumps(o) for o in options)
                )
            return llguidance.grammar_from("grammar", self.spec)  # Lark, or GBNF converted to Lark
        except (ValueError, TypeError, RecursionError) as exc:
            raise InvalidRequestError(f"invalid {self.kind} constraint: {exc}") from exc

    def _json_options(self) -> dict[str, Any]:
        if self.whitespace_pattern is not None:
            return {"whitespace_pattern": self.whitespace_pattern}
        if self.whitespace == "any":
            return {"whitespace_flexible": True}
        return {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def closed_objects(schema: Any) -> Any:
    """A copy of the schema where every object schema listing `properties` without saying anything
    of other keys (`additionalProperties`, `patternProperties`, `unevaluatedProperties`) gets
    `additionalProperties: false`. Walks only schema positions (a property named "properties" is
    a name, not a keyword)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA:
        if key in out:
            value = out[key]
            out[key] = (
                [closed_objects(s) for s in value] if isinstance(value, list) else closed_objects(value)
            )
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(out.get("properties"), dict) and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out
