"""`[server] workers`: worker processes on one inherited listening socket, each a node of the
bus, supervised by the daemon (README "More than one process"); real chatd, real redis."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time

import pytest

from bus_support import read_until
from support import LineClient, alive, wait_for

pytestmark = pytest.mark.timeout(120)


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def serving_pids(node) -> set[int]:
    """The pids that logged an accepted connection."""
    return {int(p) for p in re.findall(r"chatd\[(\d+)\] INFO: connect ", node.log_text())}


@pytest.fixture
def workers(redis_server, make_node):
    server = redis_server()
    node = make_node(server.url, 2, start=False)
    node.write_config(host="127.0.0.2", mode="chat", workers=2)
    node.start()
    return node


def test_two_workers_take_connections_and_share_one_room(workers):
    supervisor = workers.pid()
    pids = children(supervisor)
    assert len(pids) == 2
    # The kernel wakes every worker for a newcomer and the first to accept takes it: on an idle
    # machine that is often the same one. Each worker in turn is stopped while 15 arrive, so
    # the other must take them, and the room spans both.
    clients = []
    for stopped in pids:
        os.kill(stopped, signal.SIGSTOP)
        try:
            batch = [LineClient(workers.port, host="127.0.0.2") for _ in range(15)]
            for c in batch:
                read_until(c, b"*** #lobby: ")
        finally:
            os.kill(stopped, signal.SIGCONT)
        clients += batch
    wait_for(lambda: serving_pids(workers) == set(pids), what="both workers to accept clients")
    time.sleep(0.5)   # every join seen
    for c in clients:
        c.buf = b""
        c.sock.settimeout(0.2)
        try:
            while c.sock.recv(65536):
                pass
        except socket.timeout:
            pass
    clients[0].send(b"/nick alice\nhello everyone\n")
    for c in clients[1:]:
        assert read_until(c, b"hello everyone").splitlines()[-1] == b"<alice> hello everyone"
    status = workers.cmd("status", check=0).stdout.decode()
    assert "clients: 30" in status, status
    workers.cmd("stop", check=0)
    assert not alive(supervisor)
    assert not any(alive(p) for p in pids)


def test_a_killed_worker_comes_back_and_no_connect_is_refused_meanwhile(workers):
    supervisor = workers.pid()
    victim, other = children(supervisor)
    refused: list[str] = []
    connected = 0
    done = threading.Event()

    def knock() -> None:
        nonlocal connected
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline and connected < 400:
            try:
                with LineClient(workers.port, host="127.0.0.2", timeout=5) as c:
                    assert c.recv_line().startswith(b"*** Welcome to chatd, guest")
                connected += 1
            except (OSError, AssertionError) as e:
                refused.append(repr(e))
            time.sleep(0.005)
        done.set()

    knocker = threading.Thread(target=knock)
    knocker.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    knocker.join(timeout=30)
    assert done.is_set()
    assert refused == [] and connected > 50, (connected, refused[:3])
    wait_for(lambda: len(children(supervisor)) == 2 and victim not in children(supervisor),
             what="a new worker in the dead one's place")
    (new,) = set(children(supervisor)) - {other}
    assert re.search(rf"worker \d \(pid {victim}\) exited \(signal SIGKILL\); starting another",
                     workers.log_text())
    wait_for(lambda: f"ready (pid {new})" in workers.log_text(), what="the new worker to be ready")
    assert "took over node n2-" in workers.log_text()
    assert other in children(supervisor)


def test_workers_without_a_bus_are_refused_with_file_and_line(make_chatd):
    node = make_chatd()
    node.write_config(mode="chat", workers=2)
    proc = node.cmd("check-config")
    assert proc.returncode == 6
    line = next(n for n, text in enumerate(node.config.read_text().splitlines(), 1)
                if text.startswith("workers"))
    assert f"{node.config}:{line}: [server] workers = 2 needs [cluster] bus".encode() in proc.stderr


def test_a_restart_that_moves_the_workers_socket_is_rejected_by_name(workers):
    workers.write_config(host="127.0.0.2", mode="chat", workers=2, port=workers.port + 1)
    proc = workers.cmd("restart")
    assert proc.returncode == 6, proc
    assert b"server.port changed" in proc.stdout + proc.stderr
    assert b"with workers" in proc.stdout + proc.stderr


def test_a_restart_reaches_every_worker(workers):
    supervisor = workers.pid()
    pids = children(supervisor)
    text = workers.config.read_text() + '[chat]\nmotd = "fresh news"\n'
    workers.config.write_text(text)
    proc = workers.cmd("restart", check=0)
    assert b"chat.motd '' -> 'fresh news'" in proc.stdout
    for pid in pids:
        wait_for(lambda: f"chatd[{pid}] INFO: restart applied: changed chat.motd" in workers.log_text(),
                 what=f"worker {pid} to apply the restart")
    for _ in range(6):
        with LineClient(workers.port, host="127.0.0.2") as c:
            c.recv_line()
            assert c.recv_line() == b"*** fresh news\r\n"


def test_workers_hold_no_daemon_file_and_die_with_their_supervisor(workers):
    supervisor = workers.pid()
    pids = children(supervisor)
    for pid in pids:
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert str(workers.pidfile) not in held, held
        assert not any(path.endswith(".state") for path in held), held
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in pids), timeout=15,
             what="the workers to end with their supervisor")
    status = workers.cmd("status")   # LSB: dead, its pid file left behind; no lock held by any
    assert status.returncode == 1 and b"crashed or was killed" in status.stdout, status
    assert workers.cmd("start").returncode == 0   # the port and the node ids are free again


@pytest.mark.parametrize("args", [["who"], ["kick", "alice"], ["say", "hi"]])
def test_moderation_commands_say_workers_are_not_supported(workers, args):
    """README "Moderation": with workers > 1 the supervisor's control socket serves only
    `chatd upgrade`; the moderation commands say why, exit 1, and the workers keep serving.
    Asked on the socket itself, the supervisor says the same."""
    proc = workers.cmd(*args, check=1)
    why = f"chatd {args[0]} is not supported with workers > 1 (the clients are spread over 2 processes)"
    assert proc.stderr == f"chatd: {why}\n".encode()
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(10)
        sock.connect(str(workers.pidfile.with_suffix(".sock")))
        sock.sendall(json.dumps({"cmd": args[0], "target": "alice", "text": "hi"}).encode() + b"\n")
        answer = json.loads(sock.makefile("rb").readline())
    assert answer == {"ok": False, "error": why, "status": 1}
    with LineClient(workers.port, host="127.0.0.2") as c:
        assert c.recv_line().startswith(b"*** Welcome to chatd, guest")
