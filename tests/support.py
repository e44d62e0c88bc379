"""Test helpers: run the real `chatd` command, talk to it over TCP, read /proc.

Every wait has a deadline; every process a test starts is stopped by its pid.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TIMEOUT = 10.0


def chatd_command() -> list[str]:
    """The installed console script, as a user runs it."""
    here = Path(sys.executable).parent / "chatd"
    path = str(here) if here.exists() else shutil.which("chatd")
    if path is None:
        raise RuntimeError("the chatd command is not installed (pip install -e .)")
    return [path]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port(family: int = socket.AF_INET) -> int:
    """A port no socket uses, on every address, outside the kernel's ephemeral range: a port
    the kernel hands out (bind to 0) is also what it gives the suite's many client sockets as
    their source port, and one of those still open made a later bind to 0.0.0.0 fail."""
    low, high = _ephemeral_range()
    first, last = (10000, low - 1) if low > 12000 else (high + 1, 65535)
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for _ in range(200):
        port = random.randint(first, last)
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((wildcard, port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {first}-{last} after 200 tries")


def wait_for(predicate, timeout: float = DEFAULT_TIMEOUT, interval: float = 0.01, what: str = "condition"):
    """Poll `predicate` until it returns a true value; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


# ------------------------------------------------------------------ /proc

def proc_stat(pid: int) -> dict:
    """Fields of /proc/PID/stat after the command name (state, ppid, pgrp, session, tty_nr)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    rest = raw.rsplit(b")", 1)[1].split()
    return {"state": rest[0].decode(), "ppid": int(rest[1]), "pgrp": int(rest[2]),
            "session": int(rest[3]), "tty_nr": int(rest[4]), "starttime": int(rest[19])}


def proc_status(pid: int) -> dict:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def alive(pid: int) -> bool:
    """Is `pid` a live process (not a zombie)?"""
    try:
        return proc_stat(pid)["state"] not in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def kill_and_wait(pid: int, grace: float = 3.0) -> None:
    """TERM, wait, KILL, wait: for a pid this test started."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, grace)):
        if not alive(pid):
            return
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while alive(pid) and time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.01)


def flock_held(path) -> bool:
    """Is an flock held on `path`? Tried read-only from a fresh open file description."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# ------------------------------------------------------------------ a TCP client

class LineClient:
    """A blocking TCP client with deadlines, for exact-bytes assertions."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = DEFAULT_TIMEOUT,
                 rcvbuf: int | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((host, port))
        self.timeout = timeout
        self.buf = b""

    @classmethod
    def adopt(cls, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT) -> "LineClient":
        """A client over a socket connected elsewhere (in a container's network namespace)."""
        client = cls.__new__(cls)
        client.sock, client.timeout, client.buf = sock, timeout, b""
        sock.settimeout(timeout)
        return client

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out; received so far: {self.buf[:200]!r}")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def recv_exact(self, n: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while len(self.buf) < n:
            if not self._fill(deadline):
                raise AssertionError(f"EOF after {len(self.buf)} of {n} bytes: {self.buf[:200]!r}")
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv_line(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while b"\n" not in self.buf:
            if not self._fill(deadline):
                raise AssertionError(f"EOF before a full line: {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\n")
        return line + b"\n"

    def recv_until_eof(self, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (timeout or self.timeout)
        while self._fill(deadline):
            pass
        data, self.buf = self.buf, b""
        return data

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "LineClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ a chatd instance

@dataclass
class Chatd:
    """One chatd instance under a test's temporary directory, driven by the real command."""

    dir: Path
    port: int
    loop: str = "auto"
    extra_config: str = ""
    env: dict = field(default_factory=dict)
    pids: set = field(default_factory=set)
    outputs: list = field(default_factory=list)
    popens: list = field(default_factory=list)
    command: list | None = None   # the chatd to run (tests/installs.py); else the installed one

    def __post_init__(self) -> None:
        self.config = self.dir / "chatd.conf"
        self.pidfile = self.dir / "chatd.pid"
        self.logfile = self.dir / "chatd.log"
        self.run_stderr = self.dir / "run.stderr"
        self.write_config()

    def write_config(self, extra: str | None = None, daemon: dict | None = None, **server: object) -> None:
        """Write the instance's config: [server] keys, [daemon] keys, then `extra` text."""
        settings = {"host": "127.0.0.1", "port": self.port, "loop": self.loop} | server
        if "listen" in server:   # [server] listen stands alone: no host or port beside it
            del settings["host"], settings["port"]
        daemon_keys = {"pidfile": str(self.pidfile)} | (daemon or {})
        lines = ["[server]"] + [_toml(k, v) for k, v in settings.items()]
        lines += ["[daemon]"] + [_toml(k, v) for k, v in daemon_keys.items()]
        lines += ["[log]", f'target = "{self.logfile}"', 'level = "debug"']
        text = "\n".join(lines) + "\n" + (self.extra_config if extra is None else extra)
        self.config.write_text(text)

    def cmd(self, *args: str, timeout: float = 30.0, config: bool = True,
            check: int | None = None, **kw) -> subprocess.CompletedProcess:
        """Run `chatd ARGS -c CONFIG` and remember the daemon's pid for cleanup."""
        argv = (self.command or chatd_command()) + list(args) + (["-c", str(self.config)] if config else [])
        env = os.environ | self.env | kw.pop("env", {})
        proc = subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                              env=env, **kw)
        self.outputs.append((argv, proc.stdout, proc.stderr))
        self.remember_pid()
        if check is not None:
            assert proc.returncode == check, (
                f"{' '.join(argv)} -> {proc.returncode}, wanted {check}\nstdout: {proc.stdout!r}\n"
                f"stderr: {proc.stderr!r}\nlog:\n{self.log_text()[-3000:]}")
        return proc

    def start(self, *args: str) -> int:
        self.cmd("start", *args, check=0)
        return self.pid()

    def run_foreground(self, *args: str, **kw) -> subprocess.Popen:
        """`chatd run` as a child in its own session; returns once it has logged "ready:".

        (The port accepts connections a moment before that, and a stop signal in
        between rightly aborts the start.) Its stderr goes to `self.run_stderr`.
        """
        argv = (self.command or chatd_command()) + ["run", "-c", str(self.config), *args]
        env = os.environ | self.env | kw.pop("env", {})
        with open(self.run_stderr, "wb") as err:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=err, env=env, start_new_session=True, **kw)
        self.popens.append(proc)
        self.pids.add(proc.pid)
        wait_for(lambda: "ready:" in self.log_text() or b"ready:" in self.run_stderr.read_bytes()
                 or proc.poll() is not None, what="chatd run to be ready")
        return proc

    def foreground_stderr(self) -> bytes:
        return self.run_stderr.read_bytes()

    def pid(self) -> int:
        text = self.pidfile.read_text().strip()
        return int(text)

    def remember_pid(self) -> None:
        try:
            self.pids.add(self.pid())
        except (OSError, ValueError):
            pass

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def cleanup(self) -> None:
        """Stop whatever this instance left running, by pid, and check for tracebacks."""
        self.remember_pid()
        for proc in self.popens:
            kill_and_wait(proc.pid)
            proc.wait(timeout=5)
        for pid in self.pids:
            if alive(pid) and str(self.dir) in _cmdline_or_env(pid):
                kill_and_wait(pid)

    def tracebacks(self) -> list[str]:
        found = []
        if "Traceback" in self.log_text():
            found.append(f"log: {self.log_text()[-2000:]}")
        for argv, out, err in self.outputs:
            if b"Traceback" in out or b"Traceback" in err:
                found.append(f"{argv}: {err[-2000:]!r}")
        if self.run_stderr.exists() and b"Traceback" in self.run_stderr.read_bytes():
            found.append(f"chatd run: {self.run_stderr.read_bytes()[-2000:]!r}")
        return found


def _toml(key: str, value: object) -> str:
    return f'{key} = "{value}"' if isinstance(value, str) else f"{key} = {value}"


def _cmdline_or_env(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


FAULT_DIR = Path(__file__).resolve().parent / "fault"


def fault_env(fault: str, **extra: str) -> dict:
    """Environment that makes the daemon misbehave on purpose (see tests/fault/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(FAULT_DIR), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "CHATD_TEST_FAULT": fault} | extra


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line mentions `text` (a test's unique directory)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            if text in _cmdline_or_env(pid) and alive(pid):
                found.append(pid)
    return found


# ------------------------------------------------------------------ figures and /proc

def figures(name: str, **values: object) -> None:
    """One line of a test's measured figures; `.ci/run` shows it (pytest -rP)."""
    print(f"FIGURES {name}: " + " ".join(f"{k}={v}" for k, v in values.items()))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def stuck_client(port: int) -> LineClient:
    """A client that sends until every buffer between it and chatd is full, and reads nothing."""
    c = LineClient(port, rcvbuf=4096)
    c.sock.setblocking(False)
    deadline = time.monotonic() + 5
    stalled = 0
    while time.monotonic() < deadline and stalled < 5:
        try:
            c.sock.send(b"z" * 1000 + b"\n")
            stalled = 0
        except BlockingIOError:
            stalled += 1
            time.sleep(0.02)
    return c


def dup_onto_3(*fds: int):
    """A preexec_fn putting `fds` on 3, 4, ... in the child (dup2 clears FD_CLOEXEC there),
    as systemd hands over activated sockets."""
    def preexec() -> None:
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 100) for fd in fds]
        for i, fd in enumerate(high):
            os.dup2(fd, 3 + i)
    return preexec
