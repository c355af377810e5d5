"""Request -> prompt conversion details that the demo tokenizer cannot show through the server: it
adds no special tokens of its own, so `add_special_tokens` is checked here with one that adds BOS."""

from pathlib import Path

import pytest
from tokenizers import processors
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from service.openai.convert import Target, chat_prompt, encode_prompt
from service.openai.protocol import ChatCompletionRequest

BASE = Target(adapter=None, kind="base", invocation=None, response_model="m")


@pytest.fixture(scope="module")
def bos_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    bos = tokenizer.bos_token
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.bos_token_id)]
    )
    return tokenizer


def test_add_special_tokens_reaches_the_tokenizer(bos_tokenizer: PreTrainedTokenizerBase) -> None:
    bos = bos_tokenizer.bos_token_id
    assert encode_prompt(bos_tokenizer, "the river", add_special_tokens=True)[0] == bos
    assert encode_prompt(bos_tokenizer, "the river", add_special_tokens=False)[0] != bos
    assert encode_prompt(bos_tokenizer, [5, 6], add_special_tokens=True) == [5, 6]  # ids as given
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    plain = chat_prompt(bos_tokenizer, ChatCompletionRequest.model_validate(chat), BASE)
    added = chat_prompt(
        bos_tokenizer, ChatCompletionRequest.model_validate({**chat, "add_special_tokens": True}), BASE
    )
    assert added == [bos, *plain]


def test_text_parts_are_joined_with_newlines(tokenizer: PreTrainedTokenizerBase) -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}
    joined = {"role": "user", "content": "one\ntwo"}
    as_parts = chat_prompt(tokenizer, ChatCompletionRequest.model_validate({"messages": [parts]}), BASE)
    as_text = chat_prompt(tokenizer, ChatCompletionRequest.model_validate({"messages": [joined]}), BASE)
    assert as_parts == as_text
