"""API keys and tenants: every endpoint but the probes needs a key, and one tenant can never read,
extend, run intrinsics on, or delete another's conversation, even with the same id."""

from typing import Any

import httpx
import pytest

from tests.service.conftest import ServerProcess

PROTECTED: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/generate", {"prompt": "hello", "max_tokens": 1}),
    ("POST", "/intrinsic/certainty", {"prompt": "hello", "max_tokens": 1}),
    ("GET", "/adapters", None),
    ("GET", "/conversations/some-id", None),
    ("DELETE", "/conversations/some-id", None),
]


@pytest.mark.parametrize(("method", "path", "body"), PROTECTED)
@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-key", "Basic a2V5LXRlbmFudC1hOg==", "Bearer", "key-tenant-a"]
)
def test_protected_endpoints_need_a_valid_key(
    server: ServerProcess, method: str, path: str, body: dict[str, Any] | None, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.json()["error"]["code"] == "unauthorized"
    assert response.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("path", ["/health", "/ready", "/metrics"])
def test_probes_need_no_key(anonymous: httpx.Client, path: str) -> None:
    assert anonymous.get(path).status_code == 200


def test_tenants_never_share_a_conversation(client: httpx.Client, client_b: httpx.Client) -> None:
    cid = "same-id-for-both"
    a1 = client.post("/generate", json={"conversation_id": cid, "prompt": "the river", "max_tokens": 3})
    assert a1.status_code == 200
    a_tokens = client.get(f"/conversations/{cid}").json()["num_tokens"]

    # B cannot see, run an intrinsic on, or delete A's conversation: to B it does not exist
    for response in (
        client_b.get(f"/conversations/{cid}"),
        client_b.post("/intrinsic/certainty", json={"conversation_id": cid, "max_tokens": 1}),
        client_b.post("/intrinsic/rewrite", json={"conversation_id": cid, "max_tokens": 1}),
        client_b.delete(f"/conversations/{cid}"),
    ):
        assert response.status_code == 404, response.text
        error = response.json()["error"]
        assert error["code"] == "unknown_conversation"
        assert error["message"] == f"unknown conversation {cid!r}"  # the tenant namespace never shows

    # B extending "the same" id starts its own conversation: nothing of A's is reused or changed
    b1 = client_b.post("/generate", json={"conversation_id": cid, "prompt": "the river", "max_tokens": 3})
    assert b1.status_code == 200
    assert b1.json()["usage"]["cached_tokens"] == 0
    assert client.get(f"/conversations/{cid}").json()["num_tokens"] == a_tokens

    # B deleting its own copy leaves A's in place, and A's cache still serves A
    assert client_b.delete(f"/conversations/{cid}").status_code == 204
    assert client_b.get(f"/conversations/{cid}").status_code == 404
    assert client.get(f"/conversations/{cid}").status_code == 200
    history = a1.json()["usage"]["prompt_tokens"]
    a2 = client.post("/intrinsic/certainty", json={"conversation_id": cid, "max_tokens": 1}).json()
    assert a2["usage"]["cached_tokens"] == history + 3 - 1

    assert client.delete(f"/conversations/{cid}").status_code == 204
    assert client.get(f"/conversations/{cid}").status_code == 404
