"""Runs the engine's blocking calls on worker threads so the event loop never waits on model work.

    route --await--> EngineRunner.call(conv key, fn) --thread--> fn(on_token) -> engine.generate(...)
                         | per-conversation gate, in arrival order
                         '-- stream(): on_token --call_soon_threadsafe--> asyncio.Queue --> SSE

The gate of a conversation: a /generate (or delete) runs alone; intrinsics and lookups run side by
side, but reach the engine in their arrival order; each call waits for the ones that arrived before
it and could change what it sees. So simultaneous requests on one conversation each get the answer
their arrival order implies (including which of them reuses KV another computed), and the cache is
never raced, whatever the engine below does.

An engine call only submits (validation + enqueue, on a worker thread); the result is awaited on
the event loop, so no thread waits on model work and the engine's own queue bound (429) is what
callers meet. A client that goes away cancels its request: the engine stops the sequence and
frees its blocks within one step (a cancelled /generate does not commit its turn). Shutdown waits
for every call still running.
"""

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
import anyio.to_thread
from starlette.requests import Request

from alora_core import GenerationResult
from alora_core.engine import EngineHandle
from alora_core.request import TokenCallback
from service.errors import ClientDisconnected

T = TypeVar("T")
EngineCall = Callable[[TokenCallback | None], EngineHandle]  # submits one engine request


@dataclass
class _Gate:
    last_exclusive: "asyncio.Future[None] | None" = None  # the latest writer (done when it ends)
    shared_since: "set[asyncio.Future[None]]" = field(default_factory=set)  # readers after it
    submitting: asyncio.Lock = field(default_factory=asyncio.Lock)  # engine submissions in arrival order
    users: int = 0


class TokenStream:
    """Tokens of one running call as they are sampled, then its result (or its error)."""

    def __init__(self, task: "asyncio.Task[GenerationResult]", queue: "asyncio.Queue[int | None]") -> None:
        self._task = task
        self._queue = queue  # sampled token ids, then None when the call has ended
        self._head: list[int | None] = []  # an item taken by wait_first, not yet yielded

    async def wait_first(self) -> None:
        """Wait for the first token or the end of the call, and raise the call's error if it failed
        before any token (bad input, unknown conversation...): it can still become an HTTP status."""
        item = await self._queue.get()
        self._head.append(item)
        if item is None:
            self._task.result()

    async def chunks(self) -> AsyncIterator[list[int]]:
        """Each chunk: the tokens that arrived since the previous one (at least one)."""
        while True:
            item = self._head.pop() if self._head else await self._queue.get()
            if item is None:
                return
            chunk = [item]
            while not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    yield chunk
                    return
                chunk.append(nxt)
            yield chunk

    async def result(self) -> GenerationResult:
        """The call's result once it has ended (raises its error)."""
        return await self._task

    def cancel(self) -> None:
        """The consumer went away: stop the engine request (no-op once it has ended)."""
        self._task.cancel()

    def done(self) -> bool:
        return self._task.done()


class EngineRunner:
    def __init__(self, max_concurrent_calls: int = 40) -> None:
        """max_concurrent_calls: worker threads for engine calls, at least what the engine can batch
        and queue, so that its own backpressure (429) is what callers meet, not a hidden queue here."""
        self._gates: dict[str, _Gate] = {}
        self._tasks: set[asyncio.Task[GenerationResult]] = set()
        self._threads = anyio.CapacityLimiter(max_concurrent_calls)

    async def run(self, key: str, exclusive: bool, fn: Callable[[], T]) -> T:
        """A short blocking call on conversation `key` (lookup, delete) on a worker thread."""
        async with self._gate(key, exclusive):
            return await anyio.to_thread.run_sync(fn, limiter=self._threads)

    async def call(
        self, key: str | None, exclusive: bool, fn: EngineCall, request: Request | None = None
    ) -> GenerationResult:
        """Run fn (no streaming) behind conversation `key`'s gate (None: no conversation). With the
        HTTP `request`, a client disconnect cancels the engine request (raises ClientDisconnected)."""
        task = self._start(key, exclusive, fn, None)
        if request is None:
            return await asyncio.shield(task)
        watcher = asyncio.create_task(_disconnected(request))
        try:
            await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
        if not task.done():
            task.cancel()
            raise ClientDisconnected()
        return task.result()

    def stream(self, key: str | None, exclusive: bool, fn: EngineCall) -> TokenStream:
        """Start fn behind conversation `key`'s gate; its tokens arrive on the returned stream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[int | None] = asyncio.Queue()

        def on_token(token: int) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, token)

        task = self._start(key, exclusive, fn, on_token)
        # runs after every put scheduled by the thread: its result reaches the loop after them
        task.add_done_callback(lambda _: queue.put_nowait(None))
        return TokenStream(task, queue)

    async def wait_idle(self) -> None:
        """Wait for every running call (shutdown)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    @property
    def running(self) -> int:
        return len(self._tasks)

    def _start(
        self, key: str | None, exclusive: bool, fn: EngineCall, on_token: TokenCallback | None
    ) -> "asyncio.Task[GenerationResult]":
        task = asyncio.create_task(self._gated(key, exclusive, fn, on_token))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: "asyncio.Task[GenerationResult]") -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved: the route that awaited it may be gone

    async def _gated(
        self, key: str | None, exclusive: bool, fn: EngineCall, on_token: TokenCallback | None
    ) -> GenerationResult:
        async with self._gate(key, exclusive) as gate:
            async with gate.submitting if gate is not None else nullcontext():  # FIFO (asyncio.Lock)
                handle = await anyio.to_thread.run_sync(fn, on_token, limiter=self._threads)
            try:
                return await _finished(handle)
            except asyncio.CancelledError:
                handle.cancel()  # the engine frees its blocks within one step
                raise

    @asynccontextmanager
    async def _gate(self, key: str | None, exclusive: bool) -> AsyncIterator[_Gate | None]:
        if key is None:
            yield None
            return
        gate = self._gates.setdefault(key, _Gate())
        mine: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        before = [gate.last_exclusive] if gate.last_exclusive is not None else []
        if exclusive:  # waits for everyone before it; everyone after waits for it
            before += gate.shared_since
            gate.last_exclusive, gate.shared_since = mine, set()
        else:
            gate.shared_since.add(mine)
        gate.users += 1
        try:
            if before:
                await asyncio.wait(before)  # (never cancels the futures it waits on)
            yield gate
        finally:
            mine.set_result(None)
            gate.shared_since.discard(mine)
            gate.users -= 1
            if gate.users == 0:
                del self._gates[key]


async def _finished(handle: EngineHandle) -> GenerationResult:
    """Wait on the event loop (no thread) for an engine request to end; its result or its error."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def settle() -> None:
        if not done.done():
            done.set_result(None)

    def wake(_: object) -> None:  # engine thread
        loop.call_soon_threadsafe(settle)

    handle.add_done_callback(wake)
    await done
    return handle.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
