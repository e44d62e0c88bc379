"""Helpers for chat over a bus: a private redis-server on a free loopback port (never the
packaged service), and clients of chatd nodes on 127.0.0.2, .3, .4 (tests/conftest.py makes
them). Each process is stopped by pid."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from support import Chatd, LineClient, alive, free_port, kill_and_wait, wait_for

HEARTBEAT = 0.25
NODE_TIMEOUT = 1.0


class RedisServer:
    """One redis-server of the test's own: persistence off unless `aof`."""

    def __init__(self, directory: Path, aof: bool = False) -> None:
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.aof = aof
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes" if self.aof else "no",
                "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no",
                "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: self.ping(), what="redis-server to answer PING")

    def ping(self) -> bool:
        try:
            return self.command("PING") == b"+PONG\r\n"
        except OSError:
            return False

    def command(self, *args: str, timeout: float = 2.0) -> bytes:
        """One command, in RESP, and the raw first reply (enough for the tests' own checks)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            s.sendall(b"*%d\r\n" % len(args) + b"".join(
                b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in args))
            data = b""
            deadline = time.monotonic() + timeout
            while not data.endswith(b"\r\n") and time.monotonic() < deadline:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            return data

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def restart(self, empty: bool = False) -> None:
        """Kill it (SIGKILL, no goodbye) and start it again on the same port: with what its
        append-only file kept (`aof`), or `empty` (the file removed first)."""
        self.kill()
        if empty:
            for kept in ("appendonlydir", "appendonly.aof", "dump.rdb"):
                path = self.dir / kept
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
        self.start()

    def signal(self, sig: int) -> None:
        assert self.proc is not None and alive(self.proc.pid)
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGCONT)
            except ProcessLookupError:
                pass
            kill_and_wait(self.proc.pid)
            self.proc.wait(timeout=10)


def connect(node: Chatd, nick: str = "") -> LineClient:
    """A client of `node`, past its welcome and roster, named `nick` if given."""
    client = LineClient(node.port, host=node.host)
    read_until(client, b"*** #lobby: ")
    if nick:
        client.send(f"/nick {nick}\n".encode())
        read_until(client, f"is now known as {nick}\r\n".encode())
    return client


def read_until(client: LineClient, wanted: bytes, timeout: float = 10.0) -> bytes:
    """Lines up to and including the first that contains `wanted`."""
    got = b""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {wanted!r} within {timeout} s; got {got[-600:]!r}")
        one = client.recv_line(timeout=left)
        got += one
        if wanted in one:
            return got


def quiet(client: LineClient, wait: float = 0.5) -> bytes:
    """Whatever arrives within `wait` seconds (to check that nothing more does)."""
    deadline = time.monotonic() + wait
    got = b""
    while time.monotonic() < deadline:
        client.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = client.sock.recv(65536)
        except (socket.timeout, BlockingIOError):
            break
        if not chunk:
            break
        got += chunk
    return client.buf + got
