"""Accepting clients: admission, "server full", and running out of descriptors.

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

Tests: tests/process/test_fault_resources.py, tests/process/test_clients.py, tests/process/test_log_abuse.py
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

from .connection import ChurnLog, Connection, ServerState, format_peer
from .moderation import Bans

log = logging.getLogger("chatd")

ACCEPT_BATCH = 64          # accepts per wakeup, so one busy listener cannot starve the loop
SHORT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_S = 0.1              # pause after a shortage before accepting again
LINGER_S = 1.0             # how long a refused client's input is read and dropped
MAX_LINGERING = 96         # refused clients closed gracefully at a time
FD_MARGIN = 16             # descriptors never spent on lingering (restart, log reopen)
SHORTAGE_LOG_S = 10.0      # at most one "out of descriptors" line this often
DRAIN_READS = 16           # reads of 64 KiB at most, dropping a refused client's input


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
        self.bans = Bans()                 # the server's (`chatd ban`): refused unread, untold

    def measure(self) -> None:
        """Count the descriptors that are not clients: listeners, logs, the loop's own."""
        try:
            total = len(os.listdir("/proc/self/fd")) - 1   # less listdir's own
        except OSError:
            return
        self.fd_base = max(0, total - self.state.count - len(self.lingering))

    def let_in(self, sock: socket.socket, addr: Any) -> None:
        """A newly accepted socket: admitted and connected, or told "server full"."""
        if self.short_since is not None:
            self._shortage_over()
        ip = addr[0] if isinstance(addr, tuple) else "?"
        if self.bans and self.bans.match(ip) is not None:
            self._banned(sock, ip, addr)
            return
        quiet = self.state.churn.quiet(ip, self.state.limits.logged_per_ip)
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

    def _banned(self, sock: socket.socket, ip: str, addr: Any) -> None:
        """Closed before any byte is read or sent; logged once per address and interval, the
        rest counted in the churn summary."""
        sock.close()
        if self.bans.log_refusal(ip):
            log.warning("refused %s: banned", format_peer(addr))
        else:
            self.state.churn.count(ip, ChurnLog.REFUSED)

    def refuse(self, sock: socket.socket) -> None:
        """Tell `sock` "server full"; linger over its input if descriptors allow."""
        peer_gone = _tell(sock, self.connection_class.FULL_LINE)
        if peer_gone or len(self.lingering) >= MAX_LINGERING or self._room() <= FD_MARGIN:
            sock.close()
            return
        self.loop.add_reader(sock.fileno(), self._on_lingering_input, sock)
        self.lingering[sock] = self.loop.call_later(LINGER_S, self._end_linger, sock)

    def _room(self) -> int:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return 1 << 30
        return soft - self.fd_base - self.state.count - len(self.lingering)

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

    def close(self) -> None:
        """Close every lingering refusal and give the spare back (the server is stopping)."""
        for sock in list(self.lingering):
            self._end_linger(sock)
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

    def __init__(self, sock: socket.socket, gate: Gate) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.gate = gate
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
            self.gate.let_in(sock, addr)

    def _pause(self) -> None:
        """Stop reading the listener for RETRY_S: a lasting error must not spin the loop."""
        if self.reading:
            self.stop()
            self.retry = self.loop.call_later(RETRY_S, self._resume)

    def _resume(self) -> None:
        self.retry = None
        self.gate.spare.take()
        self.start()

