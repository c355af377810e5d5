"""Runs the engine's blocking calls on worker threads so the event loop never waits on model work.

    route --await--> EngineRunner.call(conv key, fn) --thread--> fn(on_token) -> engine.generate(...)
                         | per-conversation gate, in arrival order
                         '-- stream(): on_token --call_soon_threadsafe--> asyncio.Queue --> SSE

The OpenAI routes run groups of stateless calls (one per prompt, each with n choices) through
`call_group` / `stream_group`: the same machinery, with samples tagged by choice and carrying
their logprobs, and a `Finished` item as each choice ends.

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
from alora_core.engine import ChoiceCallback, EngineHandle
from alora_core.request import TokenCallback
from alora_core.sampling import TokenLogprobs
from service.errors import ClientDisconnected

T = TypeVar("T")
EngineCall = Callable[[TokenCallback | None], EngineHandle]  # submits one engine request
ChoiceCall = Callable[[ChoiceCallback | None], EngineHandle]  # the same, samples tagged by choice


@dataclass(frozen=True)
class Sampled:
    """A token of choice `choice`, as it is sampled (with its logprobs when the request asked)."""

    choice: int
    token: int
    logprobs: TokenLogprobs | None = None


@dataclass(frozen=True)
class Finished:
    """Choice `choice` has ended: `handle.result()` returns at once (or raises its error)."""

    choice: int
    handle: EngineHandle


StreamItem = Sampled | Finished


@dataclass
class _Gate:
    last_exclusive: "asyncio.Future[None] | None" = None  # the latest writer (done when it ends)
    shared_since: "set[asyncio.Future[None]]" = field(default_factory=set)  # readers after it
    submitting: asyncio.Lock = field(default_factory=asyncio.Lock)  # engine submissions in arrival order
    users: int = 0


class TokenStream:
    """Samples of one or more running calls as they arrive, then their results (or an error)."""

    def __init__(
        self, tasks: "list[asyncio.Task[list[GenerationResult]]]", queue: "asyncio.Queue[StreamItem | None]"
    ) -> None:
        self._tasks = tasks
        self._queue = queue  # Sampled / Finished items, then one None per call once it has ended
        self._open = len(tasks)
        self._head: list[StreamItem | None] = []  # an item taken by wait_first, not yet yielded

    async def wait_first(self) -> None:
        """Wait for the first token or the end of a call, and raise the call's error if it failed
        before any token (bad input, unknown conversation...): it can still become an HTTP status."""
        item = await self._queue.get()
        self._head.append(item)
        if item is None:
            for task in self._tasks:
                if task.done() and (task.cancelled() or task.exception() is not None):
                    self.cancel()  # the other calls of the group are of no use any more
                    task.result()

    async def items(self) -> AsyncIterator[list[StreamItem]]:
        """Each batch: the items that arrived since the previous one (at least one)."""
        while self._open:
            item = self._head.pop() if self._head else await self._queue.get()
            batch: list[StreamItem] = []
            while True:
                if item is None:
                    self._open -= 1
                else:
                    batch.append(item)
                if not self._open or self._queue.empty():
                    break
                item = self._queue.get_nowait()
            if batch:
                yield batch

    async def chunks(self) -> AsyncIterator[list[int]]:
        """Native streams (one call, one choice): each chunk, the tokens since the previous one."""
        async for batch in self.items():
            tokens = [item.token for item in batch if isinstance(item, Sampled)]
            if tokens:
                yield tokens

    async def results(self) -> list[list[GenerationResult]]:
        """Each call's choices' results once all have ended (raises the first error, and then
        cancels the calls still running)."""
        try:
            return list(await asyncio.gather(*self._tasks))
        except BaseException:
            self.cancel()
            raise

    async def result(self) -> GenerationResult:
        """The result of a native stream's one call (raises its error)."""
        return (await self.results())[0][0]

    def cancel(self) -> None:
        """The consumer went away: stop the engine requests (no-op for those that have ended)."""
        for task in self._tasks:
            task.cancel()

    def done(self) -> bool:
        return all(task.done() for task in self._tasks)


class EngineRunner:
    def __init__(self, max_concurrent_calls: int = 40) -> None:
        """max_concurrent_calls: worker threads for engine calls, at least what the engine can batch
        and queue, so that its own backpressure (429) is what callers meet, not a hidden queue here."""
        self._gates: dict[str, _Gate] = {}
        self._tasks: set[asyncio.Task[list[GenerationResult]]] = set()
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
        task = self._start(key, exclusive, lambda: fn(None))
        return (await self._await([task], request))[0][0]

    def stream(self, key: str | None, exclusive: bool, fn: EngineCall) -> TokenStream:
        """Start fn behind conversation `key`'s gate; its tokens arrive on the returned stream."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamItem | None] = asyncio.Queue()

        def on_token(token: int) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, Sampled(0, token))

        return self._stream([self._start(key, exclusive, lambda: fn(on_token))], queue)

    async def call_group(
        self, calls: list[ChoiceCall], request: Request | None = None
    ) -> list[list[GenerationResult]]:
        """Run stateless calls (no conversation) side by side, no streaming: each call's choices'
        results. The first error cancels the others; a client disconnect cancels them all."""
        return await self._await([self._start(None, False, lambda c=c: c(None)) for c in calls], request)

    def stream_group(self, calls: list[ChoiceCall], choices_per_call: int = 1) -> TokenStream:
        """Start stateless calls side by side; the items of call k's choice c are tagged with choice
        k * choices_per_call + c, and each choice's end arrives as a Finished item."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[StreamItem | None] = asyncio.Queue()

        def put(item: StreamItem) -> None:  # engine thread
            loop.call_soon_threadsafe(queue.put_nowait, item)

        def submit(k: int, call: ChoiceCall) -> EngineHandle:
            base = k * choices_per_call

            def on_sample(choice: int, token: int, logprobs: TokenLogprobs | None) -> None:
                put(Sampled(base + choice, token, logprobs))

            handle = call(on_sample)
            for c, choice in enumerate(handle.choices):  # after the choice's tokens (same FIFO)
                choice.add_done_callback(lambda _, c=c, choice=choice: put(Finished(base + c, choice)))
            return handle

        tasks = [self._start(None, False, lambda k=k, c=c: submit(k, c)) for k, c in enumerate(calls)]
        return self._stream(tasks, queue)

    async def wait_idle(self) -> None:
        """Wait for every running call (shutdown)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    @property
    def running(self) -> int:
        return len(self._tasks)

    def _stream(
        self, tasks: "list[asyncio.Task[list[GenerationResult]]]", queue: "asyncio.Queue[StreamItem | None]"
    ) -> TokenStream:
        for task in tasks:  # runs after every put scheduled by the thread: the end reaches the loop last
            task.add_done_callback(lambda _: queue.put_nowait(None))
        return TokenStream(tasks, queue)

    async def _await(
        self, tasks: "list[asyncio.Task[list[GenerationResult]]]", request: Request | None
    ) -> list[list[GenerationResult]]:
        """All the tasks' results; the first error cancels the others; a disconnect cancels all."""
        gathered = asyncio.gather(*tasks)
        gathered.add_done_callback(_retrieved)  # its error may have no reader once we stop waiting
        try:
            if request is None:
                return list(await asyncio.shield(gathered))
            watcher = asyncio.create_task(_disconnected(request))
            try:
                await asyncio.wait({gathered, watcher}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                watcher.cancel()
            if not gathered.done():
                raise ClientDisconnected()
            return list(gathered.result())
        except asyncio.CancelledError:
            if request is not None:
                for task in tasks:
                    task.cancel()
            raise  # without a request to watch, the calls outlive their waiter (shielded)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise

    def _start(
        self, key: str | None, exclusive: bool, submit: Callable[[], EngineHandle]
    ) -> "asyncio.Task[list[GenerationResult]]":
        task = asyncio.create_task(self._gated(key, exclusive, submit))
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: "asyncio.Task[list[GenerationResult]]") -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            task.exception()  # mark it retrieved: the route that awaited it may be gone

    async def _gated(
        self, key: str | None, exclusive: bool, submit: Callable[[], EngineHandle]
    ) -> list[GenerationResult]:
        async with self._gate(key, exclusive) as gate:
            async with gate.submitting if gate is not None else nullcontext():  # FIFO (asyncio.Lock)
                handle = await anyio.to_thread.run_sync(submit, limiter=self._threads)
            try:
                return [await _finished(choice) for choice in handle.choices]
            except BaseException:  # cancelled, or a choice failed: stop every choice
                for choice in handle.choices:
                    choice.cancel()  # the engine frees its blocks within one step
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


def _retrieved(future: "asyncio.Future[object]") -> None:
    if not future.cancelled():
        future.exception()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read: only that can arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
