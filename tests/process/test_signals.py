"""Signals and restart in place, through the real daemon (README "Signals")."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time

import pytest

from support import LineClient, alive, free_port, listening, stuck_client, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop


def state(inst) -> dict:
    return json.loads((inst.dir / "chatd.state").read_text())


def restart_outcome(inst, *args, check):
    proc = inst.cmd("restart", *args, check=check)
    return (proc.stdout + proc.stderr).decode()


def test_sighup_applies_a_good_config_and_clients_stay(loop_chatd):
    """1. a client connects, 2. max_line changes in the file, 3. chatd restart.
    Result: exit 0 naming the change, same pid, the client still echoes, new clients get the new limit."""
    inst = loop_chatd
    pid = inst.start()
    with LineClient(inst.port) as old:
        old.send(b"before\n")
        assert old.recv_line() == b"before\n"
        inst.write_config(extra="[limits]\nmax_line = 20\n")
        text = restart_outcome(inst, check=0)
        assert "limits.max_line 4096 -> 20" in text
        assert inst.pid() == pid and alive(pid)
        old.send(b"after\n")
        assert old.recv_line() == b"after\n"
        with LineClient(inst.port) as new:
            new.send(b"z" * 21 + b"\n")
            assert new.recv_line() == b"ERR line too long (max 20 bytes)\r\n"
    st = state(inst)
    assert st["generation"] == 1 and st["last_restart"]["outcome"] == "applied"
    assert b"last restart: " in inst.cmd("status").stdout and b"applied" in inst.cmd("status").stdout


def test_sighup_rejects_a_bad_config_and_keeps_serving(chatd):
    """1. a client connects, 2. the config gets a bad value, 3. chatd restart.
    Result: exit 6 naming file:line; the daemon serves exactly as before."""
    pid = chatd.start()
    with LineClient(chatd.port) as c:
        chatd.write_config(extra="[limits]\nmax_line = 4\n")
        line = len(chatd.config.read_text().splitlines())
        text = restart_outcome(chatd, check=6)
        assert f"{chatd.config}:{line}:" in text and "rejected" in text
        c.send(b"still here\n")
        assert c.recv_line() == b"still here\n"
    assert chatd.pid() == pid
    assert state(chatd)["last_restart"]["outcome"] == "rejected"
    chatd.write_config(extra="[server\n")
    assert "TOML syntax error" in restart_outcome(chatd, check=6)
    assert "rejected" in chatd.cmd("status", check=0).stdout.decode()


def test_sighup_rejects_keys_that_need_a_stop_and_start(chatd):
    chatd.start()
    chatd.write_config(daemon={"user": "nobody"})
    text = restart_outcome(chatd, check=6)
    assert "daemon.user" in text and "chatd stop" in text
    # A new pidfile makes the control commands look elsewhere, so signal the daemon directly.
    chatd.write_config(daemon={"pidfile": str(chatd.dir / "other.pid")})
    os.kill(chatd.pid(), signal.SIGHUP)
    wait_for(lambda: state(chatd)["generation"] == 2, what="the restart")
    assert "daemon.pidfile" in state(chatd)["last_restart"]["message"]
    chatd.write_config()
    chatd.write_config(loop="asyncio" if "uvloop" in state(chatd)["loop"] else "uvloop")
    assert "server.loop" in restart_outcome(chatd, check=6)


def test_sighup_moves_to_a_new_port_and_old_clients_stay(loop_chatd):
    inst = loop_chatd
    inst.start()
    old_port = inst.port
    new_port = free_port()
    with LineClient(old_port) as c:
        inst.write_config(port=new_port)
        text = restart_outcome(inst, check=0)
        assert f"server.port {old_port} -> {new_port}" in text
        with LineClient(new_port) as n:
            n.send(b"new\n")
            assert n.recv_line() == b"new\n"
        assert not listening(old_port)
        c.send(b"old client\n")
        assert c.recv_line() == b"old client\n"
    assert state(inst)["address"] == f"127.0.0.1:{new_port}"


def test_sighup_with_a_new_port_that_cannot_be_bound_changes_nothing(chatd):
    chatd.start()
    with socket.socket() as blocker:
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        busy = blocker.getsockname()[1]
        chatd.write_config(port=busy, extra="[limits]\nmax_line = 100\n")
        text = restart_outcome(chatd, check=1)
        assert "address already in use" in text and "nothing changed" in text
    with LineClient(chatd.port) as c:
        c.send(b"y" * 200 + b"\n")
        assert c.recv_line() == b"y" * 200 + b"\n"   # the old max_line still holds


def test_sighup_between_overlapping_addresses_says_so(chatd):
    chatd.write_config(host="0.0.0.0")
    chatd.start()
    chatd.write_config(host="127.0.0.1")
    text = restart_outcome(chatd, check=0)
    assert "server.host '0.0.0.0' -> '127.0.0.1'" in text and "overlap" in text
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"


def test_sighup_reopens_the_log_file_first(chatd):
    """logrotate: rename the log, SIGHUP (even with a rejected config). Result: a new log file."""
    chatd.start()
    rotated = chatd.dir / "chatd.log.1"
    chatd.logfile.rename(rotated)
    chatd.write_config(extra="[limits]\nmax_line = 1\n")
    restart_outcome(chatd, check=6)
    wait_for(lambda: chatd.logfile.exists() and "rejected" in chatd.logfile.read_text(),
             what="the reopened log")
    assert "rejected" not in rotated.read_text()


def test_reload_and_restart_of_a_stopped_instance(chatd):
    proc = chatd.cmd("reload", check=7)
    assert proc.stderr == b"chatd: chatd is not running\n" and proc.stdout == b""
    proc = chatd.cmd("restart", check=0)
    assert proc.stderr == b"chatd is not running; starting it\n"     # a note, not the result
    assert proc.stdout.startswith(b"chatd started")
    assert chatd.cmd("status").returncode == 0


@pytest.mark.slow
def test_restart_with_no_answer_times_out_with_exit_1(chatd):
    pid = chatd.start()
    os.kill(pid, signal.SIGSTOP)
    try:
        proc = chatd.cmd("restart", check=1, timeout=60)
        assert b"no answer" in proc.stderr
    finally:
        os.kill(pid, signal.SIGCONT)
    # the SIGHUP was queued; once continued, the daemon handles it
    wait_for(lambda: state(chatd)["generation"] == 1, what="the delayed restart")


@pytest.mark.slow
def test_no_connection_is_refused_during_restarts(loop_chatd):
    """A client connecting in a tight loop during 10 restarts (some moving max_line) is never refused."""
    inst = loop_chatd
    inst.start()
    stop = threading.Event()
    errors: list[str] = []
    count = [0]

    def hammer():
        while not stop.is_set():
            try:
                with LineClient(inst.port, timeout=5) as c:
                    c.send(b"x\n")
                    assert c.recv_line() == b"x\n"
                count[0] += 1
            except (OSError, AssertionError) as e:
                errors.append(repr(e))

    t = threading.Thread(target=hammer)
    t.start()
    try:
        for i in range(10):
            inst.write_config(extra=f"[limits]\nmax_line = {100 + i}\n")
            inst.cmd("restart", check=0)
    finally:
        stop.set()
        t.join(30)
    assert errors == [] and count[0] > 10


def test_sigusr1_drains_clients_cleanly(loop_chatd):
    """1. a client sends lines, 2. SIGUSR1. Result: every line sent before it is answered,
    then a FIN (EOF, no reset); chatd exits 0 and removes its pid file."""
    inst = loop_chatd
    pid = inst.start()
    c = LineClient(inst.port)
    payload = b"".join(b"line %d\n" % i for i in range(2000))
    c.send(payload)
    os.kill(pid, signal.SIGUSR1)
    got = c.recv_until_eof()
    assert got == payload
    c.close()
    wait_for(lambda: not alive(pid), what="chatd to exit")
    assert not inst.pidfile.exists()
    assert "graceful stop" in inst.log_text() and "stopped" in inst.log_text()


def test_sigusr1_is_bounded_by_drain_timeout_for_a_client_that_never_reads(chatd):
    chatd.write_config(daemon={"drain_timeout": 1.0})
    inst = chatd
    pid = inst.start()
    c = stuck_client(inst.port)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGUSR1)
    wait_for(lambda: not alive(pid), timeout=10, what="chatd to exit")
    assert time.monotonic() - t0 < 4
    c.close()


def test_sigterm_is_prompt_even_with_a_stuck_client(chatd):
    pid = chatd.start()
    c = stuck_client(chatd.port)
    t0 = time.monotonic()
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), timeout=5, what="chatd to exit")
    assert time.monotonic() - t0 < 2
    assert not chatd.pidfile.exists()
    c.close()


@pytest.mark.parametrize("signame", ["SIGINT", "SIGQUIT"])
def test_sigint_and_sigquit_are_a_tidy_exit(chatd, signame):
    pid = chatd.start()
    os.kill(pid, getattr(signal, signame))
    wait_for(lambda: not alive(pid), timeout=5, what="chatd to exit")
    assert not chatd.pidfile.exists()
    assert f"stop ({signame})" in chatd.log_text()


def test_ignored_signals_change_nothing(chatd):
    pid = chatd.start()
    with LineClient(chatd.port) as c:
        for sig in (signal.SIGUSR2, signal.SIGALRM, signal.SIGPIPE, signal.SIGTSTP, signal.SIGTTIN,
                    signal.SIGTTOU):
            os.kill(pid, sig)
        time.sleep(0.2)
        assert alive(pid)
        c.send(b"alive\n")
        assert c.recv_line() == b"alive\n"


def test_stop_continues_a_stopped_daemon(chatd):
    pid = chatd.start()
    os.kill(pid, signal.SIGSTOP)
    chatd.cmd("stop", check=0)
    assert not alive(pid)
