"""One client connection: admission, limits, flow control, idle check, and a clean close.

`Connection` is the part every mode shares; `echo.EchoConnection` adds what
is done with the bytes. Output is bounded by the transport's write-buffer
limits: past `output_buffer` the transport calls `pause_writing`, and we stop
reading that client until its output has drained to half of that.

Tests: tests/unit/test_connection.py, tests/process/test_echo.py
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
from typing import Any

from .protocol import LineDecoder

log = logging.getLogger("chatd")
LINGER_S = 1.0        # how long a graceful close reads and discards after its FIN
MAX_LINGERING = 96    # refused clients closed gracefully at a time (within daemon.FD_RESERVE);
                      # past that, under a flood of connections, they are closed at once


def format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)


def set_keepalive(sock: Any, idle_s: int) -> None:
    """TCP keepalive: probes after `idle_s` of silence find peers that vanished."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, max(1, min(idle_s, 10)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError):
        pass


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the kernel's receive queue for this connection (FIONREAD)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    except OSError:
        return 0
    return struct.unpack("i", raw)[0]


class ServerState:
    """What all connections share: current limits, the connection set, per-address counts."""

    def __init__(self, limits: Any, max_clients: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.max_clients = max_clients
        self.loop = loop
        self.connections: set[Connection] = set()
        self.per_ip: dict[str, int] = {}
        self.all_closed = asyncio.Event()
        self.all_closed.set()
        self.lingering = 0    # refused clients still being closed gracefully
        self.stopping = False  # the server is stopping: leaving clients are not announced
        self.chat: Any = None  # the ChatService of rooms.py, shared by chat connections

    def admit(self, conn: Connection) -> str:
        """Count `conn` in, or say why it is refused ("" when admitted)."""
        limits = self.limits
        if self.max_clients and len(self.connections) >= self.max_clients:
            return "server full"
        if limits.max_clients_per_ip and self.per_ip.get(conn.ip, 0) >= limits.max_clients_per_ip:
            return "server full (too many connections from one address)"
        self.connections.add(conn)
        self.per_ip[conn.ip] = self.per_ip.get(conn.ip, 0) + 1
        self.all_closed.clear()
        return ""

    def forget(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        left = self.per_ip[conn.ip] - 1
        if left:
            self.per_ip[conn.ip] = left
        else:
            del self.per_ip[conn.ip]
        if not self.connections:
            self.all_closed.set()


class Connection(LineDecoder, asyncio.Protocol):
    """The lifecycle every client goes through, whatever the mode.

    A connection is its own LineDecoder rather than holding one: with a
    thousand clients, reaching through a second object on every read cost a
    quarter of the echo throughput (measured on uvloop, 64-byte lines).
    """

    __slots__ = ("state", "transport", "ip", "peer", "active", "idle_since", "reason", "admitted",
                 "closing")
    FULL_LINE = b"ERR server full\r\n"
    CR_NUL_ENDS_LINE = False

    def __init__(self, state: ServerState) -> None:
        super().__init__(state.limits.max_line, self.CR_NUL_ENDS_LINE)
        self.state = state
        self.transport: Any = None
        self.ip = ""
        self.peer = "?"
        self.active = True        # set on every read; the idle sweep clears it
        self.idle_since = 0.0     # when the idle sweep last found it inactive
        self.reason = ""
        self.admitted = False
        self.closing = False      # nothing more may be written: closed, or half-closed by us

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if isinstance(peer, tuple) else str(peer)
        self.peer = format_peer(peer)
        refusal = self.state.admit(self)
        if refusal:
            self.reason = refusal
            log.warning("refused %s: %s", self.peer, refusal)
            transport.write(self.FULL_LINE)
            if self.state.lingering < MAX_LINGERING:
                # Close like a graceful stop: a close over unread input would send RST,
                # and the client would lose the line just written to it.
                self.state.lingering += 1
                drainer = _Drainer(self, 0)
                transport.set_protocol(drainer)
                drainer.finish()
            else:
                transport.close()
            return
        self.admitted = True
        limits = self.state.limits
        transport.set_write_buffer_limits(high=limits.output_buffer, low=limits.output_buffer // 2)
        if limits.keepalive:
            set_keepalive(transport.get_extra_info("socket"), limits.keepalive)
        log.info("connect %s (%d clients)", self.peer, len(self.state.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.admitted:
            if self.transport.get_protocol() is not self:
                self.state.lingering -= 1   # a refused client that was lingering
            return
        self.state.forget(self)
        reason = self.reason or (f"reset ({exc})" if exc else "closed")
        log.info("disconnect %s: %s (%d clients)", self.peer, reason, len(self.state.connections))

    def pause_writing(self) -> None:
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        self.transport.resume_reading()

    def close(self, reason: str) -> None:
        """Close after flushing what is queued."""
        self.reason = self.reason or reason
        self.closing = True
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Close now, dropping what is queued."""
        self.reason = self.reason or reason
        self.closing = True
        self.transport.abort()

    def drain(self) -> _Drainer:
        """Graceful stop, first step: from now on only what has already arrived is answered.

        The server calls `finish()` on the result once every client's input is read.
        """
        self.reason = self.reason or "server shutting down"
        drainer = _Drainer(self, unread_bytes(self.transport))
        self.transport.set_protocol(drainer)
        return drainer

    def farewell(self) -> None:
        """What a client is told just before a graceful stop half-closes it (nothing, in echo)."""


class _Drainer(asyncio.Protocol):
    """Stands in for a connection during a graceful stop (SPEC section 2, SIGUSR1).

    The bytes that had arrived when the stop began (`budget`) are still
    answered, and nothing after them. Then `finish()`: the farewell, our side
    half-closed (FIN) once the output is flushed, and what the client still
    sends read and dropped for LINGER_S, so closing does not reset the
    connection over unread data.
    """

    def __init__(self, conn: Connection, budget: int) -> None:
        self.conn = conn
        self.budget = budget
        self.timer: asyncio.TimerHandle | None = None

    @property
    def caught_up(self) -> bool:
        """Has everything that had arrived been read (or is the connection gone)?"""
        return self.budget <= 0 or self.conn.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        if self.budget > 0:
            take = data[: self.budget]
            self.budget -= len(take)
            self.conn.data_received(take)

    def finish(self) -> None:
        conn = self.conn
        transport = conn.transport
        if transport.is_closing() or conn.closing:
            return
        if conn.admitted:
            conn.farewell()
        conn.closing = True
        transport.resume_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                pass   # the peer is already gone: closing is all that is left
        self.timer = self.conn.state.loop.call_later(LINGER_S, transport.close)

    def eof_received(self) -> bool:
        return False   # the client is done too: close

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.conn.connection_lost(exc)
