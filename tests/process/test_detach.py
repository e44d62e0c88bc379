"""Each classic daemon step, proven from outside in /proc (daemon(7), APUE 13.3).

The test makes itself a child subreaper, so the detached daemon's parent is this
test (not init) and the test reaps it; `chatd start` runs under a pty, so there
is a controlling terminal to lose.
"""

from __future__ import annotations

import ctypes
import os
import pty
import signal
import socket
import subprocess
import time

import pytest

from support import LineClient, alive, chatd_command, proc_stat, proc_status

PR_SET_CHILD_SUBREAPER = 36
CAUGHT = {signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGTERM}
IGNORED = {signal.SIGPIPE, signal.SIGUSR2, signal.SIGALRM, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def _set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def _signals(mask_hex: str) -> set[int]:
    mask = int(mask_hex, 16)
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


@pytest.fixture
def daemon_under_pty(chatd):
    """`chatd start` run by a session leader on a pty, with a blocked signal mask, an ignored
    SIGHUP and SIGCHLD (as nohup leaves them) and an extra inherited descriptor at 1000."""
    _set_subreaper(True)
    started: list[int] = []
    try:
        pid, master = pty.fork()
        if pid == 0:   # the child: a session leader with the pty as controlling terminal
            try:
                fd = os.open(str(chatd.dir / "inherited"), os.O_WRONLY | os.O_CREAT, 0o600)
                os.dup2(fd, 1000)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP})
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.signal(signal.SIGCHLD, signal.SIG_IGN)
                os.umask(0o077)
                os.chdir(str(chatd.dir))
                argv = chatd_command() + ["start", "-c", "chatd.conf"]
                os.execv(argv[0], argv)
            finally:
                os._exit(127)
        output = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        _, status = os.waitpid(pid, 0)
        os.close(master)
        assert os.waitstatus_to_exitcode(status) == 0, output
        daemon = chatd.pid()
        started.append(daemon)
        yield daemon, pid, output
    finally:
        for p in started:
            chatd.cmd("stop")
            try:
                os.waitpid(p, 0)      # we are its subreaper: reap it
            except ChildProcessError:
                pass
        _set_subreaper(False)


def test_double_fork_and_setsid(daemon_under_pty):
    """fork, setsid, fork again: a new session, not its leader, no controlling terminal."""
    daemon, starter, _ = daemon_under_pty
    st = proc_stat(daemon)
    assert st["ppid"] == os.getpid()            # orphaned, re-parented to us (the subreaper)
    assert st["session"] != daemon               # not a session leader: can never get a tty
    assert st["pgrp"] != daemon
    assert st["session"] != os.getsid(0) and st["session"] != starter
    assert st["tty_nr"] == 0                     # no controlling terminal
    out = subprocess.run(["ps", "-o", "tty=,stat=", "-p", str(daemon)], capture_output=True, text=True)
    tty, stat = out.stdout.split()
    assert tty == "?" and "s" not in stat


def test_umask_and_working_directory(daemon_under_pty):
    daemon, _, _ = daemon_under_pty
    assert proc_status(daemon)["Umask"] == "0022"
    assert os.readlink(f"/proc/{daemon}/cwd") == "/"


def test_relative_paths_were_resolved_before_chdir(daemon_under_pty, chatd):
    """The invoker gave -c chatd.conf relative to its directory; the daemon, now in /, still uses it."""
    daemon, _, _ = daemon_under_pty
    cmdline = open(f"/proc/{daemon}/cmdline", "rb").read().split(b"\0")
    assert b"chatd.conf" in cmdline
    with LineClient(chatd.port) as c:
        c.send(b"resolved\n")
        assert c.recv_line() == b"resolved\n"
    assert chatd.logfile.exists()


def test_stdio_is_dev_null_and_inherited_fds_are_closed(daemon_under_pty, chatd):
    daemon, _, _ = daemon_under_pty
    fds = {int(n): os.readlink(f"/proc/{daemon}/fd/{n}") for n in os.listdir(f"/proc/{daemon}/fd")}
    assert fds[0] == fds[1] == fds[2] == "/dev/null"
    assert 1000 not in fds
    assert str(chatd.dir / "inherited") not in fds.values()
    assert not any("/dev/pts" in target or "ptmx" in target for target in fds.values())
    # what is left is chatd's own: the pid file, the state file, the log, sockets, the loop
    assert str(chatd.pidfile) in fds.values() and str(chatd.logfile) in fds.values()


def test_signal_mask_and_dispositions_are_reset(daemon_under_pty):
    daemon, _, _ = daemon_under_pty
    status = proc_status(daemon)
    assert int(status["SigBlk"], 16) == 0
    caught = _signals(status["SigCgt"])
    ignored = _signals(status["SigIgn"])
    assert CAUGHT <= caught
    assert IGNORED <= ignored
    assert signal.SIGCHLD not in ignored          # inherited SIG_IGN reset to the default
    assert signal.SIGHUP not in ignored           # nohup's SIG_IGN replaced by the restart handler


def test_pid_file_holds_the_real_pid_and_control_works(daemon_under_pty, chatd):
    daemon, _, output = daemon_under_pty
    assert chatd.pidfile.read_text() == f"{daemon}\n"
    assert f"chatd started (pid {daemon})".encode() in output
    assert chatd.cmd("status").returncode == 0
    assert chatd.cmd("start").stdout.startswith(b"chatd is already running")
    chatd.cmd("stop", check=0)
    assert not alive(daemon)
    assert not chatd.pidfile.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
@pytest.mark.parametrize("who", [{"user": "nobody"}, {"user": "#65534", "group": "#65534"}])
def test_privileges_are_dropped_after_bind_and_pid_file(make_chatd, who):
    """As root with a user (by name, or by #id) on a port below 1024: it binds, then becomes
    that user for good."""
    chatd = make_chatd(public=True)
    port = free_privileged_port()
    chatd.write_config(port=port, daemon=who)
    daemon = chatd.start()
    status = proc_status(daemon)
    assert status["Uid"].split() == ["65534"] * 4
    assert status["Gid"].split() == ["65534"] * 4
    assert status["Groups"].split() in ([], ["65534"])
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert "uvloop" in chatd.cmd("status").stdout.decode()   # imported before the drop
    with LineClient(port) as c:
        c.send(b"low port\n")
        assert c.recv_line() == b"low port\n"
    # the state file stays current although nobody may not create files in the pid directory
    chatd.write_config(port=port, daemon=who, extra="[limits]\nmax_line = 64\n")
    chatd.cmd("restart", check=0)
    chatd.cmd("stop", check=0)
    assert not alive(daemon)
    assert chatd.cmd("status").returncode == 3    # an empty (truncated) pid file: not running


def free_privileged_port() -> int:
    """A port below 1024 that nothing listens on now (random, so parallel runs rarely meet)."""
    import random

    for port in random.sample(range(600, 1024), 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    pytest.skip("no free port below 1024")


def _limits(pid: int) -> tuple[int, int]:
    for line in open(f"/proc/{pid}/limits"):
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files limit")


def test_fd_limit_is_raised_and_max_clients_fitted(chatd):
    """1. start with a soft RLIMIT_NOFILE of 256: the daemon raises it to the hard limit.
    2. start with a hard limit of 300 and max_clients 10000: max_clients is lowered, with a warning."""
    import resource

    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    chatd.cmd("start", check=0, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    assert _limits(chatd.pid()) == (hard, hard)
    chatd.cmd("stop", check=0)
    chatd.cmd("start", check=0, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
    assert _limits(chatd.pid()) == (300, 300)
    assert "max_clients 10000 does not fit RLIMIT_NOFILE 300; using 172" in chatd.log_text()
