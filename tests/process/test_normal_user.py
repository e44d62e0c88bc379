"""chatd as a normal user (README "Commands" and "Files"), run for real as `nobody` (uid/gid 65534).

Every command runs under `setpriv --reuid=65534 --regid=65534 --clear-groups` with Debian's
/usr/bin/python3 and PYTHONPATH pointing at this checkout, in a clean environment (HOME=/nonexistent,
PATH=/usr/bin:/bin, XDG_RUNTIME_DIR only when a test sets it). Directories handed to nobody are
the test's own mkdtemp directories under /tmp, removed afterwards. Every daemon is stopped by its
pid (after checking that its command line or environment names the test's unique directory), and
no captured output or log may contain a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import require_real
from support import (LineClient, alive, chatd_command, flock_held, free_port, kill_and_wait, listening,
                     proc_status, wait_for)

NOBODY = 65534
REPO = Path(__file__).resolve().parents[2]
SYSTEM_PYTHON = "/usr/bin/python3"
SETPRIV = "/usr/bin/setpriv"
AS_NOBODY = [SETPRIV, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
CLEAN_ENV = {"HOME": "/nonexistent", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
             "PYTHONDONTWRITEBYTECODE": "1", "LC_ALL": "C.UTF-8"}


def _proc_text(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def names(pid: int, marker: str) -> bool:
    """Does process `pid` carry `marker` in its command line or environment?"""
    return marker in _proc_text(pid, "cmdline") or marker in _proc_text(pid, "environ")


def processes_with(marker: str) -> list[int]:
    """Live processes (other than this one) whose command line or environment names `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            pid = int(entry.name)
            if names(pid, marker) and alive(pid):
                found.append(pid)
    return found


class AsNobody:
    """Runs chatd as nobody; owns the test's temporary directories and daemons."""

    def __init__(self) -> None:
        self.dirs: list[str] = []
        self.daemons: list[tuple[int, str]] = []     # (pid, marker)
        self.outputs: list[tuple[list[str], bytes, bytes]] = []
        self.logs: list[Path] = []
        self.own_files: list[Path] = []              # files to remove in shared directories
        self.own_dirs: list[Path] = []               # shared directories to rmdir if empty

    def mkdtemp(self, owner: int = NOBODY, mode: int = 0o700) -> Path:
        path = tempfile.mkdtemp(prefix="chatd-nobody-test-", dir="/tmp")
        self.dirs.append(path)
        os.chown(path, owner, owner)
        os.chmod(path, mode)
        return Path(path)

    def run(self, *args: str, xdg: Path | None = None, check: int | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = dict(CLEAN_ENV)
        if xdg is not None:
            env["XDG_RUNTIME_DIR"] = str(xdg)
        argv = AS_NOBODY + [SYSTEM_PYTHON, "-m", "chatd", *args]
        return self._run(argv, env, check, timeout)

    def run_as_root(self, *args: str, check: int | None = None,
                    timeout: float = 60.0) -> subprocess.CompletedProcess:
        env = {"HOME": "/root", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
        return self._run(chatd_command() + list(args), env, check, timeout)

    def _run(self, argv, env, check, timeout) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=env, cwd="/", stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=timeout)
        self.outputs.append((argv, proc.stdout, proc.stderr))
        if check is not None:
            assert proc.returncode == check, (
                f"{' '.join(argv)} -> {proc.returncode}, wanted {check}\n"
                f"stdout: {proc.stdout.decode(errors='replace')}\n"
                f"stderr: {proc.stderr.decode(errors='replace')}")
        return proc

    def track(self, pidfile: Path, marker: str) -> int:
        """The daemon's pid from its pid file, remembered for cleanup."""
        text = pidfile.read_text()
        assert re.fullmatch(r"[0-9]+\n", text), f"pid file {pidfile} holds {text!r}"
        pid = int(text)
        self.daemons.append((pid, marker))
        assert names(pid, marker), f"pid {pid} from {pidfile} does not name {marker}"
        return pid

    def cleanup(self) -> None:
        markers = {m for _, m in self.daemons} | set(self.dirs)
        pids = {p for p, _ in self.daemons}
        for marker in markers:
            pids |= set(processes_with(marker))
        for pid in pids:
            if alive(pid) and any(names(pid, m) for m in markers):
                kill_and_wait(pid)
        for path in self.own_files:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        for path in self.own_dirs:
            with contextlib.suppress(OSError):
                path.rmdir()          # only when empty: another instance may use it
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def tracebacks(self) -> list[str]:
        found = []
        for argv, out, err in self.outputs:
            if b"Traceback" in out or b"Traceback" in err:
                found.append(f"{' '.join(argv)}:\n{out.decode(errors='replace')}"
                             f"{err.decode(errors='replace')}")
        for log in self.logs:
            with contextlib.suppress(OSError):
                text = log.read_text(errors="replace")
                if "Traceback" in text:
                    found.append(f"log {log}:\n{text[-3000:]}")
        return found


@pytest.fixture(scope="module")
def nobody_can_run_chatd() -> None:
    if os.geteuid() != 0:
        pytest.skip("becoming nobody needs root (CI runs as root)")
    if not os.access(SETPRIV, os.X_OK):
        require_real("setpriv (util-linux)")
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        require_real(SYSTEM_PYTHON)
    # The checkout must be readable by nobody, or every test below would fail for that reason.
    probe = subprocess.run(AS_NOBODY + [SYSTEM_PYTHON, "-c",
                                        "import os, chatd, chatd.cli, chatd.control;"
                                        "print(os.getuid(), chatd.__file__)"],
                           env=CLEAN_ENV, cwd="/", capture_output=True, timeout=30)
    assert probe.returncode == 0, f"nobody cannot import chatd from {REPO}: {probe.stderr!r}"
    uid, path = probe.stdout.decode().split()
    assert uid == str(NOBODY) and Path(path).resolve().is_relative_to(REPO), probe.stdout


@pytest.fixture
def nobody(nobody_can_run_chatd) -> AsNobody:
    runner = AsNobody()
    try:
        yield runner
    finally:
        runner.cleanup()
    problems = runner.tracebacks()
    assert not problems, "tracebacks seen:\n" + "\n".join(problems)


# ------------------------------------------------------------------ helpers for assertions

def assert_echoes(port: int, line: bytes = b"hello from a normal user\n") -> None:
    with LineClient(port) as c:
        c.send(line)
        assert c.recv_line() == line


def assert_runs_as_nobody(pid: int) -> None:
    st = proc_status(pid)
    assert st["Uid"].split() == [str(NOBODY)] * 4, st["Uid"]
    assert st["Gid"].split() == [str(NOBODY)] * 4, st["Gid"]


def assert_private_dir(path: Path) -> None:
    st = os.lstat(path)
    assert stat.S_ISDIR(st.st_mode), f"{path} is not a directory"
    assert stat.S_IMODE(st.st_mode) == 0o700, f"{path} has mode {stat.S_IMODE(st.st_mode):04o}"
    assert st.st_uid == NOBODY, f"{path} belongs to uid {st.st_uid}"


def assert_stopped(pid: int, pidfile: Path) -> None:
    wait_for(lambda: not alive(pid), timeout=5, what=f"pid {pid} to exit")
    assert not pidfile.exists(), f"{pidfile} left behind: {pidfile.read_bytes()!r}"


def assert_nothing_left(marker: str, pidfile: Path) -> None:
    assert processes_with(marker) == [], f"processes left that name {marker}"
    if pidfile.exists():
        assert pidfile.read_bytes().strip() == b"", f"{pidfile} has content {pidfile.read_bytes()!r}"


def status_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stdout.decode(errors="replace").splitlines()
    return lines[0] if lines else ""


def write_config(directory: Path, name: str) -> Path:
    conf = directory / name
    conf.write_text("# chatd test config: every setting comes from the command line\n")
    os.chmod(conf, 0o644)
    return conf


# ------------------------------------------------------------------ the tests

def test_default_paths_under_xdg_runtime_dir(nobody):
    """1. as nobody, XDG_RUNTIME_DIR set, `chatd start` with no -c and no --pidfile.
    Result: exit 0; echo served; pid file in $XDG_RUNTIME_DIR/chatd/ (created 0700, ours); status 0;
    all uids 65534; log file X.log beside the pid file (no /dev/log); stop 0 removes the pid file."""
    xdg = nobody.mkdtemp()
    piddir = xdg / "chatd"
    pidfile = piddir / "chatd.pid"
    nobody.logs.append(piddir / "chatd.log")
    port = free_port()

    nobody.run("start", "-p", str(port), "--host", "127.0.0.1", xdg=xdg, check=0)
    pid = nobody.track(pidfile, marker=str(xdg))
    assert alive(pid)
    assert_private_dir(piddir)
    assert_echoes(port)
    assert_runs_as_nobody(pid)

    proc = nobody.run("status", xdg=xdg, check=0)
    assert status_line(proc) == f"chatd is running (pid {pid})", proc.stdout
    assert (piddir / "chatd.log").is_file(), os.listdir(piddir)
    if not os.path.exists("/dev/log"):
        assert str(piddir / "chatd.log") in proc.stdout.decode(), proc.stdout

    proc = nobody.run("stop", xdg=xdg, check=0)
    assert_stopped(pid, pidfile)
    assert not listening(port)


def test_config_stem_names_the_pid_file(nobody):
    """1. as nobody, `chatd start -c /tmp/.../chat.conf`. Result: the pid file is chat.pid in
    $XDG_RUNTIME_DIR/chatd, not chatd.pid; status and stop with the same -c find it."""
    xdg = nobody.mkdtemp()
    confdir = nobody.mkdtemp(owner=0, mode=0o755)
    conf = write_config(confdir, "chat.conf")
    piddir = xdg / "chatd"
    pidfile = piddir / "chat.pid"
    nobody.logs.append(piddir / "chat.log")
    port = free_port()

    nobody.run("start", "-c", str(conf), "-p", str(port), "--host", "127.0.0.1", xdg=xdg, check=0)
    pid = nobody.track(pidfile, marker=str(confdir))
    assert not (piddir / "chatd.pid").exists()
    assert_private_dir(piddir)
    assert_echoes(port)
    assert_runs_as_nobody(pid)
    assert (piddir / "chat.log").is_file(), os.listdir(piddir)

    proc = nobody.run("status", "-c", str(conf), xdg=xdg, check=0)
    assert status_line(proc) == f"chatd is running (pid {pid})", proc.stdout
    # Without -c it is another instance (chatd.pid), which is not running.
    proc = nobody.run("status", xdg=xdg, check=3)
    assert status_line(proc) == "chatd is not running", proc.stdout

    nobody.run("stop", "-c", str(conf), xdg=xdg, check=0)
    assert_stopped(pid, pidfile)


def test_default_directory_without_xdg_runtime_dir_is_tmp_chatd_uid(nobody):
    """1. as nobody, no XDG_RUNTIME_DIR, `chatd start -c /tmp/<unique>/u<random>.conf`.
    Result: pid file /tmp/chatd-65534/u<random>.pid, the directory 0700 and nobody's; stop 0.
    /tmp/chatd-65534 is shared: only this test's files are removed, the directory only if the
    test created it and it is empty."""
    base = Path(f"/tmp/chatd-{NOBODY}")
    try:
        st = os.lstat(base)
    except FileNotFoundError:
        existed = False
    else:
        existed = True
        if not (stat.S_ISDIR(st.st_mode) and st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700):
            pytest.skip(f"{base} exists but is not nobody's 0700 directory "
                        f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}); not touching it")
    stem = "u" + secrets.token_hex(8)
    confdir = nobody.mkdtemp(owner=0, mode=0o755)
    conf = write_config(confdir, f"{stem}.conf")
    pidfile = base / f"{stem}.pid"
    nobody.own_files += [base / f"{stem}.{ext}" for ext in ("pid", "lock", "state", "log")]
    if not existed:
        nobody.own_dirs.append(base)
    nobody.logs.append(base / f"{stem}.log")
    port = free_port()

    nobody.run("start", "-c", str(conf), "-p", str(port), "--host", "127.0.0.1", check=0)
    pid = nobody.track(pidfile, marker=str(confdir))
    assert_private_dir(base)
    assert_echoes(port)
    assert_runs_as_nobody(pid)
    assert (base / f"{stem}.log").is_file()

    proc = nobody.run("status", "-c", str(conf), check=0)
    assert status_line(proc) == f"chatd is running (pid {pid})", proc.stdout

    nobody.run("stop", "-c", str(conf), check=0)
    assert_stopped(pid, pidfile)


def test_privileged_port_exits_4(nobody):
    """1. as nobody, `chatd start -p 80`. Result: exit 4, a permission message, nothing left."""
    limit = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if limit <= 80:
        pytest.skip(f"ip_unprivileged_port_start is {limit}: port 80 is not privileged here")
    xdg = nobody.mkdtemp()
    pidfile = xdg / "chatd" / "chatd.pid"
    nobody.logs.append(xdg / "chatd" / "chatd.log")

    proc = nobody.run("start", "-p", "80", "--host", "127.0.0.1", xdg=xdg, check=4)
    assert re.search(rb"permission|privilege", proc.stderr, re.I), proc.stderr
    assert_nothing_left(str(xdg), pidfile)


@pytest.mark.parametrize("owner, mode, reason", [
    (0, 0o755, rb"belongs to uid 0"),
    (NOBODY, 0o777, rb"may be written by others"),
], ids=["root-owned", "world-writable"])
def test_foreign_or_open_pid_directory_is_refused(nobody, owner, mode, reason):
    """1. XDG_RUNTIME_DIR/chatd exists, owned by root (0755) or by nobody but 0777.
    2. as nobody, `chatd start`. Result: exit 4, the directory refused with the reason; nothing left."""
    xdg = nobody.mkdtemp()
    piddir = xdg / "chatd"
    piddir.mkdir()
    os.chown(piddir, owner, owner)
    os.chmod(piddir, mode)

    proc = nobody.run("start", "-p", str(free_port()), "--host", "127.0.0.1", xdg=xdg, check=4)
    assert b"refus" in proc.stderr and re.search(reason, proc.stderr), proc.stderr
    assert str(piddir).encode() in proc.stderr, proc.stderr
    assert os.listdir(piddir) == []
    st = os.lstat(piddir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (owner, mode)   # chatd did not "fix" it
    assert_nothing_left(str(xdg), piddir / "chatd.pid")


@pytest.mark.parametrize("user", ["root", "#0"])
def test_user_switch_as_normal_user_exits_4_before_detaching(nobody, user):
    """1. as nobody, `chatd start --user root` (or #0). Result: exit 4 "only root can switch ...",
    no daemon, no pid file with content, the port not served."""
    xdg = nobody.mkdtemp()
    port = free_port()
    proc = nobody.run("start", "-p", str(port), "--host", "127.0.0.1", "--user", user, xdg=xdg, check=4)
    assert b"only root can switch" in proc.stderr, proc.stderr
    assert_nothing_left(str(xdg), xdg / "chatd" / "chatd.pid")
    assert not listening(port)


@pytest.mark.parametrize("guard_owner", [0, NOBODY], ids=["guard-root", "guard-nobody"])
def test_stop_of_a_root_daemon_as_normal_user_exits_4(nobody, guard_owner):
    """1. as root, start chatd with --pidfile and --log in a world-traversable directory (with
    guard-nobody, its guard lock file is then given to nobody, so that the normal user's stop
    gets as far as signalling; root's own commands refuse a guard another user owns).
    2. as nobody, `chatd status` with that --pidfile: 0, it sees the daemon. 3. as nobody,
    `chatd stop` with that --pidfile.
    Result: exit 4; the root daemon keeps running and serving."""
    d = nobody.mkdtemp(owner=0, mode=0o755)
    pidfile = d / "root.pid"
    log = d / "root.log"
    nobody.logs.append(log)
    port = free_port()
    opts = ["-p", str(port), "--host", "127.0.0.1", "--pidfile", str(pidfile), "--log", str(log)]

    nobody.run_as_root("start", *opts, check=0)
    pid = nobody.track(pidfile, marker=str(d))
    if guard_owner != 0:
        os.chown(d / "root.lock", guard_owner, guard_owner)
    assert proc_status(pid)["Uid"].split() == ["0"] * 4

    proc = nobody.run("status", *opts, check=0)
    assert status_line(proc) == f"chatd is running (pid {pid})", proc.stdout

    proc = nobody.run("stop", *opts, check=4)
    wanted = rb"not allowed to signal" if guard_owner != 0 else rb"not allowed|permission|another user"
    assert re.search(wanted, proc.stderr, re.I), proc.stderr
    assert alive(pid)
    assert pidfile.read_text() == f"{pid}\n"
    assert_echoes(port)


def test_normal_user_cannot_block_a_root_daemons_control_commands(nobody):
    """1. as root, start chatd with --pidfile in a world-traversable directory.
    2. as nobody, open its guard lock file read-only (it is world-readable) and flock it, and hold it.
    3. as root, `chatd stop` with that --pidfile.
    Result: the stop succeeds promptly (exit 0): a normal user must not be able to lock the
    root instance's control commands out (for /run/chatd that would block every stop and restart
    of the system chatd)."""
    d = nobody.mkdtemp(owner=0, mode=0o755)
    pidfile = d / "root.pid"
    guard = d / "root.lock"
    nobody.logs.append(d / "root.log")
    opts = ["-p", str(free_port()), "--host", "127.0.0.1", "--pidfile", str(pidfile),
            "--log", str(d / "root.log")]
    nobody.run_as_root("start", *opts, check=0)
    pid = nobody.track(pidfile, marker=str(d))

    holder = subprocess.Popen(
        AS_NOBODY + [SYSTEM_PYTHON, "-c",
                     "import fcntl, os, sys, time\n"
                     "try:\n"
                     "    fd = os.open(sys.argv[1], os.O_RDONLY)\n"
                     "    fcntl.flock(fd, fcntl.LOCK_EX)\n"
                     "except OSError as e:\n"
                     "    print('refused', e.errno, flush=True)\n"
                     "    sys.exit(0)\n"
                     "print('holding', flush=True)\n"
                     "time.sleep(120)\n", str(guard)],
        env=CLEAN_ENV, cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        said = holder.stdout.readline()
        assert said.startswith((b"holding", b"refused")), (said, holder.stderr.read())
        started = time.monotonic()
        proc = nobody.run_as_root("stop", *opts, timeout=60)
        took = time.monotonic() - started
        assert proc.returncode == 0 and took < 10, (
            f"root's `chatd stop` -> {proc.returncode} after {took:.1f} s while nobody held a "
            f"read-only flock on the world-readable guard {guard} (mode "
            f"{stat.S_IMODE(os.stat(guard).st_mode):04o}): {proc.stderr!r}")
        assert_stopped(pid, pidfile)
    finally:
        kill_and_wait(holder.pid)
        holder.wait(timeout=5)
        holder.stdout.close()
        holder.stderr.close()


def test_status_as_normal_user_with_nothing_running(nobody):
    """1. as nobody, XDG_RUNTIME_DIR an empty directory, `chatd status`.
    Result: exit 3, "chatd is not running"; nothing created in XDG_RUNTIME_DIR.
    (status also looks, read-only, at /run/chatd, which this test does not touch.)"""
    xdg = nobody.mkdtemp()
    before = flock_held("/run/chatd/chatd.pid")
    proc = nobody.run("status", xdg=xdg)
    if before or flock_held("/run/chatd/chatd.pid"):
        pytest.skip("a system chatd runs in /run/chatd (another session): status would report it")
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr)
    assert status_line(proc) == "chatd is not running", proc.stdout
    assert os.listdir(xdg) == []
