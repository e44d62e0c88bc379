"""Chat mode's connection (README "Chat mode"): lines in, limits, and a bounded output queue.

The path of a line: `data_received` -> `LineDecoder.feed` (LF, CRLF or CR NUL;
telnet; the length bound) -> `clean_text` -> the token bucket -> the
`ChatService` of rooms.py, which sends to each recipient with `send`. Two fast
paths give the same bytes: a read whose lines are all printable ASCII and no
command is prefixed as one block, and such a single line skips `clean_text`.
`send` never waits: what the kernel does not take queues in the transport and
the connection's outbox (connection.py), and when that passes the client's
budget, `over_budget` drops it as too slow, so nobody else ever waits for it.

Tests: tests/process/test_chat.py, tests/process/test_chat_abuse.py, tests/unit/test_chat_paths.py
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import struct
from typing import Any

from .connection import DEBUG_SLOTS, Connection, DebugConnection
from .protocol import LINE_TOO_LONG, TelnetReply, clean_text
from .rooms import error, notice

log = logging.getLogger("chatd")
FLOOD_WINDOW_S = 10.0      # `burst` dropped lines within this window disconnect a client
PLAIN_LINE = re.compile(rb"[\x20-\x7e\t]*")   # printable ASCII and TAB: nothing to sanitize
PLAIN_BLOCK = re.compile(rb"(?:[\x20\t]*[\x21-\x7e][\x20-\x7e\t]*\n)+")   # such lines, none blank


class ChatConnection(Connection):
    """A client of chat mode."""

    __slots__ = ("nick", "room", "tokens", "refilled", "dropped")
    FULL_LINE = b"*** server full\r\n"
    CR_NUL_ENDS_LINE = True

    def __init__(self, state: Any, ip: str = "?", peer: str = "?") -> None:
        super().__init__(state, ip, peer)
        self.nick = ""
        self.room = ""
        self.tokens = float(state.limits.burst)   # the bucket is full at connect
        self.refilled = 0.0
        self.dropped: collections.deque[float] = collections.deque()

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._bound_output()
        self.refilled = self.state.loop.time()
        self.state.chat.arrive(self)

    def _bound_output(self) -> None:
        """Make `output_buffer` bound all the unread output, the kernel's share included.

        Linux grows a socket's send buffer to megabytes for a peer that does not
        read, so the loop's buffer alone would let ~3 MB queue up before "too
        slow". The kernel's share is capped, and the process's gets the rest.
        """
        limit = self.state.limits.output_buffer
        kernel = min(65536, limit // 4)
        try:
            # The kernel doubles this for its bookkeeping (socket(7)): the payload it holds
            # is about what was asked for, and that is the share taken from the limit.
            self.transport.get_extra_info("socket").setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, max(1, kernel))
        except (OSError, AttributeError):
            kernel = 0
        self.budget = max(limit - kernel, self.max_line + 2)

    # ------------------------------------------------------------ input

    def data_received(self, data: bytes) -> None:
        self.active = True
        chat = self.state.chat
        chat.cork()
        try:
            self._lines(self.feed(data))
        finally:
            chat.uncork()

    def eof_received(self) -> bool:
        """The client half-closed: it has left. Its last line counts; what is queued is flushed."""
        chat = self.state.chat
        chat.cork()
        try:
            self._lines(self.finish())
        finally:
            chat.uncork()
        self._leave("connection closed")
        self.reason = self.reason or "client closed"
        self.flush()
        return False

    def _lines(self, items: list) -> None:
        for item in items:
            if self.closing:
                return
            if item.__class__ is TelnetReply:
                self.state.chat.tell(self, item)
            elif item is LINE_TOO_LONG:
                self.state.chat.tell(self, error(f"line too long (max {self.max_line} bytes), dropped"))
            elif not self._say_block(item):
                chat = self.state.chat
                for raw in item.split(b"\n"):
                    if raw[-1:] == b"\r":
                        raw = raw[:-1]
                    if PLAIN_LINE.fullmatch(raw) and raw[:1] != b"/":
                        # Printable ASCII that is no command: clean_text would change nothing,
                        # so the bytes go out as they came, prefixed (the common case, fast).
                        if raw.strip() and self._take_token() and not self.closing:
                            chat.say_plain(self, raw)
                        continue
                    text = clean_text(raw)
                    if text.strip() and self._take_token() and not self.closing:
                        chat.on_line(self, text)

    def _say_block(self, block: bytes) -> bool:
        """All the lines of one read at once, when each is printable ASCII with a visible
        character and none is a command, and the bucket has a token for each: one prefixed
        block, built by one replace. False: take the lines one by one."""
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")   # a bare CR left over fails the match
        if block[:1] == b"/" or b"\n/" in block or not PLAIN_BLOCK.fullmatch(block):
            return False
        if self.state.limits.rate and not self._take_tokens(block.count(b"\n")):
            return False
        prefix = b"<%s> " % self.nick.encode()
        self.state.chat.say_block(self, prefix + block[:-1].replace(b"\n", b"\r\n" + prefix) + b"\r\n")
        return True

    def _take_tokens(self, n: int) -> bool:
        """The token bucket: it holds `burst` tokens (full at connect) and refills at `rate`
        a second; take `n` at once if it holds them."""
        limits = self.state.limits
        now = self.state.loop.time()
        self.tokens = min(float(limits.burst), self.tokens + (now - self.refilled) * limits.rate)
        self.refilled = now
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def _take_token(self) -> bool:
        """One line's token; without one the line is dropped with a warning, and `burst`
        dropped lines within FLOOD_WINDOW_S disconnect the client (`flooding`)."""
        limits = self.state.limits
        if not limits.rate or self._take_tokens(1):
            return True
        now = self.refilled
        dropped = self.dropped
        dropped.append(now)
        while dropped[0] < now - FLOOD_WINDOW_S:
            dropped.popleft()
        if len(dropped) >= limits.burst:
            self._leave("flooding")
            self.close("flooding")
        else:
            self.state.chat.tell(self, error("slow down, line dropped"))
        return False

    # ------------------------------------------------------------ output

    def send(self, data: bytes) -> None:
        """Queue `data` for this client; never waits (see the module docstring)."""
        if self.outbox is not None:
            self.hold(data)
        elif not self.closing and not self.transport.is_closing():
            # is_closing: the loop may have found the peer gone (reset) and not yet told us;
            # asyncio logs every write after the fifth to such a transport.
            self.transport.write(data)

    def over_budget(self) -> None:
        """Unread output passed the budget: drop the client, whoever else is waiting.

        This runs inside a send, often in the middle of a broadcast: the room is
        told when the loop delivers `connection_lost`, after the line at hand.
        """
        if not self.closing:
            try:   # reset rather than FIN: the kernel drops what it still holds for the client
                self.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            self.abort("too slow")

    def quit(self, reason: str) -> None:
        """/quit: leave with `reason`, flush what is queued, close."""
        self._leave(reason)
        self.close("quit")

    def farewell(self) -> None:
        self.send(notice("server shutting down"))

    # ------------------------------------------------------------ leaving

    def _leave(self, reason: str) -> None:
        if self.nick:
            self.state.chat.depart(self, reason, tell_others=not self.state.stopping)

    def close(self, reason: str) -> None:
        self._leave(reason)
        super().close(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave(self.reason if self.reason in ("idle", "too slow", "flooding")
                    else "connection closed")
        super().connection_lost(exc)


class DebugChatConnection(DebugConnection, ChatConnection):
    """ChatConnection at log level debug (connection.DebugConnection), which also says what
    it drops: a line over max_line or over the rate, a client too slow or flooding."""

    __slots__ = DEBUG_SLOTS

    def _lines(self, items: list) -> None:
        for item in items:
            if item is LINE_TOO_LONG:
                log.debug("dropped a line from %s (too long): max_line %d", self.peer, self.max_line)
        super()._lines(items)

    def _take_token(self) -> bool:
        if self.closing:
            return super()._take_token()
        if super()._take_token():
            return True
        limits = self.state.limits
        if self.closing:   # that drop made `burst` within FLOOD_WINDOW_S
            log.debug("dropped %s (flooding): %d lines over the rate within %g s",
                      self.peer, len(self.dropped), FLOOD_WINDOW_S)
        else:
            log.debug("dropped a line from %s (rate limit): rate %g, burst %d",
                      self.peer, limits.rate, limits.burst)
        return False

    def over_budget(self) -> None:
        if not self.closing:
            log.debug("dropped %s (too slow): %d bytes unsent, budget %d", self.peer,
                      self.unsent(), self.budget)
        super().over_budget()
