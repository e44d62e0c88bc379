"""Live upgrade with `[server] workers` > 1 (README "Live upgrade", workers_upgrade.py): each
worker hands its clients to a worker running the new code, then the supervisor re-executes
itself; real chatd between two installed versions (tests/installs.py), real redis.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time

import pytest

from bus_support import read_until
from installs import HANGS, IMPORT_FAILS, SLOW_TAKEOVER, Installs, stopped_mid_upgrade, upgrading
from support import LineClient, alive, flock_held, wait_for

pytestmark = pytest.mark.timeout(180)
A, B = "1.0.0+a", "1.0.0+b"


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return sorted(int(p) for p in f.read().split())


@pytest.fixture
def installs(tmp_path) -> Installs:
    made = Installs(tmp_path / "installs")
    made.make("a", A)
    made.make("b", B)
    made.make("broken", "1.0.0+broken", IMPORT_FAILS)
    made.use("a")
    return made


@pytest.fixture
def workers(redis_server, make_node, installs):
    """Two workers in chat mode, started through `current` (version A), their node ids the
    default ones (HOST-PORT-SLOT), which no setting names."""
    server = redis_server()
    node = make_node(server.url, 2, start=False, node_id=None)
    node.write_config(host="127.0.0.2", mode="chat", workers=2)
    node.command = installs.command
    try:
        node.start()
    finally:
        node.command = None
    return node


def spread(node, per_worker: int) -> list[LineClient]:
    """Clients on every worker: each worker in turn is stopped while some arrive, so the
    others must take them."""
    clients = []
    pids = children(node.pid())
    for stopped in pids:
        for other in pids:
            os.kill(other, signal.SIGSTOP if other == stopped else signal.SIGCONT)
        try:
            batch = [LineClient(node.port, host=node.host) for _ in range(per_worker)]
            for c in batch:
                read_until(c, b"*** #lobby: ")
        finally:
            for other in pids:
                os.kill(other, signal.SIGCONT)
        clients += batch
    return clients


def talk(clients: list[LineClient], speaker: int, text: bytes, nick: bytes) -> None:
    """`speaker` completes or says `text`; every other client sees it from `nick`."""
    clients[speaker].send(text + b"\n")
    for i, c in enumerate(clients):
        if i != speaker:
            got = read_until(c, text)
            assert got.splitlines()[-1] == b"<" + nick + b"> " + text, got


def upgraded_pids(node, old: int) -> set[int]:
    return {int(p) for p in re.findall(rf"chatd\[(\d+)\] INFO: upgraded from chatd [^ ]+ \(pid {old}\)",
                                       node.log_text())}


def test_every_worker_and_the_supervisor_run_the_new_code_and_no_client_notices(workers, installs):
    supervisor = workers.pid()
    before = children(supervisor)
    clients = spread(workers, 3)
    for i, c in enumerate(clients):
        c.send(f"/nick u{i}\n".encode())
        read_until(c, f"is now known as u{i}".encode())
    clients[1].send(b"half a li")   # a partial line, completed after the upgrade

    installs.use("b")
    proc = workers.cmd("upgrade", check=0, timeout=90)
    out = proc.stdout.decode()
    assert re.match(rf"chatd upgraded from {re.escape(A)} \(pid {supervisor}\) to {re.escape(B)} "
                    rf"\(pid {supervisor}\) in [0-9.]+ s; 6 clients carried over\n$", out), out

    after = children(supervisor)
    assert len(after) == 2 and not set(after) & set(before), (before, after)
    for old in before:   # each new worker took over from one old one, which is gone
        assert not alive(old)
        assert len(upgraded_pids(workers, old) & set(after)) == 1, workers.log_text()[-3000:]
    state = json.loads(workers.cmd("status", "--json", check=0).stdout)
    assert state["pid"] == supervisor and state["version"] == B, state
    assert state["last_upgrade"]["from"] == A and state["last_upgrade"]["to"] == B, state
    assert flock_held(workers.pidfile)

    clients[1].send(b"ne, whole\n")
    for i, c in enumerate(clients):
        if i != 1:
            assert read_until(c, b"half a line, whole").splitlines()[-1] == b"<u1> half a line, whole"
    for speaker in (0, 5):   # one on each worker, heard on both
        talk(clients, speaker, f"still here {speaker}".encode(), f"u{speaker}".encode())
    with LineClient(workers.port, host=workers.host) as fresh:
        read_until(fresh, b"*** #lobby: ")

    # And back: the new supervisor serves the control socket, the new workers take requests.
    installs.use("a")
    workers.cmd("upgrade", check=0, timeout=90)
    assert json.loads(workers.cmd("status", "--json", check=0).stdout)["version"] == A
    again = children(supervisor)
    assert len(again) == 2 and not set(again) & set(after)
    talk(clients, 3, b"after two upgrades", b"u3")

    for c in clients:
        c.close()
    workers.cmd("stop", check=0)
    assert not alive(supervisor)
    assert not any(alive(p) for p in again)


def test_a_broken_new_version_is_found_on_the_first_worker_and_nothing_changes(workers, installs):
    supervisor = workers.pid()
    before = children(supervisor)
    clients = spread(workers, 2)
    installs.use("broken")
    proc = workers.cmd("upgrade", "--timeout", "20", check=1, timeout=90)
    err = proc.stderr.decode()
    assert err.startswith(f"chatd: upgrade failed; chatd {A} (pid {supervisor}) still serving: worker 1 "), err
    assert "chatd_no_such_module" in err, err
    assert "already run" not in err, err
    assert children(supervisor) == before
    state = json.loads(workers.cmd("status", "--json", check=0).stdout)
    assert state["version"] == A and "chatd_no_such_module" in state["last_upgrade"]["failed"], state
    clients[0].send(b"/nick checked\n")
    read_until(clients[0], b"is now known as checked")
    talk(clients, 0, b"nothing happened", b"checked")


def test_upgraded_workers_still_die_with_their_supervisor(workers, installs):
    supervisor = workers.pid()
    installs.use("b")
    workers.cmd("upgrade", check=0, timeout=90)
    after = children(supervisor)
    assert len(after) == 2
    for pid in after:   # the supervisor is their parent now (a subreaper)
        with open(f"/proc/{pid}/stat") as f:
            assert int(f.read().rsplit(")", 1)[1].split()[1]) == supervisor
    os.kill(supervisor, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in after), timeout=15,
             what="the upgraded workers to end with their supervisor")


def test_a_foreground_daemon_with_workers_is_upgraded_under_the_same_pid(redis_server, make_node, installs):
    """A single daemon in the foreground is refused (its watcher knows only its pid); with
    workers the supervisor keeps its pid, so `chatd run --workers 2` is upgraded, and its
    parent still has it as its child."""
    node = make_node(redis_server().url, 2, start=False)
    node.write_config(host="127.0.0.2", mode="chat", workers=2)
    node.command = installs.command
    try:
        proc = node.run_foreground()
    finally:
        node.command = None
    with LineClient(node.port, host=node.host) as c:
        read_until(c, b"*** #lobby: ")
        installs.use("b")
        out = node.cmd("upgrade", check=0, timeout=90).stdout.decode()
        assert f"to {B} (pid {proc.pid})" in out, out
        assert proc.poll() is None
        c.send(b"/nick fg\n")
        read_until(c, b"is now known as fg")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0


def test_a_sighup_waits_for_the_upgrade_and_a_stop_signal_calls_it_off(workers, installs):
    """README "Live upgrade": with workers as without, a SIGHUP that comes during an upgrade
    is applied after it (by the new code), and a stop signal calls it off and stops."""
    installs.make("slow", "1.0.0+slow", SLOW_TAKEOVER)
    installs.make("hangs", "9.9.9", HANGS)
    supervisor = workers.pid()
    installs.use("slow")
    up = upgrading(workers)
    wait_for(lambda: "test: restored, taking" in workers.log_text(), what="worker 1's takeover")
    os.kill(supervisor, signal.SIGHUP)
    time.sleep(0.3)
    assert "restart applied" not in workers.log_text()   # it waits for the upgrade's end
    out, err = up.communicate(timeout=60)
    assert up.returncode == 0 and b"to 1.0.0+slow" in out, (out, err)
    wait_for(lambda: f"chatd[{supervisor}] INFO: restart applied" in workers.log_text(),
             what="the supervisor to apply the SIGHUP after the upgrade")
    log = workers.log_text()
    assert log.index("restart applied") > log.index(f"chatd[{supervisor}] INFO: upgraded from chatd")

    after = children(supervisor)
    stopped_mid_upgrade(workers, installs, supervisor, 2)   # one "upgrade: started" a worker
    assert not any(alive(p) for p in after)
