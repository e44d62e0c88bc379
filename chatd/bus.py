"""The link to the bus (README "More than one process"): a Redis server, reached with redis.asyncio.

Two connections: one for commands, one for subscriptions. Commands are queued
by `call` and sent, in the order they were queued, as one pipeline per pass of
the event loop (the writer task wakes once the pass that queued them ends), so
a pass's publishes cost one write and one round trip. Every command's answer
goes to its `then`, or `DOWN` when the bus could not be asked. A failure on
either connection, or a command that takes longer than `timeout`, cuts the
link (`on_lost`, once); it is then tried again, waiting twice as long each
time up to `reconnect_max`, and each try runs `on_connect` (the owner's
registration and re-assertion, on a fresh connection) before the link is up
again (`on_restored`). Nothing queued while the link is down is kept: it is
answered `DOWN` at once, so nothing is buffered for a late replay; and a bus
slower than its callers, with QUEUE_MAX commands waiting, counts as lost too,
so the queue is bounded.

This module imports redis; chatd imports it only when `[cluster] bus` is set.

Tests: tests/cluster/test_cluster.py, tests/cluster/test_workers.py
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import redis.asyncio as redis
from redis import Redis as BlockingRedis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

log = logging.getLogger("chatd")
FIRST_RETRY_S = 0.05      # the first wait before trying a lost bus again; it doubles
QUEUE_MAX = 100_000       # commands waiting for the bus; past it the link counts as lost
FAILURES = (RedisError, OSError, asyncio.TimeoutError, EOFError)


class Down:
    """The answer of a command the bus could not be asked (the link is down)."""

    def __repr__(self) -> str:
        return "DOWN"


DOWN = Down()
Then = Callable[[Any], None]


class Refused(Exception):
    """`on_connect` reached the bus but may not join it (say, the node id is taken)."""


class EarlyListener(threading.Thread):
    """A live upgrade's new process listening to its node's channels from a thread, before
    its event loop runs (upgrade.py): from `start` on, what the bus publishes there is kept,
    so that nothing said while the old process is frozen is lost (the node's sequence
    numbers drop what the old one had already shown)."""

    def __init__(self, url: str, channels: list[str], timeout: float) -> None:
        super().__init__(name="chatd-early-bus", daemon=True)
        self.client = BlockingRedis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self.pubsub = self.client.pubsub()
        self.got: list[tuple[bytes, bytes]] = []
        self.stopping = threading.Event()
        self.pubsub.subscribe(*channels)
        deadline = time.monotonic() + timeout
        confirmed = 0
        while confirmed < len(channels):   # listening for sure only once Redis says so
            if time.monotonic() > deadline:
                raise TimeoutError("no answer to SUBSCRIBE")
            message = self.pubsub.get_message(timeout=0.1)
            if message is not None and message["type"] == "subscribe":
                confirmed += 1
        self.start()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                message = self.pubsub.get_message(timeout=0.02)
            except Exception:   # noqa: BLE001 - the link proper reports the bus's troubles
                return
            if message is not None and message["type"] == "message":
                self.got.append((message["channel"], message["data"]))

    def stop(self) -> list[tuple[bytes, bytes]]:
        """Stop listening; what came, in order."""
        self.stopping.set()
        self.join(5)
        self.pubsub.close()
        self.client.close()
        return self.got


class Link:
    """Commands and subscriptions over one Redis server, and the link's loss and return."""

    def __init__(self, url: str, timeout: float, reconnect_max: float,
                 on_connect: Callable[[redis.Redis], Awaitable[None]],
                 on_message: Callable[[bytes, bytes], None],
                 on_lost: Callable[[str], None], on_restored: Callable[[], None]) -> None:
        self.url = url
        self.timeout = timeout
        self.reconnect_max = reconnect_max
        self.up = False
        self.channels: set[str] = set()       # what we subscribe to, whatever the link's state
        self._subscribed: set[str] = set()    # what the current subscription was opened with
        self._on_connect = on_connect
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_restored = on_restored
        self._queue: list[tuple[tuple[Any, ...], Then | None]] = []
        self._wake = asyncio.Event()
        self._cmd: redis.Redis | None = None
        self._sub: redis.Redis | None = None
        self._pubsub: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Connect, run `on_connect`, subscribe: at start, where a failure is the caller's
        to report (it raises Refused, or one of FAILURES)."""
        await self._connect()
        self._go_up()

    def _go_up(self) -> None:
        """Connected: commands flow, the subscription is read, what changed meanwhile caught up."""
        self.up = True
        self._spawn(self._writer())
        self._spawn(self._reader())
        self._catch_up()

    async def close(self) -> None:
        """Stop every task and close both connections (nothing queued is sent)."""
        self._closed = True
        self.up = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._disconnect()

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _client(self, timeout: float | None) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=timeout,
                                    socket_connect_timeout=self.timeout,
                                    retry=Retry(NoBackoff(), 0), health_check_interval=0)

    async def _connect(self) -> None:
        """Fresh connections, `on_connect` on the command one, then every subscription."""
        await self._disconnect()
        self._cmd = self._client(self.timeout)
        self._sub = self._client(None)   # a subscription waits for messages as long as it takes
        await asyncio.wait_for(self._on_connect(self._cmd), self.timeout * 4)
        self._pubsub = self._sub.pubsub(ignore_subscribe_messages=True)
        subscribed = set(self.channels)
        await asyncio.wait_for(self._pubsub.subscribe(*sorted(subscribed)), self.timeout)
        self._subscribed = subscribed   # channels may change meanwhile: see `_catch_up`

    def _catch_up(self) -> None:
        """The link is up again: (un)subscribe what changed while it was being set up."""
        for channel in self.channels - self._subscribed:
            self._spawn(self._subscription("subscribe", channel))
        for channel in self._subscribed - self.channels:
            self._spawn(self._subscription("unsubscribe", channel))

    async def _disconnect(self) -> None:
        clients, self._cmd, self._sub = (self._cmd, self._sub), None, None
        pubsub, self._pubsub = self._pubsub, None
        for closing in (pubsub, *clients):
            if closing is not None:
                try:
                    await closing.aclose()
                except FAILURES:
                    pass

    # ------------------------------------------------------------ commands

    def call(self, *args: Any, then: Then | None = None) -> None:
        """Send a command with the next pipeline; `then(answer)` gets its answer (an exception
        for a command the server refused), or DOWN, at once if the link is down."""
        if not self.up:
            if then is not None:
                then(DOWN)
            return
        self._queue.append((args, then))
        self._wake.set()
        if len(self._queue) > QUEUE_MAX:
            self._lost(f"more than {QUEUE_MAX} commands waiting: the bus is not keeping up")

    async def _writer(self) -> None:
        """Each pass's commands as one pipeline, in order; a failure cuts the link, and every
        command of the batch is answered, DOWN if need be (also when the writer is cancelled)."""
        while self.up:
            await self._wake.wait()
            self._wake.clear()
            while self._queue and self.up:
                batch, self._queue = self._queue, []
                answers: list[Any] = [DOWN] * len(batch)
                pipe = self._cmd.pipeline(transaction=False)   # type: ignore[union-attr]
                for args, _ in batch:
                    pipe.execute_command(*args)
                try:
                    async with asyncio.timeout(self.timeout):   # no task of its own, as
                        answers = await pipe.execute(raise_on_error=False)   # wait_for makes
                except FAILURES as e:
                    self._lost(describe(e))
                finally:
                    for (_, then), answer in zip(batch, answers):
                        if then is not None:
                            answered(then, answer)

    # ------------------------------------------------------------ subscriptions

    def subscribe(self, channel: str) -> None:
        self.channels.add(channel)
        if self.up:
            self._spawn(self._subscription("subscribe", channel))

    def unsubscribe(self, channel: str) -> None:
        self.channels.discard(channel)
        if self.up:
            self._spawn(self._subscription("unsubscribe", channel))

    async def _subscription(self, verb: str, channel: str) -> None:
        try:
            await asyncio.wait_for(getattr(self._pubsub, verb)(channel), self.timeout)
        except FAILURES as e:
            self._lost(describe(e))

    async def _reader(self) -> None:
        """Every message to `on_message(channel, data)`; a lost subscription cuts the link.
        Once the link is lost (the owner may give it up from `on_message`), what is still
        buffered on this subscription is stale: the reader stops, and a new one starts with
        the new subscription."""
        try:
            async for message in self._pubsub.listen():
                if not self.up:
                    return
                if message["type"] == "message":
                    self._on_message(message["channel"], message["data"])
        except FAILURES as e:
            self._lost(describe(e))
        except Exception as e:   # noqa: BLE001 - a reader that died would leave the node deaf
            log.error("bus: reading the subscription failed: %s: %s", type(e).__name__, e)
            self._lost(f"{type(e).__name__}: {e}")
        else:
            self._lost("the subscription ended")

    # ------------------------------------------------------------ loss and return

    def lose(self, why: str) -> None:
        """The owner found the link unusable (say, its lease is gone): as a failure."""
        self._lost(why)

    def _lost(self, why: str) -> None:
        if not self.up or self._closed:
            return
        self.up = False
        queued, self._queue = self._queue, []
        for _, then in queued:
            if then is not None:
                answered(then, DOWN)
        self._on_lost(why)
        for task in list(self._tasks):
            if task is not asyncio.current_task():
                task.cancel()
        self._spawn(self._reconnect())

    async def _reconnect(self) -> None:
        """Try again, waiting longer each time (up to reconnect_max), until the link is up."""
        delay = FIRST_RETRY_S
        while not self._closed:
            await asyncio.sleep(delay)
            try:
                await self._connect()
            except (Refused, *FAILURES) as e:
                log.debug("bus %s: still unreachable: %s", self.url, describe(e))
                delay = min(delay * 2, self.reconnect_max)
                continue
            self._go_up()
            self._on_restored()
            return


def answered(then: Then, answer: Any) -> None:
    """Give `then` its answer; a callback's own failure is logged, and never stops the writer
    (which would leave every later command unsent)."""
    try:
        then(answer)
    except Exception as e:   # noqa: BLE001
        log.error("bus: handling an answer failed: %s: %s", type(e).__name__, e)


def describe(e: BaseException) -> str:
    """An error as one short phrase for the log."""
    if isinstance(e, asyncio.TimeoutError):
        return "no answer in time"
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text
