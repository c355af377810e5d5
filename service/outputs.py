"""Adapter output formats: an optional `alora_output.json` sidecar in an adapter's directory says how
to parse the adapter's generated text into a typed `result`:

    {"type": "labels", "labels": ["answerable", "unanswerable"]}   -> "answerable"
    {"type": "number", "minimum": 0, "maximum": 1}                 -> 0.85
    {"type": "json"}                                               -> {"rewritten_question": "..."}

Parsing is strict and predictable: surrounding whitespace is ignored (and, for labels, surrounding
quotes and a trailing full stop); anything else that does not match gives `result: null` and a
`result_error` saying why, never a guess.
"""

import json
import math
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError

from alora_core.errors import AdapterLoadError

OUTPUT_FORMAT_FILE = "alora_output.json"  # same name as alora_core.fixtures.OUTPUT_FORMAT_FILE
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


class LabelsFormat(BaseModel):
    """The output is one of a fixed set of labels (matched case-insensitively; result = the label)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["labels"]
    labels: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, description="Allowed labels.")


class NumberFormat(BaseModel):
    """The output is one number, optionally within [minimum, maximum]."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["number"]
    minimum: float | None = Field(None, description="Smallest accepted value.")
    maximum: float | None = Field(None, description="Largest accepted value.")


class JsonFormat(BaseModel):
    """The output is one JSON value (object, array, string, number, boolean or null)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json"]


OutputFormat = Annotated[LabelsFormat | NumberFormat | JsonFormat, Field(discriminator="type")]
_FORMAT: TypeAdapter[LabelsFormat | NumberFormat | JsonFormat] = TypeAdapter(OutputFormat)


class ParsedOutput(BaseModel):
    value: JsonValue = None
    error: str | None = None


def load_output_format(adapter_dir: Path) -> LabelsFormat | NumberFormat | JsonFormat | None:
    """The adapter's declared format, None without a sidecar. A malformed sidecar fails loudly."""
    path = adapter_dir / OUTPUT_FORMAT_FILE
    if not path.is_file():
        return None
    try:
        return _FORMAT.validate_json(path.read_bytes())
    except (OSError, ValidationError) as exc:
        raise AdapterLoadError(f"{path} is not a valid output-format sidecar: {exc}") from exc


def parse_output(fmt: LabelsFormat | NumberFormat | JsonFormat, text: str) -> ParsedOutput:
    stripped = text.strip()
    if isinstance(fmt, LabelsFormat):
        candidate = stripped.strip("\"'").removesuffix(".").strip().casefold()
        for label in fmt.labels:
            if label.casefold() == candidate:
                return ParsedOutput(value=label)
        return ParsedOutput(error=f"output {stripped[:80]!r} is not one of the labels {fmt.labels}")
    if isinstance(fmt, NumberFormat):
        if not _NUMBER.fullmatch(stripped):
            return ParsedOutput(error=f"output {stripped[:80]!r} is not a number")
        number = float(stripped)
        if not math.isfinite(number):
            return ParsedOutput(error=f"output {stripped[:80]!r} is not a finite number")
        if (fmt.minimum is not None and number < fmt.minimum) or (
            fmt.maximum is not None and number > fmt.maximum
        ):
            return ParsedOutput(error=f"output {number} is outside [{fmt.minimum}, {fmt.maximum}]")
        return ParsedOutput(value=number)
    try:
        return ParsedOutput(value=json.loads(stripped, parse_constant=_reject_constant))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, NaN/Infinity, absurd nesting
        return ParsedOutput(error=f"output {stripped[:80]!r} is not JSON: {exc}")


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")
