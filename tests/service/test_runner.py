"""The per-conversation gate of EngineRunner, without a model: a /generate (exclusive) runs alone and
in arrival order; intrinsics (shared) run side by side; tokens stream in order, errors surface."""

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from alora_core.errors import UnknownConversationError
from service.errors import ClientDisconnected
from service.runner import EngineRunner


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


class FakeHandle:
    """Stands in for an EngineHandle: the work runs on its own thread, like the engine's scheduler."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._future: Future[Any] = Future()
        self.cancelled = threading.Event()
        self.choices = [self]  # one choice (EngineHandle.choices)
        threading.Thread(target=self._complete, args=(work,), daemon=True).start()

    def _complete(self, work: Callable[[], Any]) -> None:
        try:
            self._future.set_result(work())
        except Exception as exc:
            self._future.set_exception(exc)

    def add_done_callback(self, fn: Callable[[Future[Any]], None]) -> None:
        self._future.add_done_callback(fn)

    def result(self, timeout: float | None = None) -> Any:
        return self._future.result(timeout)

    def cancel(self) -> None:
        self.cancelled.set()


def submits(body: Callable[[Any], Any]) -> Callable[[Any], FakeHandle]:
    """An engine call: submitting returns at once, the body runs as the engine would."""
    return lambda on_token: FakeHandle(lambda: body(on_token))


def test_exclusive_and_shared_calls_keep_arrival_order() -> None:
    log: list[str] = []
    started = threading.Event()
    release = threading.Event()
    both_shared_running = threading.Barrier(2, timeout=10)

    def writer(name: str, block: bool = False) -> Any:
        def fn(on_token: Any) -> str:
            log.append(f"{name} start")
            if block:
                started.set()
                release.wait(timeout=10)
            log.append(f"{name} end")
            return name

        return submits(fn)

    def reader(name: str) -> Any:
        def fn(on_token: Any) -> str:
            log.append(f"{name} start")
            both_shared_running.wait()  # both readers are inside at once, or this times out
            log.append(f"{name} end")
            return name

        return submits(fn)

    async def scenario() -> list[str]:
        runner = EngineRunner()
        first = asyncio.ensure_future(runner.call("c", True, writer("w1", block=True)))
        await asyncio.to_thread(started.wait, 10)
        readers = [asyncio.ensure_future(runner.call("c", False, reader(n))) for n in ("r1", "r2")]
        second = asyncio.ensure_future(runner.call("c", True, writer("w2")))
        other = await runner.call("other", True, writer("x"))  # another conversation is not held up
        assert other == "x"
        assert log == ["w1 start", "x start", "x end"]  # readers and w2 wait behind w1
        release.set()
        results = await asyncio.gather(first, *readers, second)
        await runner.wait_idle()
        assert runner.running == 0
        return list(results)

    assert run(scenario()) == ["w1", "r1", "r2", "w2"]
    assert log.index("w1 end") < log.index("r1 start")
    assert log.index("w1 end") < log.index("r2 start")
    assert log.index("w2 start") > max(log.index("r1 end"), log.index("r2 end"))


def test_stream_delivers_tokens_in_order_then_the_result() -> None:
    def fn(on_token: Any) -> str:
        for token in range(50):
            on_token(token)
        return "done"

    async def scenario() -> tuple[list[int], Any]:
        stream = EngineRunner().stream("c", True, submits(fn))
        await stream.wait_first()
        tokens = [t async for chunk in stream.chunks() for t in chunk]
        return tokens, await stream.result()

    tokens, result = run(scenario())
    assert tokens == list(range(50))
    assert result == "done"


def test_stream_error_before_first_token_is_raised_by_wait_first() -> None:
    def fn(on_token: Any) -> str:
        raise UnknownConversationError("unknown conversation 'x'")

    async def scenario() -> None:
        stream = EngineRunner().stream("c", True, submits(fn))
        await stream.wait_first()

    with pytest.raises(UnknownConversationError):
        run(scenario())


def test_a_caller_that_goes_away_cancels_its_engine_request() -> None:
    release = threading.Event()
    handles: list[FakeHandle] = []

    def submit(on_token: Any) -> FakeHandle:
        handles.append(FakeHandle(lambda: release.wait(10)))
        return handles[-1]

    class GoneClient:  # the ASGI receive channel of a request whose client hangs up
        def __init__(self) -> None:
            self.hang_up = asyncio.Event()

        async def receive(self) -> dict[str, str]:
            await self.hang_up.wait()
            return {"type": "http.disconnect"}

    async def scenario() -> None:
        runner = EngineRunner()
        client = GoneClient()
        call = asyncio.ensure_future(runner.call("c", True, submit, client))  # type: ignore[arg-type]
        stream = runner.stream("d", True, submit)
        while len(handles) < 2:
            await asyncio.sleep(0.01)
        client.hang_up.set()
        with pytest.raises(ClientDisconnected):
            await call
        stream.cancel()  # what the SSE generator does when the client goes away mid-stream
        await asyncio.gather(stream.result(), return_exceptions=True)
        for _ in range(100):  # the cancellations reach the engine while the loop still runs
            if all(h.cancelled.is_set() for h in handles):
                break
            await asyncio.sleep(0.01)
        assert all(h.cancelled.is_set() for h in handles)
        assert not release.is_set()  # cancelled while the engine was still working on them

    run(scenario())
    release.set()
