"""Structured outputs through the real openai SDK against a running server on the random demo model:
every request form (response_format, vLLM's structured_outputs, the legacy guided_*), on the base
model, a LoRA and an aLoRA, greedy, sampled, n=4 and streamed; outputs validated with jsonschema /
re; logprobs after the mask; bad constraints are 400s naming the field and leave the server exact."""

import json
import re
from typing import Any

import jsonschema
import openai
import pytest

from tests.service.openai.conftest import SERVED
from tests.service.openai.test_errors import error_of

OBJECT = {
    "type": "object",
    "properties": {
        "certainty": {"type": "number", "minimum": 0, "maximum": 1},
        "citations": {
            "type": "array",
            "items": {"type": "object", "properties": {"doc": {"type": "integer"}}, "required": ["doc"]},
            "maxItems": 3,
        },
    },
    "required": ["certainty", "citations"],
}
ARRAY = {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3}
REGEX = r"[A-Z][a-z]{1,8}-[0-9]{2}"
CHOICES = ["yes", "no", "maybe not"]
LARK = 'start: item (", " item)*\nitem: "a" | "b" NUM\nNUM: /[0-9]/'
LARK_AS_REGEX = r"(a|b[0-9])(, (a|b[0-9]))*"
CHAT = [{"role": "user", "content": "Is the sky blue? Answer in the requested format."}]


def schema_check(schema: dict[str, Any]) -> Any:
    return lambda text: jsonschema.validate(json.loads(text), schema)


def regex_check(pattern: str) -> Any:
    def check(text: str) -> None:
        assert re.fullmatch(pattern, text), text

    return check


# (request fields, validator) for each form a client may send
FORMS = {
    "response_format_json_schema": (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "Out", "schema": OBJECT, "strict": True},
            }
        },
        schema_check(OBJECT),
    ),
    "response_format_json_object": (
        {"response_format": {"type": "json_object"}},
        lambda text: isinstance(json.loads(text), dict) or pytest.fail(text),
    ),
    "structured_outputs_json": ({"structured_outputs": {"json": ARRAY}}, schema_check(ARRAY)),
    "structured_outputs_regex": ({"structured_outputs": {"regex": REGEX}}, regex_check(REGEX)),
    "structured_outputs_choice": (
        {"structured_outputs": {"choice": CHOICES}},
        lambda t: t in CHOICES or pytest.fail(t),
    ),
    "structured_outputs_grammar": ({"structured_outputs": {"grammar": LARK}}, regex_check(LARK_AS_REGEX)),
    "guided_json": ({"guided_json": OBJECT}, schema_check(OBJECT)),
    "guided_json_text": ({"guided_json": json.dumps(ARRAY)}, schema_check(ARRAY)),
    "guided_regex": ({"guided_regex": REGEX}, regex_check(REGEX)),
    "guided_choice": ({"guided_choice": CHOICES}, lambda t: t in CHOICES or pytest.fail(t)),
    "guided_grammar": (
        {"guided_grammar": LARK, "guided_decoding_backend": "xgrammar"},
        regex_check(LARK_AS_REGEX),
    ),
}


def chat(sdk: openai.OpenAI, fields: dict[str, Any], model: str = SERVED, **kw: Any) -> Any:
    body = {"max_tokens": 120, **kw}
    sdk_fields = {
        k: body.pop(k)
        for k in ("max_tokens", "temperature", "seed", "n", "logprobs", "top_logprobs", "stop")
        if k in body
    }
    extra = dict(fields)
    if "response_format" in extra:
        sdk_fields["response_format"] = extra.pop("response_format")
    return sdk.chat.completions.create(model=model, messages=CHAT, extra_body={**extra, **body}, **sdk_fields)


@pytest.mark.parametrize("form", list(FORMS))
def test_every_request_form_constrains_the_output(sdk: openai.OpenAI, form: str) -> None:
    fields, check = FORMS[form]
    choices = chat(sdk, fields, temperature=1.0, seed=11, n=4).choices
    choices += chat(sdk, fields, temperature=0).choices
    if form == "response_format_json_object":  # any object: random weights write long strings
        choices = [c for c in choices if c.finish_reason == "stop"]
        assert choices  # (the ones cut at max_tokens are unfinished objects)
    for choice in choices:
        assert choice.finish_reason == "stop", choice
        check(choice.message.content)


@pytest.mark.parametrize("model", ["rewrite", "certainty"])
def test_adapters_are_constrained_too(sdk: openai.OpenAI, model: str) -> None:
    texts = []
    for seed in range(10):
        response = chat(
            sdk, {"structured_outputs": {"json": OBJECT}}, model=model, temperature=1.0, seed=seed
        )
        choice = response.choices[0]
        texts.append(choice.message.content)
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), OBJECT)
    assert len(set(texts)) > 1  # really sampled


def test_completions_and_streaming_are_constrained(sdk: openai.OpenAI) -> None:
    for seed in range(4):
        response = sdk.completions.create(
            model=SERVED, prompt="The answer:", max_tokens=120, temperature=1.0, seed=seed,
            extra_body={"guided_json": OBJECT},
        )  # fmt: skip
        assert response.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(response.choices[0].text), OBJECT)
    stream = sdk.chat.completions.create(
        model=SERVED, messages=CHAT, max_tokens=120, temperature=1.0, seed=5, n=2, stream=True,
        extra_body={"structured_outputs": {"json": OBJECT}},
    )  # fmt: skip
    texts, reasons = ["", ""], [None, None]
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert reasons == ["stop", "stop"]
    for text in texts:
        jsonschema.validate(json.loads(text), OBJECT)


def test_logprobs_are_after_the_mask(sdk: openai.OpenAI) -> None:
    """Tokens spell the text; every top alternative with a real logprob continues some choice (the
    mask removed the rest: they are absent or at -9999.0)."""
    for seed in range(3):
        response = chat(
            sdk, {"guided_choice": CHOICES}, temperature=1.0, seed=seed, logprobs=True, top_logprobs=8
        )
        choice = response.choices[0]
        content = choice.logprobs.content
        assert "".join(t.token for t in content if t.token != "<|end_of_text|>") == choice.message.content
        so_far = ""
        for entry in content:
            assert entry.logprob > -9999.0
            for alt in entry.top_logprobs:
                if alt.logprob > -9999.0:
                    extended = so_far + alt.token
                    ending = alt.token == "<|end_of_text|>" and so_far in CHOICES
                    assert ending or any(c.startswith(extended) for c in CHOICES), (so_far, alt.token)
            so_far += entry.token if entry.token != "<|end_of_text|>" else ""


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        (
            {"structured_outputs": {"json": {"type": "object", "properties": {"a": {"type": 7}}}}},
            "structured_outputs",
        ),
        (
            {"guided_json": {"type": "object", "dependentRequired": {"a": ["b"]}}},
            "guided_json",
        ),  # unsupported
        ({"guided_regex": "([a-z"}, "guided_regex"),
        ({"guided_grammar": 'start: "a" undefined_rule'}, "guided_grammar"),
        ({"structured_outputs": {"regex": "a" * 40000}}, "structured_outputs"),  # oversize
        ({"structured_outputs": {"json": OBJECT, "regex": "a"}}, "structured_outputs"),  # two in one
        ({"guided_json": OBJECT, "response_format": {"type": "json_object"}}, "guided_json"),  # conflicting
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_decoding_backend": "magic", "guided_regex": "a"}, "guided_decoding_backend"),
        ({"guided_regex": "a", "ignore_eos": True}, None),
    ],
)
def test_bad_constraints_are_400_and_the_server_stays_exact(
    sdk: openai.OpenAI, fields: dict[str, Any], param: str | None
) -> None:
    before = chat(sdk, {"guided_json": OBJECT}, temperature=0).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as caught:
        chat(sdk, fields, temperature=0)
    error = error_of(caught.value)
    if param is not None:
        assert error["param"] == param, error
    assert chat(sdk, {"guided_json": OBJECT}, temperature=0).choices[0].message.content == before


def test_text_response_format_and_no_constraint_are_the_same(sdk: openai.OpenAI) -> None:
    plain = chat(sdk, {}, temperature=0, max_tokens=12).choices[0].message.content
    text = chat(sdk, {"response_format": {"type": "text"}}, temperature=0, max_tokens=12)
    assert text.choices[0].message.content == plain
    constrained = chat(sdk, {"guided_json": OBJECT}, temperature=0, max_tokens=12)
    assert constrained.choices[0].message.content != plain


def test_a_dead_end_ends_that_choice_with_finish_reason_error(sdk: openai.OpenAI) -> None:
    """min_tokens holds back the end the grammar needs: no token is allowed. That request ends with
    finish_reason "error" (not a hang, not a 500); the next request is exact."""
    before = chat(sdk, {"guided_choice": CHOICES}, temperature=0).choices[0].message.content
    dead = chat(sdk, {"guided_choice": ["x"], "min_tokens": 8}, temperature=0).choices[0]
    assert dead.finish_reason == "error" and dead.message.content == "x"
    assert chat(sdk, {"guided_choice": CHOICES}, temperature=0).choices[0].message.content == before
