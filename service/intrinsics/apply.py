"""The native /intrinsic's io.yaml path, with granite-common as the library (it is the reference
IBM's clients run; the service runs the same code on the same inputs):

    messages (+ documents, instruction args)
      -> IntrinsicsRewriter.transform       instruction turn, sentence markers, documents, params
      -> chat template (as /v1/chat/completions renders it: an aLoRA's invocation replaces the
         generation prompt) -> prompt ids
      -> engine: io.yaml parameters as sampling defaults, top-10 logprobs when a rule needs them,
         the output schema as a decoding constraint (output_constraint)
      -> {choices: [{message: {content: text}, logprobs}]}  (OpenAI's chat shape)
      -> IntrinsicsResultProcessor.transform -> `result` (the processed JSON)

A token input (prompt, input_ids, conversation) skips the rewriter; an io.yaml that edits the
messages (instruction, sentence boundaries, documents as a message) then needs `messages` (400).
"""

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from granite_common import IntrinsicsResultProcessor, IntrinsicsRewriter
from granite_common.base.types import ChatCompletion
from pydantic import JsonValue, ValidationError

from alora_core import SamplingParams
from alora_core.errors import AdapterLoadError, InvalidRequestError
from alora_core.structured.constraint import OutputConstraint
from service.intrinsics.config import PARAMETERS, TOP_LOGPROBS, AdapterIo, IoConfig, load_io_config

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IntrinsicIo:
    """An adapter's io.yaml with the granite-common rewriter and processor built from it."""

    io: AdapterIo
    rewriter: IntrinsicsRewriter
    processor: IntrinsicsResultProcessor

    @property
    def config(self) -> IoConfig:
        return self.io.config


def load_intrinsic_ios(adapters: dict[str, Path]) -> dict[str, IntrinsicIo]:
    """Every adapter's io.yaml (those that have one), checked before the model loads."""
    out = {}
    for name, path in adapters.items():
        io = load_io_config(Path(path))
        if io is None:
            continue
        try:
            config = io.config.granite_dict()
            out[name] = IntrinsicIo(
                io, IntrinsicsRewriter(config_dict=config), IntrinsicsResultProcessor(config_dict=config)
            )
        except (ImportError, TypeError, ValueError) as exc:  # e.g. nltk missing for sentence_boundaries
            raise AdapterLoadError(f"{io.path}: granite-common cannot use it: {exc}") from exc
    return out


def rewrite(
    iio: IntrinsicIo,
    messages: list[dict[str, Any]],
    documents: list[dict[str, Any]] | None,
    args: dict[str, str],
) -> ChatCompletion:
    """granite-common's rewritten request (400 when the inputs do not fit the io.yaml)."""
    request: dict[str, Any] = {"messages": messages}
    if documents is not None:
        request["extra_body"] = {"documents": documents}
    try:
        return iio.rewriter.transform(request, **args)
    except (ValueError, TypeError, ValidationError) as exc:
        raise InvalidRequestError(f"cannot apply the adapter's io.yaml to this request: {exc}") from None


def template_inputs(rewritten: ChatCompletion) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """(messages, documents) of a rewritten request, as the chat template takes them."""
    messages = [m.model_dump(exclude_none=True) for m in rewritten.messages]
    extra = rewritten.extra_body
    documents = None
    if extra is not None and extra.documents is not None:
        documents = [d.model_dump(exclude_none=True) for d in extra.documents]
    return messages, documents


def sampling_defaults(config: IoConfig, given: set[str]) -> dict[str, Any]:
    """The io.yaml's parameters as SamplingParams fields, for those the caller did not set."""
    out: dict[str, Any] = {}
    for name, value in (config.parameters or {}).items():
        field = PARAMETERS[name]
        if field in given:
            continue
        out[field] = tuple(value) if field == "stop" and isinstance(value, list) else value
    return out


def output_constraint(config: IoConfig, params: SamplingParams) -> SamplingParams:
    """The one place an io.yaml's `response_format` becomes a decoding constraint (the request's
    own `response_format`, if it gave one, wins)."""
    if config.response_format is None or params.constraint is not None:
        return params
    return replace(params, constraint=OutputConstraint.json_schema(config.response_format))


def with_io(config: IoConfig, params: SamplingParams, own_format: bool = False) -> SamplingParams:
    """Logprobs when a rule needs them (top 10, as granite-common asks), and the constraint unless
    the request gave its own `response_format` (`{"type": "text"}`: unconstrained)."""
    if config.needs_logprobs:
        params = replace(params, logprobs=max(params.logprobs or 0, TOP_LOGPROBS))
    return params if own_format else output_constraint(config, params)


def process(
    iio: IntrinsicIo, text: str, logprobs: list[dict[str, Any]] | None, rewritten: ChatCompletion | None
) -> tuple[JsonValue, str | None]:
    """(result, None) or (None, why): granite-common's processor on the raw output, as a client
    would run it on /v1/chat/completions' response."""
    choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        choice["logprobs"] = {"content": logprobs}
    response = {"choices": [choice]}
    try:
        processed = iio.processor.transform(response, rewritten)
        return json.loads(processed.choices[0].message.content), None
    except Exception as exc:  # any failure of the rules on this output is the output's fault
        log.debug("io.yaml result processing failed", exc_info=True)
        return None, f"output {text[:80]!r} does not fit the adapter's io.yaml: {type(exc).__name__}: {exc}"
