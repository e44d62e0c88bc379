"""The debug connection classes in-process (log level debug): what they count and log, and that
they answer clients exactly as the mode's own classes do."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from chatd import config, connection as connection_module
from chatd.chat import ChatConnection, DebugChatConnection
from chatd.connection import CountingTransport, ServerState
from chatd.echo import (BufferedEchoConnection, DebugBufferedEchoConnection, DebugEchoConnection,
                        EchoConnection)
from chatd.rooms import ChatService


class Clock:
    """The loop's time and timers, moved by hand (`advance`)."""

    def __init__(self) -> None:
        self.now = 100.0
        self.timers: list[Timer] = []

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback) -> Timer:
        timer = Timer(self.now + delay, callback)
        self.timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the time on, running the timers that come due, in order."""
        self.now += seconds
        due = sorted((t for t in self.timers if t.when <= self.now), key=lambda t: t.when)
        self.timers = [t for t in self.timers if t.when > self.now]
        for timer in due:
            if not timer.cancelled:
                timer.callback()


@dataclasses.dataclass
class Timer:
    when: float
    callback: object
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Transport:
    """Records what a connection writes and asks; `queued` is its write buffer's size."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.queued = 0
        self.reading = True
        self.protocol = None
        self.closed = False

    def write(self, data) -> None:
        self.out += data

    def get_extra_info(self, key: str, default=None):
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 7777)}.get(key, default)

    def set_write_buffer_limits(self, **kw) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.queued

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def make_state(**limits) -> ServerState:
    state = ServerState(dataclasses.replace(config.load().limits, keepalive=0, **limits), 0, Clock())
    state.chat = ChatService()
    return state


def connect(cls, state: ServerState):
    assert state.admit("127.0.0.1") == ""
    conn = cls(state, "127.0.0.1", "127.0.0.1:40000")
    transport = Transport()
    conn.connection_made(transport)
    return conn, transport


ECHO_INPUT = [b"hello\n", b"two\nlines\n", b"a tail", b" and its end\n", b"\xff\xff\n", b"x" * 5000 + b"\n"]


@pytest.mark.parametrize("base, debug", [(EchoConnection, DebugEchoConnection),
                                         (BufferedEchoConnection, DebugBufferedEchoConnection)])
def test_debug_echo_answers_as_echo_and_counts_both_ways(caplog, base, debug):
    """The same reads into the mode's class and its debug class. Result: the same bytes back;
    the debug one logs accepted and closed with the exact counts, and no client text."""
    outputs = []
    with caplog.at_level(logging.DEBUG, logger="chatd"):
        for cls in (base, debug):
            state = make_state(max_line=4096)
            conn, transport = connect(cls, state)
            for data in ECHO_INPUT:
                if hasattr(cls, "buffer_updated"):   # as asyncio's loop delivers it
                    buf = conn.get_buffer(-1)
                    buf[:len(data)] = data
                    conn.buffer_updated(len(data))
                else:
                    conn.data_received(data)
            conn.eof_received()
            state.loop.now += 1.5
            conn.connection_lost(None)
            outputs.append(bytes(transport.out))
    assert outputs[0] == outputs[1]
    received, sent = sum(map(len, ECHO_INPUT)), len(outputs[1])
    debug_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug_lines == [
        "accepted 127.0.0.1:40000 on 127.0.0.1:7777",
        f"closed 127.0.0.1:40000 (client closed): received {received} bytes, sent {sent} bytes, "
        f"open 1.500 s"]
    assert "hello" not in caplog.text


def test_debug_echo_logs_pause_and_resume_once_each(caplog):
    """1. the transport has a queue and the outbox passes the budget, twice,
    2. the transport drains. Result: one "paused", one "resumed", reading stopped and resumed."""
    state = make_state(max_line=64, output_buffer=100)
    with caplog.at_level(logging.DEBUG, logger="chatd"):
        conn, transport = connect(DebugEchoConnection, state)
        conn.pause_writing()
        transport.queued = 50
        conn.data_received(b"y" * 40 + b"\n")
        assert transport.reading
        conn.data_received(b"z" * 40 + b"\n")
        assert not transport.reading
        conn.data_received(b"w" * 40 + b"\n")   # a read already on its way
        state.loop.now += 0.25
        transport.queued = 0
        conn.resume_writing()
        assert transport.reading
        conn.resume_writing()   # drained again without a pause: nothing to say
    debug_lines = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert debug_lines == ["accepted 127.0.0.1:40000 on 127.0.0.1:7777",
                           "paused reading 127.0.0.1:40000: 132 bytes unsent, budget 100",
                           "resumed reading 127.0.0.1:40000 after 0.250 s"]
    assert bytes(transport.out) == b"y" * 40 + b"\n" + b"z" * 40 + b"\n" + b"w" * 40 + b"\n"
    assert conn.bytes_in == conn.bytes_out == 123


def test_the_graceful_stop_drainer_counts_what_it_reads_and_drops(monkeypatch):
    """A graceful stop with 10 bytes unread: 25 arrive, 10 are answered, 15 dropped; all 25
    count as received."""
    state = make_state()
    conn, transport = connect(DebugEchoConnection, state)
    monkeypatch.setattr(connection_module, "unread_bytes", lambda transport: 10)
    drainer = conn.drain()
    assert transport.protocol is drainer
    drainer.data_received(b"answered\n" + b"X" * 16)
    assert bytes(transport.out) == b"answered\n"
    assert conn.bytes_in == 25 and conn.bytes_out == 9
    drainer.data_received(b"later")
    assert conn.bytes_in == 30


def test_the_counting_transport_forwards_everything_and_never_raises_on_a_count():
    state = make_state()
    conn, real = connect(DebugEchoConnection, state)
    proxy = conn.transport
    assert isinstance(proxy, CountingTransport) and proxy.transport is real
    before = conn.bytes_out
    proxy.write(b"abc")
    proxy.write(bytearray(b"de"))
    proxy.write(memoryview(b"fghi"))
    proxy.writelines([b"j", b"kl"])
    assert conn.bytes_out - before == 12
    assert bytes(real.out).endswith(b"abcdefghijkl")
    real.queued = 7
    assert proxy.get_write_buffer_size() == 7 and proxy.is_closing() is False
    proxy.pause_reading()
    assert real.reading is False
    with pytest.raises(AttributeError):   # __slots__: no instance dict
        proxy.extra = 1
    with pytest.raises(AttributeError):
        proxy.no_such_method   # noqa: B018 - the transport's AttributeError, as without a proxy

    class Odd:   # a transport that takes anything: the proxy's count must not raise either
        def write(self, data) -> None:
            pass
    odd = CountingTransport(Odd(), conn)
    odd.write(12345)
    odd.write(object())


def test_debug_chat_answers_as_chat_and_logs_what_it_drops(caplog):
    """One sender, one receiver; the sender sends four lines at once (burst 3), then an
    over-long line. Result: the same bytes as ChatConnection's; the debug class logs the line
    dropped by the rate and the one dropped for its length, never their text."""
    data = [b"one\ntwo\nthree\nsecret-four\n", b"secret-" + b"L" * 60 + b"\n"]
    outputs = []
    with caplog.at_level(logging.DEBUG, logger="chatd"):
        for cls in (ChatConnection, DebugChatConnection):
            state = make_state(rate=1.0, burst=3, max_line=32)
            sender, st = connect(cls, state)
            receiver, rt = connect(cls, state)
            for d in data:
                sender.data_received(d)
            outputs.append((bytes(st.out), bytes(rt.out)))
    assert outputs[0] == outputs[1]
    assert b"slow down, line dropped" in outputs[1][0] and b"line too long" in outputs[1][0]
    dropped = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert dropped == ["dropped a line from 127.0.0.1:40000 (rate limit): rate 1, burst 3",
                       "dropped a line from 127.0.0.1:40000 (too long): max_line 32"]
    assert "secret" not in caplog.text


def test_debug_chat_logs_a_flooder_and_a_slow_reader_once_each(caplog):
    state = make_state(rate=1.0, burst=3, max_line=64, output_buffer=4096)
    with caplog.at_level(logging.DEBUG, logger="chatd"):
        flooder, ft = connect(DebugChatConnection, state)
        slow, stt = connect(DebugChatConnection, state)
        flooder.data_received(b"".join(b"f%d\n" % i for i in range(20)))
        assert flooder.closing and flooder.reason == "flooding"
        talker, _ = connect(DebugChatConnection, state)
        slow.pause_writing()
        for _ in range(80):
            talker.data_received(b"x" * 60 + b"\n")
            state.loop.advance(1.0)   # within the rate; "too slow" is judged after a second
        assert slow.reason == "too slow"
        slow.connection_lost(None)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("dropped 127.0.0.1:40000 (flooding): 3 lines over the rate within 10 s") == 1
    too_slow = [m for m in messages if "too slow" in m and m.startswith("dropped")]
    assert len(too_slow) == 1 and too_slow[0].startswith("dropped 127.0.0.1:40000 (too slow): "), too_slow
    closed = [m for m in messages if m.startswith("closed ")]
    assert closed and closed[-1].startswith("closed 127.0.0.1:40000 (too slow): received 0 bytes, sent "), closed
