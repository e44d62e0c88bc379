"""Echo mode (README "Echo mode"): every complete line comes back byte for byte, at once.

The path of a line: `data_received` -> `LineDecoder.plain` (a read holding
only whole lines and no IAC byte is written back as it came) or else
`LineDecoder.feed` (framing, telnet, length bound) -> one `transport.write`
per read (while the transport has a queue, into the outbox: see connection.py).
The connection is itself the decoder (see `connection.Connection`).

Tests: tests/process/test_echo.py, tests/process/test_clients.py, tests/process/test_fair_share.py, tests/unit/test_upgrade_parts.py
"""

from __future__ import annotations

import asyncio

from .connection import DEBUG_SLOTS, SHARE_BYTES, Connection, DebugConnection
from .protocol import LINE_TOO_LONG, TelnetReply, escape_iac

READ_BUFFER_BYTES = 256 * 1024


class EchoConnection(Connection):
    """A client of echo mode."""

    __slots__ = ()
    MODE = "echo"

    def consume(self, data: bytes) -> None:
        self.active = True
        self.in_bytes += len(data)   # bytes, not lines: see metrics.py
        block = self.plain(data)
        if block:
            if self.outbox is None:   # Connection.write, inlined: the hot path
                self.transport.write(block)
                if self.outbox is not None:   # this write paused the transport
                    self.tail = block
            else:
                self.hold(block)
            self.out_bytes += len(block)
        elif block is None:
            out = self.decode(data)
            if out:
                self._write_slow(out)
        taken = self.taken + len(data)   # Connection.take_share, inlined: the hot path
        if taken < SHARE_BYTES:
            self.taken = taken
        else:
            self.sit_out()

    data_received = consume

    def _write_slow(self, out: list) -> None:
        """Over-long lines become ERR lines, a literal 0xFF goes out as IAC IAC, replies as they are."""
        parts = [self.too_long_line() if item is LINE_TOO_LONG
                 else item if item.__class__ is TelnetReply else escape_iac(item) for item in out]
        data = b"".join(parts)
        self.out_bytes += len(data)
        self.write(data)

    def too_long_line(self) -> bytes:
        return b"ERR line too long (max %d bytes)\r\n" % self.max_line

    def eof_received(self) -> bool:
        """The client half-closed: echo its last unterminated bytes, flush, close."""
        tail = self.finish()
        if tail:
            self._write_slow(tail)
        self.reason = "client closed"
        self.flush()
        return False


class BufferedEchoConnection(EchoConnection, asyncio.BufferedProtocol):
    """EchoConnection reading into one shared buffer (asyncio's own loop).

    asyncio's selector transport otherwise allocates a fresh 256 KiB bytes
    object for every recv(); reading into a reused buffer avoids that. One
    buffer serves every connection: callbacks never interleave, and the bytes
    are copied out before anything else runs.
    """

    __slots__ = ()
    _buffer = memoryview(bytearray(READ_BUFFER_BYTES))

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(bytes(self._buffer[:nbytes]))


class DebugEchoConnection(DebugConnection, EchoConnection):
    """EchoConnection at log level debug (connection.DebugConnection), which also says when
    reading the client is paused (`over_budget`); `resume_writing` says when it resumes."""

    __slots__ = DEBUG_SLOTS

    def over_budget(self) -> None:
        # A pause not logged (`note`) leaves paused_since unset: its resume is not logged either.
        if self.paused_since is None and self.note("paused reading %s: %d bytes unsent, budget %d",
                                                   self.peer, self.unsent(), self.budget):
            self.paused_since = self.state.loop.time()
        super().over_budget()


class DebugBufferedEchoConnection(DebugEchoConnection, BufferedEchoConnection):
    """BufferedEchoConnection at log level debug: `buffer_updated` calls the counting
    `data_received`."""

    __slots__ = ()
