"""Locust workload for alora-serve: every user is an agent holding a conversation.

    on start     GET /adapters (the intrinsics to call)
    each turn    POST /generate, streamed, with the conversation's FULL (growing) history
                   -> "POST /generate" (whole stream), "TTFT /generate" (first non-empty chunk),
                      "TPOT /generate" (time per output token after the first)
                 at random: POST /intrinsic/{name}, or POST /intrinsics (fan-out, several adapters)
    between      a short think time, or now and then an idle gap: the conversation's cache is
                 demoted (device -> host -> Redis) while other users run, and restored on return
    at the end   DELETE /conversations/{id}, then a new conversation (also when the test stops)

Every request carries `X-Conversation-Id`, which the Helm chart's ingress hashes for cache locality.

    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 4 \
        --run-time 10m --stop-timeout 60 --csv loadtest/results/agents [--api-key KEY] [--turns 8]

Workload options (after locust's own, see --help): --turns, --max-tokens, --intrinsic-max-tokens,
--intrinsic-prob, --fanout-prob, --idle-prob, --idle-s, --think-s, --api-key.
"""

import json
import random
import time
import uuid
from collections.abc import Iterator
from typing import Any

from locust import HttpUser, events, task

WORDS = (
    "the river city weather tomorrow tool call result answer question context document agent "
    "search report check number value list plan step memory cache please explain why how when "
    "which summary source claim evidence draft review data fast slow good bad next previous"
).split()


@events.init_command_line_parser.add_listener
def _workload_options(parser: Any) -> None:
    group = parser.add_argument_group("alora-serve workload")
    group.add_argument("--turns", type=int, default=6, help="/generate turns per conversation")
    group.add_argument("--max-tokens", type=int, default=32, help="max_tokens of a /generate turn")
    group.add_argument("--intrinsic-max-tokens", type=int, default=4, help="max_tokens of an intrinsic")
    group.add_argument("--intrinsic-prob", type=float, default=0.5, help="chance of intrinsics after a turn")
    group.add_argument("--fanout-prob", type=float, default=0.3, help="of those, chance of a fan-out call")
    group.add_argument("--idle-prob", type=float, default=0.1, help="chance of an idle gap after a turn")
    group.add_argument("--idle-s", type=float, default=30.0, help="length of an idle gap (seconds)")
    group.add_argument("--think-s", type=float, default=1.0, help="longest think time between turns")
    group.add_argument("--api-key", default="", help="sent as 'Authorization: Bearer KEY'")


class AgentConversation(HttpUser):
    """One conversation at a time: turns with a growing history, intrinsics between them."""

    def wait_time(self) -> float:
        options = self.environment.parsed_options
        if random.random() < options.idle_prob:
            return float(options.idle_s)
        return random.uniform(0.0, options.think_s)

    def on_start(self) -> None:
        options = self.environment.parsed_options
        if options.api_key:
            self.client.headers["Authorization"] = f"Bearer {options.api_key}"
        with self.client.get("/adapters", name="/adapters", catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"GET /adapters: {response.status_code}")
                self.adapters: list[str] = []
            else:
                self.adapters = [a["name"] for a in response.json()["adapters"]]
        self.conversation_id: str | None = None
        self.messages: list[dict[str, str]] = []
        self.turn = 0

    def on_stop(self) -> None:
        if self.conversation_id is not None:
            self.end_conversation()

    @task
    def step(self) -> None:
        """One turn, maybe intrinsics after it; the conversation ends after --turns turns."""
        options = self.environment.parsed_options
        if self.conversation_id is None:
            self.conversation_id = f"lt-{uuid.uuid4().hex}"
            self.messages, self.turn = [], 0
        self.messages.append({"role": "user", "content": sentence(random.randint(8, 40))})
        reply = self.generate(options.max_tokens)
        if reply is None:  # failed: start afresh rather than continue a history the server lacks
            self.end_conversation()
            return
        self.messages.append({"role": "assistant", "content": reply})
        self.turn += 1
        if self.adapters and random.random() < options.intrinsic_prob:
            if random.random() < options.fanout_prob:
                self.fan_out(options.intrinsic_max_tokens)
            else:
                self.intrinsic(random.choice(self.adapters), options.intrinsic_max_tokens)
        if self.turn >= options.turns:
            self.end_conversation()

    # -- requests -----------------------------------------------------------------------------------

    def headers(self) -> dict[str, str]:
        assert self.conversation_id is not None
        return {"X-Conversation-Id": self.conversation_id}

    def generate(self, max_tokens: int) -> str | None:
        """A streamed turn; returns the reply text (None on failure)."""
        body = {
            "conversation_id": self.conversation_id,
            "messages": self.messages,
            "max_tokens": max_tokens,
            "temperature": 0.7,
            "stream": True,
        }
        start = time.perf_counter()
        first_token_at: float | None = None
        num_tokens = 0
        final: dict[str, Any] | None = None
        error = ""
        with self.client.post(
            "/generate", json=body, headers=self.headers(), name="/generate", stream=True, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(describe(response.status_code, response.text))
                return None
            size = 0
            for event in sse_events(response.iter_lines()):
                size += len(json.dumps(event))
                kind = event.get("type")
                if kind == "token" and event.get("token_ids"):
                    num_tokens += len(event["token_ids"])
                    if first_token_at is None:
                        first_token_at = time.perf_counter()
                elif kind == "final":
                    final = event
                elif kind == "error":
                    error = describe(200, json.dumps(event))
            end = time.perf_counter()
            # the whole stream, not just its headers, is the request's time
            response.request_meta["response_time"] = (end - start) * 1000
            response.request_meta["response_length"] = size
            if error or final is None:
                response.failure(error or "stream ended without a final event")
                return None
            response.success()
        if first_token_at is not None:
            self.report("TTFT", "/generate", (first_token_at - start) * 1000)
            if num_tokens > 1:
                self.report("TPOT", "/generate", (end - first_token_at) * 1000 / (num_tokens - 1))
        return str(final["text"])

    def report(self, request_type: str, name: str, milliseconds: float) -> None:
        """A derived timing (TTFT, TPOT) as its own row of locust's statistics."""
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=milliseconds,
            response_length=0,
            exception=None,
            context={},
        )

    def intrinsic(self, name: str, max_tokens: int) -> None:
        body = {"conversation_id": self.conversation_id, "max_tokens": max_tokens}
        with self.client.post(
            f"/intrinsic/{name}",
            json=body,
            headers=self.headers(),
            name=f"/intrinsic/{name}",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(describe(response.status_code, response.text))
            elif response.json().get("name") != name:
                response.failure(f"answer is not adapter {name}'s")

    def fan_out(self, max_tokens: int) -> None:
        """Several adapters on the conversation in one call (one item with its own sampling fields)."""
        names = random.sample(self.adapters, k=min(len(self.adapters), random.randint(2, 3)))
        items: list[str | dict[str, Any]] = [
            names[0],
            *({"name": n, "max_tokens": max_tokens} for n in names[1:]),
        ]
        body = {"conversation_id": self.conversation_id, "intrinsics": items, "max_tokens": max_tokens}
        with self.client.post(
            "/intrinsics", json=body, headers=self.headers(), name="/intrinsics", catch_response=True
        ) as response:
            if response.status_code == 404 and "unknown_adapter" not in response.text:
                response.failure("POST /intrinsics: 404, this server has no fan-out endpoint")
            elif response.status_code != 200:
                response.failure(describe(response.status_code, response.text))
            elif [r.get("name") for r in response.json().get("results", [])] != names:
                response.failure(f"fan-out answered {response.text[:200]!r}, expected results for {names}")

    def end_conversation(self) -> None:
        if self.conversation_id is None:
            return
        with self.client.delete(
            f"/conversations/{self.conversation_id}",
            headers=self.headers(),
            name="/conversations/[id]",
            catch_response=True,
        ) as response:
            # 404: its first turn failed, so it never existed; anything else but 204 is a failure
            if response.status_code == 404 and self.turn == 0:
                response.success()
            elif response.status_code != 204:
                response.failure(describe(response.status_code, response.text))
        self.conversation_id = None


# -- helpers ------------------------------------------------------------------------------------------


def sentence(num_words: int) -> str:
    return " ".join(random.choice(WORDS) for _ in range(num_words)).capitalize() + "?"


def sse_events(lines: Iterator[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON payloads of `data:` lines, up to `data: [DONE]`."""
    for line in lines:
        if not line.startswith(b"data: "):
            continue
        payload = line[len(b"data: ") :]
        if payload == b"[DONE]":
            return
        yield json.loads(payload)


def describe(status: int, body: str) -> str:
    """`429 overloaded`-style failure text (error bodies: {"error": {"code", "message"}})."""
    try:
        code = json.loads(body)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = body[:120]
    return f"{status} {code}"
