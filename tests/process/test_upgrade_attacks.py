"""Live upgrade under attack (README "Live upgrade"): clients and commands at the worst moments
of `chatd upgrade`, each test a hole once found.

The new version in most of these is the checkout's chatd made slow to take over
(installs.SLOW_TAKEOVER): it logs once it has rebuilt everything from the record, then waits
before saying "prepared", so what a test does meanwhile happens while the old process is frozen
and the new one does not yet serve. The fixtures and helpers are test_upgrade's.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from chatd.connection import KERNEL_BUFFER
from installs import CHATTY, DIES_AFTER_COMMIT, EXITS_SLOWLY, SLOW_COMMIT, SLOW_TAKEOVER, Installs, slow_takeover, upgrading
from conftest import require_real
from support import LineClient, alive, figures, proc_status, rss_kib, wait_for
from test_install import SYSTEM_PYTHON
from test_upgrade import A, B, _drain, _pull, installs, make_daemon, start, status, upgrade   # noqa: F401 - fixtures

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

FROZEN = "test: restored"   # the slow version's log line: the old process is frozen from here


def upgrade_in_background(inst, installs: Installs, to: str, *args: str) -> subprocess.Popen:
    """`chatd upgrade ARGS` to `to`, returning once the new process has rebuilt everything
    (the old one frozen, the new one not yet serving)."""
    installs.use(to)
    up = upgrading(inst, *args)
    wait_for(lambda: FROZEN in inst.log_text() or up.poll() is not None, timeout=30,
             what="the new chatd to rebuild the old one's state")
    return up


def finished(up: subprocess.Popen) -> bytes:
    out, err = up.communicate(timeout=60)
    assert up.returncode == 0, (out, err)
    return out


def reset(client: LineClient) -> None:
    """Close with SO_LINGER 0: the peer gets an RST."""
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()


def room_of_four(inst) -> list[LineClient]:
    """m0 to m3 in #lobby, everything they were told so far read."""
    members = [LineClient(inst.port) for _ in range(4)]
    for i, member in enumerate(members):
        member.recv_line()
        member.send(b"/nick m%d\n" % i)
    _pull(members[0], b"guest4 is now known as m3")
    for member in members:
        _drain(member)
    return members


def act_while_frozen(members: list[LineClient]) -> None:
    """m0 says a line, m1 its last words and half-closes, m2 a line and resets."""
    members[0].send(b"said while frozen\n")
    members[1].send(b"my last words\n")
    members[1].shutdown_write()
    members[2].send(b"said, then gone\n")
    reset(members[2])


def heard_in_order(listener: LineClient) -> bytes:
    """What m3 heard of `act_while_frozen`, each line before its sayer's leaving."""
    for wanted in (b"<m0> said while frozen\r\n", b"<m1> my last words\r\n", b"*** m1 left #lobby",
                   b"<m2> said, then gone\r\n", b"*** m2 left #lobby"):
        _pull(listener, wanted)
    heard = listener.buf
    assert heard.index(b"<m1> my last words") < heard.index(b"*** m1 left"), heard
    assert heard.index(b"<m2> said, then gone") < heard.index(b"*** m2 left"), heard
    return heard


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_chat_clients_that_end_while_frozen_leave_and_the_room_is_served_on(make_daemon, installs, loop):
    """A chat client that said its last line and half-closed (EOF) while the old process was
    frozen, beside one that said a line and reset: the new process handled the EOF while later
    clients had no transport yet, its "left" went to them, and the new daemon died (every
    client lost, the port refused). And the reset client's line was lost (uvloop) or came
    after its "left" (asyncio): the new process saw the reset before it handled the line."""
    installs.make("slow", "2.0.0", SLOW_TAKEOVER)
    inst = make_daemon(loop=loop, mode="chat")
    start(inst, installs)
    members = room_of_four(inst)
    up = upgrade_in_background(inst, installs, "slow")
    act_while_frozen(members)
    newcomer = LineClient(inst.port)   # waits in the backlog
    finished(up)
    heard_in_order(members[3])
    assert b"Welcome" in newcomer.recv_line()
    members[1].recv_until_eof()   # closed once its input is handled
    members[3].send(b"and on\n")
    assert _pull(members[0], b"<m3> and on\r\n")
    assert "ERROR" not in inst.log_text(), inst.log_text()[-2000:]


@pytest.mark.parametrize("command", ["status", "stats", "stop"])
def test_a_command_right_after_the_upgrade_finds_the_new_process(make_daemon, installs, command):
    """`chatd upgrade` returned once the old process had sent its commit, and the old process
    then exited: a command run next (a script's `chatd upgrade && chatd stop`, or one that had
    waited on the guard lock) found a pid file naming the exited process and a lock held by
    another: `status` and `stats` exit 4 "cannot tell whether chatd runs", `stop` said "not
    running" and left the daemon serving."""
    installs.make("slow", "2.0.0", SLOW_COMMIT)
    inst = make_daemon()
    old = start(inst, installs)
    client = LineClient(inst.port)
    done = upgrade(inst, installs, "slow")
    new = int(done.stdout.split(b"(pid ")[2].split(b")")[0])
    if command == "status":
        report = status(inst)
        assert (report["running"], report["pid"], report["version"]) == (True, new, "2.0.0"), report
        assert report["last_upgrade"]["from_pid"] == old
    elif command == "stats":
        assert b"connections" in inst.cmd("stats", check=0).stdout
    else:
        assert inst.cmd("stop", check=0).stdout == f"chatd stopped (pid {new})\n".encode()
        assert not alive(new) and not alive(old)
        assert client.recv_until_eof() == b""


def test_a_new_version_that_closes_the_channel_then_exits_is_reported_by_its_exit(make_daemon, installs):
    """The old process waited 50 ms for the exit that follows a closed channel: a new process
    slower than that to exit (a loaded machine) was reported as "closed the upgrade channel",
    without its exit status."""
    installs.make("broken", "9.9.9", EXITS_SLOWLY)
    inst = make_daemon()
    old = start(inst, installs)
    failed = upgrade(inst, installs, "broken", check=1)
    assert b"exited with status 1 before taking over: chatd: this build refuses to start" in failed.stderr, failed.stderr
    assert inst.pid() == old and status(inst)["version"] == A


def _peak_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _swamped(port: int) -> tuple[LineClient, bytes]:
    """A client that reads nothing and sent numbered lines until the daemon stopped reading
    it (the daemon holds about its output budget for it); and what it sent."""
    client = LineClient(port, rcvbuf=4096)
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)   # what stalls, stalls here
    client.sock.setblocking(False)
    stream = b"".join(b"%07d %s\n" % (i, b"y" * 1015) for i in range(16384))   # 16 MiB
    sent, stalled = 0, 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and stalled < 10 and sent < len(stream):
        try:
            sent += client.sock.send(stream[sent:sent + 65536])
            stalled = 0
        except BlockingIOError:
            stalled += 1
            time.sleep(0.02)
    assert sent < len(stream), "the daemon read everything: it never stopped reading"
    return client, stream[:sent]


@pytest.mark.slow
def test_queued_output_costs_its_size_once_at_the_freeze_and_is_let_go_once_sent(make_daemon, installs):
    """Readers that read nothing, each with its output budget queued: the record carried
    their output as base64 inside one JSON text, which cost the old process about four times
    the output in memory at the freeze (and the freeze seconds); raw beside the record, once.
    And the new process kept the record, every byte of that output in it, for its life: once
    the readers had taken everything, it still held it all."""
    budget = 8 << 20
    inst = make_daemon(loop="asyncio", extra=f"[limits]\noutput_buffer = {budget}\n")
    old = start(inst, installs)
    idle = rss_kib(old)
    readers = [_swamped(inst.port) for _ in range(6)]
    queued = rss_kib(old) - idle
    assert queued > 6 * budget // 1024 // 2, (queued, idle)   # the daemon really holds it
    peak = [0]

    def watch() -> None:
        while alive(old):
            try:
                peak[0] = _peak_kib(old)
            except (OSError, StopIteration):
                return
            time.sleep(0.005)
    watcher = threading.Thread(target=watch)
    watcher.start()
    upgrade(inst, installs, "b")
    watcher.join(30)
    new = inst.pid()
    for reader, sent in readers:
        reader.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        reader.sock.setblocking(True)
        lines = sent[:sent.rindex(b"\n") + 1]
        assert reader.recv_exact(len(lines), timeout=30) == lines
    time.sleep(0.5)
    figures("upgrade_queued_output", queued_kib=queued, old_rss_kib=idle + queued,
            old_peak_kib=peak[0], new_rss_sent_kib=rss_kib(new))
    assert peak[0] - (idle + queued) < 2 * queued, (peak[0], idle, queued)   # base64: 4.6 times
    assert rss_kib(new) < idle + queued // 2, (rss_kib(new), idle, queued)


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_a_reader_the_old_process_stopped_reading_is_not_read_on_past_its_budget(make_daemon, installs, loop):
    """Echo stops reading a client whose output passed its budget. The new process read such
    clients anyway until its first pass (asyncio: all the kernel had, about 190 KB each;
    uvloop: about 285 KB), and held it, past the budget. Now at most one read (uvloop's, made
    before the protocol can refuse it); and once the client reads, every line comes back."""
    inst = make_daemon(loop=loop)
    start(inst, installs)
    swamped = [_swamped(inst.port) for _ in range(4)]
    before = json.loads(inst.cmd("stats", "--json", check=0).stdout)["received_bytes_total"]
    upgrade(inst, installs, "b")
    time.sleep(0.5)
    after = json.loads(inst.cmd("stats", "--json", check=0).stdout)["received_bytes_total"]
    read_on = _total(after) - _total(before)
    figures("upgrade_swamped_read_on", loop=loop, clients=len(swamped), bytes=read_on)
    assert read_on <= (0 if loop == "asyncio" else len(swamped) * 2 * KERNEL_BUFFER), read_on
    for client, sent in swamped:
        client.sock.setblocking(True)
        lines = sent[:sent.rindex(b"\n") + 1]   # a partial last line waits for its end
        assert client.recv_exact(len(lines), timeout=20) == lines


def _total(family: object) -> int:
    """A metric family of `stats --json` summed over its series."""
    if isinstance(family, (int, float)):
        return int(family)
    if isinstance(family, dict):
        return sum(_total(v) for v in family.values())
    return sum(_total(v) for v in family) if isinstance(family, list) else 0


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_daemon_that_dropped_privileges_is_upgraded_and_logs_on(make_chatd, tmp_path):
    """root starts chatd with `user = "nobody"`, its log file root's (0640, opened before the
    drop): the new code runs as nobody, could not open the log file again, and refused to
    take over ("cannot open log target ...: Permission denied"): such a daemon could never be
    upgraded. The log file's descriptor is handed over now, as the pid file's is."""
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        require_real(SYSTEM_PYTHON)
    public = Path(tempfile.mkdtemp(prefix="chatd-installs-"))
    try:
        public.chmod(0o755)
        made = Installs(public / "installs", python=SYSTEM_PYTHON)   # nobody can run it
        made.make("a", A), made.make("b", B)
        made.use("a")
        inst = make_chatd(public=True)
        inst.write_config(mode="chat", daemon={"user": "nobody"})
        old = start(inst, made)
        assert os.stat(inst.logfile).st_uid == 0
        alice, bob = LineClient(inst.port), LineClient(inst.port)
        _pull(alice, b"guest2 joined #lobby")
        done = upgrade(inst, made, "b")
        new = int(done.stdout.split(b"(pid ")[2].split(b")")[0])
        assert proc_status(new)["Uid"].split()[0] == "65534"
        bob.send(b"still here\n")
        assert _pull(alice, b"<guest2> still here\r\n")
        assert f"chatd[{new}] INFO: upgraded from chatd {A} (pid {old})" in inst.log_text()
        inst.cmd("stop", check=0)
    finally:
        shutil.rmtree(public, ignore_errors=True)


def test_more_than_a_thousand_clients_are_carried(make_daemon, installs):
    """With 1,100 clients the upgrade channel's descriptor is past 1024, which select(2)
    cannot take: the old process's upgrade died on a ValueError, `chatd upgrade` got no
    answer, and the new process was left behind. Now poll(2)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    inst = make_daemon(extra="[limits]\nmax_clients_per_ip = 0\n")
    start(inst, installs)
    clients = [socket.create_connection(("127.0.0.1", inst.port), timeout=10) for _ in range(1100)]
    try:
        wait_for(lambda: status(inst)["clients"] == 1100, what="1,100 clients")
        done = upgrade(inst, installs, "b")
        assert b"1100 clients carried over" in done.stdout
        clients[-1].sendall(b"last\n")
        assert clients[-1].recv(16) == b"last\n"
    finally:
        for client in clients:
            client.close()


@pytest.mark.slow   # --timeout 3 s, waited out
def test_a_new_version_stuck_while_the_old_one_is_frozen_is_given_up_and_nothing_is_lost(make_daemon, installs):
    """The new code stops after rebuilding everything (the old process frozen, holding what
    clients send meanwhile, an end of input and a reset among it): past --timeout it is
    killed, and the old one handles all of it, in order, and accepts the newcomer waiting."""
    installs.make("stuck", "2.0.0", slow_takeover(3600))
    inst = make_daemon(mode="chat")
    old = start(inst, installs)
    members = room_of_four(inst)
    up = upgrade_in_background(inst, installs, "stuck", "--timeout", "3")
    act_while_frozen(members)
    newcomer = LineClient(inst.port)
    out, err = up.communicate(timeout=60)
    assert up.returncode == 1 and b"did not take over within 3 s; killed it" in err, err
    _pull(members[3], b"*** guest5 joined")
    heard = heard_in_order(members[3])
    assert heard.index(b"*** m2 left") < heard.index(b"*** guest5 joined")
    assert b"Welcome" in newcomer.recv_line()
    assert inst.pid() == old


def test_a_new_version_that_dies_after_the_commit_is_not_reported_as_an_upgrade(make_daemon, installs):
    """Past the commit there is no way back, but `chatd upgrade` said "upgraded ... 1 clients
    carried over" (exit 0) for a new process that had died, and nothing was serving. Now it
    says so, exit 7 (not running)."""
    installs.make("dies", "2.0.0", DIES_AFTER_COMMIT)
    inst = make_daemon()
    old = start(inst, installs)
    client = LineClient(inst.port)
    failed = upgrade(inst, installs, "dies", check=7)
    assert failed.stdout == b""
    assert re.fullmatch(rb"chatd: the new chatd \(pid \d+\) exited with status 1 after taking over; "
                        rb"chatd is not running\n", failed.stderr), failed.stderr
    assert f"upgrade: the new chatd (pid ".encode() in inst.log_text().encode()
    wait_for(lambda: not alive(old), what="the old process to exit")
    assert client.recv_until_eof() == b""


def test_a_new_version_that_writes_a_lot_while_the_old_one_is_frozen_takes_over(make_daemon, installs):
    """Until the commit the new process's stdout and stderr are a pipe the old one reads, but
    the frozen old process did not read it: a new version writing more than the pipe holds
    (warnings, a log to stderr) blocked on it, and every client stayed frozen until --timeout
    failed the upgrade."""
    installs.make("chatty", "2.0.0", CHATTY)
    inst = make_daemon()
    start(inst, installs)
    client = LineClient(inst.port)
    began = time.monotonic()
    done = upgrade(inst, installs, "chatty", "--timeout", "5")
    assert b"to 2.0.0" in done.stdout and time.monotonic() - began < 4, done.stdout
    client.send(b"x\n")
    assert client.recv_line() == b"x\n"
