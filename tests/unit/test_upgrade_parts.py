"""The live upgrade's parts (chatd/upgrade.py): the record's encoding, the channel with its
descriptors, and the invariant the handover rests on: a connection knows, without the
loop's help, every byte of output it has not yet handed to the kernel (`queued`)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time

import pytest
from hypothesis import given, strategies as st

from chatd import upgrade
from chatd.chat import ChatConnection
from chatd.config import Config
from chatd.connection import ServerState
from chatd.echo import BufferedEchoConnection, EchoConnection
from chatd.modes import ChatMode

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text() | st.binary(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@given(st.dictionaries(st.text(), json_values, max_size=6))
def test_a_record_survives_encoding_bytes_included(record):
    data, raw = upgrade.encode(record)
    assert upgrade.decode(data, b"".join(raw)) == record


def test_anything_but_a_record_is_refused():
    for data, raw in ((b"[]", b""), (b"nope", b""), (b"{\"$r\": 3}", b"abc"), (b"{\"a\": {\"$r\": 4}}", b"abc"),
                      (b"{\"a\": {\"$r\": 2}}", b"abc"), (b"{\"a\": {\"$r\": -1}}", b""), (b"{\"a\": {\"$r\": 1.5}}", b"ab")):
        with pytest.raises(ValueError):
            upgrade.decode(data, raw)


def test_bytes_go_raw_beside_the_record():
    """Queued output goes as itself, not as base64 inside the JSON (four times its size in
    each process, and seconds of the freeze): the JSON holds only its length."""
    output = os.urandom(300000)
    data, raw = upgrade.encode({"clients": [{"output": output, "backlog": b""}]})
    assert len(data) < 100 and raw == [output, b""]


def test_the_channel_carries_a_big_record_and_many_descriptors():
    ours, theirs = upgrade.Channel.pair()
    peer = upgrade.Channel(theirs)
    files = [os.open(os.devnull, os.O_RDONLY) for _ in range(450)]   # > 2 messages of descriptors
    record = {"clients": [{"output": os.urandom(n * 97), "backlog": b"x"} for n in range(300)]}   # ~4 MB
    try:
        import threading
        sender = threading.Thread(target=ours.send_record, args=(*upgrade.encode(record), files))
        sender.start()
        deadline = time.monotonic() + 10
        kind, head, _ = peer.receive(deadline)
        got, fds = peer.receive_record(deadline, kind, head)
        sender.join(10)
        assert got == record
        assert len(fds) == len(files)
        assert all(os.path.samestat(os.fstat(a), os.fstat(b)) for a, b in zip(files, fds))
        for fd in fds:
            os.close(fd)
    finally:
        for fd in files:
            os.close(fd)
        ours.close(), peer.close()


def test_a_takeover_refuses_a_record_of_another_format(monkeypatch):
    ours, theirs = upgrade.Channel.pair()
    monkeypatch.setattr(upgrade.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    taking = upgrade.Takeover(upgrade.Channel(theirs))
    ours.send_record(*upgrade.encode({"format": upgrade.FORMAT + 1}), [])
    with pytest.raises(SystemExit):
        taking.receive()
    kind, body, _ = ours.receive(time.monotonic() + 5)
    assert kind == "fail" and f"format {upgrade.FORMAT}, not {upgrade.FORMAT + 1}" in body["error"]


# ------------------------------------------------------------------ queued output

def _loops():
    yield "asyncio", asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        return
    yield "uvloop", uvloop.new_event_loop


@pytest.mark.parametrize("mode", ["echo", "echo-first-pause", "chat-send", "chat-fanout"])
@pytest.mark.parametrize("name, new_loop", list(_loops()), ids=[n for n, _ in _loops()])
def test_queued_output_is_exactly_what_the_kernel_has_not_taken(name, new_loop, mode):
    """A client that reads nothing: once the daemon holds output for it, what the client can
    read plus `queued()` is every byte the daemon produced for it, in order."""
    loop = new_loop()
    limits = Config().limits
    # A max_line past any read: every read of echo takes its inlined fast path (`plain`).
    limits = type(limits)(**{**limits.__dict__, "output_buffer": 1 << 20, "rate": 0.0,
                             "max_line": 1 << 20 if mode == "echo-first-pause" else limits.max_line})
    state = ServerState(limits, 100, loop)
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 18)   # fixed: the kernel takes no more
    server, _ = listener.accept()
    server.setblocking(False)
    state.admit("127.0.0.1")
    if mode.startswith("echo"):
        cls = _first_pause(EchoConnection if name == "uvloop" else BufferedEchoConnection)
        conn = cls(state, "127.0.0.1", "peer")
        produced = b"".join(b"%06d %s\n" % (i, b"e" * 56) for i in range(45000))   # 64-byte lines
    else:
        ChatMode().configure(state, Config())
        cls = ChatConnection
        conn = cls(state, "127.0.0.1", "peer")
        produced = b""
    try:
        loop.run_until_complete(loop.connect_accepted_socket(lambda: conn, server))
        if mode.startswith("echo"):
            # Until the budget is spent, or (echo-first-pause) until the first write the kernel
            # did not take whole: whole lines a read, each taking echo's inlined fast path.
            first = mode == "echo-first-pause"
            step = 4096 if first else 65536
            stop = threading.Event()

            def feed() -> None:
                for at in range(0, len(produced), step):
                    if stop.is_set():
                        return
                    try:
                        client.sendall(produced[at:at + step])
                    except OSError:
                        return
            client.settimeout(10)
            sender = threading.Thread(target=feed, daemon=True)
            sender.start()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not conn.held and not (first and conn.outbox is not None):
                loop.run_until_complete(asyncio.sleep(0 if first else 0.01))
            stop.set()
            expected = produced[:produced.rindex(b"\n", 0, conn.in_bytes) + 1]   # whole lines
        else:
            loop.run_until_complete(asyncio.sleep(0.05))
            for i in range(8000):   # the server's notices, as the room would send them
                notice = b"*** notice %05d %s\r\n" % (i, b"n" * 80)
                if mode == "chat-send":
                    conn.send(notice)
                else:
                    paused = conn.outbox is not None
                    ChatConnection.fanout({conn: None}, notice, None, None)
                    if not paused and conn.outbox is not None:   # this fanout paused it
                        _check_queued(conn)
                if i % 50 == 0:
                    loop.run_until_complete(asyncio.sleep(0))
            loop.run_until_complete(asyncio.sleep(0.05))
            expected = None
        assert conn.outbox is not None, "the daemon holds no output: the test proves nothing"
        if mode.startswith("echo"):
            assert conn.at_first_pause is not None, "no pause seen"
        queued = conn.queued()                   # the loop does not run from here on
        client.setblocking(False)
        got = bytearray()
        quiet = 0
        for _ in range(5000):   # until the kernel has had nothing more for 0.3 s
            try:
                chunk = client.recv(1 << 20)
            except BlockingIOError:
                quiet += 1
                if quiet == 60:
                    break
                time.sleep(0.005)
                continue
            quiet = 0
            if not chunk:
                break
            got += chunk
        if expected is None:
            expected = b"".join(b"*** notice %05d %s\r\n" % (i, b"n" * 80) for i in range(8000))
            expected = got[:got.index(b"*** notice 00000")] + expected   # the welcome first
        assert conn.transport.get_write_buffer_size() > 0, "nothing in the transport: untested"
        assert bytes(got) + queued == expected
    finally:
        conn.transport.abort()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        client.close()
        listener.close()


def _first_pause(cls: type) -> type:
    """`cls`, which right after the read whose echo first paused the transport asks `queued`
    (it must know the unsent end of that write) and, on asyncio's loop, checks it against the
    transport's own buffer."""
    class FirstPause(cls):
        __slots__ = ("at_first_pause",)

        def consume(self, data: bytes) -> None:
            if not hasattr(self, "at_first_pause"):
                self.at_first_pause = None
            paused = self.outbox is not None
            super().consume(data)
            if not paused and self.outbox is not None and self.at_first_pause is None:
                self.at_first_pause = _check_queued(self)

        data_received = consume
    return FirstPause


def _check_queued(conn) -> bytes:
    """`queued()` at once (it raises if the write that paused the transport is unknown), and
    on asyncio's loop the same bytes as the transport's own buffer and the outbox."""
    queued = conn.queued()
    buffer = getattr(conn.transport, "_buffer", None)
    if isinstance(buffer, (bytes, bytearray)):
        assert queued == bytes(buffer) + bytes(conn.outbox or b"")
    return queued
