"""The real telnet client (inetutils) driven through a pseudo-terminal, for the process tests.

The pty is telnet's controlling terminal (pty.fork), so Ctrl-C is a real SIGINT and telnet
sends IAC IP IAC DO TIMING-MARK; with a pty that is not its controlling terminal, ^C would
only be echoed and nothing sent. Every read has a deadline; `stop` ends telnet by its pid.
"""

from __future__ import annotations

import os
import pty
import select
import time
from typing import Callable

from conftest import require_real
from support import kill_and_wait

TELNET = "/usr/bin/telnet"
HOST = "127.0.0.1"
TIMEOUT = 10.0


def need(path: str, name: str) -> None:
    """Skip (fail under CHATD_REQUIRE_REAL=1) when a real client is not installed."""
    if not os.access(path, os.X_OK):
        require_real(name)


class TelnetPty:
    """The real telnet client with a pty as its controlling terminal (so ^C is a real SIGINT)."""

    def __init__(self, port: int) -> None:
        env = {"PATH": "/usr/bin:/bin", "TERM": "dumb", "HOME": os.environ.get("HOME", "/tmp"),
               "LANG": "C"}
        pid, fd = pty.fork()
        if pid == 0:                                           # the child: exec, never return
            try:
                os.execve(TELNET, [TELNET, HOST, str(port)], env)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        self.out = b""
        self.seen = 0
        self.returncode: int | None = None

    def write(self, data: bytes) -> None:
        os.write(self.fd, data)

    def _read(self, deadline: float) -> bool:
        """One bounded read from the pty master; False at EOF (the child is gone)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        ready, _, _ = select.select([self.fd], [], [], min(remaining, 0.1))
        if not ready:
            return True
        try:
            chunk = os.read(self.fd, 4096)
        except OSError:                                        # EIO: the slave side is closed
            return False
        self.out += chunk
        return bool(chunk)

    def wait_output(self, predicate: Callable[[bytes], bool], what: str, timeout: float = TIMEOUT) -> None:
        """Wait until `predicate(everything on screen so far)` holds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.out):
            if time.monotonic() > deadline:
                raise AssertionError(f"telnet: timed out waiting for {what}; screen:\n{self.out!r}")
            if not self._read(deadline) and not predicate(self.out):
                raise AssertionError(f"telnet: EOF waiting for {what}; screen:\n{self.out!r}")

    def expect(self, want: bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait until the screen after the last match shows `want`; return the new part."""
        self.wait_output(lambda out: want in out[self.seen:], repr(want), timeout)
        end = self.out.index(want, self.seen) + len(want)
        new, self.seen = self.out[self.seen:end], end
        return new

    def settle(self, seconds: float) -> None:
        """Keep draining the pty for `seconds` (telnet must never block on its output)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._read(deadline):
            pass

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"telnet did not exit; screen:\n{self.out!r}")
            self._read(min(deadline, time.monotonic() + 0.05))
        drain = time.monotonic() + 2.0            # what it wrote before exiting is still queued
        while self._read(drain) and time.monotonic() < drain:
            pass
        return self.returncode

    def ctrl_c(self) -> None:
        """^C: the tty echoes it, telnet's SIGINT handler sends IAC IP IAC DO TIMING-MARK."""
        self.write(b"\x03")
        self.expect(b"^C")
        self.settle(0.3)

    def type_line_and_see_echo(self, token: str) -> None:
        """Type `token` + Enter; telnet shows the tty's local echo, then the server's: 2 copies."""
        tok = token.encode()
        assert self.out.count(tok) == 0, f"token {token} already on screen"
        self.write(tok + b"\r")
        self.wait_output(lambda out: out.count(tok) >= 2, f"the server's echo of {token}")

    def stop(self) -> None:
        """TERM, wait, KILL by pid; reap; close the master."""
        try:
            if self.poll() is None:
                kill_and_wait(self.pid)
                try:
                    os.waitpid(self.pid, 0)
                except ChildProcessError:
                    pass
        finally:
            try:
                os.close(self.fd)
            except OSError:
                pass


def connected_telnet(port: int) -> TelnetPty:
    """telnet to 127.0.0.1:PORT, connected and ready for typing."""
    t = TelnetPty(port)
    try:
        t.expect(b"Escape character is")
        t.settle(0.2)                     # let telnet set its terminal modes before typing
    except BaseException:
        t.stop()
        raise
    return t
