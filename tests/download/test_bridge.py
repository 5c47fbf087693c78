"""The download task's bridge from its decode threads back to its event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from curate.stages.download import _Bridge


def test_results_errors_and_cancellations_come_back_to_their_own_futures():
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            bridge = _Bridge(asyncio.get_running_loop(), pool)
            futs = [bridge.run(lambda x: x * x, i) for i in range(50)]
            assert await asyncio.gather(*futs) == [i * i for i in range(50)]

            def boom(x):
                raise KeyError(x)

            with pytest.raises(KeyError):
                await bridge.run(boom, 7)
            gate = threading.Event()
            slow = bridge.run(lambda: gate.wait(5))
            slow.cancel()  # the awaiting row gave up: its result is dropped, nothing raises
            gate.set()
            assert await asyncio.wait_for(bridge.run(lambda: "after"), 5) == "after"
            await asyncio.sleep(0.05)
            assert slow.cancelled()

    asyncio.run(main())
    assert errors == []  # a late result for a cancelled future is dropped, not set (InvalidStateError)


def test_results_finishing_while_the_loop_is_busy_share_one_wake_up():
    """Results finished while the loop runs other code are handed over together: fewer wake-ups of
    the loop than results (run_in_executor pays one for each)."""
    async def main():
        loop = asyncio.get_running_loop()
        wakes = 0
        real = loop.call_soon_threadsafe

        def counting(cb, *args):
            nonlocal wakes
            wakes += 1
            return real(cb, *args)

        loop.call_soon_threadsafe = counting
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            bridge = _Bridge(loop, pool)
            started = threading.Barrier(5)
            futs = [bridge.run(lambda i=i: (started.wait(5), i)[1]) for i in range(4)]
            started.wait(5)
            threading.Event().wait(0.2)  # the loop is busy (blocked) while all four finish
            assert await asyncio.wait_for(asyncio.gather(*futs), 5) == [0, 1, 2, 3]
        assert wakes == 1

    asyncio.run(main())
