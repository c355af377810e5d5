"""The adapter output-format sidecar (alora_output.json) and how `result` is parsed from text."""

import json
from pathlib import Path

import pytest

from alora_core.errors import AdapterLoadError
from alora_core.fixtures import IO_CONFIG_FILE, DemoPaths
from service.outputs import (
    OUTPUT_FORMAT_FILE,
    JsonFormat,
    LabelsFormat,
    NumberFormat,
    load_output_format,
    parse_output,
)

LABELS = LabelsFormat(type="labels", labels=["answerable", "unanswerable"])
NUMBER = NumberFormat(type="number", minimum=0, maximum=1)
JSON = JsonFormat(type="json")


@pytest.mark.parametrize(
    ("fmt", "text", "value"),
    [
        (LABELS, "answerable", "answerable"),
        (LABELS, "  Unanswerable.\n", "unanswerable"),
        (LABELS, '"answerable"', "answerable"),
        (NUMBER, "0.85", 0.85),
        (NUMBER, " 1 ", 1.0),
        (NUMBER, ".5", 0.5),
        (
            JSON,
            '{"rewritten_question": "What is the weather?"}',
            {"rewritten_question": "What is the weather?"},
        ),
        (JSON, " [1, 2] ", [1, 2]),
    ],
)
def test_parses(fmt: LabelsFormat | NumberFormat | JsonFormat, text: str, value: object) -> None:
    parsed = parse_output(fmt, text)
    assert parsed.error is None
    assert parsed.value == value


@pytest.mark.parametrize(
    ("fmt", "text", "reason"),
    [
        (LABELS, "answerable because the document says so", "not one of the labels"),
        (LABELS, "", "not one of the labels"),
        (NUMBER, "about 0.5", "not a number"),
        (NUMBER, "1.5", "outside"),
        (NUMBER, "nan", "not a number"),
        (NUMBER, "1e999", "not a finite number"),
        (JSON, "{'single': 'quotes'}", "not JSON"),
        (JSON, "NaN", "not JSON"),
        (JSON, "[" * 100_000, "not JSON"),
    ],
)
def test_unparsable_output_gives_null_and_a_reason(
    fmt: LabelsFormat | NumberFormat | JsonFormat, text: str, reason: str
) -> None:
    parsed = parse_output(fmt, text)
    assert parsed.value is None
    assert parsed.error is not None and reason in parsed.error


def test_demo_adapters_ship_io_yaml_not_sidecars(demo: DemoPaths) -> None:
    """The demo's adapters moved from the deprecated sidecar to io.yaml (issue 18)."""
    formats = {name: load_output_format(path) for name, path in demo.adapters.items()}
    assert formats == {"uncertainty": None, "answerability": None, "query_rewrite": None}
    assert all((path / IO_CONFIG_FILE).is_file() for path in demo.adapters.values())


def test_no_sidecar_means_no_format(tmp_path: Path) -> None:
    assert load_output_format(tmp_path) is None


@pytest.mark.parametrize(
    "sidecar",
    ['{"type": "labels", "labels": []}', '{"type": "regex"}', '{"type": "number", "max": 1}', "not json"],
)
def test_malformed_sidecar_fails_loudly(tmp_path: Path, sidecar: str) -> None:
    (tmp_path / OUTPUT_FORMAT_FILE).write_text(sidecar)
    with pytest.raises(AdapterLoadError, match=OUTPUT_FORMAT_FILE):
        load_output_format(tmp_path)


def test_sidecar_round_trips_through_json(tmp_path: Path) -> None:
    (tmp_path / OUTPUT_FORMAT_FILE).write_text(json.dumps(LABELS.model_dump()))
    assert load_output_format(tmp_path) == LABELS
