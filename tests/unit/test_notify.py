"""chatd.notify in-process: sd_notify's datagrams and socket activation's descriptors (README "Signals").

The datagrams go to a real AF_UNIX datagram socket the test binds; the
descriptors of socket activation are handed to a child Python (dup2 onto fds
3.. in the child), so the test process's own descriptors are never touched.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest

from chatd.errors import StartError
from chatd.notify import Notifier, listen_fds
from support import dup_onto_3

ENV_KEYS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_PID", "LISTEN_FDS",
            "LISTEN_FDNAMES", "UPSTART_JOB")
CREDS = struct.calcsize("iII")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No init-system variable leaks in from the environment pytest runs in."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)


# ------------------------------------------------------------------ Notifier.from_environment

def test_from_environment_maps_an_at_name_to_an_abstract_address_and_unsets_everything(monkeypatch):
    """1. NOTIFY_SOCKET=@name, WATCHDOG_USEC=400000, WATCHDOG_PID unset.
    Result: the address is b"\\0name", the ping interval is half of WATCHDOG_USEC, the variables are gone."""
    monkeypatch.setenv("NOTIFY_SOCKET", "@chatd-test-abc")
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    n = Notifier.from_environment()
    try:
        assert n.address == b"\0chatd-test-abc"
        assert n.enabled
        assert n.watchdog_interval == pytest.approx(0.2)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert key not in os.environ
    finally:
        n.close()


def test_from_environment_takes_a_path_as_it_is(monkeypatch, tmp_path):
    path = str(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_environment()
    try:
        assert n.address == path
        assert n.enabled
        assert n.watchdog_interval == 0
        assert "NOTIFY_SOCKET" not in os.environ
    finally:
        n.close()


@pytest.mark.parametrize("wpid, interval", [("ours", 0.2), ("1", 0.0), ("", 0.2)])
def test_watchdog_pid_must_be_ours(monkeypatch, wpid, interval):
    """WATCHDOG_PID names this process (or is empty): pings at half of WATCHDOG_USEC;
    names another process: no pings. Either way the variables are unset."""
    monkeypatch.setenv("NOTIFY_SOCKET", "@chatd-test-wd")
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if wpid == "ours" else wpid)
    n = Notifier.from_environment()
    try:
        assert n.watchdog_interval == pytest.approx(interval)
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            assert key not in os.environ
    finally:
        n.close()


def test_without_notify_socket_nothing_is_enabled(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "400000")
    n = Notifier.from_environment()
    assert not n.enabled and n.sock is None
    assert n.watchdog_interval == 0
    n.ready("x")      # a no-op, never an error
    n.watchdog()
    n.close()
    assert "WATCHDOG_USEC" not in os.environ


# ------------------------------------------------------------------ datagrams on a real socket

@pytest.fixture(params=["abstract", "path"])
def receiver(request, tmp_path):
    """(socket, NOTIFY_SOCKET value): a bound datagram socket with SO_PASSCRED."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    if request.param == "abstract":
        name = f"chatd-test-{uuid.uuid4()}"
        sock.bind(b"\0" + name.encode())
        value = "@" + name
    else:
        value = str(tmp_path / "notify")
        sock.bind(value)
    try:
        yield sock, value
    finally:
        sock.close()


def receive(sock: socket.socket) -> tuple[bytes, int]:
    """One datagram (within 5 s) and the sender's pid; then check that nothing else is queued."""
    sock.settimeout(5)
    data, ancdata, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(CREDS))
    pids = [struct.unpack("iII", d[:CREDS])[0] for level, kind, d in ancdata
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS]
    assert len(pids) == 1, ancdata
    sock.setblocking(False)
    with pytest.raises(BlockingIOError):
        extra = sock.recv(4096)
        print("unexpected extra datagram:", extra)
    return data, pids[0]


def test_one_datagram_per_call_with_the_exact_lines(receiver, monkeypatch):
    sock, value = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", value)
    n = Notifier.from_environment()
    try:
        cases = [
            (lambda: n.send("A=1", "B=two words"), b"A=1\nB=two words\n"),
            (lambda: n.ready("echo on 127.0.0.1:7777, 0 clients"),
             b"READY=1\nSTATUS=echo on 127.0.0.1:7777, 0 clients\n"),
            (lambda: n.status("chat on x, 2 clients"), b"STATUS=chat on x, 2 clients\n"),
            (lambda: n.stopping("stop, 0 clients"), b"STOPPING=1\nSTATUS=stop, 0 clients\n"),
            (lambda: n.watchdog(), b"WATCHDOG=1\n"),
            (lambda: n.failed(98, "address already in use"),
             b"ERRNO=98\nSTATUS=address already in use\n"),
            # a config file's errors, one a line: still one STATUS= field
            (lambda: n.failed(22, "f:1: bad\nf:3: worse"), b"ERRNO=22\nSTATUS=f:1: bad; f:3: worse\n"),
        ]
        for call, wanted in cases:
            call()
            data, pid = receive(sock)
            assert data == wanted
            assert pid == os.getpid()
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        n.reloading()
        data, pid = receive(sock)
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = data.decode().split("\n")
        assert lines[0] == "RELOADING=1" and lines[2:] == [""], data
        key, _, usec = lines[1].partition("=")
        assert key == "MONOTONIC_USEC" and usec.isdigit(), data
        assert before <= int(usec) <= after
    finally:
        n.close()


def test_a_missing_socket_is_not_an_error(monkeypatch, tmp_path):
    for value in (str(tmp_path / "nothing-here"), f"@chatd-test-{uuid.uuid4()}"):
        monkeypatch.setenv("NOTIFY_SOCKET", value)
        n = Notifier.from_environment()
        try:
            assert n.enabled
            n.ready("x")
            n.reloading()
            n.watchdog()
            n.stopping("y")
        finally:
            n.close()


def test_a_socket_that_went_away_is_not_an_error(monkeypatch, tmp_path):
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    n = Notifier.from_environment()
    try:
        n.ready("first")
        sock.settimeout(5)
        assert sock.recv(4096) == b"READY=1\nSTATUS=first\n"
        sock.close()
        n.watchdog()                 # bound path, nobody behind it: ECONNREFUSED
        os.unlink(path)
        n.watchdog()                 # no such file: ENOENT
        n.stopping("gone")
    finally:
        n.close()
        sock.close()


class Stuck(Exception):
    """Not an OSError, so Notifier.send cannot swallow it."""


def test_a_receiver_that_stops_reading_does_not_block_the_sender(monkeypatch):
    """1. a notify socket that is bound but never read (a stalled manager), 2. 40 pings.
    Result: every send returns at once; chatd sends from its event loop, so a send that
    blocks on the full receive queue (net.unix.max_dgram_qlen) would stop it serving anyone."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"chatd-test-{uuid.uuid4()}"
    sock.bind(b"\0" + name.encode())
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    n = Notifier.from_environment()

    def alarm(signum, frame):
        raise Stuck

    old = signal.signal(signal.SIGALRM, alarm)
    sent = 0
    try:
        signal.setitimer(signal.ITIMER_REAL, 2.0)
        try:
            for sent in range(1, 41):
                n.watchdog()
        except Stuck:
            pytest.fail(f"Notifier.send blocked on ping {sent}: the receiver's queue is full")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, old)
        n.close()
        sock.close()


# ------------------------------------------------------------------ listen_fds

def test_listen_fds_for_another_process_are_left_alone(monkeypatch):
    monkeypatch.setenv("LISTEN_PID", "1")
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_FDNAMES", "tcp")
    assert listen_fds() == []
    assert os.environ["LISTEN_PID"] == "1"
    assert os.environ["LISTEN_FDS"] == "1"
    assert os.environ["LISTEN_FDNAMES"] == "tcp"


def test_listen_fds_without_listen_pid_is_empty(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert os.environ["LISTEN_FDS"] == "1"


CHILD = r"""
import json, os, socket, sys
from chatd.errors import StartError
from chatd.notify import listen_fds
os.environ["LISTEN_PID"] = str(os.getpid())
try:
    found = listen_fds()
except StartError as e:
    print(json.dumps({"error": str(e)}))
    sys.exit(0)
print(json.dumps({
    "found": [{"name": a.name, "fd": a.sock.fileno(), "family": int(a.sock.family),
               "type": int(a.sock.type), "addr": list(a.sock.getsockname()[:2]),
               "blocking": a.sock.getblocking(), "inheritable": a.sock.get_inheritable(),
               "listening": a.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)}
              for a in found],
    "env": {k: os.environ.get(k) for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")},
}))
"""


def activate_in_child(socks: list[socket.socket], names: str | None, count: str | None = None) -> dict:
    """Run listen_fds() in a child Python whose fds 3.. are `socks`; its result as a dict."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_KEYS}
    env["LISTEN_FDS"] = count if count is not None else str(len(socks))
    if names is not None:
        env["LISTEN_FDNAMES"] = names
    proc = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, timeout=30,
                          stdin=subprocess.DEVNULL, pass_fds=tuple(range(3, 3 + len(socks))),
                          preexec_fn=dup_onto_3(*(s.fileno() for s in socks)))
    assert proc.returncode == 0, proc.stderr.decode()
    return json.loads(proc.stdout)


def tcp_listener() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


def test_listen_fds_returns_the_named_sockets_and_unsets_the_variables():
    a, b = tcp_listener(), tcp_listener()
    with a, b:
        result = activate_in_child([a, b], "a:b")
        assert "error" not in result, result
        found = result["found"]
        assert [f["name"] for f in found] == ["a", "b"]
        assert [f["fd"] for f in found] == [3, 4]
        assert [f["addr"] for f in found] == [list(a.getsockname()), list(b.getsockname())]
        for f in found:
            assert f["family"] == socket.AF_INET and f["type"] == socket.SOCK_STREAM
            assert f["listening"]
            assert not f["blocking"] and not f["inheritable"]
        assert result["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_fds_without_names():
    a = tcp_listener()
    with a:
        result = activate_in_child([a], None)
        assert [f["fd"] for f in result["found"]] == [3]
        assert result["env"] == {"LISTEN_PID": None, "LISTEN_FDS": None, "LISTEN_FDNAMES": None}


def test_listen_fds_refuses_a_datagram_socket():
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with udp:
        result = activate_in_child([udp], "dgram")
    assert "datagram socket" in result["error"]
    assert "fd 3 (dgram)" in result["error"]


def test_listen_fds_refuses_a_unix_stream_socket(tmp_path):
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "sock"))
    unix.listen(8)
    with unix:
        result = activate_in_child([unix], "local")
    assert "unix socket" in result["error"]
    assert "fd 3 (local)" in result["error"]


def test_listen_fds_refuses_a_tcp_socket_that_does_not_listen():
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    with tcp:
        result = activate_in_child([tcp], "tcp")
    assert "not listening" in result["error"]
    assert "fd 3 (tcp)" in result["error"]


def test_listen_fds_names_the_bad_one_among_several():
    good = tcp_listener()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with good, udp:
        result = activate_in_child([good, udp], "good:bad")
    assert "fd 4 (bad)" in result["error"] and "datagram socket" in result["error"]


def test_listen_fds_with_a_count_that_is_not_a_number():
    a = tcp_listener()
    with a:
        result = activate_in_child([a], None, count="x")
    assert "LISTEN_FDS" in result["error"]


def test_start_error_is_what_is_raised(monkeypatch):
    """In-process, for the class: LISTEN_FDS garbage with our own LISTEN_PID touches no descriptor."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "two")
    with pytest.raises(StartError, match="LISTEN_FDS"):
        listen_fds()
