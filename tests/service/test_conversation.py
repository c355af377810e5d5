"""A multi-turn conversation over HTTP with intrinsics between turns, each answer checked token for
token against Hugging Face PEFT on the same history (greedy, float32, CPU)."""

import httpx

from tests.alora_core.conftest import PeftOracle
from tests.service.conftest import FREE_TEXT, chat_ids, invocation_ids

N = 6  # tokens per answer


def greedy(oracle: PeftOracle, adapter: str | None, context: list[int], n: int = N) -> list[int]:
    tokens, _ = oracle.generate(adapter, context, n)
    return tokens


def conversation_tokens(client: httpx.Client, conversation_id: str) -> int:
    response = client.get(f"/conversations/{conversation_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["num_tokens"])


def test_multi_turn_conversation_with_intrinsics_matches_peft(
    client: httpx.Client, oracle: PeftOracle
) -> None:
    cid = "parity-1"
    messages = [{"role": "user", "content": "What is the weather in the city by the river?"}]

    # turn 1: chat messages, a new conversation
    turn1 = client.post("/generate", json={"conversation_id": cid, "messages": messages, "max_tokens": N})
    assert turn1.status_code == 200, turn1.text
    t1 = turn1.json()
    h1 = chat_ids(oracle, messages)
    assert t1["conversation_id"] == cid
    assert t1["usage"] == {
        "prompt_tokens": len(h1),
        "completion_tokens": len(t1["token_ids"]),
        "cached_tokens": 0,
    }
    assert t1["token_ids"] == greedy(oracle, None, h1)
    history = h1 + t1["token_ids"]
    assert conversation_tokens(client, cid) == len(history)

    # intrinsic 1: aLoRA (PEFT >= 0.18 format) on the conversation: invocation appended, base KV reused
    certainty = client.post(
        "/intrinsic/certainty", json={"conversation_id": cid, "max_tokens": N, "response_format": FREE_TEXT}
    )
    assert certainty.status_code == 200, certainty.text
    c = certainty.json()
    context = history + invocation_ids(client, "certainty")
    assert c["token_ids"] == greedy(oracle, "certainty", context)
    assert c["activation_start"] == len(history)
    assert c["usage"]["prompt_tokens"] == len(context)
    assert c["usage"]["cached_tokens"] == len(history) - 1  # the last sampled token has no KV yet
    assert conversation_tokens(client, cid) == len(history)  # unchanged

    # turn 2: the full history again as messages: the cached prefix is reused
    messages += [{"role": "assistant", "content": t1["text"]}, {"role": "user", "content": "And tomorrow?"}]
    turn2 = client.post("/generate", json={"conversation_id": cid, "messages": messages, "max_tokens": N})
    assert turn2.status_code == 200, turn2.text
    t2 = turn2.json()
    h2 = chat_ids(oracle, messages)
    assert h2[: len(h1)] == h1
    assert t2["usage"]["prompt_tokens"] == len(h2)
    assert t2["usage"]["cached_tokens"] >= len(h1)
    assert t2["token_ids"] == greedy(oracle, None, h2)
    history = h2 + t2["token_ids"]
    assert conversation_tokens(client, cid) == len(history)

    # intrinsic 2: legacy aLoRA (invocation_string), explicit input that already holds the invocation
    invocation = invocation_ids(client, "answerability")
    context = history + invocation
    answerability = client.post(
        "/intrinsic/answerability",
        json={"conversation_id": cid, "input_ids": context, "max_tokens": N, "response_format": FREE_TEXT},
    )
    assert answerability.status_code == 200, answerability.text
    a = answerability.json()
    assert a["usage"]["prompt_tokens"] == len(context)  # not appended a second time
    assert a["usage"]["cached_tokens"] == len(history) - 1
    assert a["token_ids"] == greedy(oracle, "answerability", context)

    # intrinsic 3: plain LoRA recomputes the whole conversation with its own weights
    rewrite = client.post(
        "/intrinsic/rewrite", json={"conversation_id": cid, "max_tokens": N, "response_format": FREE_TEXT}
    )
    assert rewrite.status_code == 200, rewrite.text
    r = rewrite.json()
    assert r["usage"] == {
        "prompt_tokens": len(history),
        "completion_tokens": len(r["token_ids"]),
        "cached_tokens": 0,
    }
    assert r["token_ids"] == greedy(oracle, "rewrite", history)
    assert conversation_tokens(client, cid) == len(history)

    # turn 3: input_ids extending the exact history: everything but the last token comes from cache
    more = oracle.tokenizer.encode(" please tell me more", add_special_tokens=False)
    h3 = history + more
    turn3 = client.post("/generate", json={"conversation_id": cid, "input_ids": h3, "max_tokens": N})
    assert turn3.status_code == 200, turn3.text
    t3 = turn3.json()
    assert t3["usage"]["cached_tokens"] == len(history) - 1
    assert t3["token_ids"] == greedy(oracle, None, h3)
    assert conversation_tokens(client, cid) == len(h3) + len(t3["token_ids"])

    # and the first intrinsic again, on the longer conversation
    again = client.post(
        "/intrinsic/certainty", json={"conversation_id": cid, "max_tokens": N, "response_format": FREE_TEXT}
    ).json()
    context = h3 + t3["token_ids"] + invocation_ids(client, "certainty")
    assert again["token_ids"] == greedy(oracle, "certainty", context)


def test_intrinsic_on_messages_without_conversation(client: httpx.Client, oracle: PeftOracle) -> None:
    """Input given, no conversation: the chat template without a generation prompt, then the invocation."""
    messages = [
        {"role": "user", "content": "Where is the mountain?"},
        {"role": "assistant", "content": "It is by the river."},
    ]
    response = client.post(
        "/intrinsic/certainty", json={"messages": messages, "max_tokens": N, "response_format": FREE_TEXT}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    context = chat_ids(oracle, messages, generation_prompt=False) + invocation_ids(client, "certainty")
    assert body["conversation_id"] is None
    assert body["usage"]["cached_tokens"] == 0
    assert body["usage"]["prompt_tokens"] == len(context)
    assert body["token_ids"] == greedy(oracle, "certainty", context)


def test_prompt_form_uses_tokenizer_defaults(client: httpx.Client, oracle: PeftOracle) -> None:
    prompt = "Tell me about the cache of the service."
    response = client.post("/generate", json={"prompt": prompt, "max_tokens": N})
    assert response.status_code == 200, response.text
    ids = list(oracle.tokenizer.encode(prompt))
    body = response.json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["token_ids"] == greedy(oracle, None, ids)
    assert len(body["conversation_id"]) == 32  # a fresh id was made


def test_adapters_list_io_yaml_summaries_and_aliases(client: httpx.Client) -> None:
    """The demo's adapters carry io.yaml (issue 18: it replaced the alora_output.json sidecar) and
    answer to their old names too."""
    adapters = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
    assert adapters["uncertainty"]["output_format"] is None
    assert adapters["uncertainty"]["io"]["transformations"] == ["likelihood", "nest"]
    assert adapters["uncertainty"]["io"]["needs_logprobs"] is True
    assert adapters["certainty"]["alias_of"] == "uncertainty"
    assert adapters["answerability"]["kind"] == "alora"  # legacy invocation_string, still an aLoRA
    assert adapters["rewrite"]["kind"] == "lora"
    assert adapters["rewrite"]["invocation_tokens"] is None
    assert adapters["rewrite"]["alias_of"] == "query_rewrite"
    assert adapters["query_rewrite"]["io"]["response_format"]["required"] == ["rewritten_question"]
