"""`chatd upgrade` with `[server] workers` > 1 attacked (README "Live upgrade",
workers_upgrade.py): signals and stops in the middle of it, the supervisor's exec failing,
control-socket clients that misbehave, and what the supervisor holds after many upgrades.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time

import pytest

from bus_support import read_until
import installs as kinds
from installs import SLOW_TAKEOVER, Installs, upgrading
from support import LineClient, alive, fd_count, figures, flock_held, processes_mentioning, wait_for
from test_upgrade_workers import A, B, children, installs, talk, workers  # noqa: F401 (fixtures)

# About 85 s in all: the slow step (the default step keeps tests/cluster/test_upgrade_workers.py).
pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]
SLOW = "1.0.0+slow"


def slow(installs: Installs) -> None:
    """An install B that takes SLOW_S more in each new worker, for a test to act meanwhile."""
    installs.make("slow", SLOW, SLOW_TAKEOVER)
    installs.use("slow")


def restored(node) -> int:
    return node.log_text().count("test: restored, taking")


def under_way(node, installs: Installs, restoring: int) -> subprocess.Popen:
    """`chatd upgrade` to the slow install, once the new worker of slot `restoring` restores."""
    slow(installs)
    proc = upgrading(node)
    wait_for(lambda: restored(node) == restoring, timeout=60, what=f"new worker {restoring} to be restoring")
    return proc


def one_process_per_slot(node, supervisor: int) -> None:
    wait_for(lambda: len(children(supervisor)) == 2 and len(processes_mentioning(str(node.dir))) == 3,
             timeout=15, what="two workers and the supervisor, nothing else")


def outcome(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=90)
    return proc.returncode, out.decode(), err.decode()


def upgraded_pids(node) -> list[str]:
    return re.findall(r"upgraded from chatd [^ ]+ \(pid \d+\)", node.log_text())


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


def test_chatd_stop_during_an_upgrade_waits_for_it_then_stops_everything(workers, installs):
    proc = under_way(workers, installs, 1)
    workers.cmd("stop", check=0, timeout=60)   # the guard lock: after the upgrade's answer
    code, out, err = outcome(proc)
    assert code == 0, (code, out, err)
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=10, what="no chatd left")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_a_stop_signal_during_a_workers_handover_calls_the_upgrade_off_and_leaves_no_process(
        workers, installs, sig):
    supervisor = workers.pid()
    proc = under_way(workers, installs, 1)
    began = time.monotonic()
    os.kill(supervisor, sig)
    wait_for(lambda: not alive(supervisor), timeout=30, what="the supervisor to stop")
    took = time.monotonic() - began
    code, out, err = outcome(proc)
    assert code == 1 and "called off" in err, (code, out, err, workers.log_text()[-3000:])
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=10, what="no chatd left")
    assert took < 4, (took, workers.log_text()[-3000:])
    assert "SIGKILL" not in workers.log_text()


def test_a_sighup_during_the_upgrade_is_applied_by_the_new_supervisor(workers, installs):
    supervisor = workers.pid()
    proc = under_way(workers, installs, 1)
    os.kill(supervisor, signal.SIGHUP)
    code, out, err = outcome(proc)
    assert code == 0, (code, out, err)
    wait_for(lambda: f"chatd[{supervisor}] INFO: restart applied" in workers.log_text(), timeout=10,
             what="the restart after it")
    log = workers.log_text()
    assert log.index(f"chatd[{supervisor}] INFO: upgraded from") < log.index("restart applied"), log[-3000:]
    assert state(workers)["version"] == SLOW


def test_the_supervisors_exec_failing_leaves_it_serving_and_says_which_workers_moved(workers, installs):
    supervisor = workers.pid()
    before_fds = fd_count(supervisor)
    proc = under_way(workers, installs, 2)
    installs.use("gone")   # the command's path now leads nowhere
    code, out, err = outcome(proc)
    assert code == 1, (code, out, err)
    assert "the supervisor cannot run" in err and "workers 1, 2 already run chatd " + SLOW in err, err
    got = state(workers)
    assert got["pid"] == supervisor and got["version"] == A, got
    assert flock_held(workers.pidfile)
    assert fd_count(supervisor) == before_fds, sorted(os.listdir(f"/proc/{supervisor}/fd"))
    after = children(supervisor)
    assert len(after) == 2
    with LineClient(workers.port, host=workers.host) as c:
        read_until(c, b"*** #lobby: ")
    installs.use("b")
    workers.cmd("upgrade", check=0, timeout=90)
    assert state(workers)["version"] == B
    workers.cmd("stop", check=0)
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=10, what="no chatd left")


def test_two_upgrades_at_once_one_is_refused(workers, installs):
    first = under_way(workers, installs, 1)
    with connect(workers) as second:   # `chatd upgrade` would wait for the guard lock
        second.sendall(b'{"cmd": "upgrade", "timeout": 30}\n')
        second.settimeout(5)
        assert json.loads(second.recv(4096))["error"] == "an upgrade is in progress"
    code, out, err = outcome(first)
    assert code == 0, (code, out, err)


def slot_pid(node, slot: int) -> int:
    return int(re.findall(rf"worker {slot} started \(pid (\d+)\)", node.log_text())[-1])


def test_an_upgrade_during_a_workers_restart_pause_changes_nothing(workers, installs):
    supervisor = workers.pid()
    victim = 0
    for _ in range(4):   # dies young four times: its next start waits 4 s
        victim = wait_for(lambda: (p := slot_pid(workers, 2)) != victim and p in children(supervisor) and p,
                          timeout=10, what="worker 2 to be started")
        os.kill(victim, signal.SIGKILL)
    wait_for(lambda: "starting another in 4 s" in workers.log_text(), timeout=10, what="the 4 s pause")
    installs.use("b")
    got = workers.cmd("upgrade", check=1, timeout=60)
    assert b"worker 2 is not serving" in got.stderr and b"already run" not in got.stderr, got.stderr
    assert b"nothing changed" in got.stderr, got.stderr
    assert len(upgraded_pids(workers)) == 0, workers.log_text()[-3000:]
    assert state(workers)["version"] == A


def test_the_foreground_supervisor_upgrades_and_stops_with_its_workers(redis_server, make_node, installs):
    server = redis_server()
    node = make_node(server.url, 2, start=False)
    node.write_config(host="127.0.0.2", mode="chat", workers=2)
    node.command = installs.command
    proc = node.run_foreground()
    node.command = None
    installs.use("b")
    got = node.cmd("upgrade", check=0, timeout=40)   # the guard lock free: not "busy" after 30 s
    assert f"(pid {proc.pid}) to {B} (pid {proc.pid})".encode() in got.stdout, got.stdout
    workers_now = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, node.foreground_stderr()[-2000:]
    wait_for(lambda: not any(alive(p) for p in workers_now), timeout=10, what="the workers to end")


def test_five_upgrades_leak_no_descriptor_and_keep_the_lock(workers, installs):
    supervisor = workers.pid()
    with LineClient(workers.port, host=workers.host) as c:
        read_until(c, b"*** #lobby: ")
        counts = [fd_count(supervisor)]
        for i in range(5):
            installs.use("b" if i % 2 == 0 else "a")
            workers.cmd("upgrade", check=0, timeout=90)
            counts.append(fd_count(supervisor))
            assert flock_held(workers.pidfile)
            got = state(workers)
            assert got["pid"] == supervisor and got["version"] == (B if i % 2 == 0 else A), got
            record = json.loads((workers.dir / "chatd.state").read_text())
            assert sorted(record["workers"]) == children(supervisor), record
            assert got["clients"] == 1, got
        figures("workers-upgrade-fds", supervisor_fds=counts)
        assert len(set(counts)) == 1, counts
        c.send(b"/nick still\n")
        read_until(c, b"is now known as still")


def test_sighups_all_through_the_upgrade_and_its_exec_are_taken_not_fatal(workers, installs):
    supervisor = workers.pid()
    installs.use("b")
    proc = upgrading(workers)
    sent = 0
    while proc.poll() is None and sent < 2000:   # SIGHUP's default action would end it
        os.kill(supervisor, signal.SIGHUP)
        sent += 1
        time.sleep(0.005)
    code, out, err = outcome(proc)
    assert code == 0, (code, out, err)
    assert alive(supervisor) and state(workers)["version"] == B
    with LineClient(workers.port, host=workers.host) as c:
        read_until(c, b"*** #lobby: ")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_killed_or_stopped_during_its_handover_leaves_its_slot_served(workers, installs, sig):
    supervisor = workers.pid()
    old = children(supervisor)
    proc = under_way(workers, installs, 1)
    os.kill(old[0], sig)
    code, out, err = outcome(proc)
    if sig == signal.SIGKILL:
        assert code == 1 and "died during its upgrade" in err, (code, out, err)
    one_process_per_slot(workers, supervisor)
    with LineClient(workers.port, host=workers.host) as c:
        read_until(c, b"*** #lobby: ")
    if sig == signal.SIGTERM:   # deferred by the worker: the upgrade went through
        record = json.loads((workers.dir / "chatd.state").read_text())
        assert sorted(record["workers"]) == children(supervisor), (record, code, out, err)


def test_a_worker_that_answers_too_late_does_not_upgrade_behind_the_users_back(workers, installs):
    supervisor = workers.pid()
    stopped = children(supervisor)[0]
    installs.use("b")
    os.kill(stopped, signal.SIGSTOP)
    try:
        got = workers.cmd("upgrade", "--timeout", "1", check=1, timeout=60)
    finally:
        os.kill(stopped, signal.SIGCONT)
    assert b"did not answer" in got.stderr, got.stderr
    time.sleep(3)
    assert alive(stopped) and stopped in children(supervisor), workers.log_text()[-3000:]
    assert "upgrade: started" not in workers.log_text()
    assert f"chatd[{stopped}] WARNING: upgrade: asked too late" in workers.log_text()
    workers.cmd("upgrade", check=0, timeout=60)   # and the next upgrade is answered as its own
    assert not alive(stopped) and state(workers)["version"] == B


@pytest.mark.parametrize("kind", ["EXITS_EARLY", "EXITS_SLOWLY", "HANGS", "NEW_FORMAT", "DIES_AFTER_COMMIT",
                                  "CHATTY", "SLOW_COMMIT"])
def test_each_kind_of_new_version_leaves_every_slot_served_and_nothing_else(workers, installs, kind):
    supervisor = workers.pid()
    installs.make("x", "1.0.0+x", getattr(kinds, kind))
    installs.use("x")
    with LineClient(workers.port, host=workers.host) as c:
        read_until(c, b"*** #lobby: ")
        got = workers.cmd("upgrade", "--timeout", "5", timeout=60)
        one_process_per_slot(workers, supervisor)
        if kind in ("CHATTY", "SLOW_COMMIT"):   # slow or noisy, not broken
            assert got.returncode == 0 and state(workers)["version"] == "1.0.0+x", got
        else:   # the daemon serves on: never "not running" (exit 7)
            assert got.returncode == 1 and b"not running" not in got.stderr, got
            assert state(workers)["version"] == A
        with LineClient(workers.port, host=workers.host) as fresh:
            read_until(fresh, b"*** #lobby: ")
    workers.cmd("stop", check=0)
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=10, what="no chatd left")


def test_chat_queued_for_a_reader_that_does_not_read_arrives_whole_and_in_order(workers, installs):
    workers.extra_config += "[limits]\nrate = 0\noutput_buffer = 4194304\n"
    workers.write_config(host="127.0.0.2", mode="chat", workers=2)
    workers.cmd("reload", check=0)
    reader = LineClient(workers.port, host=workers.host, rcvbuf=4096)
    read_until(reader, b"*** #lobby: ")
    with LineClient(workers.port, host=workers.host) as speaker:
        read_until(speaker, b"*** #lobby: ")
        speaker.send(b"/nick talker\n")
        read_until(speaker, b"is now known as talker")
        read_until(reader, b"is now known as talker")
        lines = [b"%05d %s" % (i, b"q" * 100) for i in range(8000)]   # ~850 KB: more than the kernel buffers hold
        for i in range(0, len(lines), 100):
            speaker.send(b"".join(line + b"\n" for line in lines[i:i + 100]))
        time.sleep(1)
        installs.use("b")
        workers.cmd("upgrade", check=0, timeout=90)
        got = read_until(reader, lines[-1], timeout=30)
        said = [line.split(b"> ", 1)[1] for line in got.splitlines() if line.startswith(b"<talker> ")]
        assert said == lines, (len(said), said[:2], said[-2:])
    reader.close()


@pytest.mark.parametrize("restoring", [1, 2])
def test_the_supervisor_killed_during_a_workers_handover_leaves_no_process(workers, installs, restoring):
    supervisor = workers.pid()
    proc = under_way(workers, installs, restoring)
    os.kill(supervisor, signal.SIGKILL)
    outcome(proc)
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=40, what="no chatd left")
    workers.start()   # and it starts again
    assert len(children(workers.pid())) == 2


def test_the_pid_file_names_the_supervisor_and_stays_locked_all_through(workers, installs):
    supervisor = workers.pid()
    slow(installs)
    proc = upgrading(workers)   # and looks from the start
    looks = 0
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        assert flock_held(workers.pidfile) and workers.pid() == supervisor
        looks += 1
        time.sleep(0.005)
    code, out, err = outcome(proc)
    assert code == 0 and looks > 50, (code, out, err, looks)
    assert flock_held(workers.pidfile) and workers.pid() == supervisor


def test_the_upgrade_goes_on_when_its_command_is_killed(workers, installs):
    supervisor = workers.pid()
    proc = under_way(workers, installs, 1)
    proc.kill()   # Ctrl-C, or a lost ssh session: its answer has nowhere to go
    outcome(proc)
    wait_for(lambda: f"chatd[{supervisor}] INFO: upgraded from chatd {A}: 2 workers" in workers.log_text(),
             timeout=30, what="the upgrade to end")
    assert alive(supervisor) and state(workers)["version"] == SLOW
    installs.use("b")
    workers.cmd("upgrade", check=0, timeout=90)


# Slow just after its commit, and says so: the old worker can be killed before it answers.
COMMITTED_SLOWLY = ("upgrade.py", "        self.on_commit()\n",
                    "        self.on_commit()\n        log.info('test: committed, taking 1 s more')\n"
                    "        time.sleep(1.0)\n")


def test_an_old_worker_killed_past_its_commit_leaves_one_process_per_slot(workers, installs):
    supervisor = workers.pid()
    old = children(supervisor)
    installs.make("late", "1.0.0+late", COMMITTED_SLOWLY)
    installs.use("late")
    proc = upgrading(workers)
    wait_for(lambda: "test: committed" in workers.log_text(), timeout=30, what="the first commit")
    os.kill(old[0], signal.SIGKILL)
    code, out, err = outcome(proc)
    assert code == 0, (code, out, err)   # its clients moved: the new process serves them
    time.sleep(1)
    serving = processes_mentioning(str(workers.dir))
    assert len(serving) == 3 and len(children(supervisor)) == 2, (serving, children(supervisor), code, err,
                                                                   workers.log_text()[-3000:])
    assert len(re.findall(r"joined as node \S+-1\n", workers.log_text())) == 2   # the first worker's, the new one's
    workers.cmd("stop", check=0)
    wait_for(lambda: not processes_mentioning(str(workers.dir)), timeout=10, what="no chatd left")
