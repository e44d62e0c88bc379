"""Echo mode (SPEC section 4): every complete line comes back byte for byte, at once.

The path of a line: `data_received` -> `LineDecoder.feed` (framing, telnet,
length bound) -> one `transport.write` per read. A read that holds only whole
lines and no IAC byte is written back as it came.

Tests: tests/unit/test_echo.py, tests/process/test_echo.py
"""

from __future__ import annotations

import asyncio

from .connection import Connection
from .protocol import LINE_TOO_LONG, TelnetReply, escape_iac

READ_BUFFER_BYTES = 256 * 1024


class EchoConnection(Connection):
    """A client of echo mode."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        self.active = True
        out = self.decoder.feed(data)
        if out:
            if len(out) == 1 and out[0].__class__ is bytes and b"\xff" not in out[0]:
                self.transport.write(out[0])
            else:
                self._write_slow(out)

    def _write_slow(self, out: list) -> None:
        """Over-long lines become ERR lines, a literal 0xFF goes out as IAC IAC, replies as they are."""
        parts = [self.too_long_line() if item is LINE_TOO_LONG
                 else item if item.__class__ is TelnetReply else escape_iac(item) for item in out]
        self.transport.write(b"".join(parts))

    def too_long_line(self) -> bytes:
        return b"ERR line too long (max %d bytes)\r\n" % self.decoder.max_line

    def eof_received(self) -> bool:
        """The client half-closed: echo its last unterminated bytes, flush, close."""
        tail = self.decoder.finish()
        if tail:
            self._write_slow(tail)
        self.reason = "client closed"
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
