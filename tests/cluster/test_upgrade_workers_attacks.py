"""`chatd upgrade` with `[server] workers` > 1 attacked (README "Live upgrade",
workers_upgrade.py): signals and stops in the middle of it, the supervisor's exec failing,
control-socket clients that misbehave, and what the supervisor holds after many upgrades.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time

import pytest

from bus_support import read_until
from installs import SLOW_TAKEOVER, Installs
from support import LineClient, alive, fd_count, flock_held, wait_for
from test_upgrade_workers import A, B, children, installs, talk, workers  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(240)
SLOW = "1.0.0+slow"


def slow(installs: Installs) -> None:
    """An install B that takes SLOW_S more in each new worker, for a test to act meanwhile."""
    installs.make("slow", SLOW, SLOW_TAKEOVER)
    installs.use("slow")


def restored(node) -> int:
    return node.log_text().count("test: restored, taking")


def state(node) -> dict:
    return json.loads(node.cmd("status", "--json", check=0).stdout)


def connect(node) -> socket.socket:
    """A client on the control socket, waiting while its backlog is full."""
    deadline = time.monotonic() + 10
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(str(node.dir / "chatd.sock"))
            return s
        except (ConnectionRefusedError, BlockingIOError):
            s.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def test_idle_control_clients_past_fd_setsize_do_not_kill_the_supervisor(workers):
    supervisor = workers.pid()
    idle = []
    try:
        for _ in range(1100):   # select() takes descriptors below 1024 only
            idle.append(connect(workers))
        wait_for(lambda: fd_count(supervisor) > 1100, timeout=10, what="the supervisor to accept them")
    finally:
        for s in idle:
            s.close()
    workers.cmd("status", check=0)
    assert len(children(supervisor)) == 2


def test_control_clients_that_misbehave_stall_nothing(workers):
    """One sends nothing, one 1 MB without a newline, one garbage: each gets its answer or
    its timeout while the supervisor restarts a killed worker and stops on request."""
    supervisor = workers.pid()
    silent, flood, garbage = connect(workers), connect(workers), connect(workers)
    try:
        flood.setblocking(False)
        sent = 0
        try:
            while sent < 1 << 20:
                sent += flood.send(b"x" * 65536)
        except (BlockingIOError, BrokenPipeError):   # full, or answered and closed at 8 KiB
            pass
        garbage.sendall(b"\xff\xfe{]\n")
        garbage.settimeout(5)
        assert json.loads(garbage.recv(4096)) == {"ok": False, "error": "bad request", "status": 2}
        flood.settimeout(5)
        assert json.loads(flood.recv(4096).split(b"\n")[0])["error"] == "bad request"
        victim = children(supervisor)[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: len(children(supervisor)) == 2 and victim not in children(supervisor),
                 timeout=10, what="the killed worker to be started again")
        silent.settimeout(10)
        assert silent.recv(4096) == b""   # dropped after REQUEST_TIMEOUT_S, with no answer
        with LineClient(workers.port, host=workers.host) as c:
            read_until(c, b"*** #lobby: ")
        began = time.monotonic()
        workers.cmd("stop", check=0)
        assert time.monotonic() - began < 5 and not alive(supervisor)
    finally:
        for s in (silent, flood, garbage):
            s.close()
