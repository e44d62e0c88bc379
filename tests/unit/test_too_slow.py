"""chat's "too slow" judgement, tick by tick, with the kernel's queue under the test's control."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from chatd import chat as chat_module, config
from chatd.chat import SLOW_TICKS, ChatConnection
from chatd.connection import ServerState
from chatd.rooms import ChatService


class Transport:
    """A transport that holds nothing itself; the kernel's queue is `Kernel.unsent`."""

    def __init__(self) -> None:
        self.aborted = False

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, key: str, default=None):
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, **kw) -> None:
        pass

    def is_closing(self) -> bool:
        return self.aborted

    def abort(self) -> None:
        self.aborted = True


class Kernel:
    unsent = 0


@pytest.fixture
def conn(monkeypatch):
    monkeypatch.setattr(chat_module, "unsent_bytes", lambda transport: Kernel.unsent)
    loop = asyncio.new_event_loop()
    limits = dataclasses.replace(config.load().limits, keepalive=0)
    state = ServerState(limits, 0, loop)
    state.chat = ChatService()
    assert state.admit("?") == ""
    c = ChatConnection(state)
    c.connection_made(Transport())
    yield c
    loop.close()


def tick(c: ChatConnection, kernel: int) -> None:
    """One second of judging: the kernel now holds `kernel` bytes for the client."""
    assert c.watch is not None, "no longer judged"
    c.watch.cancel()
    Kernel.unsent = kernel
    c._judge()


def test_a_client_that_took_its_kernels_fill_then_nothing_is_still_dropped(conn):
    """Past its budget (its lines refused, so little is queued), the client's kernel takes
    6 KiB in the first second and nothing after. Three seconds over the last three still
    hold those 6 KiB, more than a line; the fourth second's do not, and it is dropped. Before,
    judging ended at the third second (nothing past the budget) and the client stayed for
    good with output waiting."""
    Kernel.unsent = 10_100
    conn.takes = []
    conn._watch()
    tick(conn, 3_956)            # took 6,144 bytes
    for _ in range(SLOW_TICKS - 1):
        tick(conn, 3_956)        # nothing
    assert not conn.transport.aborted and conn.watch is not None
    tick(conn, 3_956)
    assert conn.transport.aborted and conn.reason == "too slow"


def test_a_client_that_keeps_taking_a_line_every_three_seconds_stays(conn):
    Kernel.unsent = 50_000
    conn.takes = []
    conn._watch()
    left = 50_000
    for second in range(12):
        left -= conn.max_line if second % SLOW_TICKS == 0 else 0
        tick(conn, left)
        assert not conn.transport.aborted, second


def test_the_watch_ends_once_nothing_waits(conn):
    Kernel.unsent = 5_000
    conn.takes = []
    conn._watch()
    tick(conn, 0)
    assert conn.watch is None and not conn.transport.aborted
