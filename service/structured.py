"""Request fields that ask for a structured output -> the engine's OutputConstraint.

    response_format     {"type": "text"} | {"type": "json_object"}
                        | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
                        native API only: {"type": "regex", "regex"} | {"type": "choice", "choice"}
                        | {"type": "grammar", "grammar"}
    structured_outputs  vLLM >= 0.12: exactly one of json | regex | choice | grammar | json_object,
                        with whitespace_pattern, disable_any_whitespace, disable_additional_properties
    guided_*            vLLM < 0.12 (granite-io, Mellea): guided_json | guided_regex | guided_choice |
                        guided_grammar, with guided_whitespace_pattern, guided_decoding_backend

At most one of the three forms, and one constraint within it: anything else is a 400 naming the
field. JSON output is compact by default (json.dumps' separators; see docs/structured-outputs.md).
"""

import json
from typing import Any

from alora_core.errors import InvalidRequestError
from alora_core.structured import OutputConstraint
from service.errors import InvalidBodyError

GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
BACKENDS = (None, "auto", "llguidance", "guidance", "xgrammar", "outlines", "lm-format-enforcer")
_KINDS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}


def refuse(message: str, param: str) -> InvalidBodyError:
    return InvalidBodyError(message, param=param)


def output_constraint(fields: dict[str, Any], *, native: bool = False) -> OutputConstraint | None:
    """fields: the request's response_format, structured_outputs and guided_* values (absent = None).
    Returns the one constraint they ask for (None: free text). Compiles nothing (the engine does)."""
    given = [name for name in ("response_format", "structured_outputs") if fields.get(name) is not None]
    given += [name for name in GUIDED if fields.get(name) is not None]
    rf = fields.get("response_format")
    if isinstance(rf, dict) and rf.get("type") == "text" and len(rf) == 1:
        given.remove("response_format")
    if len(given) > 1:
        raise refuse(f"give at most one output constraint, got {', '.join(given)}", given[1])
    backend = fields.get("guided_decoding_backend")
    if backend not in BACKENDS:
        raise refuse(f"unknown guided_decoding_backend {backend!r}", "guided_decoding_backend")
    if not given:
        if fields.get("guided_whitespace_pattern") is not None:
            raise refuse("guided_whitespace_pattern needs guided_json", "guided_whitespace_pattern")
        return None
    name = given[0]
    try:
        if name == "response_format":
            constraint = from_response_format(rf, native)
        elif name == "structured_outputs":
            constraint = from_structured_outputs(fields["structured_outputs"])
        else:
            constraint = from_guided(name, fields[name], fields.get("guided_whitespace_pattern"))
        constraint.check()  # size and shape; the engine compiles it (and names what it rejects)
    except InvalidRequestError as exc:
        raise refuse(exc.message, name) from None
    return constraint


def from_response_format(rf: Any, native: bool) -> OutputConstraint:
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise InvalidRequestError("response_format must be an object with a `type`")
    kind = rf["type"]
    if kind == "json_object":
        return OutputConstraint("json_object")
    if kind == "json_schema":
        spec = rf.get("json_schema")
        if not isinstance(spec, dict) or "schema" not in spec:
            raise InvalidRequestError("response_format json_schema needs `json_schema: {name, schema}`")
        return OutputConstraint.json_schema(spec["schema"])
    if native and kind in ("regex", "grammar") and isinstance(rf.get(kind), str):
        return OutputConstraint(kind, rf[kind])
    if native and kind == "choice" and isinstance(rf.get("choice"), list):
        return OutputConstraint.choice(rf["choice"])
    kinds = "text, json_object, json_schema" + (", regex, choice, grammar" if native else "")
    raise InvalidRequestError(f"response_format type must be one of {kinds} (with its value), got {kind!r}")


def from_structured_outputs(so: Any) -> OutputConstraint:
    if not isinstance(so, dict):
        raise InvalidRequestError("structured_outputs must be an object")
    unknown = set(so) - {*_KINDS, "json_object", "whitespace_pattern", "disable_any_whitespace"}
    unknown -= {"disable_additional_properties", "disable_fallback", "backend"}
    if unknown:
        raise InvalidRequestError(f"structured_outputs: unsupported field(s) {sorted(unknown)}")
    kinds = [k for k in (*_KINDS, "json_object") if so.get(k) not in (None, False)]
    if len(kinds) != 1:
        raise InvalidRequestError(
            f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object; got {kinds or 'none'}"
        )
    pattern = so.get("whitespace_pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise InvalidRequestError("structured_outputs.whitespace_pattern must be a string")
    return _constraint(kinds[0], so[kinds[0]], pattern)


def from_guided(name: str, value: Any, whitespace_pattern: Any) -> OutputConstraint:
    if whitespace_pattern is not None and name != "guided_json":
        raise InvalidRequestError("guided_whitespace_pattern applies to guided_json only")
    return _constraint(name.removeprefix("guided_"), value, whitespace_pattern)


def _constraint(kind: str, value: Any, whitespace_pattern: str | None) -> OutputConstraint:
    """kind: json | regex | choice | grammar | json_object (vLLM's names) and its value."""
    if kind == "json_object":
        return OutputConstraint("json_object", whitespace_pattern=whitespace_pattern)
    if kind == "json":
        if isinstance(value, str):  # vLLM accepts the schema as JSON text too
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise InvalidRequestError(f"the JSON schema is not valid JSON: {exc}") from None
        return OutputConstraint.json_schema(value, whitespace_pattern=whitespace_pattern)
    if kind == "choice":
        if not isinstance(value, list):
            raise InvalidRequestError("choice must be a list of strings")
        return OutputConstraint.choice(value)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{kind} must be a string")
    return OutputConstraint(_KINDS[kind], value)  # type: ignore[arg-type]
