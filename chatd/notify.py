"""systemd's notification socket (sd_notify(3)) and socket activation (sd_listen_fds(3)),
and upstart's `expect stop`, with the standard library only. No-ops outside them.

Only this module reads NOTIFY_SOCKET, WATCHDOG_USEC, WATCHDOG_PID, LISTEN_PID,
LISTEN_FDS, LISTEN_FDNAMES and UPSTART_JOB, and it unsets each once used, so
nothing chatd might start inherits them.

Tests: tests/unit/test_notify.py, tests/process/test_init_systems.py
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass

from .errors import StartError

SD_LISTEN_FDS_START = 3


def supervised() -> bool:
    """Is chatd run by systemd (or start-stop-daemon --notify-await) or upstart? Then it
    stays in the foreground: the supervisor tracks the pid it started."""
    return bool(os.environ.get("NOTIFY_SOCKET") or os.environ.get("UPSTART_JOB"))


def take_upstart_job() -> bool:
    """Upstart's `expect stop`: with UPSTART_JOB set, chatd stops itself once ready (seed 003)."""
    return os.environ.pop("UPSTART_JOB", None) is not None


class Notifier:
    """Datagrams to NOTIFY_SOCKET, sent from the main pid (NotifyAccess=main)."""

    def __init__(self, address: str | bytes | None = None, watchdog_usec: int = 0) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self.sock: socket.socket | None = None
        if address is not None:
            # Non-blocking: a receiver that stops reading fills its queue, and a blocking
            # send would then freeze the event loop; a lost datagram is the lesser harm.
            self.sock = socket.socket(socket.AF_UNIX,
                                      socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @classmethod
    def from_environment(cls) -> Notifier:
        """Take NOTIFY_SOCKET ("@name" is an abstract socket) and the watchdog settings."""
        raw = os.environ.pop("NOTIFY_SOCKET", "")
        usec = os.environ.pop("WATCHDOG_USEC", "")
        wpid = os.environ.pop("WATCHDOG_PID", "")
        address: str | bytes | None = None
        if raw.startswith("@"):
            address = b"\0" + raw[1:].encode()
        elif raw.startswith("/"):
            address = raw
        watchdog = int(usec) if usec.isdigit() else 0
        if wpid and wpid != str(os.getpid()):
            watchdog = 0   # the watchdog is meant for another process
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.sock is not None

    @property
    def watchdog_interval(self) -> float:
        """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC); 0 when not asked for."""
        return self.watchdog_usec / 2e6 if self.enabled else 0.0

    def send(self, *fields: str) -> None:
        """One datagram of KEY=VALUE lines. A notify socket that went away, or is full,
        changes nothing."""
        if self.sock is None:
            return
        # A newline separates fields: a multi-line value (a config file's errors) becomes one.
        fields = tuple(f.replace("\n", "; ") for f in fields)
        try:
            self.sock.sendto("\n".join(fields).encode() + b"\n", self.address)
        except OSError:
            pass

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        """RELOADING=1 with the CLOCK_MONOTONIC time, in one datagram (systemd 253's protocol)."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    def failed(self, errno_value: int, status: str) -> None:
        self.send(f"ERRNO={errno_value}", f"STATUS={status}")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


@dataclass
class Activated:
    """A listening socket handed over by socket activation, with its LISTEN_FDNAMES name."""

    sock: socket.socket
    name: str


def listen_fds() -> list[Activated]:
    """The sockets passed to this very process (LISTEN_PID), checked; [] when there are none.

    Variables meant for another process are left alone. Every socket must be a
    listening TCP stream socket: anything else (a datagram socket, a unix
    socket, a connected socket from Accept=yes) is refused with the reason.
    """
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = os.environ.pop("LISTEN_FDS", "")
    names = os.environ.pop("LISTEN_FDNAMES", "")
    os.environ.pop("LISTEN_PID", None)
    if not count.isdigit():
        raise StartError(f"LISTEN_FDS={count!r} is not a number of descriptors")
    n = int(count)
    labels = names.split(":") if names else []
    found = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        name = labels[i] if i < len(labels) else "unknown"
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise StartError(f"fd {fd} ({name}) handed over by socket activation: {e.strerror}") from None
        _check_listener(sock, fd, name)
        sock.set_inheritable(False)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        found.append(Activated(sock, name))
    return found


def _check_listener(sock: socket.socket, fd: int, name: str) -> None:
    what = f"fd {fd} ({name}) handed over by socket activation"
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        kind = {socket.AF_UNIX: "a unix socket"}.get(sock.family, f"address family {sock.family}")
        raise StartError(f"{what} is {kind}; chatd serves TCP stream sockets only")
    if sock.type != socket.SOCK_STREAM:
        raise StartError(f"{what} is a datagram socket; chatd serves TCP stream sockets only "
                         f"(use ListenStream=, not ListenDatagram=)")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise StartError(f"{what} is not listening; chatd needs Accept=no in the .socket unit")
