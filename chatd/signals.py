"""The signal table, set in one step before the first fork, and the startup-window recorder.

Every signal's final disposition is set at once, before chatd forks, so no
signal that arrives while it starts can kill it by default action. Until the
event loop runs, the caught signals are only recorded; `Server` then points the
recorder at a `SignalQueue` and replays what was recorded. Handlers never do
work: they record, and the main loop acts.

Tests: tests/process/test_signals.py, tests/process/test_detach.py
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Callable, Iterator

# What each signal means is documented in the README.
CAUGHT = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM)
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM})
IGNORED = (signal.SIGPIPE, signal.SIGUSR2, signal.SIGALRM)
JOB_CONTROL = (signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# SIGXFSZ stays ignored as Python sets it: a log file over its size limit gives
# EFBIG, which the log handler survives, rather than a kill.
KEPT_IGNORED = (signal.SIGXFSZ,)


def first_stop(signals: list[int]) -> int | None:
    """The first stop signal among `signals`, if any."""
    return next((s for s in signals if s in STOP_SIGNALS), None)


class SignalRecorder:
    """Records caught signals until a loop takes them over."""

    def __init__(self) -> None:
        self.pending: list[int] = []
        self._sink: Callable[[int], None] | None = None

    def _record(self, signum: int, frame: object) -> None:
        if self._sink is not None:
            self._sink(signum)
        elif signum not in self.pending:   # as the kernel does: one pending instance each
            self.pending.append(signum)

    def install(self, detached: bool) -> None:
        """Set every disposition of the table, then empty the signal mask: a signal held
        until then (across a supervisor's re-exec, workers_upgrade.py) is recorded, never
        acted on by its default.

        Signals outside the table get their defaults back (a parent may have left
        SIGCHLD or SIGHUP ignored, as nohup does). A detached daemon ignores the
        job-control stops; `chatd run` keeps them so Ctrl-Z works at a terminal.
        """
        special = set(CAUGHT) | set(IGNORED) | set(JOB_CONTROL) | set(KEPT_IGNORED)
        for sig in signal.valid_signals():
            if sig in special or sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            try:
                signal.signal(sig, signal.SIG_DFL)
            except (OSError, ValueError):
                pass   # real-time signals reserved by the C library
        for sig in IGNORED:
            signal.signal(sig, signal.SIG_IGN)
        for sig in JOB_CONTROL:
            signal.signal(sig, signal.SIG_IGN if detached else signal.SIG_DFL)
        for sig in CAUGHT:
            signal.signal(sig, self._record)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])   # last: what was held comes to `_record`

    def take_over(self, sink: Callable[[int], None]) -> None:
        """From now on deliver signals to `sink`, starting with those recorded so far."""
        self._sink = sink
        pending, self.pending = self.pending, []
        for signum in pending:
            sink(signum)

    def stop_requested(self) -> int | None:
        """The first recorded stop signal, if any (checked during start-up)."""
        return first_stop(self.pending)


class SignalQueue:
    """The signals waiting for the main loop: each at most once, stop signals first, and
    blocked while it waits (the kernel keeps one instance pending meanwhile).

    Standard signals are not queued by the kernel either: a second SIGHUP that
    arrives before the first is handled is the same request. Keeping one entry
    per signal bounds the queue under a storm, and taking stop signals first
    means a SIGTERM never waits behind a backlog of restarts. `put` runs in the
    Python-level signal handler, between any two bytecodes of the loop, so it
    touches nothing but a dict and wakes the loop the thread-safe way; it works
    the same on asyncio's loop (PEP 475 runs the handler when epoll is
    interrupted) and on uvloop (its wakeup fd runs it).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pending: dict[int, None] = {}
        self._loop = loop
        self._arrived = asyncio.Event()

    def put(self, signum: int) -> None:
        if signum not in self._pending:
            self._pending[signum] = None
            # Blocked while it waits: the kernel then keeps one instance pending, as this
            # queue does, and a storm of it stops costing a delivery each (a million SIGHUPs
            # a second otherwise starved the loop, and a SIGTERM waited behind them).
            signal.pthread_sigmask(signal.SIG_BLOCK, (signum,))
            try:
                self._loop.call_soon_threadsafe(self._arrived.set)
            except RuntimeError:
                pass   # the loop has closed: chatd is on its way out already

    def get_nowait(self) -> int | None:
        """The next signal to act on, or None."""
        pending = list(self._pending)   # one C-level copy: a handler may add to the dict any time
        if not pending:
            return None
        signum = first_stop(pending) or pending[0]
        del self._pending[signum]
        signal.pthread_sigmask(signal.SIG_UNBLOCK, (signum,))   # one that came meanwhile: now
        return signum

    async def get(self) -> int:
        while True:
            self._arrived.clear()
            signum = self.get_nowait()
            if signum is not None:
                return signum
            await self._arrived.wait()

    def waiting(self) -> list[int]:
        """The signals not yet acted on, left in place (a live upgrade carries them)."""
        return list(self._pending)

    def stop_pending(self) -> int | None:
        """A stop signal waiting to be handled, left in place (checked during start-up)."""
        return first_stop(list(self._pending))


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """The caught signals blocked for a moment (around a fork: a child that installs its own
    table, which empties the mask, then gets one sent to it meanwhile, instead of running the
    parent's handler on the parent's queue)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CAUGHT)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def wake_on(fd: int) -> None:
    """For a loop that sleeps in poll() (workers.Supervisor): every caught signal, and
    SIGCHLD (given a handler that records nothing, for that), writes a byte to `fd`."""
    signal.set_wakeup_fd(fd)
    signal.signal(signal.SIGCHLD, lambda *_: None)


def stop_waking() -> None:
    """Undo `wake_on` (a forked worker, or a supervisor on its way out); SIGCHLD back to its
    default."""
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)


def ignore_late_signals() -> None:
    """The daemon is exiting: a stop signal or SIGHUP that arrives now changes nothing."""
    for sig in STOP_SIGNALS | {signal.SIGHUP}:
        signal.signal(sig, signal.SIG_IGN)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
