"""Simultaneous requests on one conversation: diverging /generate histories and intrinsics in flight
together each get exactly PEFT's answer for their own input, and the cache stays correct after."""

from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from tests.alora_core.conftest import PeftOracle
from tests.service.conftest import FREE_TEXT, KEY_A, ServerProcess, invocation_ids

N = 4


def test_simultaneous_requests_on_one_conversation(
    server: ServerProcess, client: httpx.Client, oracle: PeftOracle
) -> None:
    cid = "concurrent-1"
    history = list(oracle.tokenizer.encode("The agent asks the tool about the weather of the city."))
    first = client.post(
        "/generate", json={"conversation_id": cid, "input_ids": history, "max_tokens": N}
    ).json()
    history += first["token_ids"]
    certainty = invocation_ids(client, "certainty")
    words = [" yes", " no", " what about the river", " please tell me", " the data"]
    branches = [history + oracle.tokenizer.encode(w, add_special_tokens=False) for w in words]

    jobs: list[tuple[str, dict[str, Any], str | None, list[int]]] = []
    for ids in branches:  # diverging turns: each rewrites the conversation's tail
        jobs.append(("/generate", {"conversation_id": cid, "input_ids": ids, "max_tokens": N}, None, ids))
    for ids in branches[:3]:  # intrinsics with explicit contexts on the same conversation
        context = ids + certainty
        jobs.append(
            (
                "/intrinsic/certainty",
                {"conversation_id": cid, "input_ids": context, "max_tokens": N, "response_format": FREE_TEXT},
                "certainty",
                context,
            )
        )
        jobs.append(
            (
                "/intrinsic/rewrite",
                {"conversation_id": cid, "input_ids": ids, "max_tokens": N, "response_format": FREE_TEXT},
                "rewrite",
                ids,
            )
        )

    def send(job: tuple[str, dict[str, Any], str | None, list[int]]) -> dict[str, Any]:
        with httpx.Client(
            base_url=server.url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=120
        ) as c:
            response = c.post(job[0], json=job[1])
            assert response.status_code == 200, response.text
            return dict(response.json())

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        results = list(pool.map(send, jobs))

    for (path, _, adapter, context), result in zip(jobs, results, strict=True):
        expected, _ = oracle.generate(adapter, context, N)
        assert result["token_ids"] == expected, (path, context)
        assert result["usage"]["prompt_tokens"] == len(context)

    # the conversation holds one of the branches, complete, and its cache serves the next turn right
    ends = {
        len(ids) + len(r["token_ids"])
        for (p, _, _, ids), r in zip(jobs, results, strict=True)
        if p == "/generate"
    }
    assert client.get(f"/conversations/{cid}").json()["num_tokens"] in ends
    for ids in branches[:2]:
        follow = client.post(
            "/generate", json={"conversation_id": cid, "input_ids": ids, "max_tokens": N}
        ).json()
        assert follow["token_ids"] == oracle.generate(None, ids, N)[0]
