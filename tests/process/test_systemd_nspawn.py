"""chatd under a real systemd 252, booted in `systemd-nspawn` (README "Running under systemd").

One container for the whole module (tests/nspawn.py): `--volatile=yes` boots the host's own
/usr on a fresh tmpfs root. The SHIPPED unit files are bound read-only to /etc/systemd/system;
one drop-in adjusts only the paths (Debian's /usr/bin/python3 with PYTHONPATH=/srv/chatd, the
read-only checkout), and a second, empty at first, takes WatchdogSec=2 for the watchdog test.
The config lives in a host directory bound read-only to /etc/chatd, so the test rewrites it
between reloads. For the live upgrade, versions of chatd are installed side by side
(tests/installs.py) in a host directory bound read-only to /srv/chatd-installs, and a third
drop-in points PYTHONPATH at its `current` link, which the test flips between them.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from installs import IMPORT_FAILS, Installs
from nspawn import PORT, Container, booted
from support import LineClient, figures

REPO = Path(__file__).resolve().parents[2]

# Only the paths change: chatd from the checkout, with Debian's python3 (no venv, no uvloop).
PATHS_DROPIN = """\
[Service]
ExecStart=
ExecStart=/usr/bin/python3 -m chatd run -c /etc/chatd/chatd.conf
ExecReload=
ExecReload=/usr/bin/python3 -m chatd reload -c /etc/chatd/chatd.conf
ExecStop=
ExecStop=/usr/bin/python3 -m chatd stop -c /etc/chatd/chatd.conf
Environment=PYTHONPATH=/srv/chatd
"""
WATCHDOG_DROPIN = "[Service]\nWatchdogSec=2\n"
# Whatever `current` points at is the chatd installed now: what `python3 -m chatd` imports.
INSTALLS = "/srv/chatd-installs"
UPGRADE_DROPIN = f"[Service]\nEnvironment=PYTHONPATH={INSTALLS}/current\n"

CONFIG = """\
[server]
port = {port}
mode = "echo"

[limits]
max_line = {max_line}
"""


class ChatdBox(Container):
    """The container, with the host-side files this module binds into it."""

    def __init__(self, nspawn: subprocess.Popen, init: int, workdir: Path) -> None:
        super().__init__(nspawn, init, workdir)
        self.config = workdir / "etc-chatd" / "chatd.conf"
        self.watchdog_dropin = workdir / "watchdog.conf"
        self.upgrade_dropin = workdir / "upgrade.conf"
        self.installs = Installs(workdir / "installs")

    def chatd(self, *args: str, check: int | None = 0, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """The checkout's chatd command inside, as root types it (whichever version the daemon runs)."""
        return self.run("/usr/bin/env", "PYTHONPATH=/srv/chatd", "/usr/bin/python3", "-m", "chatd", *args,
                        "-c", "/etc/chatd/chatd.conf", check=check, timeout=timeout)

    def write_config(self, max_line: int = 4096, text: str | None = None) -> None:
        """Rewrite the config in place (same inode: the directory is bound read-only inside)."""
        self.config.write_text(CONFIG.format(port=PORT, max_line=max_line) if text is None else text)
        self.config.chmod(0o644)

    def reset(self) -> None:
        """chatd.service and chatd.socket stopped, nothing failed, the default config."""
        self.write_config()
        self.systemctl("stop", "chatd.socket", "chatd.service")
        self.systemctl("reset-failed", "chatd.socket", "chatd.service", check=None)


# -------------------------------------------------------------------- the container

def _binds(workdir: Path) -> dict[str, str]:
    """The checkout, the shipped units, the drop-ins, the installs and the config directory."""
    (workdir / "etc-chatd").mkdir(mode=0o755)
    (workdir / "etc-chatd" / "chatd.conf").write_text(CONFIG.format(port=PORT, max_line=4096))
    (workdir / "installs").mkdir(mode=0o755)
    for name, text in (("paths.conf", PATHS_DROPIN), ("watchdog.conf", ""), ("upgrade.conf", "")):
        (workdir / name).write_text(text)
    for f in ("paths.conf", "watchdog.conf", "upgrade.conf", "etc-chatd/chatd.conf"):
        (workdir / f).chmod(0o644)
    return {
        str(REPO): "/srv/chatd",
        str(REPO / "systemd" / "chatd.service"): "/etc/systemd/system/chatd.service",
        str(REPO / "systemd" / "chatd.socket"): "/etc/systemd/system/chatd.socket",
        str(workdir / "paths.conf"): "/etc/systemd/system/chatd.service.d/test.conf",
        str(workdir / "watchdog.conf"): "/etc/systemd/system/chatd.service.d/watchdog.conf",
        str(workdir / "upgrade.conf"): "/etc/systemd/system/chatd.service.d/upgrade.conf",
        str(workdir / "installs"): INSTALLS,
        str(workdir / "etc-chatd"): "/etc/chatd",
    }


@pytest.fixture(scope="module")
def box():
    with booted(ChatdBox, _binds) as box:
        # preset-all on the empty /etc enables both units ([Install] sections): start from a
        # known state, with each test starting what it needs.
        box.reset()
        yield box


@pytest.fixture
def fresh(box):
    """Each test starts with chatd stopped and the default config, and leaves it that way."""
    box.reset()
    yield box
    box.systemctl("kill", "-s", "SIGCONT", "chatd.service", check=None)
    box.reset()


# -------------------------------------------------------------------- tests

def test_container_boots_clean(box):
    """The container's own systemd is `running` (firstboot and rsyslog masked), nothing failed."""
    assert box.boot_state == "running", f"state {box.boot_state}; failed units:\n{box.failed_units}"


def test_start_returns_after_ready(fresh):
    box = fresh
    box.systemctl("start", "chatd")
    # no retry: `systemctl start` of a Type=notify unit returns only after READY=1
    assert box.echo(b"ready?\n") == b"ready?\n"
    props = box.show("chatd", "ActiveState", "SubState", "StatusText", "Type", "NotifyAccess", "MainPID")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main", props
    # every address: one dual-stack [::] socket, or 0.0.0.0 where the container has no IPv6
    assert re.match(rf"echo on (\[::\]|0\.0\.0\.0):{PORT}, \d+ clients?", props["StatusText"]), props
    status = box.systemctl("status", "--full", "chatd").stdout.decode()
    assert props["StatusText"].split(",")[0] in status, status
    assert f"Main PID: {props['MainPID']}" in status, status


def test_echo_is_byte_exact(fresh):
    box = fresh
    box.systemctl("start", "chatd")
    payload = b"one\n" + b"two\r\n" + bytes(range(0, 255)).replace(b"\n", b"") + b"\n" + b"x" * 3000 + b"\n"
    assert box.echo(payload) == payload
    assert box.echo(b"\n") == b"\n"


def test_reload_applies_a_valid_config_and_fails_on_a_broken_one(fresh):
    box = fresh
    box.systemctl("start", "chatd")
    pid = box.main_pid()

    box.write_config(max_line=64)
    box.systemctl("reload", "chatd")   # check=0
    props = box.show("chatd", "ActiveState", "StatusText", "MainPID")
    assert props["ActiveState"] == "active" and int(props["MainPID"]) == pid, props
    assert "last restart applied" in props["StatusText"], props
    long_line = b"y" * 100 + b"\n"
    too_long = b"ERR line too long (max 64 bytes)\r\n"
    assert box.echo(long_line, want=len(too_long)) == too_long

    for broken in ("[server]\nport = 7777\nmode = \"echo\"\n[limits\nmax_line = 64\n",   # TOML syntax
                   CONFIG.format(port=PORT, max_line=3)):                              # a bad value
        box.write_config(text=broken)
        rc = box.systemctl("reload", "chatd", check=None)
        assert rc.returncode != 0, f"reload of a broken config succeeded:\n{broken}\n{box.journal()[-2000:]}"
        props = box.show("chatd", "ActiveState", "SubState", "StatusText", "MainPID")
        assert props["ActiveState"] == "active" and props["SubState"] == "running", props
        assert int(props["MainPID"]) == pid, props
        assert "rejected" in props["StatusText"], props
        assert box.echo(b"still here\n") == b"still here\n"
        assert box.echo(long_line, want=len(too_long)) == too_long   # old config kept

    box.write_config()
    box.systemctl("reload", "chatd")
    assert "last restart applied" in box.show("chatd", "StatusText")["StatusText"]
    assert box.echo(long_line) == long_line
    journal = box.journal()
    assert "restart applied" in journal and "restart rejected" in journal, journal[-3000:]
    assert "Traceback" not in journal, journal[-3000:]


def test_stop_is_a_success(fresh):
    box = fresh
    box.systemctl("start", "chatd")
    pid = box.main_pid()
    assert box.alive_inside(pid)
    box.systemctl("stop", "chatd")
    props = box.show("chatd", "ActiveState", "Result", "MainPID", "ExecMainStatus", "ExecMainCode")
    assert props["Result"] == "success" and props["ActiveState"] == "inactive", props
    assert props["MainPID"] == "0", props
    assert not box.alive_inside(pid), f"pid {pid} still there after stop"
    assert "Traceback" not in box.journal()


def test_socket_activation(fresh):
    box = fresh
    box.systemctl("start", "chatd.socket")
    sock = box.show("chatd.socket", "ActiveState", "SubState", "Listen")
    assert sock["ActiveState"] == "active" and sock["SubState"] == "listening", sock
    assert f":{PORT} (Stream)" in sock["Listen"], sock
    assert box.show("chatd.service", "ActiveState")["ActiveState"] == "inactive"
    ss = box.run("ss", "-Hltn", f"sport = :{PORT}", namespaces="-n", check=0).stdout.decode()
    assert f":{PORT}" in ss, ss

    # the first connection starts chatd.service, waits in the backlog, and is served
    assert box.echo(b"first\n", timeout=20) == b"first\n"
    props = box.show("chatd.service", "ActiveState", "SubState", "StatusText", "MainPID")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert "systemd: chatd" in props["StatusText"], props
    status = box.chatd("status").stdout.decode()
    assert f"pid {props['MainPID']}" in status and "systemd: chatd" in status, status
    journal = box.journal()
    assert "socket activation" in journal, journal[-3000:]
    assert box.echo(b"second\n") == b"second\n"


def test_watchdog(fresh):
    box = fresh
    try:
        box.watchdog_dropin.write_text(WATCHDOG_DROPIN)   # same inode: bound read-only inside
        box.systemctl("daemon-reload")
        box.systemctl("restart", "chatd")
        props = box.show("chatd", "WatchdogUSec", "MainPID")
        assert props["WatchdogUSec"] == "2s", props
        pid = int(props["MainPID"])
        time.sleep(2.5)   # WATCHDOG=1 every second keeps it alive past one period
        assert box.show("chatd", "ActiveState")["ActiveState"] == "active"
        assert box.main_pid() == pid

        box.systemctl("kill", "--kill-who=main", "-s", "SIGSTOP", "chatd")
        stopped = time.monotonic()
        seen = ""
        deadline = stopped + 10
        while time.monotonic() < deadline:
            seen = box.show("chatd", "Result")["Result"]
            if seen == "watchdog":   # for RestartSec=1 only: then Restart=on-failure resets it
                break
            time.sleep(0.05)
        assert seen == "watchdog", f"Result={seen!r} 10 s after SIGSTOP\n{box.journal()[-3000:]}"
        assert time.monotonic() - stopped < 10
        deadline = time.monotonic() + 10
        journal = ""
        while time.monotonic() < deadline:
            journal = box.journal()
            if "Watchdog timeout" in journal and "Failed with result 'watchdog'" in journal:
                break
            time.sleep(0.1)
        assert "Watchdog timeout (limit 2s)" in journal, journal[-3000:]
        assert "Failed with result 'watchdog'" in journal, journal[-3000:]
        # Restart=on-failure brings it back with a new pid
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            props = box.show("chatd", "ActiveState", "MainPID")
            if props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, pid):
                break
            time.sleep(0.1)
        assert props["ActiveState"] == "active" and int(props["MainPID"]) not in (0, pid), props
        assert box.echo(b"back\n") == b"back\n"
    finally:
        box.systemctl("kill", "-s", "SIGCONT", "chatd", check=None)
        box.systemctl("stop", "chatd", check=None)
        box.watchdog_dropin.write_text("")
        box.systemctl("daemon-reload", check=None)


def test_hardening(fresh):
    box = fresh
    box.systemctl("start", "chatd")
    pid = box.main_pid()
    st = box.proc_status(pid)
    uids, gids = st["Uid"].split(), st["Gid"].split()
    assert len(uids) == 4 and all(u != "0" for u in uids) and len(set(uids)) == 1, st["Uid"]
    assert len(gids) == 4 and all(g != "0" for g in gids), st["Gid"]
    assert st["NoNewPrivs"] == "1", st
    assert st["Seccomp"] == "2", st
    assert st["CapBnd"] == "0000000000000000", st
    assert st["CapEff"] == "0000000000000000", st
    assert st["CapPrm"] == "0000000000000000", st
    user = box.run("ps", "-o", "user=", "-p", str(pid), check=0).stdout.decode().strip()
    assert user and user != "root", user
    assert box.echo(b"hardened\n") == b"hardened\n"


# -------------------------------------------------------------------- live upgrade

VERSION_A, VERSION_B, VERSION_BROKEN = "41.0.0", "42.0.0", "43.0.0"


@pytest.fixture(scope="module")
def installed(box):
    """Versions A and B of chatd, and one that fails at import, side by side under /srv/chatd-installs."""
    for name, version, change in (("a", VERSION_A, None), ("b", VERSION_B, None),
                                  ("broken", VERSION_BROKEN, IMPORT_FAILS)):
        box.installs.make(name, version, change)
    return box.installs


@pytest.fixture
def upgradable(fresh, installed):
    """chatd.service runs whatever /srv/chatd-installs/current holds (A to begin with), with
    WatchdogSec=2: a process that stopped pinging during or after an upgrade is killed in the test."""
    box = fresh
    installed.use("a")
    box.upgrade_dropin.write_text(UPGRADE_DROPIN)
    box.watchdog_dropin.write_text(WATCHDOG_DROPIN)
    try:
        box.systemctl("daemon-reload")
        yield box
    finally:
        box.systemctl("stop", "chatd", check=None)
        box.upgrade_dropin.write_text("")
        box.watchdog_dropin.write_text("")
        box.systemctl("daemon-reload", check=None)


def _status(box: Container) -> dict:
    return json.loads(box.chatd("status", "--json").stdout)


def _gone_inside(box: Container, pid: int) -> bool:
    deadline = time.monotonic() + 10
    while box.alive_inside(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not box.alive_inside(pid)


def _upgrade(box: Container, old: str, new: str, old_pid: int) -> tuple[int, float]:
    """`chatd upgrade` as root inside; the unit must have taken the new main pid, with no
    restart, no reload left hanging and the watchdog fed by the new process. Its pid, and the
    seconds the upgrade took as it says."""
    proc = box.chatd("upgrade", "--timeout", "20", timeout=60)
    said = proc.stdout.decode()
    found = re.search(rf"chatd upgraded from {re.escape(old)} \(pid {old_pid}\) to {re.escape(new)} "
                      rf"\(pid (\d+)\) in ([0-9.]+) s", said)
    assert found, said
    pid = int(found.group(1))
    assert pid != old_pid and _gone_inside(box, old_pid), f"old pid {old_pid} still there"
    props = box.show("chatd", "ActiveState", "SubState", "MainPID", "ExecMainPID", "NRestarts", "Result",
                     "WatchdogTimestampMonotonic")
    assert (props["ActiveState"], props["SubState"], props["Result"]) == ("active", "running", "success"), props
    assert props["MainPID"] == props["ExecMainPID"] == str(pid), props
    assert props["NRestarts"] == "0", props
    report = _status(box)
    assert report["pid"] == pid and report["version"] == new, report
    assert report["last_upgrade"]["from"] == old and report["last_upgrade"]["from_pid"] == old_pid, report
    assert int(box.run("cat", "/run/chatd/chatd.pid", check=0).stdout) == pid
    status = box.systemctl("status", "--full", "chatd").stdout.decode()
    assert "Active: active (running)" in status and f"Main PID: {pid}" in status, status
    # the new process logs to the journal, as the unit's process (its stderr is the old one's)
    said_there = rf"python3\[{pid}\]: upgraded from chatd {re.escape(old)} \(pid {old_pid}\)"
    deadline = time.monotonic() + 5
    while not re.search(said_there, journal := box.journal()):
        assert time.monotonic() < deadline, f"no {said_there!r} in the journal:\n{journal[-3000:]}"
        time.sleep(0.1)
    # NotifyAccess=main: only the new main pid's WATCHDOG=1 moves this on, every second
    fed = props["WatchdogTimestampMonotonic"]
    deadline = time.monotonic() + 5
    while box.show("chatd", "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"] == fed:
        assert time.monotonic() < deadline, f"no WATCHDOG=1 from the new main pid {pid} within 5 s"
        time.sleep(0.1)
    return pid, float(found.group(2))


def _stop_gracefully(box: Container, pid: int, earlier: int) -> float:
    """`systemctl stop` after an upgrade: the unit inactive, not failed, no restart, and the
    main pid `pid` stopped by its graceful stop, not SIGKILLed (journal lines past `earlier`).
    The seconds it took."""
    began = time.monotonic()
    box.systemctl("stop", "chatd")
    took = time.monotonic() - began
    props = box.show("chatd", "ActiveState", "Result", "MainPID", "NRestarts")
    assert props == {"ActiveState": "inactive", "Result": "success", "MainPID": "0", "NRestarts": "0"}, props
    assert _gone_inside(box, pid)
    journal = box.journal()[earlier:]
    assert f"python3[{pid}]: stopped" in journal, journal[-3000:]
    for bad in ("Killing process", "remains running", "Failed", "Traceback"):
        assert bad not in journal, journal[-3000:]
    return took


def _echoes(clients: list[LineClient], text: str) -> None:
    for i, client in enumerate(clients):
        line = f"{text} {i}\n".encode()
        client.send(line)
        assert client.recv_line() == line


def test_upgrade_keeps_the_unit_and_its_clients(upgradable):
    """`chatd upgrade` is the unit's upgrade path: A -> B -> A with clients connected, the unit
    active throughout with no restart, then `systemctl stop` stops the last main pid cleanly."""
    box = upgradable
    earlier = len(box.journal())   # the module's earlier tests' lines
    box.systemctl("start", "chatd")
    first = box.main_pid()
    assert _status(box)["version"] == VERSION_A
    clients = box.clients(5)
    _echoes(clients, "before")

    box.installs.use("b")
    second, took_b = _upgrade(box, VERSION_A, VERSION_B, first)
    _echoes(clients, "after the upgrade to B")
    assert box.echo(b"newcomer\n") == b"newcomer\n"

    box.installs.use("a")
    third, took_a = _upgrade(box, VERSION_B, VERSION_A, second)
    _echoes(clients, "back on A")

    journal = box.journal()[earlier:]
    for old, new, pid in ((VERSION_A, VERSION_B, second), (VERSION_B, VERSION_A, third)):
        assert re.search(rf"upgrade: handed over to chatd {re.escape(new)} \(pid {pid}\)", journal), journal[-3000:]
    for bad in ("Traceback", "does not belong", "Failed", "failed", "Watchdog timeout", "Scheduled restart"):
        assert bad not in journal, journal[-3000:]

    stop_s = _stop_gracefully(box, third, earlier)
    for client in clients:
        assert client.recv_until_eof() == b""
        client.close()
    figures("upgrade under systemd", clients=len(clients), a_to_b_s=took_b, b_to_a_s=took_a,
            stop_after_upgrade_s=f"{stop_s:.2f}")


@pytest.mark.slow
def test_upgrade_keeps_a_chat_room(upgradable):
    """Nicks and the room survive the upgrade under systemd."""
    box = upgradable
    earlier = len(box.journal())
    box.write_config(text=CONFIG.format(port=PORT, max_line=4096).replace('"echo"', '"chat"'))
    box.systemctl("start", "chatd")
    members = []
    for nick in ("alice", "bob"):
        member, = box.clients(1)
        while not (line := member.recv_line()).startswith(b"*** #lobby:"):
            pass
        assert line == (b"*** #lobby: alice\r\n" if members else b"*** #lobby: nobody else here\r\n")
        member.send(f"/nick {nick}\n".encode())
        for seen in [*members, member]:
            while not (line := seen.recv_line()).endswith(f" is now known as {nick}\r\n".encode()):
                assert line.endswith(b" joined #lobby\r\n"), line
        members.append(member)
    alice, bob = members

    box.installs.use("b")
    pid, _ = _upgrade(box, VERSION_A, VERSION_B, box.main_pid())
    alice.send(b"still here, bob?\n")
    assert bob.recv_line() == b"<alice> still here, bob?\r\n"
    bob.send(b"/who\n")
    assert bob.recv_line() == b"*** #lobby: alice, bob\r\n"
    _stop_gracefully(box, pid, earlier)
    for member in members:   # told, as a graceful stop tells a chat (SIGKILL would not)
        assert member.recv_until_eof() == b"*** server shutting down\r\n"
        member.close()


def test_failed_upgrade_keeps_the_old_main_pid(upgradable):
    """A version that fails at import: `chatd upgrade` exits 1 with its reason, the unit keeps
    its main pid, active, no restart; the next good version then upgrades."""
    box = upgradable
    earlier = len(box.journal())
    box.systemctl("start", "chatd")
    pid = box.main_pid()
    clients = box.clients(3)

    box.installs.use("broken")
    proc = box.chatd("upgrade", "--timeout", "20", check=1, timeout=60)
    said = proc.stderr.decode()
    assert f"chatd {VERSION_A} (pid {pid}) still serving" in said and "chatd_no_such_module" in said, said
    assert "Traceback" not in said, said
    props = box.show("chatd", "ActiveState", "SubState", "MainPID", "NRestarts", "Result")
    assert props == {"ActiveState": "active", "SubState": "running", "MainPID": str(pid), "NRestarts": "0",
                     "Result": "success"}, props
    assert "Active: active (running)" in box.systemctl("status", "--full", "chatd").stdout.decode()
    report = _status(box)
    assert report["pid"] == pid and report["version"] == VERSION_A, report
    assert "chatd_no_such_module" in report["last_upgrade"]["failed"], report
    _echoes(clients, "after the failed upgrade")

    box.installs.use("b")
    new, _ = _upgrade(box, VERSION_A, VERSION_B, pid)
    _echoes(clients, "after the good one")
    assert "Traceback" not in box.journal()[earlier:]   # the broken version's is in the answer only
    _stop_gracefully(box, new, earlier)
    for client in clients:
        client.close()


@pytest.mark.slow
def test_upgraded_main_pid_is_supervised(upgradable):
    """At the commit the new main pid is the old one's child, and systemd says "Supervising
    process N which is not our child"; the old one exits at once, the new one is reparented to
    systemd, and its death is noticed: Restart=on-failure brings chatd back, on the socket
    chatd.socket still holds."""
    box = upgradable
    box.systemctl("start", "chatd.socket")
    assert box.echo(b"first\n", timeout=20) == b"first\n"
    box.installs.use("b")
    pid, _ = _upgrade(box, VERSION_A, VERSION_B, box.main_pid())
    assert "(systemd: chatd)" in _status(box)["address"]
    assert box.echo(b"after\n") == b"after\n"
    assert box.proc_status(pid)["PPid"] == "1"

    box.systemctl("kill", "--kill-who=main", "-s", "SIGKILL", "chatd")
    deadline = time.monotonic() + 15
    while (props := box.show("chatd", "ActiveState", "MainPID", "NRestarts"))["NRestarts"] != "1" \
            or props["ActiveState"] != "active" or props["MainPID"] in ("0", str(pid)):
        assert time.monotonic() < deadline, f"not restarted within 15 s: {props}\n{box.journal()[-3000:]}"
        time.sleep(0.1)
    assert "Main process exited, code=killed, status=9/KILL" in box.journal()
    assert _status(box)["version"] == VERSION_B   # what `current` holds now
    assert box.echo(b"back\n") == b"back\n"
