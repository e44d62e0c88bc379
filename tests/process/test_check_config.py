"""Every error in a config file, each once with FILE:LINE, through the real `chatd` command.

`check-config`, `start` and `run` print each error on its own `chatd: ` line
of stderr, in file order; a running daemon that rejects such a file on
restart keeps the errors on one line of its log and state file.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from support import chatd_command, free_port, processes_mentioning

# Lines 1-6 are good; then one error on each marked line.
SEMANTIC = """\
[server]
host = "127.0.0.1"
port = {port}

[daemon]
pidfile = "{pidfile}"
drain_timeout = 0
user = "chatd_no_such_user_q7"

[limits]
max_line = 5000
output_buffer = 4999
max_lines = 1

[sever]
port = 1
"""
SEMANTIC_ERRORS = [
    (7, "[daemon] drain_timeout: must be greater than 0, got 0"),
    (8, "[daemon] user: no such user: 'chatd_no_such_user_q7'"),
    (12, "[limits] output_buffer (4999) must be at least max_line (5000)"),
    (13, "unknown key 'max_lines' in [limits] (known: "),
    (15, "unknown section [sever] (known: "),
]

# Two syntax errors; the bad port would be an error too, but a syntax error hides it.
SYNTAX = """\
[server]
host = "127.0.0.1"
port = 0
mode = = "echo"

[daemon]
pidfile = "{pidfile}"
[log]
level = "info
"""
SYNTAX_ERRORS = [
    (4, "TOML syntax error: Invalid value"),
    (9, "TOML syntax error: "),
]

CASES = {"semantic": (SEMANTIC, SEMANTIC_ERRORS), "syntax": (SYNTAX, SYNTAX_ERRORS)}


def run_chatd(*args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """The installed command, as a user runs it (not under a supervisor)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "UPSTART_JOB", "LISTEN_FDS", "LISTEN_PID", "CHATD_DEBUG")}
    return subprocess.run(chatd_command() + list(args), capture_output=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env, text=True)


def write_config(tmp_path, template: str):
    path = tmp_path / "chatd.conf"
    path.write_text(template.format(port=free_port(), pidfile=tmp_path / "chatd.pid"))
    return path


def assert_lists_the_errors(stderr: str, path, expected: list[tuple[int, str]]) -> None:
    """stderr is exactly one `chatd: FILE:LINE: ...` line per error, in file order."""
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == len(expected), stderr
    for got, (line, text) in zip(lines, expected):
        assert got.startswith(f"chatd: {path}:{line}: {text}"), (got, line, text)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_config_lists_every_error_once_in_file_order(tmp_path, case):
    template, expected = CASES[case]
    path = write_config(tmp_path, template)
    proc = run_chatd("check-config", "-c", str(path))
    assert proc.returncode == 6, proc
    assert proc.stdout == ""
    assert_lists_the_errors(proc.stderr, path, expected)


def test_check_config_of_a_valid_file_says_ok(tmp_path):
    path = write_config(tmp_path, '[server]\nhost = "127.0.0.1"\nport = {port}\n'
                                  '[daemon]\npidfile = "{pidfile}"\n')
    proc = run_chatd("check-config", "-c", str(path))
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{path}: OK\n", "")


@pytest.mark.parametrize("command", ["start", "run"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_start_with_a_bad_file_lists_the_same_errors_and_leaves_nothing(tmp_path, command, case):
    template, expected = CASES[case]
    path = write_config(tmp_path, template)
    proc = run_chatd(command, "-c", str(path))
    assert proc.returncode == 6, proc
    assert_lists_the_errors(proc.stderr, path, expected)
    assert not (tmp_path / "chatd.pid").exists()
    assert sorted(os.listdir(tmp_path)) == ["chatd.conf"]
    assert processes_mentioning(str(tmp_path)) == []


def test_a_rejected_restart_keeps_the_errors_on_one_line_of_log_and_state(chatd_instance):
    inst = chatd_instance
    pid = inst.start()
    inst.write_config(extra="[limits]\nmax_line = 4\nburst = 0\n[chat]\nmotd = 1\n")
    lines = inst.config.read_text().splitlines()
    expected = [f"{inst.config}:{lines.index(text) + 1}: {message}" for text, message in [
        ("max_line = 4", "[limits] max_line: must be between 16 and 16777216, got 4"),
        ("burst = 0", "[limits] burst: must be at least 1, got 0"),
        ("motd = 1", "[chat] motd: expected a string, got an integer"),
    ]]
    joined = "; ".join(expected)
    proc = inst.cmd("restart", check=6)
    stderr = proc.stderr.decode()
    assert stderr.splitlines() == [f"chatd: config rejected; still serving with the old one: {joined}"], stderr
    assert inst.pid() == pid
    state = json.loads((inst.dir / "chatd.state").read_text())
    assert state["last_restart"]["outcome"] == "rejected"
    assert state["last_restart"]["message"] == joined
    assert any(line.endswith(f"restart rejected: {joined}") for line in inst.log_text().splitlines()), \
        inst.log_text()[-3000:]


@pytest.fixture
def chatd_instance(make_chatd):
    """A chatd instance from conftest's factory: stopped by pid at teardown, checked for tracebacks."""
    return make_chatd()
