"""SignalQueue: one entry per signal, stop signals first (chatd/signals.py)."""

from __future__ import annotations

import asyncio
import signal

from chatd.signals import SignalQueue


def test_a_storm_of_one_signal_is_one_entry_and_a_stop_jumps_the_queue():
    async def scenario() -> list[int]:
        queue = SignalQueue(asyncio.get_running_loop())
        for _ in range(1000):
            queue.put(signal.SIGHUP)
        queue.put(signal.SIGTERM)
        queue.put(signal.SIGHUP)
        assert queue.stop_pending() == signal.SIGTERM
        got = [await queue.get(), await queue.get()]
        assert queue.get_nowait() is None
        return got

    assert asyncio.run(scenario()) == [signal.SIGTERM, signal.SIGHUP]


def test_get_waits_for_a_signal_put_later():
    async def scenario() -> int:
        loop = asyncio.get_running_loop()
        queue = SignalQueue(loop)
        loop.call_later(0.01, queue.put, signal.SIGUSR1)
        return await asyncio.wait_for(queue.get(), 5)

    assert asyncio.run(scenario()) == signal.SIGUSR1


def test_a_signal_is_blocked_while_it_waits_and_unblocked_once_taken():
    """While a signal waits in the queue the kernel keeps it pending (one instance) instead of
    delivering each of a storm; taking it unblocks it, so one that came meanwhile is delivered."""
    def blocked() -> set[int]:
        return set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

    async def scenario() -> None:
        queue = SignalQueue(asyncio.get_running_loop())
        queue.put(signal.SIGHUP)
        assert signal.SIGHUP in blocked()
        assert queue.get_nowait() == signal.SIGHUP
        assert signal.SIGHUP not in blocked()

    before = blocked()
    try:
        asyncio.run(scenario())
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
