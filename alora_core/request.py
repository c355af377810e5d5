"""A submitted request, as the scheduler tracks it, and the handle its caller holds."""

import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal

from alora_core.kvcache.prefix_cache import Probe
from alora_core.kvcache.redis_jobs import FetchJob
from alora_core.lora.registry import ResidentAdapter
from alora_core.sampling import SamplingParams, TokenLogprobs
from alora_core.sequence import Sequence
from alora_core.structured.matcher import GrammarState

TokenCallback = Callable[[int], None]  # called with each sampled token id, from the scheduler's thread
SampleCallback = Callable[[int, TokenLogprobs | None], None]  # the same, with the token's logprobs


@dataclass(eq=False)
class Request:
    kind: Literal["generate", "intrinsic"]
    conversation_id: str | None  # generate: the conversation it commits to (None: no handle)
    input_ids: list[int] | None  # intrinsic: None = the conversation's tokens + the invocation
    params: SamplingParams
    adapter: ResidentAdapter | None = None
    tenant: str = ""  # KV is shared only within a tenant (and a cache salt)
    cache_salt: str | None = None
    on_token: TokenCallback | None = None
    on_sample: SampleCallback | None = None  # instead of on_token: token and logprobs (if asked)
    grammar: GrammarState | None = None  # params.constraint's matcher, compiled before submit
    forks: "list[Request]" = field(default_factory=list)  # n > 1: choices 1..n-1, spawned at the
    # first sampling point from this request's KV and logits (scheduler._spawn_forks)
    future: "Future[object]" = field(default_factory=Future)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.perf_counter)
    # filled in by the scheduler
    seq: Sequence | None = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the cache, at first admission
    fetch: FetchJob | None = None  # Redis values on their way into its blocks
    probe: Probe | None = None  # Redis asked which values continue its cached prefix
    probed_blocks: int | None = None  # ... and the answer (block end reachable from Redis)
    handle_tokens: int = 0  # what its conversation handle offered (attached back after restore)
    hits: Counter[str] = field(default_factory=Counter)  # tier -> prompt tokens restored from it
    wanted: int = 0  # tokens some tier held when it was admitted (the rest of it was recomputed)
    admitted_at: float | None = None
    first_token_at: float | None = None
    emitted: int = 0  # tokens already passed to on_token
    preemptions: int = 0

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        for fork in self.forks:  # choices not spawned yet share their parent's fate
            fork.fail(error)


class RequestHandle:
    """What a submitter gets back: wait for the result, or cancel (the sequence stops within one step)."""

    def __init__(self, request: Request, wake: Callable[[], None]) -> None:
        self._request = request
        self._wake = wake

    def result(self, timeout: float | None = None) -> object:
        return self._request.future.result(timeout)

    def done(self) -> bool:
        return self._request.future.done()

    def cancel(self) -> None:
        self._request.cancel_event.set()
        self._wake()

    def add_done_callback(self, fn: Callable[["Future[object]"], None]) -> None:
        self._request.future.add_done_callback(fn)
