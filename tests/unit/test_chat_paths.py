"""Chat's fast paths give exactly the bytes of the careful path, whatever the input."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import re

from hypothesis import HealthCheck, given, settings, strategies as st

from chatd import chat as chat_module, config
from chatd.chat import ChatConnection
from chatd.connection import ServerState
from chatd.rooms import ChatService


class Transport:
    """Records what a connection writes."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_extra_info(self, key: str, default=None):
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, **kw) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


@contextlib.contextmanager
def careful_path_only():
    """Turn the fast paths off: every line goes through clean_text, and is said as text."""
    saved = ChatConnection._say_block, chat_module.PLAIN_LINE, chat_module.VOID_LINES, chat_module.VOID_BYTES
    ChatConnection._say_block = lambda self, block: False
    chat_module.PLAIN_LINE = chat_module.VOID_LINES = re.compile(rb"(?!)")
    chat_module.VOID_BYTES = b""
    try:
        yield
    finally:
        (ChatConnection._say_block, chat_module.PLAIN_LINE, chat_module.VOID_LINES,
         chat_module.VOID_BYTES) = saved


def room(rate: float):
    """A sender and two receivers in one room."""
    loop = asyncio.new_event_loop()
    limits = dataclasses.replace(config.load().limits, rate=rate, burst=5, keepalive=0)
    state = ServerState(limits, 0, loop)
    state.chat = ChatService()
    peers = []
    for _ in range(3):
        assert state.admit("?") == ""
        conn = ChatConnection(state)
        conn.connection_made(Transport())
        peers.append(conn)
    for p in peers:
        p.transport.out.clear()
    return loop, peers


lines = st.lists(st.one_of(
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=30),
    st.sampled_from(["", "  ", "/who", "//x", "\t tab", "caf\u00e9", "a\x1b[31mb", "x\ry", "\x1b[31m",
                     "\x01\x1b]0;t\x07 \u202e", "\u2066\x85\x7f"]),
    st.binary(max_size=12).map(lambda b: b.decode("latin-1"))), max_size=12)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines, st.sampled_from([b"\n", b"\r\n", b"\r\0"]), st.sampled_from([0.0, 1.0]))
def test_fast_paths_send_the_same_bytes(texts, end, rate):
    """The block and plain-line fast paths against the careful path (clean_text for every
    line): the same bytes reach the sender and both receivers, for any lines, with the
    token bucket off or nearly empty."""
    data = b"".join(t.encode("utf-8", "surrogateescape").replace(b"\n", b"").replace(b"\r", b"")
                    .replace(b"\0", b"").replace(b"\xff", b"") + end for t in texts)
    outputs = []
    logging.getLogger("chatd").disabled = True
    try:
        for paths in (contextlib.nullcontext(), careful_path_only()):
            loop, peers = room(rate)
            try:
                with paths:
                    peers[0].data_received(data)
                outputs.append([bytes(p.transport.out) for p in peers])
            finally:
                loop.close()
    finally:
        logging.getLogger("chatd").disabled = False
    assert outputs[0] == outputs[1]


def test_every_line_comes_in_by_said(monkeypatch):
    """A read of plain lines (the block path), a read mixing a plain line with one to sanitize
    (the line-by-line path) and a command: each line reaches the service by `said`, the fast
    paths' as bytes, the others as text."""
    calls = []
    said = ChatService.said
    monkeypatch.setattr(ChatService, "said", lambda self, peer, what: (calls.append(what),
                                                                       said(self, peer, what)))
    loop, (sender, *receivers) = room(0.0)
    try:
        sender.data_received(b"one\ntwo\n")
        sender.data_received(b"plain\ncaf\xc3\xa9 \x1b[31mred\n")
        sender.data_received(b"/nick alice\n")
    finally:
        loop.close()
    assert calls == [b"one\ntwo\n", b"plain\n", "caf\u00e9 red", "/nick alice"]
    for receiver in receivers:
        assert bytes(receiver.transport.out) == (b"<guest1> one\r\n<guest1> two\r\n<guest1> plain\r\n"
                                                 b"<guest1> caf\xc3\xa9 red\r\n"
                                                 b"*** guest1 is now known as alice\r\n")


void_parts = st.lists(st.sampled_from(
    [b" ", b"\t", b"\r", b"\0", b"\x01", b"\x1b", b"\x7f", b"\xc2\x85", b"\xc2", b"\xe2\x80\xae",
     b"\xe2\x81\xa6", b"\xe2\x80", b"[", b"]", b"m", b"0;", b"\x07", b"\\", b"a", b"\xff", b"\xe9"]),
    max_size=10).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(void_parts)
def test_a_void_line_cleans_to_nothing(line):
    """Chat's VOID_LINES and VOID_BYTES, which charge blank and control-only lines a token
    each in bulk, take a line only if clean_text leaves nothing visible of it."""
    if (chat_module.VOID_LINES.fullmatch(line + b"\n")
            or not (line + b"\n").translate(None, chat_module.VOID_BYTES)):
        assert not chat_module.clean_text(line).strip(), line


def test_void_lines_are_found():
    """The hostile classes of the benchmark take the bulk path: bare LFs, controls, bidi."""
    for line in (b"", b"\x01\x02\x1b[0m\x07\r", "\u202e\u2066\u202d".encode(), b"\x1b]0;x\x07 \t"):
        assert chat_module.VOID_LINES.fullmatch(line + b"\n"), line
