"""Accepting clients: access rules, PROXY headers, admission, "server full", and running out of descriptors.

Before anything is read from a newcomer, a ban (`chatd ban`, moderation.Bans) or
`access.Access.check` may refuse it (deny, allow, the connect rate: `turn_away`); on a `proxy://` listener a trusted proxy's header is read first
(`proxy.HeaderStage`) and the checks, the limits and the log apply to the client it names.

chatd accepts on its listening sockets itself instead of through
`loop.create_server`, for three things the loops do not do:

- A refused newcomer is told "server full" on the bare socket and closed the
  way a graceful stop closes: FIN after the line, then what it still sends is
  read and dropped for LINGER_S. Closing over unread input would send RST, and
  the client could lose the line. No transport or protocol is ever made for it,
  except on a TLS listener, where the line can only follow a handshake: that
  handshake is bounded by `[tls] handshake_timeout`, the line is followed by
  close_notify, and the whole refusal by LINGER_S more (`Refusal`).
- On a TLS listener, an admitted newcomer's handshake happens after admission,
  so handshakes in progress hold client slots, within the per-address limit:
  idle handshakes from one address cannot crowd out the others.
- Descriptors are counted: a refusal lingers only while descriptors are to
  spare (a restart still needs some for its new listener and log file); past
  that the newcomer is told and closed at once.
- When accept() itself fails for lack of descriptors, one spare descriptor kept
  for this is closed, the newcomer accepted in its place, told and closed, and
  the spare taken back, so nobody waits unanswered in the backlog. asyncio
  (3.11) instead retries such an error up to `backlog` times per wakeup,
  logging every one, and uvloop stops accepting for a second. The shortage is
  logged when it begins and when it ends, with a count.

Tests: tests/process/test_fault_resources.py, tests/process/test_clients.py, tests/process/test_log_abuse.py, tests/process/test_access.py, tests/process/test_tls.py, tests/process/test_edge_attacks.py
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
import ssl
import time
from typing import Any

from . import access, proxy
from .connection import ChurnLog, Connection, ServerState, format_peer, unmapped
from .moderation import Bans
from .tls import bound_asyncio_reads

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
BANNED = "banned"          # by `chatd ban` (moderation.Bans)
# The refusals of ServerState.admit and access.Access.check as the metrics label them
# (metrics.REFUSALS); whatever a PROXY header stage refuses is "proxy".
REFUSED_AS = {"server full": "server full",
              "server full (too many connections from one address)": "per-address limit",
              access.DENIED: "denied", access.NOT_ALLOWED: "not allowed",
              access.TOO_FAST: "connect rate", BANNED: "banned"}


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


def _reason(e: BaseException) -> str:
    """Why a connection could not be made, in a few words (OpenSSL's reason for TLS)."""
    if isinstance(e, asyncio.CancelledError):
        return "the server is stopping"
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


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


class Refusal(asyncio.Protocol):
    """A refused TLS client after its handshake: the line, then close_notify; the descriptor
    is given back within LINGER_S whatever the client does (the shutdown's timeout)."""

    def __init__(self, line: bytes, loop: asyncio.AbstractEventLoop) -> None:
        self.line = line
        self.gone: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        transport.write(self.line)
        transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.gone.done():
            self.gone.set_result(None)


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
        self.telling: set[asyncio.Task[None]] = set()      # refusals over TLS (Refusal)
        self.connecting: set[asyncio.Task[None]] = set()
        self.handshakes: set[asyncio.Task[None]] = set()   # admitted, their TLS handshake pending
        self.tls: ssl.SSLContext | None = None             # for new connections on TLS listeners
        self.handshake_timeout = 10.0
        self.fd_base = 0                   # descriptors that are not clients (see measure)
        self.short_since: float | None = None
        self.short_logged = -SHORTAGE_LOG_S
        self.turned_away = 0               # newcomers told "server full" during the shortage
        self.access = access.Access()      # the rules; the server configures it
        self.refused = ChurnLog()          # refusals by `access`: one line per address and interval
        self.headers: dict[socket.socket, proxy.HeaderStage] = {}   # PROXY headers awaited
        self.bans = Bans()                 # the server's (`chatd ban`): turned away as a deny is

    def measure(self) -> None:
        """Count the descriptors that are not clients: listeners, logs, the loop's own."""
        try:
            total = len(os.listdir("/proc/self/fd")) - 1   # less listdir's own
        except OSError:
            return
        self.fd_base = max(0, total - self.state.count - self.refusing() - len(self.headers))

    def use_tls(self, context: ssl.SSLContext | None, handshake_timeout: float) -> None:
        """New connections on TLS listeners get `context` (`[tls]`, at start and on each
        restart); connected clients keep the one they were accepted with."""
        self.tls = context
        self.handshake_timeout = handshake_timeout
        if context is not None:
            bound_asyncio_reads()

    def let_in(self, sock: socket.socket, addr: Any, listener: Any = None) -> None:
        """A newly accepted socket on `listener` (server.Listener: its endpoint says what the
        connection starts with): a PROXY header read first if the listener asks for one, then
        `admit`."""
        if self.short_since is not None:
            self._shortage_over()
        if isinstance(addr, tuple):
            addr = (unmapped(addr[0]), addr[1])
        if listener is not None and listener.endpoint.proxy:
            self._read_header(sock, addr, listener)
        else:
            self.admit(sock, addr, listener)

    def admit(self, sock: socket.socket, addr: Any, listener: Any, proxy_addr: Any = None) -> None:
        """The client at `addr` (behind the proxy at `proxy_addr`, the one its header names):
        checked by the access rules, then admitted and connected (through a TLS handshake on a
        TLS listener), or told "server full"."""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        refusal = BANNED if self.bans and self.bans.match(ip) is not None else self.access.check(ip)
        if refusal:
            self.turn_away(sock, addr, refusal, listener)
            return
        quiet = self.state.churn.quiet(ip, self.state.limits.logged_per_ip)
        if proxy_addr is not None and not quiet:   # as bounded as the lines of the connection
            log.debug("PROXY header from %s: client %s", format_peer(proxy_addr), format_peer(addr))
        refusal = self.state.admit(ip)
        if refusal:
            self.state.metrics.refused(REFUSED_AS.get(refusal, refusal))
            if quiet:
                self.state.churn.count(ip, ChurnLog.REFUSED)
            else:
                log.warning("refused %s: %s", format_peer(addr), refusal)
            self.refuse(sock, listener, self.connection_class.FULL_LINE)
            return
        self.state.metrics.accepted += 1
        sock.setblocking(False)
        try:   # asyncio sets it only for sockets made with proto IPPROTO_TCP; replies are small
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        tls = self._tls_for(listener)
        task = self.loop.create_task(self._connect(sock, ip, format_peer(addr), quiet, tls))
        tasks = self.connecting if tls is None else self.handshakes
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def turn_away(self, sock: socket.socket, addr: Any, refusal: str, listener: Any) -> None:
        """Refused by the access rules (or as a proxy): logged once per address and interval,
        then counted (`refused`). Over the connect rate the newcomer is told so, like "server
        full"; otherwise closed at once, nothing read or sent."""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        self.state.metrics.refused(REFUSED_AS.get(refusal, "proxy"))
        if self.refused.quiet(ip, 1):
            self.refused.count(ip, ChurnLog.REFUSED)
        else:
            log.warning("refused %s: %s", format_peer(addr), refusal)
        if refusal == access.TOO_FAST:
            self.refuse(sock, listener, self.connection_class.SLOW_DOWN_LINE)
        else:
            sock.close()

    def _read_header(self, sock: socket.socket, addr: Any, listener: Any, buf: bytes = b"") -> None:
        """A `proxy://` listener: a trusted proxy's header first (proxy.HeaderStage), then
        `admit` for the client it names; anyone else is turned away. (`buf`: the part of the
        header a live upgrade's old process had read, `resume_header`.)"""
        ip = addr[0] if isinstance(addr, tuple) else "?"
        if not self.access.trusted(ip):
            self.turn_away(sock, addr, "not in [access] proxy_from, on a proxy:// listener", listener)
            return
        if len(self.headers) >= MAX_HEADERS or self._room() <= FD_MARGIN:
            # Each awaits with a descriptor: past that, a restart could not read its config.
            self.turn_away(sock, addr, f"{len(self.headers)} PROXY headers already awaited", listener)
            return

        def done(header: proxy.Header | None, error: str) -> None:
            del self.headers[sock]
            if header is None:
                self.turn_away(sock, addr, error, listener)
                return
            client = addr if header.client is None else (unmapped(header.client[0]), header.client[1])
            self.admit(sock, client, listener, addr)

        self.headers[sock] = proxy.HeaderStage(self.loop, sock, done, buf, (addr, listener))

    def resume_header(self, sock: socket.socket, addr: Any, listener: Any, buf: bytes) -> None:
        """A header a live upgrade's old process was reading: read on from where it was (its
        deadline starts again)."""
        self._read_header(sock, addr, listener, buf)

    def _tls_for(self, listener: Any) -> ssl.SSLContext | None:
        """The context for a newcomer on `listener`: None on a plain one."""
        return self.tls if listener is not None and listener.endpoint.tls else None

    async def _connect(self, sock: socket.socket, ip: str, peer: str, quiet: bool,
                       tls: ssl.SSLContext | None) -> None:
        conn = self.connection_class(self.state, ip, peer)
        conn.quiet = quiet
        try:
            await self.loop.connect_accepted_socket(
                lambda: conn, sock, ssl=tls, ssl_handshake_timeout=self.handshake_timeout if tls else None,
                ssl_shutdown_timeout=LINGER_S if tls else None)
        except (OSError, asyncio.CancelledError) as e:   # a failed TLS handshake is an OSError
            self.state.release(ip)
            self.state.metrics.closed(conn, "handshake failed" if tls else "reset")   # it was accepted
            sock.close()
            what = "TLS handshake with" if tls else "connect"
            if quiet:
                self.state.churn.count(ip, ChurnLog.REFUSED)
            else:
                log.info("%s %s failed: %s", what, peer, _reason(e))
            return
        if tls and self.bans and not conn.closing and self.bans.match(ip) is not None:   # banned mid-handshake
            conn.dismiss("you were banned", "banned")

    async def settle(self) -> None:
        """Wait until every accepted socket has become a connection (before a stop); TLS
        handshakes still in progress are given up."""
        for task in self.handshakes | self.telling:
            task.cancel()
        pending = self.connecting | self.handshakes | self.telling
        if pending:
            await asyncio.wait(list(pending), timeout=1.0)

    # ------------------------------------------------------------ refusals

    def refuse(self, sock: socket.socket, listener: Any, line: bytes) -> None:
        """Tell `sock`, accepted on `listener`, `line` (why it is refused) and close it; linger
        over its input, or on a TLS listener shake hands first, if descriptors allow."""
        spare = self.refusing() < MAX_LINGERING and self._room() > FD_MARGIN
        tls = self._tls_for(listener)
        if tls is not None:
            if not spare:
                sock.close()
                return
            task = self.loop.create_task(self._tell_tls(sock, line, tls))
            self.telling.add(task)
            task.add_done_callback(self.telling.discard)
            return
        peer_gone = _tell(sock, line)
        if peer_gone or not spare:
            sock.close()
            return
        self.loop.add_reader(sock.fileno(), self._on_lingering_input, sock)
        self.lingering[sock] = self.loop.call_later(LINGER_S, self._end_linger, sock)

    async def _tell_tls(self, sock: socket.socket, line: bytes, tls: ssl.SSLContext) -> None:
        """`line` after a handshake of at most handshake_timeout, then at most LINGER_S more."""
        sock.setblocking(False)
        refusal = Refusal(line, self.loop)
        try:
            await self.loop.connect_accepted_socket(lambda: refusal, sock, ssl=tls,
                                                    ssl_handshake_timeout=self.handshake_timeout,
                                                    ssl_shutdown_timeout=LINGER_S)
            await refusal.gone
        except (OSError, asyncio.CancelledError):
            sock.close()

    def refusing(self) -> int:
        """Refused clients still holding a descriptor: lingering, or being told over TLS."""
        return len(self.lingering) + len(self.telling)

    def _room(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return soft - self.fd_base - self.state.count - self.refusing() - len(self.headers)

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
                self.state.metrics.refused("out of descriptors")
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

