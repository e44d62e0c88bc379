"""Init systems through the real daemon (README "Running under systemd").

- systemd's notify protocol, on a NOTIFY_SOCKET the test binds (abstract and path),
  with SO_PASSCRED so every datagram's sender pid is checked;
- socket activation with the real systemd-socket-activate, and by hand (fds dup'd onto 3..);
- upstart's `expect stop` (seed 003): chatd stops itself with SIGSTOP once it serves;
- Debian's start-stop-daemon --notify-await.

Every process is started with Popen in its own session and stopped by its pid in a finally.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import socket
import struct
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import require_real
from support import (LineClient, alive, chatd_command, dup_onto_3, free_port, kill_and_wait, listening,
                     proc_stat, wait_for)

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

INIT_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
                  "LISTEN_FDNAMES", "UPSTART_JOB")
CREDS = struct.calcsize("iII")
START_STOP_DAEMON = "/sbin/start-stop-daemon"


def base_env(**extra: str) -> dict:
    """The test's environment without any init-system variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if k not in INIT_VARIABLES}
    return env | extra


def monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


# ------------------------------------------------------------------ a fake NOTIFY_SOCKET

@dataclass
class Datagram:
    pid: int
    uid: int
    gid: int
    text: str
    usec: int          # CLOCK_MONOTONIC (µs) just after it was received

    @property
    def lines(self) -> list[str]:
        return [line for line in self.text.split("\n") if line]

    def has(self, line: str) -> bool:
        return line in self.lines

    def get(self, key: str) -> str | None:
        for line in self.lines:
            k, sep, v = line.partition("=")
            if sep and k == key:
                return v
        return None


class NotifySocket:
    """An AF_UNIX datagram socket with SO_PASSCRED, as systemd's manager binds it."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        if path is None:
            name = f"chatd-test-{uuid.uuid4()}"
            self.sock.bind(b"\0" + name.encode())
            self.value = "@" + name
        else:
            self.sock.bind(str(path))
            self.value = str(path)
        self.sock.setblocking(False)
        self.seen: list[Datagram] = []

    def env(self, **extra: str) -> dict:
        return base_env(NOTIFY_SOCKET=self.value, **extra)

    def recv(self, timeout: float) -> Datagram | None:
        """The next datagram within `timeout` seconds, or None."""
        ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not ready:
            return None
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(CREDS))
        now = monotonic_usec()
        creds = [struct.unpack("iII", d[:CREDS]) for level, kind, d in ancdata
                 if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
        assert len(creds) == 1, f"no SCM_CREDENTIALS with {data!r}"
        pid, uid, gid = creds[0]
        d = Datagram(pid, uid, gid, data.decode(errors="replace"), now)
        self.seen.append(d)
        return d

    def wait(self, predicate, timeout: float = 10.0, what: str = "a datagram") -> Datagram:
        deadline = time.monotonic() + timeout
        while True:
            d = self.recv(deadline - time.monotonic())
            if d is None:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"seen: {[x.text for x in self.seen]}")
            if predicate(d):
                return d

    def wait_line(self, line: str, timeout: float = 10.0) -> Datagram:
        return self.wait(lambda d: d.has(line), timeout, what=line)

    def collect(self, seconds: float) -> list[Datagram]:
        """Every datagram that arrives in the next `seconds`."""
        deadline = time.monotonic() + seconds
        got = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return got
            d = self.recv(remaining)
            if d is not None:
                got.append(d)

    def drain(self) -> list[Datagram]:
        got = []
        while (d := self.recv(0)) is not None:
            got.append(d)
        return got

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NotifySocket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ------------------------------------------------------------------ processes

@contextlib.contextmanager
def process(argv: list[str], env: dict, output: Path, **kw):
    """Popen in a new session, stdout and stderr appended to `output`; stopped by pid at the end."""
    with open(output, "ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                start_new_session=True, **kw)
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGCONT)   # a stopped one must be able to die of SIGTERM
        kill_and_wait(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def chatd_run(inst, command: str = "run") -> list[str]:
    return chatd_command() + [command, "-c", str(inst.config)]


def with_own_pid(variable: str, argv: list[str]) -> list[str]:
    """`sh -c 'VAR=$$ exec "$@"'`: the variable names the pid the command will run as."""
    return ["sh", "-c", f'{variable}=$$ exec "$@"', "sh", *argv]


def exit_status(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    return proc.wait(timeout=timeout)


def echo_works(port: int, text: bytes = b"hello init system\n") -> None:
    with LineClient(port) as c:
        c.send(text)
        assert c.recv_line() == text


def output_of(inst) -> str:
    return inst.run_stderr.read_bytes().decode(errors="replace") if inst.run_stderr.exists() else ""


def all_from(notify: NotifySocket, pid: int) -> None:
    strangers = [(d.pid, d.text) for d in notify.seen if d.pid != pid]
    assert not strangers, f"datagrams not from the main pid {pid}: {strangers}"


def short_path(tmp_path: Path, name: str) -> Path:
    """A path for a unix socket (sun_path holds 107 bytes)."""
    path = tmp_path / name
    assert len(str(path)) < 100, path
    return path


# ------------------------------------------------------------------ sd_notify

@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_ready_comes_from_the_main_pid_once_the_port_accepts(make_chatd, tmp_path, kind):
    """1. a NOTIFY_SOCKET (abstract `@name`, or a path), 2. chatd run.
    Result: READY=1 with a STATUS= naming mode and address; a connection made the moment it
    arrives (no retry) succeeds; every datagram comes from the Popen pid."""
    inst = make_chatd()
    path = short_path(tmp_path, "notify") if kind == "path" else None
    with NotifySocket(path) as notify, \
            process(chatd_run(inst), notify.env(), inst.run_stderr) as proc:
        ready = notify.wait_line("READY=1")
        first = socket.create_connection(("127.0.0.1", inst.port), timeout=2)   # no retry
        first.close()
        status = ready.get("STATUS")
        assert status is not None, ready.text
        assert "echo" in status and f"127.0.0.1:{inst.port}" in status, status
        assert ready.pid == proc.pid and ready.uid == os.getuid()
        before = [d.text for d in notify.seen[:-1]]
        assert not any("STOPPING" in t or "ERRNO" in t or "READY" in t for t in before), before
        echo_works(inst.port)
        assert proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0, output_of(inst)
        notify.wait_line("STOPPING=1")
        all_from(notify, proc.pid)


def test_reload_sends_reloading_with_monotonic_usec_then_ready_with_the_outcome(loop_chatd):
    """1. chatd run under NOTIFY_SOCKET, 2. SIGHUP after a good change, 3. `chatd reload` after a bad one.
    Result: each time one datagram RELOADING=1 + MONOTONIC_USEC=N (N between the clock read
    just before the signal and just after the datagram), then READY=1 with the outcome in STATUS=."""
    inst = loop_chatd
    with NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(), inst.run_stderr) as proc:
        notify.wait_line("READY=1")

        inst.write_config(extra="[limits]\nmax_line = 20\n")
        before = monotonic_usec()
        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify.wait(lambda d: "RELOADING=1" in d.text, what="RELOADING=1")
        assert reloading.has("RELOADING=1"), reloading.text
        usec = reloading.get("MONOTONIC_USEC")
        assert usec is not None and usec.isdigit(), reloading.text
        assert before <= int(usec) <= reloading.usec
        ready = notify.wait_line("READY=1")
        assert "applied" in (ready.get("STATUS") or ""), ready.text
        assert "max_line" in ready.get("STATUS"), ready.text

        inst.write_config(mode="nonsense")
        before = monotonic_usec()
        inst.cmd("reload", check=6)
        reloading = notify.wait(lambda d: "RELOADING=1" in d.text, what="RELOADING=1")
        usec = reloading.get("MONOTONIC_USEC")
        assert usec is not None and before <= int(usec) <= reloading.usec, reloading.text
        ready = notify.wait_line("READY=1")
        assert "rejected" in (ready.get("STATUS") or ""), ready.text

        echo_works(inst.port)
        all_from(notify, proc.pid)


def test_status_follows_the_clients(chatd):
    inst = chatd
    with NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(), inst.run_stderr) as proc:
        ready = notify.wait_line("READY=1")
        assert "0 clients" in ready.get("STATUS"), ready.text
        with LineClient(inst.port) as a, LineClient(inst.port) as b:
            for c in (a, b):
                c.send(b"x\n")
                assert c.recv_line() == b"x\n"
            notify.wait(lambda d: "2 clients" in (d.get("STATUS") or ""), what="STATUS= with 2 clients")
        notify.wait(lambda d: "0 clients" in (d.get("STATUS") or ""), what="STATUS= with 0 clients")
        all_from(notify, proc.pid)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_stopping_on_shutdown(chatd, sig):
    inst = chatd
    with NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(), inst.run_stderr) as proc:
        notify.wait_line("READY=1")
        os.kill(proc.pid, sig)
        stopping = notify.wait_line("STOPPING=1")
        assert stopping.get("STATUS"), stopping.text
        assert exit_status(proc) == 0, output_of(inst)
        all_from(notify, proc.pid)


def test_a_failed_start_sends_errno_and_exits_non_zero(chatd):
    """1. the port is taken, 2. chatd run under NOTIFY_SOCKET.
    Result: ERRNO=98 (EADDRINUSE) from the main pid, no READY=1, exit status non-zero."""
    inst = chatd
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    squatter.bind(("127.0.0.1", inst.port))
    squatter.listen(1)
    with squatter, NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(), inst.run_stderr) as proc:
        failed = notify.wait(lambda d: d.get("ERRNO") is not None, what="ERRNO=")
        assert failed.get("ERRNO") == "98", failed.text
        assert "already in use" in (failed.get("STATUS") or ""), failed.text
        assert exit_status(proc) != 0
        assert "already in use" in output_of(inst)
        notify.drain()
        assert not any(d.has("READY=1") for d in notify.seen)
        all_from(notify, proc.pid)


@pytest.mark.parametrize("watchdog_pid", ["unset", "ours"])
def test_watchdog_pings_at_half_of_watchdog_usec(loop_chatd, watchdog_pid):
    """WATCHDOG_USEC=400000 and WATCHDOG_PID absent or chatd's own pid: WATCHDOG=1 every ~0.2 s."""
    inst = loop_chatd
    argv = chatd_run(inst)
    extra = {"WATCHDOG_USEC": "400000"}
    if watchdog_pid == "ours":
        argv = with_own_pid("WATCHDOG_PID", argv)
        extra["WATCHDOG_PID"] = "placeholder"
    with NotifySocket() as notify, \
            process(argv, notify.env(**extra), inst.run_stderr) as proc:
        notify.wait_line("READY=1")
        pings = [d for d in notify.collect(1.6) if d.has("WATCHDOG=1")]
        assert 5 <= len(pings) <= 11, [d.text for d in pings]
        gaps = [(b.usec - a.usec) / 1e6 for a, b in zip(pings, pings[1:])]
        average = sum(gaps) / len(gaps)
        assert 0.15 <= average <= 0.3, gaps
        assert all(p.text == "WATCHDOG=1\n" for p in pings)
        all_from(notify, proc.pid)


def test_watchdog_for_another_pid_is_ignored(chatd):
    inst = chatd
    env_extra = {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(os.getpid())}
    with NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(**env_extra), inst.run_stderr) as proc:
        notify.wait_line("READY=1")
        later = notify.collect(1.2)
        assert not any("WATCHDOG" in d.text for d in later), [d.text for d in later]
        all_from(notify, proc.pid)


def test_a_stopped_chatd_stops_pinging_and_resumes_after_sigcont(loop_chatd):
    """The pings come from the event loop itself, in a single-threaded process:
    SIGSTOP silences them, SIGCONT brings them back."""
    inst = loop_chatd
    with NotifySocket() as notify, \
            process(chatd_run(inst), notify.env(WATCHDOG_USEC="400000"), inst.run_stderr) as proc:
        notify.wait_line("READY=1")
        notify.wait_line("WATCHDOG=1")
        assert os.listdir(f"/proc/{proc.pid}/task") == [str(proc.pid)], "chatd runs threads"
        os.kill(proc.pid, signal.SIGSTOP)
        wait_for(lambda: proc_stat(proc.pid)["state"] == "T", what="chatd to be stopped")
        notify.drain()
        silent = notify.collect(1.0)
        assert not silent, [d.text for d in silent]
        os.kill(proc.pid, signal.SIGCONT)
        notify.wait_line("WATCHDOG=1", timeout=1.0)
        again = [d for d in notify.collect(1.0) if d.has("WATCHDOG=1")]
        assert len(again) >= 3, [d.text for d in again]
        all_from(notify, proc.pid)


def test_start_under_notify_socket_stays_in_the_foreground(chatd):
    """`chatd start` with NOTIFY_SOCKET does not detach: the Popen process is the daemon."""
    inst = chatd
    with NotifySocket() as notify, \
            process(chatd_run(inst, "start"), notify.env(), inst.run_stderr) as proc:
        ready = notify.wait_line("READY=1")
        assert ready.pid == proc.pid
        assert proc.poll() is None
        assert inst.pid() == proc.pid
        assert proc_stat(proc.pid)["ppid"] == os.getpid()
        echo_works(inst.port)
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0, output_of(inst)
        all_from(notify, proc.pid)


def unix_datagram_sockets(pid: int) -> list[int]:
    """The inodes of the AF_UNIX datagram sockets `pid` holds (from /proc/PID/net/unix)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    found = []
    for line in Path(f"/proc/{pid}/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[4], 16) == socket.SOCK_DGRAM and int(fields[6]) in inodes:
            found.append(int(fields[6]))
    return found


@pytest.mark.parametrize("notify_socket", [False, True], ids=["without", "with"])
def test_a_notify_socket_is_opened_only_under_notify_socket(chatd, notify_socket):
    """Without NOTIFY_SOCKET chatd runs fine and holds no unix datagram socket to send
    anything with (with NOTIFY_SOCKET, the same check finds one: the check works)."""
    inst = chatd
    with NotifySocket() as notify:
        env = notify.env() if notify_socket else base_env(WATCHDOG_USEC="400000")
        with process(chatd_run(inst), env, inst.run_stderr) as proc:
            wait_for(lambda: "ready:" in inst.log_text() or proc.poll() is not None, what="ready")
            assert proc.poll() is None, output_of(inst)
            echo_works(inst.port)
            assert bool(unix_datagram_sockets(proc.pid)) == notify_socket
            os.kill(proc.pid, signal.SIGTERM)
            assert exit_status(proc) == 0
        if not notify_socket:
            assert notify.collect(0.2) == []


# ------------------------------------------------------------------ socket activation

def socket_activate() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        require_real("systemd-socket-activate")
    return path


def wait_bound(port: int, proto: str = "t") -> None:
    """Until `ss` shows a listening TCP (t) or bound UDP (u) socket on 127.0.0.1:port."""
    def bound() -> bool:
        out = subprocess.run(["ss", f"-Hl{proto}n", f"sport = :{port}"], capture_output=True,
                             text=True, timeout=10).stdout
        return bool(out.strip())
    wait_for(bound, what=f"a listener on port {port}")


def test_systemd_socket_activate_hands_over_the_listener(chatd):
    """1. systemd-socket-activate -l 127.0.0.1:PORT --fdname=tcp chatd run, 2. a client connects.
    Result: chatd is exec'd and serves that first connection; status and the log name the socket
    as "(systemd: tcp)"; a reload that moves the port is rejected (6), one of [limits] applied."""
    inst = chatd
    argv = [socket_activate(), "-l", f"127.0.0.1:{inst.port}", "--fdname=tcp", *chatd_run(inst)]
    with process(argv, base_env(), inst.run_stderr) as proc:
        wait_bound(inst.port)
        echo_works(inst.port, b"first connection\n")
        assert inst.pid() == proc.pid     # exec'd in place
        name = f"127.0.0.1:{inst.port} (systemd: tcp)"
        status = inst.cmd("status", check=0).stdout.decode()
        assert f"address: {name}" in status, status
        log = inst.log_text()
        assert "socket activation" in log and name in log, log

        inst.write_config(port=free_port())
        proc_reload = inst.cmd("reload", check=6)
        said = (proc_reload.stdout + proc_reload.stderr).decode()
        assert "server.port" in said and "socket activation" in said, said
        echo_works(inst.port, b"still here\n")

        inst.write_config(extra="[limits]\nmax_line = 20\n")
        said = inst.cmd("reload", check=0).stdout.decode()
        assert "limits.max_line" in said, said
        with LineClient(inst.port) as c:
            c.send(b"z" * 21 + b"\n")
            assert c.recv_line().startswith(b"ERR line too long")
        assert f"address: {name}" in inst.cmd("status", check=0).stdout.decode()

        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0, output_of(inst)


def test_systemd_socket_activate_datagram_is_refused(chatd):
    """--datagram: chatd is exec'd at the first datagram and refuses the socket, saying why."""
    inst = chatd
    argv = [socket_activate(), "-l", f"127.0.0.1:{inst.port}", "--datagram", *chatd_run(inst)]
    with process(argv, base_env(), inst.run_stderr) as proc:
        wait_bound(inst.port, "u")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"wake up\n", ("127.0.0.1", inst.port))
        assert exit_status(proc) != 0
        said = output_of(inst)
        assert "datagram socket" in said, said
        assert not listening(inst.port)


def test_systemd_socket_activate_accept_is_refused(chatd):
    """--accept (inetd style, Accept=yes): chatd gets a connected socket and refuses it, saying why."""
    inst = chatd
    argv = [socket_activate(), "-l", f"127.0.0.1:{inst.port}", "--accept", *chatd_run(inst)]
    with process(argv, base_env(), inst.run_stderr):
        wait_bound(inst.port)
        with LineClient(inst.port, timeout=10) as c:
            assert c.recv_until_eof() == b""      # the child refused it and exited
        wait_for(lambda: "not listening" in output_of(inst), what="chatd's refusal")
        assert "Accept=no" in output_of(inst)


def tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_listen_variables_for_another_pid_are_ignored(chatd):
    """LISTEN_PID names another process, LISTEN_FDS=1, fd 3 a listening socket of the test's.
    Result: chatd binds its own port and leaves fd 3 alone (still there, never accepted on)."""
    inst = chatd
    decoy = tcp_listener()
    env = base_env(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1", LISTEN_FDNAMES="decoy")
    with decoy, process(chatd_run(inst), env, inst.run_stderr, pass_fds=(3,),
                        preexec_fn=dup_onto_3(decoy.fileno())) as proc:
        wait_for(lambda: "ready:" in inst.log_text() or proc.poll() is not None, what="ready")
        assert proc.poll() is None, output_of(inst)
        echo_works(inst.port)
        status = inst.cmd("status", check=0).stdout.decode()
        assert f"address: 127.0.0.1:{inst.port}\n" in status and "systemd" not in status, status
        assert os.readlink(f"/proc/{proc.pid}/fd/3") == f"socket:[{os.fstat(decoy.fileno()).st_ino}]"
        with socket.create_connection(decoy.getsockname(), timeout=5):
            decoy.settimeout(5)
            conn, _ = decoy.accept()      # chatd did not take it
            conn.close()
        assert "socket activation" not in inst.log_text()
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0


def test_two_sockets_with_names_for_our_pid(chatd):
    """LISTEN_PID=$$ through sh, LISTEN_FDS=2, LISTEN_FDNAMES=a:b: both are served, none bound."""
    inst = chatd
    a, b = tcp_listener(), tcp_listener()
    pa, pb = a.getsockname()[1], b.getsockname()[1]
    env = base_env(LISTEN_PID="placeholder", LISTEN_FDS="2", LISTEN_FDNAMES="a:b")
    with a, b, process(with_own_pid("LISTEN_PID", chatd_run(inst)), env, inst.run_stderr,
                       pass_fds=(3, 4), preexec_fn=dup_onto_3(a.fileno(), b.fileno())) as proc:
        a.close()
        b.close()
        wait_for(lambda: "ready:" in inst.log_text() or proc.poll() is not None, what="ready")
        assert proc.poll() is None, output_of(inst)
        echo_works(pa, b"on a\n")
        echo_works(pb, b"on b\n")
        assert not listening(inst.port)
        status = inst.cmd("status", check=0).stdout.decode()
        assert f"address: 127.0.0.1:{pa} (systemd: a), 127.0.0.1:{pb} (systemd: b)" in status, status
        assert inst.pid() == proc.pid
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0, output_of(inst)


def test_a_detached_start_keeps_the_sockets_handed_to_it(chatd):
    """`chatd start` with LISTEN_PID naming the invoker: the daemon, two forks later, serves
    the socket it was handed (the descriptor sweep spares it) and binds nothing itself."""
    inst = chatd
    a = tcp_listener()
    port = a.getsockname()[1]
    env = base_env(LISTEN_PID="placeholder", LISTEN_FDS="1", LISTEN_FDNAMES="handed")
    with a:
        proc = subprocess.run(with_own_pid("LISTEN_PID", chatd_run(inst, "start")), env=env,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=30,
                              pass_fds=(3,), preexec_fn=dup_onto_3(a.fileno()))
    inst.remember_pid()
    assert proc.returncode == 0, proc.stderr
    assert f"127.0.0.1:{port} (systemd: handed)".encode() in proc.stdout
    echo_works(port, b"two forks later\n")
    assert not listening(inst.port)
    inst.cmd("stop", check=0)


# ------------------------------------------------------------------ upstart

def wait_stopped(pid: int, timeout: float = 10.0) -> int:
    """waitpid(WUNTRACED) with a deadline: the status once the child stops (or ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got, status = os.waitpid(pid, os.WNOHANG | os.WUNTRACED)
        if got == pid:
            return status
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} did not stop within {timeout} s")


def test_upstart_expect_stop(chatd):
    """1. chatd start with UPSTART_JOB set.
    Result: it stays in the foreground and stops itself with SIGSTOP once the port accepts;
    a client can connect then but gets its echo only after SIGCONT."""
    inst = chatd
    with process(chatd_run(inst, "start"), base_env(UPSTART_JOB="chatd"), inst.run_stderr) as proc:
        status = wait_stopped(proc.pid)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP, (status, output_of(inst))
        assert proc_stat(proc.pid)["state"] == "T"
        assert inst.pid() == proc.pid
        with LineClient(inst.port) as c:          # the port accepts already
            c.send(b"while stopped\n")
            c.sock.settimeout(0.3)
            with pytest.raises(socket.timeout):
                c.sock.recv(100)
            os.kill(proc.pid, signal.SIGCONT)
            assert c.recv_line() == b"while stopped\n"
        echo_works(inst.port)
        assert inst.pid() == proc.pid and proc.poll() is None
        os.kill(proc.pid, signal.SIGTERM)
        assert exit_status(proc) == 0, output_of(inst)


# ------------------------------------------------------------------ start-stop-daemon

def test_start_stop_daemon_notify_await(chatd):
    """start-stop-daemon --start --background --notify-await returns 0 once chatd serves;
    --stop --retry TERM/10 stops it and the pid file goes."""
    if not os.access(START_STOP_DAEMON, os.X_OK):
        require_real("start-stop-daemon")
    inst = chatd
    pidfile = str(inst.pidfile)
    start = [START_STOP_DAEMON, "--start", "--background", "--notify-await", "--notify-timeout", "20",
             "--pidfile", pidfile, "--startas", chatd_command()[0], "--",
             "run", "--pidfile", pidfile, "-c", str(inst.config)]
    pid = None
    try:
        with open(inst.run_stderr, "ab") as out:
            done = subprocess.run(start, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  env=base_env(), timeout=40)
        with contextlib.suppress(OSError, ValueError):
            pid = inst.pid()
        assert done.returncode == 0, output_of(inst)
        socket.create_connection(("127.0.0.1", inst.port), timeout=2).close()   # no retry
        assert pid is not None and alive(pid)
        assert "chatd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        echo_works(inst.port)
        with open(inst.run_stderr, "ab") as out:
            done = subprocess.run([START_STOP_DAEMON, "--stop", "--pidfile", pidfile, "--retry", "TERM/10"],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=base_env(),
                                  timeout=40)
        assert done.returncode == 0, output_of(inst)
        assert not alive(pid)
        assert not inst.pidfile.exists()
    finally:
        if pid is not None and alive(pid):
            kill_and_wait(pid)
