"""Accepting clients: access rules, PROXY headers, admission, "server full", and running out of descriptors.

Before anything is read from a newcomer, `access.Access.check` may refuse it (deny, allow, the
connect rate: `turn_away`); on a `proxy://` listener a trusted proxy's header is read first
(`proxy.HeaderStage`) and the checks, the limits and the log apply to the client it names.

chatd accepts on its listening sockets itself instead of through
`loop.create_server`, for three things the loops do not do:

- A refused newcomer is told "server full" on the bare socket and closed the
  way a graceful stop closes: FIN after the line, then what it still sends is
  read and dropped for LINGER_S. Closing over unread input would send RST, and
  the client could lose the line. No transport or protocol is ever made for it.
- Descriptors are counted: a refusal lingers only while descriptors are to
  spare (a restart still needs some for its new listener and log file); past
  that the newcomer is told and closed at once.
- When accept() itself fails for lack of descriptors, one spare descriptor kept
  for this is closed, the newcomer accepted in its place, told and closed, and
  the spare taken back, so nobody waits unanswered in the backlog. asyncio
  (3.11) instead retries such an error up to `backlog` times per wakeup,
  logging every one, and uvloop stops accepting for a second. The shortage is
  logged when it begins and when it ends, with a count.

Tests: tests/process/test_fault_resources.py, tests/process/test_clients.py, tests/process/test_log_abuse.py, tests/process/test_access.py, tests/process/test_edge_attacks.py
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import time
from typing import Any

from . import access, proxy
from .connection import ChurnLog, Connection, ServerState, format_peer, unmapped

log = logging.getLogger("chatd")

ACCEPT_BATCH = 64          # accepts per wakeup, so one busy listener cannot starve the loop
SHORT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_S = 0.1              # pause after a shortage before accepting again
LINGER_S = 1.0             # how long a refused client's input is read and dropped
MAX_LINGERING = 96         # refused clients closed gracefully at a time
FD_MARGIN = 16             # descriptors never spent on lingering (restart, log reopen)
SHORTAGE_LOG_S = 10.0      # at most one "out of descriptors" line this often
DRAIN_READS = 16           # reads of 64 KiB at most, dropping a refused client's input
MAX_HEADERS = 1024         # PROXY headers awaited at a time (each a descriptor, for at most 5 s)


def _drop_input(sock: socket.socket) -> bool:
    """Read and drop what `sock` holds; True once the peer has closed or failed."""
    for _ in range(DRAIN_READS):
        try:
            if not sock.recv(65536):
                return True
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True
    return False


def _tell(sock: socket.socket, line: bytes) -> bool:
    """The refusal line and a FIN, then what the client sent is dropped; True once the peer
    has closed or failed (a peer already gone is simply closed after)."""
    sock.setblocking(False)
    try:
        sock.send(line)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    return _drop_input(sock)


class Spare:
    """One descriptor held back, to accept a newcomer when no other is left."""

    def __init__(self) -> None:
        self.fd: int | None = None
        self.take()

    def take(self) -> bool:
        if self.fd is None:
            try:
                self.fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return False
        return True

    def release(self) -> bool:
        """Free the descriptor for one accept; False if there is none to free."""
        if self.fd is None:
            return False
        os.close(self.fd)
        self.fd = None
        return True


class Gate:
    """Decides, for each accepted socket, between a connection and "server full"."""

    def __init__(self, state: ServerState, loop: asyncio.AbstractEventLoop) -> None:
        self.state = state
        self.loop = loop
        self.connection_class: type[Connection] = Connection
        self.spare = Spare()
        self.lingering: dict[socket.socket, asyncio.TimerHandle] = {}
        self.connecting: set[asyncio.Task[None]] = set()
        self.fd_base = 0                   # descriptors that are not clients (see measure)
        self.short_since: float | None = None
        self.short_logged = -SHORTAGE_LOG_S
        self.turned_away = 0               # newcomers told "server full" during the shortage
        self.access = access.Access()      # the rules; the server configures it
        self.refused = ChurnLog()          # refusals by `access`: one line per address and interval
        self.headers: dict[socket.socket, proxy.HeaderStage] = {}   # PROXY headers awaited

    def measure(self) -> None:
        """Count the descriptors that are not clients: listeners, logs, the loop's own."""
        try:
            total = len(os.listdir("/proc/self/fd")) - 1   # less listdir's own
        except OSError:
            return
        self.fd_base = max(0, total - self.state.count - len(self.lingering) - len(self.headers))

    def let_in(self, sock: socket.socket, addr: Any, listener: Any = None) -> None:
        """A newly accepted socket on `listener` (server.Listener: its endpoint says what the
        connection starts with): a PROXY header read first if the listener asks for one, then
        `admit`."""
        if self.short_since is not None:
            self._shortage_over()
        if isinstance(addr, tuple):
            addr = (unmapped(addr[0]), addr[1])
        if listener is not None and listener.endpoint.proxy:
            self._read_header(sock, addr)
        else:
            self.admit(sock, addr)

    def admit(self, sock: socket.socket, addr: Any, proxy_addr: Any = None) -> None:
        """The client at `addr` (behind the proxy at `proxy_addr`, the one its header names):
        checked by the access rules, then admitted and connected, or told "server full"."""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        refusal = self.access.check(ip)
        if refusal:
            self.turn_away(sock, addr, refusal)
            return
        quiet = self.state.churn.quiet(ip, self.state.limits.logged_per_ip)
        if proxy_addr is not None and not quiet:   # as bounded as the lines of the connection
            log.debug("PROXY header from %s: client %s", format_peer(proxy_addr), format_peer(addr))
        refusal = self.state.admit(ip)
        if refusal:
            if quiet:
                self.state.churn.count(ip, ChurnLog.REFUSED)
            else:
                log.warning("refused %s: %s", format_peer(addr), refusal)
            self.refuse(sock)
            return
        sock.setblocking(False)
        try:   # asyncio sets it only for sockets made with proto IPPROTO_TCP; replies are small
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        task = self.loop.create_task(self._connect(sock, ip, format_peer(addr), quiet))
        self.connecting.add(task)
        task.add_done_callback(self.connecting.discard)

    def turn_away(self, sock: socket.socket, addr: Any, refusal: str) -> None:
        """Refused by the access rules (or as a proxy): logged once per address and interval,
        then counted (`refused`). Over the connect rate the newcomer is told so, like "server
        full"; otherwise closed at once, nothing read or sent."""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        if self.refused.quiet(ip, 1):
            self.refused.count(ip, ChurnLog.REFUSED)
        else:
            log.warning("refused %s: %s", format_peer(addr), refusal)
        if refusal == access.TOO_FAST:
            self.refuse(sock, self.connection_class.SLOW_DOWN_LINE)
        else:
            sock.close()

    def _read_header(self, sock: socket.socket, addr: Any) -> None:
        """A `proxy://` listener: a trusted proxy's header first (proxy.HeaderStage), then
        `admit` for the client it names; anyone else is turned away."""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        if not self.access.trusted(ip):
            self.turn_away(sock, addr, "not in [access] proxy_from, on a proxy:// listener")
            return
        if len(self.headers) >= MAX_HEADERS or self._room() <= FD_MARGIN:
            # Each awaits with a descriptor: past that, a restart could not read its config.
            self.turn_away(sock, addr, f"{len(self.headers)} PROXY headers already awaited")
            return

        def done(header: proxy.Header | None, error: str) -> None:
            del self.headers[sock]
            if header is None:
                self.turn_away(sock, addr, error)
                return
            client = addr if header.client is None else (unmapped(header.client[0]), header.client[1])
            self.admit(sock, client, addr)

        self.headers[sock] = proxy.HeaderStage(self.loop, sock, done)

    async def _connect(self, sock: socket.socket, ip: str, peer: str, quiet: bool) -> None:
        conn = self.connection_class(self.state, ip, peer)
        conn.quiet = quiet
        try:
            await self.loop.connect_accepted_socket(lambda: conn, sock)
        except OSError as e:
            self.state.release(ip)
            sock.close()
            log.info("connect %s failed: %s", peer, e.strerror or e)

    async def settle(self) -> None:
        """Wait until every accepted socket has become a connection (before a stop)."""
        if self.connecting:
            await asyncio.wait(list(self.connecting), timeout=1.0)

    # ------------------------------------------------------------ refusals

    def refuse(self, sock: socket.socket, line: bytes = b"") -> None:
        """Tell `sock` "server full" (or `line`); linger over its input if descriptors allow."""
        peer_gone = _tell(sock, line or self.connection_class.FULL_LINE)
        if peer_gone or len(self.lingering) >= MAX_LINGERING or self._room() <= FD_MARGIN:
            sock.close()
            return
        self.loop.add_reader(sock.fileno(), self._on_lingering_input, sock)
        self.lingering[sock] = self.loop.call_later(LINGER_S, self._end_linger, sock)

    def _room(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return soft - self.fd_base - self.state.count - len(self.lingering) - len(self.headers)

    def _on_lingering_input(self, sock: socket.socket) -> None:
        if _drop_input(sock):
            self._end_linger(sock)

    def _end_linger(self, sock: socket.socket) -> None:
        timer = self.lingering.pop(sock, None)
        if timer is None:
            return
        timer.cancel()
        self.loop.remove_reader(sock.fileno())
        sock.close()

    def close_headers(self) -> None:
        """Close every awaited PROXY header: the server is stopping, and a header completed
        later must not bring a client in."""
        for sock, stage in self.headers.items():
            stage.cancel()
            sock.close()
        self.headers.clear()

    def close(self) -> None:
        """Close every lingering refusal and awaited header, and give the spare back (the
        server is stopping)."""
        for sock in list(self.lingering):
            self._end_linger(sock)
        self.close_headers()
        self.spare.release()

    # ------------------------------------------------------------ out of descriptors

    def short_of_fds(self, listener: socket.socket, err: OSError) -> None:
        """accept() failed for lack of descriptors: turn away what waits, with the spare."""
        now = time.monotonic()
        if self.short_since is None:
            self.short_since = now
            if now - self.short_logged >= SHORTAGE_LOG_S:
                self.short_logged = now
                log.warning("out of descriptors (accept: %s): newcomers are told \"server full\" "
                            "until clients leave", err.strerror)
        for _ in range(ACCEPT_BATCH):
            if not self.spare.release():
                break
            try:
                sock, _ = listener.accept()
            except OSError:
                sock = None
            if sock is not None:
                _tell(sock, self.connection_class.FULL_LINE)
                sock.close()
                self.turned_away += 1
            if not self.spare.take() or sock is None:
                break

    def _shortage_over(self) -> None:
        assert self.short_since is not None
        log.info("descriptors available again after %.1f s; %d newcomers were told \"server full\" "
                 "meanwhile", time.monotonic() - self.short_since, self.turned_away)
        self.short_since = None
        self.turned_away = 0


class Acceptor:
    """Accepts on one listening socket while started, handing each newcomer to the gate."""

    def __init__(self, sock: socket.socket, gate: Gate, listener: Any = None) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.gate = gate
        self.listener = listener
        self.loop = gate.loop
        self.retry: asyncio.TimerHandle | None = None
        self.reading = False

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self.accept_waiting)
        self.reading = True

    def stop(self) -> None:
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        if self.reading:
            self.loop.remove_reader(self.sock.fileno())
            self.reading = False

    def accept_waiting(self, batch: int = ACCEPT_BATCH) -> None:
        """Accept up to `batch` newcomers waiting in the backlog."""
        for _ in range(batch):
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in SHORT_OF_FDS:
                    self.gate.short_of_fds(self.sock, e)
                else:
                    log.warning("accept: %s", e.strerror or e)
                self._pause()
                return
            self.gate.let_in(sock, addr, self.listener)

    def _pause(self) -> None:
        """Stop reading the listener for RETRY_S: a lasting error must not spin the loop."""
        if self.reading:
            self.stop()
            self.retry = self.loop.call_later(RETRY_S, self._resume)

    def _resume(self) -> None:
        self.retry = None
        self.gate.spare.take()
        self.start()

