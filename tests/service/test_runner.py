"""The per-conversation gate of EngineRunner, without a model: a /generate (exclusive) runs alone and
in arrival order; intrinsics (shared) run side by side; tokens stream in order, errors surface."""

import asyncio
import threading
from typing import Any

import pytest

from alora_core.errors import UnknownConversationError
from service.runner import EngineRunner


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, timeout=30))


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

        return fn

    def reader(name: str) -> Any:
        def fn(on_token: Any) -> str:
            log.append(f"{name} start")
            both_shared_running.wait()  # both readers are inside at once, or this times out
            log.append(f"{name} end")
            return name

        return fn

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
        stream = EngineRunner().stream("c", True, fn)
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
        stream = EngineRunner().stream("c", True, fn)
        await stream.wait_first()

    with pytest.raises(UnknownConversationError):
        run(scenario())
