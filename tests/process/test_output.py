"""Output discipline: stdout carries only a command's result; warnings and errors go to stderr,
each failure exactly once; `status --json` is one JSON object with stable keys."""

from __future__ import annotations

import json

from support import LineClient

# The keys `chatd status --json` always prints (README, "Commands").
STATUS_KEYS = {"running", "pid", "version", "address", "mode", "clients", "uptime_s", "started",
               "event_loop", "log", "last_restart", "last_upgrade", "pidfile", "config", "stale_pid", "pid_problem"}


def test_a_rejected_restart_says_its_reason_once_on_stderr(chatd):
    chatd.start()
    chatd.config.write_text(chatd.config.read_text() + "[limits]\nmax_line = 3\n")
    proc = chatd.cmd("restart", check=6)
    err = proc.stderr.decode()
    assert proc.stdout == b""
    assert err.count("max_line") == 1, err
    assert err.startswith("chatd: config rejected; still serving with the old one: ")
    assert "warning" not in err


def test_status_with_a_broken_config_keeps_stdout_clean(chatd):
    pid = chatd.start()
    chatd.config.write_text(chatd.config.read_text() + "[limits\n")
    proc = chatd.cmd("status", check=0)
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == f"chatd is running (pid {pid})"
    assert all(": " in line for line in lines[1:]) and not any("warning" in line for line in lines)
    err = proc.stderr.decode()
    assert err.count("warning: ") == 1 and "TOML syntax error" in err and str(chatd.pidfile) in err


def test_status_json_running(chatd):
    pid = chatd.start()
    with LineClient(chatd.port):
        chatd.cmd("restart", check=0)
        proc = chatd.cmd("status", "--json", check=0)
    assert proc.stderr == b""
    report = json.loads(proc.stdout)            # exactly one JSON document
    assert set(report) == STATUS_KEYS
    assert report["running"] is True and report["pid"] == pid
    assert report["address"] == f"127.0.0.1:{chatd.port}" and report["mode"] == "echo"
    assert report["pidfile"] == str(chatd.pidfile) and report["config"] == str(chatd.config)
    assert isinstance(report["uptime_s"], float) and report["uptime_s"] >= 0
    assert report["last_restart"]["outcome"] == "applied"
    assert report["event_loop"] and report["log"] and report["version"]
    text = chatd.cmd("status", check=0).stdout.decode()
    assert f"address: {report['address']}" in text and f"event loop: {report['event_loop']}" in text


def test_status_json_not_running_and_dead(chatd):
    proc = chatd.cmd("status", "--json", check=3)
    report = json.loads(proc.stdout)
    assert set(report) == STATUS_KEYS
    assert report["running"] is False and report["pid"] is None and report["stale_pid"] is None
    chatd.pidfile.write_text("4242\n")             # what a killed daemon leaves behind
    report = json.loads(chatd.cmd("status", "--json", check=1).stdout)
    assert report["running"] is False and report["stale_pid"] == "4242"


def test_stop_of_a_stopped_chatd_prints_only_its_result(chatd):
    proc = chatd.cmd("stop", check=0)
    assert proc.stdout == b"chatd is not running\n" and proc.stderr == b""


def test_reload_of_a_stopped_chatd_is_an_error_on_stderr(chatd):
    proc = chatd.cmd("reload", check=7)
    assert proc.stdout == b"" and proc.stderr == b"chatd: chatd is not running\n"
