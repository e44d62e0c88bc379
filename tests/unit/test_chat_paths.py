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
    """Turn both fast paths off: every line goes through clean_text and on_line."""
    say_block, plain = ChatConnection._say_block, chat_module.PLAIN_LINE
    ChatConnection._say_block = lambda self, block: False
    chat_module.PLAIN_LINE = re.compile(rb"(?!)")
    try:
        yield
    finally:
        ChatConnection._say_block, chat_module.PLAIN_LINE = say_block, plain


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
    st.sampled_from(["", "  ", "/who", "//x", "\t tab", "caf\u00e9", "a\x1b[31mb", "x\ry"]),
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
