"""An adapter's `io.yaml`, in granite-common's schema (the file IBM ships with each intrinsic):

    model:             name clients put in the request (null: keep theirs)           required key
    response_format:   JSON text of the output's JSON schema (null: free text)       required key
    transformations:   result rules (likelihood, nest, project, explode, ...) | null required key
    instruction:       str.format template appended as a user turn ({last_message}, caller args)
    parameters:        request parameters (max_completion_tokens, temperature, ...)
    sentence_boundaries: {last_message|documents: tag} -> "<tag0> ..." markers (nltk Punkt)
    docs_as_message:   string | json | roles: documents moved into the messages
    logprobs_workaround: rebuild the content from the logprob tokens (gpt-oss)

Loaded at start-up, before the model: a malformed file stops the service with an error naming the
file and the field. The same checks as granite-common's own loader run (it builds every rule), plus
ours: the schema must be a JSON schema, and `parameters` must be ones the native route applies.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from granite_common.intrinsics.output import NAME_TO_RULE
from jsonschema import SchemaError
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, JsonValue, ValidationError, field_validator

from alora_core.errors import AdapterLoadError

IO_CONFIG_FILE = "io.yaml"
LOGPROB_RULES = frozenset({"likelihood"})  # rules that read the top-k logprobs of the output tokens
TOP_LOGPROBS = 10  # what granite-common's rewriter asks for when a rule needs logprobs
# io.yaml `parameters` the native /intrinsic applies, as defaults of its sampling fields
PARAMETERS = {
    "max_completion_tokens": "max_tokens",
    "max_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "seed": "seed",
    "stop": "stop",
}


class Transformation(BaseModel):
    """One result rule; its own arguments are checked by building granite-common's rule."""

    model_config = ConfigDict(extra="allow")
    type: str
    input_path: list[str | int | None]

    @field_validator("type")
    @classmethod
    def _known(cls, value: str) -> str:
        if value not in NAME_TO_RULE:
            raise ValueError(f"unknown transformation {value!r} (known: {sorted(NAME_TO_RULE)})")
        return value


class IoConfig(BaseModel):
    """A parsed io.yaml. `response_format` holds the parsed schema (the file holds JSON text)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None
    response_format: dict[str, JsonValue] | bool | None
    transformations: list[Transformation] | None
    instruction: str | None = None
    parameters: dict[str, JsonValue] | None = None
    sentence_boundaries: dict[Literal["last_message", "documents"], str] | None = None
    docs_as_message: Literal["string", "json", "roles"] | None = None
    logprobs_workaround: bool | None = None

    @field_validator("response_format", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> Any:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"not JSON text: {exc}") from exc
        if isinstance(value, dict):
            try:
                validator_for(value).check_schema(value)
            except SchemaError as exc:
                raise ValueError(f"not a JSON schema: {exc.message}") from exc
        return value

    @field_validator("parameters")
    @classmethod
    def _parameters(cls, value: dict[str, JsonValue] | None) -> dict[str, JsonValue] | None:
        for name in value or {}:
            if name not in PARAMETERS:
                raise ValueError(
                    f"parameter {name!r} is not applied by the native /intrinsic (supported: "
                    f"{sorted(PARAMETERS)})"
                )
        return value

    @property
    def needs_logprobs(self) -> bool:
        return any(t.type in LOGPROB_RULES for t in self.transformations or ())

    @property
    def edits_messages(self) -> bool:
        """The rewriter changes the messages: the input must be `messages`, not tokens."""
        return bool(self.instruction is not None or self.sentence_boundaries or self.docs_as_message)

    def granite_dict(self) -> dict[str, Any]:
        """The dict granite-common's rewriter and processor take (`config_dict=`)."""
        out = self.model_dump(exclude_none=False)
        out["transformations"] = (
            None if self.transformations is None else [t.model_dump() for t in self.transformations]
        )
        return out


@dataclass(frozen=True)
class AdapterIo:
    """An adapter's io.yaml: parsed, and the file's text as written (served for discovery)."""

    config: IoConfig
    text: str
    path: Path


def load_io_config(adapter_dir: Path) -> AdapterIo | None:
    """The adapter's io.yaml, None without one; a malformed one raises naming the file and field."""
    path = adapter_dir / IO_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AdapterLoadError(f"{path}: not readable YAML: {exc}") from exc
    return AdapterIo(parse_io_config(raw, str(path)), text, path)


def parse_io_config(raw: Any, source: str) -> IoConfig:
    if not isinstance(raw, dict):
        raise AdapterLoadError(f"{source}: the top level must be a mapping, got {type(raw).__name__}")
    for required in ("model", "response_format", "transformations"):
        if required not in raw:
            raise AdapterLoadError(f"{source}: field `{required}`: missing (required, may be null)")
    try:
        config = IoConfig.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(top level)"
        raise AdapterLoadError(f"{source}: field `{field}`: {error['msg']}") from None
    for i, rule in enumerate(config.transformations or ()):
        spec = rule.model_dump()
        kwargs = {k: v for k, v in spec.items() if k not in ("type", "input_path")}
        try:
            NAME_TO_RULE[rule.type](config.granite_dict(), rule.input_path, **kwargs)
        except (TypeError, ValueError, KeyError) as exc:
            raise AdapterLoadError(f"{source}: field `transformations.{i}` ({rule.type}): {exc}") from None
    return config


def summary(io: AdapterIo) -> dict[str, Any]:
    """What discovery shows of an io.yaml: the output schema and the result rules."""
    config = io.config
    return {
        "response_format": config.response_format,
        "transformations": [t.type for t in config.transformations or ()],
        "needs_logprobs": config.needs_logprobs,
        "instruction": config.instruction is not None,
        "parameters": config.parameters or {},
    }
