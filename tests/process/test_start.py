"""Starting and stopping through the real command: readiness, failures, single instance, LSB codes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from support import (LineClient, alive, chatd_command, fault_env, free_port, kill_and_wait,
                     listening, processes_mentioning, wait_for)


def assert_nothing_left(inst) -> None:
    """No process of this instance, and no pid file with content."""
    assert processes_mentioning(str(inst.dir)) == []
    assert not inst.pidfile.exists() or inst.pidfile.read_text() == ""


def test_start_returns_only_once_connect_works(chatd):
    """1. start, 2. connect at once (no sleep), 3. stop; 20 times. Result: every connect succeeds."""
    for _ in range(20):
        chatd.cmd("start", check=0)
        with LineClient(chatd.port) as c:
            c.send(b"ping\n")
            assert c.recv_line() == b"ping\n"
        chatd.cmd("stop", check=0)
        assert not chatd.pidfile.exists()


def test_start_prints_what_it_started(chatd):
    out = chatd.cmd("start", check=0).stdout.decode()
    pid = chatd.pid()
    assert out.startswith(f"chatd started (pid {pid}): echo mode on 127.0.0.1:{chatd.port}")
    assert "event loop" in out and f"log: file {chatd.logfile}" in out
    again = chatd.cmd("start", check=0).stdout.decode()
    assert again.strip() == f"chatd is already running (pid {pid}): echo on 127.0.0.1:{chatd.port}"


def test_port_in_use_fails_with_the_reason_and_leaves_nothing(chatd):
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", chatd.port))
        blocker.listen(1)
        proc = chatd.cmd("start", check=1)
        assert b"address already in use" in proc.stderr
        assert proc.stderr.startswith(b"chatd: ")
        assert_nothing_left(chatd)


def test_bad_config_is_exit_6_with_file_and_line(chatd):
    chatd.write_config(extra="[limits]\nmax_line = 3\n")
    proc = chatd.cmd("start", check=6)
    line = chatd.config.read_text().splitlines().index("max_line = 3") + 1
    assert f"{chatd.config}:{line}:".encode() in proc.stderr
    assert b"max_line" in proc.stderr
    assert_nothing_left(chatd)


def test_missing_config_file_is_exit_6(chatd):
    proc = chatd.cmd("start", "-c", str(chatd.dir / "nope.conf"), config=False, check=6)
    assert b"nope.conf" in proc.stderr and b"No such file" in proc.stderr


def test_bad_option_values_are_usage_errors(chatd):
    for args, text in ((["--port", "junk"], b"--port"), (["--port", "70000"], b"--port"),
                       (["--mode", "shout"], b"--mode"), (["--frobnicate"], b"frobnicate"),
                       (["--loop", "tokio"], b"--loop"), (["--timeout", "soon"], b"--timeout")):
        proc = chatd.cmd("start", *args, check=2)
        assert text in proc.stderr
        assert b"Traceback" not in proc.stderr
    assert_nothing_left(chatd)


def test_unknown_user_fails_before_detaching(chatd):
    proc = chatd.cmd("start", "--user", "no-such-user-xyz", check=2)
    assert b"no such user" in proc.stderr
    assert_nothing_left(chatd)


def test_stderr_log_target_with_a_detached_start_is_a_usage_error(chatd):
    proc = chatd.cmd("start", "--log", "stderr", check=2)
    assert b"stderr" in proc.stderr
    assert_nothing_left(chatd)


def test_unusable_pid_directory_fails_before_detaching(chatd):
    proc = chatd.cmd("start", "--pidfile", str(chatd.dir / "missing" / "x.pid"), check=2)
    assert b"does not exist" in proc.stderr
    proc = chatd.cmd("start", "--pidfile", "/proc/chatd-test.pid", check=4)
    assert b"/proc" in proc.stderr
    assert_nothing_left(chatd)


def test_daemon_dying_without_a_word_is_reported_and_cleaned_up(chatd):
    """1. the daemon is SIGKILLed after writing its pid file, before ready.
    Result: start exits 1 saying so; no process and no pid file remain."""
    proc = chatd.cmd("start", env=fault_env("sigkill-before-ready"), check=1)
    assert b"exited during start-up without saying why" in proc.stderr
    assert_nothing_left(chatd)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGQUIT", "SIGUSR1"])
def test_stop_signal_before_ready_aborts_the_start(chatd, signame):
    """1. a slow start, 2. a stop signal once the pid file is written. Result: start exits 1
    saying so, nothing left."""
    starter = subprocess.Popen(chatd_command() + ["start", "-c", str(chatd.config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | fault_env("slow-start", CHATD_TEST_DELAY="1.5"))
    try:
        pid = wait_for(lambda: chatd.pidfile.exists() and chatd.pidfile.read_text().strip(),
                       what="the pid file")
        os.kill(int(pid), getattr(signal, signame))
        out, err = starter.communicate(timeout=20)
    finally:
        kill_and_wait(starter.pid)
    assert starter.returncode == 1, err
    assert f"start aborted by {signame}".encode() in err
    assert_nothing_left(chatd)


def test_sighup_before_ready_is_applied_after_ready(chatd):
    starter = subprocess.Popen(chatd_command() + ["start", "-c", str(chatd.config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | fault_env("slow-start", CHATD_TEST_DELAY="1.5"))
    try:
        pid = int(wait_for(lambda: chatd.pidfile.exists() and chatd.pidfile.read_text().strip(),
                           what="the pid file"))
        os.kill(pid, signal.SIGHUP)
        out, err = starter.communicate(timeout=20)
    finally:
        kill_and_wait(starter.pid)
    assert starter.returncode == 0, err
    assert alive(pid)
    status = wait_for(lambda: b"applied" in chatd.cmd("status").stdout and chatd.cmd("status"),
                      what="the restart to be recorded")
    assert b"last restart: " in status.stdout


def test_concurrent_starts_give_exactly_one_daemon(chatd):
    procs = [subprocess.Popen(chatd_command() + ["start", "-c", str(chatd.config)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(6)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, outs
    started = [o for o, _ in outs if o.startswith(b"chatd started")]
    already = [o for o, _ in outs if o.startswith(b"chatd is already running")]
    assert len(started) == 1 and len(already) == 5
    chatd.remember_pid()
    assert processes_mentioning(str(chatd.dir)) == [chatd.pid()]


def test_kill_9_then_status_1_then_start_works(chatd):
    pid = chatd.start()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the daemon to die")
    proc = chatd.cmd("status", check=1)
    assert f"still names {pid}".encode() in proc.stdout
    new = chatd.start()
    assert new != pid
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"


@pytest.mark.slow
def test_stop_and_start_in_a_loop_never_meets_address_in_use(chatd):
    for i in range(10):
        chatd.cmd("start", check=0)
        c = LineClient(chatd.port)
        c.send(b"%d\n" % i)
        assert c.recv_line() == b"%d\n" % i
        chatd.cmd("stop", check=0)
        c.close()


@pytest.mark.parametrize("content", [b"", b"0", b"-1", b"abc", b"99999999999", b"1\n", b"SELF"])
def test_garbage_pid_file_never_leads_to_a_signal(chatd, content):
    """A pid file whose lock is free names nothing we may signal, whatever it says."""
    victim = subprocess.Popen([sys.executable, "-c",
                               "import signal, sys, time\n"
                               "for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP, signal.SIGCONT):\n"
                               "    signal.signal(s, lambda n, f: print(n, flush=True))\n"
                               "print('ready', flush=True)\n"
                               "time.sleep(30)\n"], stdout=subprocess.PIPE)
    try:
        assert victim.stdout.readline() == b"ready\n"
        data = str(victim.pid).encode() if content == b"SELF" else content
        chatd.pidfile.write_bytes(data)
        assert chatd.cmd("stop").returncode == 0
        chatd.pidfile.write_bytes(data)
        expected_status = 1 if data.strip() else 3
        assert chatd.cmd("status").returncode == expected_status
        chatd.pidfile.write_bytes(data)
        restart = chatd.cmd("reload")
        assert restart.returncode == 7
        time.sleep(0.2)
        assert alive(victim.pid)
        victim.kill()
        assert victim.stdout.read() == b""   # it printed no signal number
    finally:
        kill_and_wait(victim.pid)


def test_locked_pid_file_naming_another_process_is_not_signalled(chatd):
    """1. a stranger holds the lock on the pid file, which names a third process.
    Result: stop says chatd is not running (exit 0: no chatd holds the file) and signals neither.
    (Before issue 12's review: exit 1, "not signalling anything".)"""
    third = subprocess.Popen([sys.executable, "-c",
                              "import signal, time\nsignal.signal(signal.SIGUSR1, lambda *a: print('hit', flush=True))\n"
                              "print('ready', flush=True)\ntime.sleep(30)\n"], stdout=subprocess.PIPE)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, sys.argv[2].encode())\n"
                               "print('locked', flush=True)\ntime.sleep(30)\n",
                               str(chatd.pidfile), str(third.pid)], stdout=subprocess.PIPE)
    try:
        assert third.stdout.readline() == b"ready\n"
        assert holder.stdout.readline() == b"locked\n"
        proc = chatd.cmd("stop", check=0)
        assert proc.stdout.startswith(b"chatd is not running") and b"is locked, but" in proc.stdout
        assert alive(third.pid) and alive(holder.pid)
        third.kill()
        assert third.stdout.read() == b""
    finally:
        kill_and_wait(third.pid)
        kill_and_wait(holder.pid)


@pytest.mark.slow
def test_stop_escalates_to_sigkill_and_says_so(chatd):
    """A daemon that ignores SIGUSR1 and SIGTERM: stop --timeout 0.5 ends with SIGKILL, exit 1."""
    chatd.cmd("start", env=fault_env("ignore-stop"), check=0)
    pid = chatd.pid()
    proc = chatd.cmd("stop", "--timeout", "0.5", check=1)
    err = proc.stderr.decode()
    assert proc.stdout == b""                                  # no result: it failed
    assert "sending SIGTERM" in err and "sending SIGKILL" in err
    assert err.count("killed with SIGKILL") == 1 and f"chatd: chatd (pid {pid}) had to be killed" in err
    assert not alive(pid)
    assert not chatd.pidfile.exists() or chatd.pidfile.read_text() == ""
    assert chatd.cmd("status").returncode == 3


def test_stop_waits_until_the_process_has_exited(chatd):
    pid = chatd.start()
    chatd.cmd("stop", check=0)
    assert not alive(pid)
    assert not listening(chatd.port)


def test_stop_and_status_of_a_stopped_instance(chatd):
    assert chatd.cmd("stop", check=0).stdout == b"chatd is not running\n"
    assert chatd.cmd("status", check=3).stdout == b"chatd is not running\n"


def test_status_prints_every_field(chatd):
    pid = chatd.start()
    with LineClient(chatd.port) as c:
        c.send(b"hi\n")
        c.recv_line()
        proc = wait_for(lambda: (p := chatd.cmd("status", check=0)) and b"clients: 1" in p.stdout and p,
                        what="status to count the client")
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == f"chatd is running (pid {pid})"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    for key in ("address", "mode", "clients", "uptime", "event loop", "log", "last restart"):
        assert key in fields, key
    assert fields["address"] == f"127.0.0.1:{chatd.port}"
    assert fields["mode"] == "echo"
    assert fields["last restart"] == "never"
    assert fields["log"] == f"file {chatd.logfile}"


def test_status_cannot_tell_when_the_pid_file_cannot_be_opened(chatd):
    chatd.pidfile.symlink_to(chatd.dir / "elsewhere.pid")
    proc = chatd.cmd("status", check=4)
    assert b"cannot" in proc.stderr


def test_run_refuses_when_another_instance_holds_the_lock(chatd):
    chatd.start()
    proc = chatd.cmd("run", check=1)
    assert b"already running" in proc.stderr


def test_run_serves_in_the_foreground_and_ctrl_c_exits_0(chatd):
    proc = chatd.run_foreground()
    with LineClient(chatd.port) as c:
        c.send(b"fg\n")
        assert c.recv_line() == b"fg\n"
    assert chatd.cmd("status", check=0).stdout.startswith(f"chatd is running (pid {proc.pid})".encode())
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=10) == 0, chatd.foreground_stderr()
    assert b"Traceback" not in chatd.foreground_stderr()
    assert not chatd.pidfile.exists()
    assert "stop (SIGINT)" in chatd.log_text()


def test_check_config(chatd):
    assert chatd.cmd("check-config", check=0).stdout == f"{chatd.config}: OK\n".encode()
    chatd.write_config(extra="[limits]\nbogus = 1\n")
    proc = chatd.cmd("check-config", check=6)
    line = len(chatd.config.read_text().splitlines())
    assert f"{chatd.config}:{line}: unknown key 'bogus' in [limits]".encode() in proc.stderr


def test_default_pid_file_follows_the_config_file_stem(tmp_path):
    """Without a pidfile setting, -c /x/chat.conf gives DIR/chat.pid (DIR from $RUNTIME_DIRECTORY here)."""
    rundir = tmp_path / "run"
    rundir.mkdir(mode=0o700)
    port = free_port()
    conf = tmp_path / "chat.conf"
    conf.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n[log]\ntarget = "{tmp_path}/l.log"\n')
    env = os.environ | {"RUNTIME_DIRECTORY": str(rundir)}
    cmd = chatd_command()
    try:
        subprocess.run(cmd + ["start", "-c", str(conf)], env=env, check=True, timeout=30, capture_output=True)
        assert (rundir / "chat.pid").exists() and (rundir / "chat.state").exists()
        assert (rundir / "chat.lock").exists()
    finally:
        subprocess.run(cmd + ["stop", "-c", str(conf)], env=env, timeout=30, capture_output=True)
        for pid in processes_mentioning(str(tmp_path)):
            kill_and_wait(pid)
    assert not (rundir / "chat.pid").exists()


def test_help_and_version():
    proc = subprocess.run(chatd_command() + ["--help"], capture_output=True, timeout=10)
    assert proc.returncode == 0
    text = proc.stdout.decode()
    for section in ("SYNOPSIS", "COMMANDS", "OPTIONS", "EXIT STATUS", "FILES", "SIGNALS"):
        assert section in text
    proc = subprocess.run(chatd_command() + ["--version"], capture_output=True, timeout=10)
    assert proc.returncode == 0 and proc.stdout.startswith(b"chatd ")


def test_every_command_accepts_every_option(chatd):
    opts = ["--host", "127.0.0.1", "-p", str(chatd.port), "--mode", "echo", "--pidfile", str(chatd.pidfile),
            "--log", str(chatd.logfile), "--log-level", "info", "--loop", "asyncio", "--timeout", "5"]
    assert chatd.cmd("check-config", *opts).returncode == 0
    assert chatd.cmd("status", *opts).returncode == 3
    assert chatd.cmd("start", *opts).returncode == 0
    assert chatd.cmd("status", *opts).returncode == 0
    assert b"asyncio" in chatd.cmd("status").stdout
    restart = chatd.cmd("restart", *opts)          # the options match the running instance
    assert restart.returncode == 0 and restart.stdout.startswith(b"chatd restarted in place")
    assert restart.stderr == b""
    assert chatd.cmd("reload", *opts).returncode == 0
    assert chatd.cmd("stop", *opts).returncode == 0


@pytest.mark.parametrize("lock", ["LOCK_SH", "LOCK_EX"])
def test_a_stranger_holding_a_lock_on_a_stale_pid_file_cannot_block_start(chatd, lock):
    """1. chatd is killed, leaving its pid file, 2. another process locks it (any user who may
    read it can, shared or exclusive). Result: start replaces the file and serves."""
    pid = chatd.start()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the daemon to die")
    squatter = subprocess.Popen([sys.executable, "-c",
                                 "import fcntl, os, sys, time\n"
                                 "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                                 f"fcntl.flock(fd, fcntl.{lock})\n"
                                 "print('locked', flush=True)\ntime.sleep(30)\n",
                                 str(chatd.pidfile)], stdout=subprocess.PIPE)
    try:
        assert squatter.stdout.readline() == b"locked\n"
        proc = chatd.cmd("start", check=0)
        assert b"chatd started" in proc.stdout
        if lock == "LOCK_EX":   # it looks running until /proc/locks shows who holds it
            assert f"it names pid {pid} but the lock is held by pid {squatter.pid}".encode() in proc.stderr
        assert chatd.pid() != pid
        with LineClient(chatd.port) as c:
            c.send(b"mine\n")
            assert c.recv_line() == b"mine\n"
        assert alive(squatter.pid)
    finally:
        kill_and_wait(squatter.pid)


def test_control_commands_on_a_pid_directory_that_does_not_exist_yet(chatd):
    """As before systemd first makes RuntimeDirectory=: nothing runs there, and nothing is created."""
    pidfile = str(chatd.dir / "not-yet" / "chatd.pid")
    assert chatd.cmd("stop", "--pidfile", pidfile, check=0).stdout == b"chatd is not running\n"
    assert chatd.cmd("status", "--pidfile", pidfile, check=3).stdout == b"chatd is not running\n"
    assert chatd.cmd("reload", "--pidfile", pidfile, check=7).stderr == b"chatd: chatd is not running\n"
    assert not (chatd.dir / "not-yet").exists()
