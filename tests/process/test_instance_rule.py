"""One rule for what identifies an instance, kept by every command (README, "Which chatd a command means").

An instance is its pid file, chosen by -c and --pidfile. The other setting options describe
the server the user means; a command whose options differ from the running instance's never
acts on it: it fails, names the running instance, and says how to run a second one.
"""

from __future__ import annotations

import json
import re

import pytest

from support import LineClient, alive, free_port, listening


def running(chatd) -> int:
    pid = chatd.start()
    with LineClient(chatd.port) as c:
        c.send(b"hi\n")
        assert c.recv_line() == b"hi\n"
    return pid


def still_serving(chatd, pid: int) -> None:
    assert alive(pid) and chatd.pid() == pid
    with LineClient(chatd.port) as c:
        c.send(b"still\n")
        assert c.recv_line() == b"still\n"


def assert_refusal(proc, chatd, pid: int, asked: str) -> str:
    """Nothing on stdout; stderr names the running instance and how to run a second one."""
    err = proc.stderr.decode()
    assert proc.stdout == b"", proc.stdout
    assert f"pid file {chatd.pidfile} (pid {pid}) serves echo on 127.0.0.1:{chatd.port}" in err, err
    assert f"not {asked}" in err, err
    assert "to run a second chatd beside it" in err and "--pidfile" in err, err
    assert all(line.startswith("chatd: ") for line in err.splitlines()), err
    assert "Traceback" not in err
    return err


def test_start_with_another_mode_and_port_starts_nothing_and_says_why(chatd):
    pid = running(chatd)
    other = free_port()
    proc = chatd.cmd("start", "--mode", "chat", "-p", str(other))
    assert proc.returncode == 1
    assert_refusal(proc, chatd, pid, f"--port {other} --mode chat")
    assert not listening(other)
    still_serving(chatd, pid)


def test_start_with_the_running_options_is_already_running(chatd):
    pid = running(chatd)
    proc = chatd.cmd("start", "--mode", "echo", "-p", str(chatd.port), "--host", "127.0.0.1", check=0)
    assert proc.stdout.decode().strip() == f"chatd is already running (pid {pid}): echo on 127.0.0.1:{chatd.port}"
    assert proc.stderr == b""


@pytest.mark.parametrize("command", ["stop", "restart", "reload"])
def test_control_commands_never_act_on_another_server(chatd, command):
    pid = running(chatd)
    other = free_port()
    generation = json.loads((chatd.dir / "chatd.state").read_text())["generation"]
    proc = chatd.cmd(command, "-p", str(other))
    assert proc.returncode == 1
    assert_refusal(proc, chatd, pid, f"--port {other}")
    still_serving(chatd, pid)
    assert json.loads((chatd.dir / "chatd.state").read_text())["generation"] == generation  # no SIGHUP


def test_restart_refuses_an_option_the_daemon_was_not_started_with(chatd):
    """A running chatd re-reads only its file: `restart --mode chat` would otherwise be ignored."""
    pid = running(chatd)
    proc = chatd.cmd("restart", "--mode", "chat")
    assert proc.returncode == 1
    err = assert_refusal(proc, chatd, pid, "--mode chat")
    assert "re-reads only its config file" in err
    assert chatd.cmd("status").stdout.decode().splitlines()[2] == "mode: echo"


def test_status_of_another_server_is_not_running(chatd):
    pid = running(chatd)
    other = free_port()
    proc = chatd.cmd("status", "-p", str(other))
    assert proc.returncode == 3
    assert_refusal(proc, chatd, pid, f"--port {other}")
    assert chatd.cmd("status", "-p", str(chatd.port), "--mode", "echo").returncode == 0
    assert chatd.cmd("status", "--host", "127.0.0.1").returncode == 0
    as_json = chatd.cmd("status", "--json", "--mode", "chat")
    assert as_json.returncode == 3
    report = json.loads(as_json.stdout)
    assert report["running"] is False and "--mode chat" in report["mismatch"]


def test_run_beside_a_running_instance_names_it(chatd):
    pid = running(chatd)
    proc = chatd.cmd("run", "-p", str(free_port()))
    assert proc.returncode == 1 and proc.stdout == b""
    assert f"(pid {pid})" in proc.stderr.decode() and "--pidfile" in proc.stderr.decode()
    still_serving(chatd, pid)


def test_the_advice_runs_a_second_instance_that_is_controlled_apart(chatd):
    """Following the message's advice (its own --pidfile) gives a second chatd; each is stopped
    by its own pid file, and neither command touches the other."""
    pid = running(chatd)
    other = free_port()
    err = chatd.cmd("start", "--mode", "chat", "-p", str(other)).stderr.decode()
    second_pidfile = re.search(r"--pidfile (\S+)", err).group(1)
    assert second_pidfile.startswith(str(chatd.dir))
    second = ["--mode", "chat", "-p", str(other), "--pidfile", second_pidfile]
    chatd.cmd("start", *second, check=0)
    try:
        with LineClient(other) as c:
            assert c.recv_line().startswith(b"*** Welcome to chatd")
        assert chatd.cmd("status", *second, check=0).stdout.decode().splitlines()[2] == "mode: chat"
        chatd.cmd("stop", *second, check=0)
        assert not listening(other)
        still_serving(chatd, pid)
    finally:
        chatd.cmd("stop", "--pidfile", second_pidfile)


def test_matching_options_act(chatd):
    pid = running(chatd)
    chatd.cmd("stop", "-p", str(chatd.port), "--mode", "echo", check=0)
    assert not alive(pid)
