"""chatd under a real systemd 252, booted in `systemd-nspawn` (README "Running under systemd").

One container for the whole module :
`systemd-nspawn -b -D / --volatile=yes` boots the host's own /usr on a fresh tmpfs root, in a
private network namespace, inside cgroups this module creates before exec and removes after
nspawn has exited. The SHIPPED unit files are bound read-only to /etc/systemd/system; one
drop-in adjusts only the paths (Debian's /usr/bin/python3 with PYTHONPATH=/srv/chatd, the
read-only checkout), and a second, empty at first, takes WatchdogSec=2 for the watchdog test.
The config lives in a host directory bound read-only to /etc/chatd, so the test rewrites it
between reloads. For the live upgrade, versions of chatd are installed side by side
(tests/installs.py) in a host directory bound read-only to /srv/chatd-installs, and a third
drop-in points PYTHONPATH at its `current` link, which the test flips between them. systemctl, journalctl and the TCP clients run through `nsenter` into the
container's init; the daemon's port is 7777 on the container's own loopback.

Safety: never a systemd manager outside the container, never `--ephemeral -D /`, one container
at a time (an flock on this file), TERM/30 s/TERM/10 s/KILL teardown by pid, cgroups removed
deepest first, nothing killed by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import require_real
from installs import IMPORT_FAILS, Installs
from support import LineClient, figures

REPO = Path(__file__).resolve().parents[2]
PORT = 7777
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_PAGER": "",
       "SYSTEMD_COLORS": "0", "HOME": "/root"}

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

# An echo client for the container's loopback: sends argv[2] (hex), reads until argv[3]
# bytes came back (or EOF, or the deadline), prints what came back in hex.
CLIENT = r"""
import socket, sys, time
port, payload, want, timeout = int(sys.argv[1]), bytes.fromhex(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
deadline = time.monotonic() + timeout
s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
s.sendall(payload)
buf = b""
while len(buf) < want:
    left = deadline - time.monotonic()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        chunk = s.recv(65536)
    except socket.timeout:
        break
    if not chunk:
        break
    buf += chunk
s.close()
sys.stdout.write(buf.hex())
"""

# Connects argv[2] clients to port argv[1] on the container's loopback and hands their sockets
# to the test through the Unix socket on descriptor argv[3], so they outlive this process.
CONNECT = r"""
import socket, sys
port, count, fd = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
clients = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
socket.send_fds(socket.socket(fileno=fd), [b"clients"], [c.fileno() for c in clients])
"""


def _status_fields(pid: int) -> dict[str, str]:
    out = {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (by PPid)."""
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _status_fields(int(entry)).get("PPid") == str(pid):
            kids.append(int(entry))
    return kids


def _remove_cgroup(path: Path) -> list[str]:
    """rmdir a cgroup subtree, deepest first; a few retries while its last processes vanish."""
    problems: list[str] = []
    deadline = time.monotonic() + 10
    while path.exists():
        problems = []
        for dirpath, _dirs, _files in os.walk(path, topdown=False):
            try:
                os.rmdir(dirpath)
            except FileNotFoundError:
                pass
            except OSError as e:
                problems.append(f"{dirpath}: {e.strerror}")
        if not path.exists() or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    return problems if path.exists() else []


class Container:
    """A booted container: its nspawn process, its init's host pid, and the host-side files."""

    def __init__(self, nspawn: subprocess.Popen, init: int, workdir: Path) -> None:
        self.nspawn = nspawn
        self.init = init
        self.workdir = workdir
        self.config = workdir / "etc-chatd" / "chatd.conf"
        self.watchdog_dropin = workdir / "watchdog.conf"
        self.upgrade_dropin = workdir / "upgrade.conf"
        self.installs = Installs(workdir / "installs")

    # ---------------------------------------------------------------- commands inside

    def run(self, *argv: str, namespaces: str = "-a", timeout: float = 30.0,
            check: int | None = None) -> subprocess.CompletedProcess:
        assert self.nspawn.poll() is None, f"nspawn exited ({self.nspawn.returncode})"
        proc = subprocess.run(["nsenter", "-t", str(self.init), namespaces, *argv], env=ENV,
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, cwd="/")
        if check is not None:
            assert proc.returncode == check, (
                f"{' '.join(argv)} -> {proc.returncode}, wanted {check}\n"
                f"stdout: {proc.stdout.decode(errors='replace')}\n"
                f"stderr: {proc.stderr.decode(errors='replace')}\n"
                f"journal:\n{self.journal()[-3000:]}")
        return proc

    def systemctl(self, *args: str, check: int | None = 0, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, "-p", ",".join(props)).stdout.decode()
        values = dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)
        return {p: values.get(p, "") for p in props}

    def main_pid(self, unit: str = "chatd") -> int:
        return int(self.show(unit, "MainPID")["MainPID"])

    def journal(self, unit: str = "chatd.service") -> str:
        if self.nspawn.poll() is not None:
            return "(container gone)"
        proc = subprocess.run(["nsenter", "-t", str(self.init), "-a", "journalctl", "--no-pager", "-q",
                               "-o", "short-monotonic", "-u", unit], env=ENV, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30, cwd="/")
        return proc.stdout.decode(errors="replace")

    def echo(self, payload: bytes, want: int | None = None, timeout: float = 10.0) -> bytes:
        """One connection to port 7777 on the container's loopback: send, read `want` bytes back."""
        want = len(payload) if want is None else want
        proc = self.run("/usr/bin/python3", "-I", "-c", CLIENT, str(PORT), payload.hex(), str(want),
                        str(timeout), namespaces="-n", timeout=timeout + 20)
        assert proc.returncode == 0, (f"client failed: {proc.stderr.decode(errors='replace')}\n"
                                      f"journal:\n{self.journal()[-3000:]}")
        return bytes.fromhex(proc.stdout.decode())

    def clients(self, count: int, timeout: float = 10.0) -> list[LineClient]:
        """`count` connections to port 7777 on the container's loopback, held by this process."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            proc = subprocess.Popen(["nsenter", "-t", str(self.init), "-n", "/usr/bin/python3", "-I", "-c",
                                     CONNECT, str(PORT), str(count), str(theirs.fileno())], env=ENV,
                                    stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/",
                                    pass_fds=(theirs.fileno(),))
            theirs.close()
            try:
                ours.settimeout(timeout + 20)
                _, fds, _, _ = socket.recv_fds(ours, 64, count)
            finally:
                _, err = proc.communicate(timeout=timeout + 20)
            assert len(fds) == count, f"{len(fds)} of {count} clients connected: {err.decode(errors='replace')}"
        return [LineClient.adopt(socket.socket(fileno=fd), timeout) for fd in fds]

    def chatd(self, *args: str, check: int | None = 0, timeout: float = 30.0) -> subprocess.CompletedProcess:
        """The checkout's chatd command inside, as root types it (whichever version the daemon runs)."""
        return self.run("/usr/bin/env", "PYTHONPATH=/srv/chatd", "/usr/bin/python3", "-m", "chatd", *args,
                        "-c", "/etc/chatd/chatd.conf", check=check, timeout=timeout)

    def proc_status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status as the container sees it (PID is a pid of the container)."""
        text = self.run("cat", f"/proc/{pid}/status", check=0).stdout.decode()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def alive_inside(self, pid: int) -> bool:
        proc = self.run("cat", f"/proc/{pid}/stat")
        if proc.returncode != 0:
            return False
        return proc.stdout.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")

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

def _nspawn_command(name: str, workdir: Path) -> list[str]:
    binds = {
        str(REPO): "/srv/chatd",
        str(REPO / "systemd" / "chatd.service"): "/etc/systemd/system/chatd.service",
        str(REPO / "systemd" / "chatd.socket"): "/etc/systemd/system/chatd.socket",
        str(workdir / "paths.conf"): "/etc/systemd/system/chatd.service.d/test.conf",
        str(workdir / "watchdog.conf"): "/etc/systemd/system/chatd.service.d/watchdog.conf",
        str(workdir / "upgrade.conf"): "/etc/systemd/system/chatd.service.d/upgrade.conf",
        str(workdir / "installs"): INSTALLS,
        str(workdir / "etc-chatd"): "/etc/chatd",
        "/dev/null": "/etc/systemd/system/systemd-firstboot.service",
    }
    argv = ["systemd-nspawn", "-b", "-D", "/", "--volatile=yes", "--register=no", "--keep-unit",
            "--private-network", "-M", name, "--console=pipe"]
    argv += [f"--bind-ro={src}:{dst}" for src, dst in binds.items()]
    argv += ["--bind-ro=/dev/null:/etc/systemd/system/rsyslog.service"]
    return argv


def _find_init(nspawn: subprocess.Popen, console: Path) -> int:
    """The container's init: the child of nspawn whose NSpid is `<hostpid> 1` (never "the first child")."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if nspawn.poll() is not None:
            pytest.fail(f"systemd-nspawn exited ({nspawn.returncode}) before its init appeared:\n"
                        f"{console.read_text(errors='replace')[-3000:]}")
        for child in _children(nspawn.pid):
            if _status_fields(child).get("NSpid", "").split() == [str(child), "1"]:
                return child
        time.sleep(0.02)
    pytest.fail(f"no container init under nspawn (pid {nspawn.pid}) within 30 s")


def _wait_running(box: Container, console: Path) -> str:
    deadline = time.monotonic() + 60
    state = ""
    while time.monotonic() < deadline:
        if box.nspawn.poll() is not None:
            pytest.fail(f"systemd-nspawn exited ({box.nspawn.returncode}) during boot:\n"
                        f"{console.read_text(errors='replace')[-3000:]}")
        state = box.run("systemctl", "is-system-running", timeout=10).stdout.decode().strip()
        if state in ("running", "degraded"):
            return state
        time.sleep(0.1)
    pytest.fail(f"the container's systemd did not come up within 60 s (last state {state!r})")


def _stop_nspawn(nspawn: subprocess.Popen, init: int | None) -> None:
    """SIGTERM (orderly halt), 30 s; SIGTERM again (immediate), 10 s; SIGKILL and wait."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 30)):
        if nspawn.poll() is not None:
            break
        nspawn.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            nspawn.wait(timeout=wait)
    # A SIGKILLed nspawn can leave its container's init behind: kill that one by its pid,
    # once it is proven to be our container's init (NSpid "<pid> 1").
    if init is not None and _status_fields(init).get("NSpid", "").split() == [str(init), "1"]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{init}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


@contextlib.contextmanager
def _one_container_at_a_time():
    """An flock on this very file: concurrent runs of this module boot one container at a time."""
    fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another run of this module held its container for 300 s")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def box():
    if os.geteuid() != 0:
        require_real("root (for systemd-nspawn)")
    for tool in ("systemd-nspawn", "nsenter"):
        if shutil.which(tool) is None:
            require_real(tool)
    roots = [Path(r) for r in CGROUP_ROOTS if Path(r, "cgroup.procs").exists()]
    if not roots:
        require_real("a name=systemd or unified cgroup hierarchy")

    started = time.monotonic()
    ident = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="chatd-nspawn-test-"))
    workdir.chmod(0o755)   # DynamicUser: the config must be world-readable
    (workdir / "etc-chatd").mkdir(mode=0o755)
    (workdir / "paths.conf").write_text(PATHS_DROPIN)
    (workdir / "installs").mkdir(mode=0o755)
    for f in ("watchdog.conf", "upgrade.conf"):
        (workdir / f).write_text("")
    for f in ("paths.conf", "watchdog.conf", "upgrade.conf"):
        (workdir / f).chmod(0o644)
    console = workdir / "console.log"
    cgroups = [root / f"chatd-test-{ident}" for root in roots]
    nspawn = None
    init = None
    box = None
    with _one_container_at_a_time():
        try:
            for cg in cgroups:
                cg.mkdir()

            def enter_own_cgroups() -> None:
                for cg in cgroups:
                    with open(cg / "cgroup.procs", "w") as f:
                        f.write("0")

            box_config = workdir / "etc-chatd" / "chatd.conf"
            box_config.write_text(CONFIG.format(port=PORT, max_line=4096))
            box_config.chmod(0o644)
            with open(console, "wb") as out:
                nspawn = subprocess.Popen(_nspawn_command(f"chatd-{ident}", workdir), stdin=subprocess.DEVNULL,
                                          stdout=out, stderr=subprocess.STDOUT, preexec_fn=enter_own_cgroups,
                                          start_new_session=True, cwd="/")
            init = _find_init(nspawn, console)
            box = Container(nspawn, init, workdir)
            state = _wait_running(box, console)
            box.boot_seconds = time.monotonic() - started
            box.boot_state = state
            box.failed_units = box.systemctl("list-units", "--failed", "--plain", "--no-legend",
                                             check=None).stdout.decode()
            # preset-all on the empty /etc enables both units ([Install] sections): start from a
            # known state, with each test starting what it needs.
            box.boot_active = {u: box.show(u, "ActiveState")["ActiveState"] for u in ("chatd.service", "chatd.socket")}
            box.reset()
            yield box
        finally:
            if nspawn is not None:
                _stop_nspawn(nspawn, init)
            leftovers = []
            for cg in cgroups:
                leftovers += _remove_cgroup(cg)
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"\nnspawn module: {time.monotonic() - started:.2f} s in all"
                  + (f", boot {box.boot_seconds:.2f} s ({box.boot_state})" if box and hasattr(box, "boot_seconds") else ""))
            assert not leftovers, f"cgroups left behind: {leftovers}"


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
