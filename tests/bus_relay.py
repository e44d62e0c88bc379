"""A TCP relay for the cluster fault tests: 127.0.0.1:port <-> a redis-server, that the test
can cut, blackhole and restore, so that one node loses the bus while the others keep it.

A test tool, not a bus: one thread, one `select` loop, bounded waits. States:

- `restore()` (the start): every connection is forwarded both ways;
- `cut()`: every connection is reset (RST, as when a route goes away and the peers learn it)
  and new ones are reset on arrival;
- `blackhole()`: nothing moves any more, in either direction, and new connections are held
  without an upstream (a network that silently stops carrying packets: the peers learn
  nothing, only their timeouts tell them). `restore()` lets what was held flow again.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

from support import free_port

PASS, CUT, BLACKHOLE = "pass", "cut", "blackhole"


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), not a FIN: the far end sees ECONNRESET."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class Relay:
    """127.0.0.1:`port` forwarded to 127.0.0.1:`target`; see the module docstring."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = free_port()
        self.state = PASS
        self.accepted = 0
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", self.port))
        self._listener.listen(64)
        self._wake_r, self._wake_w = socket.socketpair()
        self._peer: dict[socket.socket, socket.socket | None] = {}   # each end -> the other
        self._lock = threading.Lock()
        self._pending: tuple[str, threading.Event] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"relay:{self.port}", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ the test's controls

    def cut(self) -> None:
        self._set(CUT)

    def blackhole(self) -> None:
        self._set(BLACKHOLE)

    def restore(self) -> None:
        self._set(PASS)

    def close(self) -> None:
        self._stopping = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)
        for sock in list(self._peer):
            _reset(sock)
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def _set(self, state: str) -> None:
        """Change state; returns once the relay thread has applied it."""
        done = threading.Event()
        with self._lock:
            self._pending = (state, done)
        self._wake_w.send(b"x")
        if not done.wait(5):
            raise AssertionError(f"relay did not switch to {state} within 5 s")

    # ------------------------------------------------------------ the thread

    def _apply(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None:
            return
        state, done = pending
        self.state = state
        if state == CUT:
            for sock in list(self._peer):
                _reset(sock)
            self._peer.clear()
        elif state == PASS:
            for sock, other in list(self._peer.items()):
                if other is None and sock in self._peer:   # held while blackholed: connect now
                    self._upstream(sock)
        done.set()

    def _upstream(self, client: socket.socket) -> None:
        try:
            up = socket.create_connection(("127.0.0.1", self.target), timeout=2)
        except OSError:
            self._drop(client)
            return
        up.settimeout(2)
        self._peer[client], self._peer[up] = up, client

    def _drop(self, sock: socket.socket) -> None:
        other = self._peer.pop(sock, None)
        sock.close()
        if other is not None:
            self._peer.pop(other, None)
            other.close()

    def _run(self) -> None:
        while not self._stopping:
            watched = [self._listener, self._wake_r]
            if self.state == PASS:
                watched += [s for s, other in self._peer.items() if other is not None]
            readable, _, _ = select.select(watched, [], [], 0.5)
            for sock in readable:
                if sock is self._wake_r:
                    self._wake_r.recv(64)
                    self._apply()
                elif sock is self._listener:
                    client, _ = self._listener.accept()
                    self.accepted += 1
                    client.settimeout(2)
                    if self.state == CUT:
                        _reset(client)
                    elif self.state == BLACKHOLE:
                        self._peer[client] = None
                    else:
                        self._upstream(client)
                elif sock in self._peer and self.state == PASS:
                    self._forward(sock)

    def _forward(self, sock: socket.socket) -> None:
        other = self._peer[sock]
        try:
            data = sock.recv(65536)
            if data and other is not None:
                other.sendall(data)
        except OSError:
            data = b""
        if not data:
            self._drop(sock)
