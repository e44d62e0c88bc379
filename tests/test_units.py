"""The shipped systemd units and the rsyslog snippet, checked by the real tools.

`systemd-analyze verify` runs on the units as shipped, in a fake root: only rc 0 with empty
output passes, since several defects (an unknown key, a bad value) are rc-0 warnings.
"""

from __future__ import annotations

import grp
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from chatd import config, control
from conftest import require_real

REPO = Path(__file__).resolve().parent.parent
SERVICE = REPO / "systemd" / "chatd.service"
SOCKET = REPO / "systemd" / "chatd.socket"
RSYSLOG = REPO / "etc" / "chatd.rsyslog"
LOGROTATE = REPO / "etc" / "chatd.logrotate"
RSYSLOGD = "/usr/sbin/rsyslogd"
CONF = "/etc/chatd/chatd.conf"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (systemd.syntax(7): comments, continuations)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("["):
            assert line.endswith("]"), line
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None and "=" in line, line
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def one(section: dict[str, list[str]], key: str) -> str:
    assert key in section, f"{key}= missing"
    values = [v for v in section[key] if v]   # an empty assignment resets a list
    return values[-1] if values else ""


def seconds(value: str) -> float:
    """A systemd time span (systemd.time(7)) in seconds: "20", "20s", "1min 30s", "500ms"."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}
    if re.fullmatch(r"\d+(\.\d+)?", value):
        return float(value)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * units[u] for n, u in parts)


def exec_argv(section: dict[str, list[str]], key: str) -> list[str]:
    argv = shlex.split(one(section, key))
    while argv and argv[0][:1] in "-@:+!":   # systemd.service(5) command prefixes
        argv[0] = argv[0][1:] or argv.pop(0)
    return argv


@pytest.fixture(scope="module")
def service() -> dict[str, list[str]]:
    return parse_unit(SERVICE)["Service"]


# ------------------------------------------------------------------ systemd-analyze verify

def verify_units(tmp_path, service_text: str) -> subprocess.CompletedProcess:
    """`systemd-analyze verify` of the service (as `service_text`) and the socket, installed in
    a root of their own, with stubs where the service looks for its programs."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        require_real("systemd-analyze")
    root = tmp_path / "R"
    units = root / "etc" / "systemd" / "system"
    units.mkdir(parents=True)
    (units / SERVICE.name).write_text(service_text)
    shutil.copy(SOCKET, units / SOCKET.name)
    service = parse_unit(units / SERVICE.name)["Service"]
    for key in ("ExecStart", "ExecReload"):
        program = exec_argv(service, key)[0]
        assert program.startswith("/"), f"{key}: {program}"
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return subprocess.run([analyze, "verify", f"--root={root}", "--man=no", "--recursive-errors=no",
                           f"/etc/systemd/system/{SERVICE.name}", f"/etc/systemd/system/{SOCKET.name}"],
                          capture_output=True, stdin=subprocess.DEVNULL, timeout=60)


def test_units_as_shipped_pass_systemd_analyze_verify_without_a_word(tmp_path):
    proc = verify_units(tmp_path, SERVICE.read_text())
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, b""), proc


def test_verify_would_catch_an_rc0_warning(tmp_path):
    """The check above is not vacuous: a typo in a key's value is reported (as a warning that
    alone would leave rc 0), and the output check sees it."""
    proc = verify_units(tmp_path, SERVICE.read_text().replace("Type=notify", "Type=notfy"))
    assert b"Failed to parse service type, ignoring: notfy" in proc.stderr, proc


# ------------------------------------------------------------------ what the README promises of the units

def test_service_is_notify_with_run_and_reload(service):
    assert one(service, "Type") == "notify"   # systemd 252 has no notify-reload
    start = exec_argv(service, "ExecStart")
    assert start[0].startswith("/") and Path(start[0]).name == "chatd", start
    assert start[1:] == ["run", "-c", CONF], start
    reload_ = exec_argv(service, "ExecReload")
    assert reload_[0] == start[0], (reload_, start)
    assert reload_[1:] == ["reload", "-c", CONF], reload_
    if "NotifyAccess" in service:   # READY=1 and WATCHDOG=1 come from the main pid
        assert one(service, "NotifyAccess") in ("main", "all"), service["NotifyAccess"]


def test_service_restarts_watches_and_stops_gracefully(service):
    assert one(service, "Restart") == "on-failure"
    assert seconds(one(service, "WatchdogSec")) > 0
    assert one(service, "KillSignal") in ("SIGUSR1", "USR1", "10")
    drain = config.KEYS["daemon.drain_timeout"].default
    assert drain == 10
    assert seconds(one(service, "TimeoutStopSec")) > drain


def test_service_stops_through_chatd_stop(service):
    """ExecStop= is `chatd stop`, which sends SIGUSR1 and waits for the exit: systemd itself does
    not wait for a main pid that a live upgrade started (README "Running under systemd").
    TimeoutStopSec leaves room for its steps: SIGTERM after drain_timeout + 5 s, SIGKILL and
    the wait for it KILL_WAIT_S each."""
    start = exec_argv(service, "ExecStart")
    stop = exec_argv(service, "ExecStop")
    assert stop[0] == start[0] and stop[1:] == ["stop", "-c", CONF], stop
    drain = config.KEYS["daemon.drain_timeout"].default
    assert seconds(one(service, "TimeoutStopSec")) > drain + 5 + 2 * control.KILL_WAIT_S


def test_service_runtime_directory_and_fd_limit(service):
    assert "chatd" in one(service, "RuntimeDirectory").split()
    limit = one(service, "LimitNOFILE")
    soft, _, hard = limit.partition(":")
    assert all(v.isdigit() and int(v) <= 20000 for v in (soft, hard or soft)), limit


def test_service_hardening(service):
    if "User" in service:
        assert one(service, "User") not in ("", "root", "0")
    else:
        assert one(service, "DynamicUser") in ("yes", "true", "on", "1")
    assert one(service, "ProtectSystem") == "strict"
    assert one(service, "PrivateTmp") in ("yes", "true", "on", "1")
    assert one(service, "NoNewPrivileges") in ("yes", "true", "on", "1")
    families = " ".join(service["RestrictAddressFamilies"])
    assert not families.lstrip().startswith("~"), families   # an allow list, not a deny list
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families.split()), families   # AF_UNIX: NOTIFY_SOCKET
    assert one(service, "SystemCallFilter")
    assert "CapabilityBoundingSet" in service


def test_socket_unit_listens_for_the_service():
    sock = parse_unit(SOCKET)["Socket"]
    assert one(sock, "ListenStream")
    if "Service" in sock:
        assert one(sock, "Service") == SERVICE.name


def test_logrotate_hook_runs_the_chatd_the_unit_runs_with_the_same_config(service):
    """The postrotate command reaches the installed chatd: the program the unit starts
    (README installs /usr/local/bin/chatd), with the unit's config, so its SIGHUP goes to
    that instance. (SIGHUP, never SIGUSR1: tests/test_shipped_files.py.)"""
    text = LOGROTATE.read_text()
    script = re.search(r"postrotate\n(.*?)\n\s*endscript", text, re.S)
    assert script, text
    commands = [shlex.split(line) for line in script.group(1).splitlines()
                if line.strip() and not line.strip().startswith("#")]
    chatd_calls = [argv for argv in commands if argv and Path(argv[0]).name == "chatd"]
    assert chatd_calls, commands
    program = exec_argv(service, "ExecStart")[0]
    for argv in chatd_calls:
        assert argv[0] == program, f"postrotate runs {argv[0]}, the unit runs {program}"
        assert argv[1:4] == ["reload", "-c", CONF], argv


# ------------------------------------------------------------------ the rsyslog snippet

def test_rsyslog_snippet_parses_with_rsyslogd(tmp_path):
    if not os.path.exists(RSYSLOGD):
        require_real("rsyslogd")
    text = RSYSLOG.read_text()
    assert "/var/log/chatd/chatd.log" in text and re.search(r"\$programname\s*==\s*\"chatd\"", text)
    assert re.search(r"^\s*stop\s*$", text, re.M), "chatd's lines would also reach the general log"
    snippet = text.replace("/var/log/chatd/chatd.log", str(tmp_path / "log" / "chatd.log"))
    try:
        grp.getgrnam("adm")
    except KeyError:   # not Debian-like: the group the snippet names does not exist
        snippet = re.sub(r'\s(fileOwner|fileGroup)="[^"]*"', "", snippet)
    (tmp_path / "30-chatd.conf").write_text(snippet)
    conf = tmp_path / "rsyslog.conf"
    conf.write_text(f'global(workDirectory="{tmp_path}")\n'
                    f'include(file="{tmp_path / "30-chatd.conf"}")\n'
                    f'*.* action(type="omfile" file="{tmp_path / "messages"}")\n')
    proc = subprocess.run([RSYSLOGD, "-N1", "-f", str(conf)], capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=30)
    assert proc.returncode == 0, proc.stderr
    noise = [line for line in proc.stderr.decode().splitlines() + proc.stdout.decode().splitlines()
             if not re.match(r"rsyslogd: (version .*config validation run|End of config validation run)", line)]
    assert noise == [], noise
