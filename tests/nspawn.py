"""A real systemd 252 booted in `systemd-nspawn`, for tests/process/test_systemd_nspawn.py (the
shipped units) and tests/package/test_deb.py (the Debian package).

`booted` boots the host's own root, never a copy of it: `--volatile=yes` (a fresh tmpfs root,
the host's /usr read-only) or, with `overlay`, the whole host root under an overlayfs whose
upper layer is a tmpfs that takes every write, so that dpkg can install into it (nspawn's own
`--volatile=overlay` refuses `-D /`); that overlay is mounted in a private mount namespace
(`unshare`), so it goes with nspawn. In a private network namespace, inside
cgroups it creates before exec and removes after nspawn has exited. systemctl, journalctl and
the TCP clients run through `nsenter` into the container's init; chatd's port is 7777 on the
container's own loopback.

Safety: never a systemd manager outside the container, never `--ephemeral -D /`, one container
at a time (an flock on this file, for every module that boots one), TERM/30 s/TERM/10 s/KILL
teardown by pid, cgroups removed deepest first, nothing killed by name.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from conftest import require_real
from support import LineClient

PORT = 7777
CGROUP_ROOTS = ("/sys/fs/cgroup/systemd", "/sys/fs/cgroup/unified")
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8", "SYSTEMD_PAGER": "",
       "SYSTEMD_COLORS": "0", "HOME": "/root"}
# Units that fail or take long in a container booted from the host's root: masked.
MASKED = ("systemd-firstboot.service", "rsyslog.service")

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
        self.boot_seconds = 0.0
        self.boot_state = ""
        self.failed_units = ""

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

    def proc_status(self, pid: int) -> dict[str, str]:
        """/proc/PID/status as the container sees it (PID is a pid of the container)."""
        text = self.run("cat", f"/proc/{pid}/status", check=0).stdout.decode()
        return {k: v.strip() for k, _, v in (line.partition(":") for line in text.splitlines())}

    def alive_inside(self, pid: int) -> bool:
        proc = self.run("cat", f"/proc/{pid}/stat")
        if proc.returncode != 0:
            return False
        return proc.stdout.rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")


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
def _one_container_at_a_time() -> Iterator[None]:
    """An flock on this very file: concurrent runs boot one container at a time."""
    fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail("another run held its container for 300 s")
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def require_nspawn() -> None:
    """Skip (fail with CHATD_REQUIRE_REAL=1) without root, nspawn, nsenter or a cgroup tree."""
    if os.geteuid() != 0:
        require_real("root (for systemd-nspawn)")
    for tool in ("systemd-nspawn", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            require_real(tool)
    if not any(Path(r, "cgroup.procs").exists() for r in CGROUP_ROOTS):
        require_real("a name=systemd or unified cgroup hierarchy")


BoxT = TypeVar("BoxT", bound=Container)

# Run by `unshare --mount --propagation private`: the host root under a tmpfs-backed overlay at
# $1/root, then nspawn ("$@" after $1) on it. The tmpfs keeps the upper layer off the root file
# system (an upper layer inside the lower one is refused), and both mounts end with nspawn.
OVERLAY = """\
set -e
mount -t tmpfs -o mode=0755 chatd-test "$1/overlay"
mkdir "$1/overlay/upper" "$1/overlay/work"
mount -t overlay chatd-test -o "lowerdir=/,upperdir=$1/overlay/upper,workdir=$1/overlay/work" "$1/root"
shift
exec "$@"
"""


@contextlib.contextmanager
def booted(make: Callable[[subprocess.Popen, int, Path], BoxT], binds: Callable[[Path], dict[str, str]],
           overlay: bool = False, masked: tuple[str, ...] = MASKED) -> Iterator[BoxT]:
    """A container booted from the host's root (`--volatile=yes`, or its writable `overlay`), `binds(workdir)`
    bound read-only (host path -> path inside; workdir is a fresh world-readable temporary
    directory the caller fills), and the `masked` units masked: `make(nspawn, init, workdir)`,
    once its systemd is up, and everything undone afterwards."""
    require_nspawn()
    started = time.monotonic()
    ident = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="chatd-nspawn-test-"))
    workdir.chmod(0o755)   # DynamicUser: what the daemon reads must be world-readable
    console = workdir / "console.log"
    cgroups = [Path(root) / f"chatd-test-{ident}" for root in CGROUP_ROOTS if Path(root, "cgroup.procs").exists()]
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

            argv = ["systemd-nspawn", "-b", "--register=no", "--keep-unit", "--private-network",
                    "-M", f"chatd-{ident}", "--console=pipe"]
            if overlay:
                (workdir / "overlay").mkdir()
                (workdir / "root").mkdir()
                argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", OVERLAY, "sh", str(workdir),
                        *argv, "-D", str(workdir / "root")]
            else:
                argv += ["-D", "/", "--volatile=yes"]
            argv += [f"--bind-ro={src}:{dst}" for src, dst in binds(workdir).items()]
            argv += [f"--bind-ro=/dev/null:/etc/systemd/system/{unit}" for unit in masked]
            with open(console, "wb") as out:
                nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          preexec_fn=enter_own_cgroups, start_new_session=True, cwd="/")
            init = _find_init(nspawn, console)
            box = make(nspawn, init, workdir)
            box.boot_state = _wait_running(box, console)
            box.boot_seconds = time.monotonic() - started
            box.failed_units = box.systemctl("list-units", "--failed", "--plain", "--no-legend",
                                             check=None).stdout.decode()
            yield box
        finally:
            if nspawn is not None:
                _stop_nspawn(nspawn, init)
            leftovers = []
            for cg in cgroups:
                leftovers += _remove_cgroup(cg)
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"\nnspawn: {time.monotonic() - started:.2f} s in all"
                  + (f", boot {box.boot_seconds:.2f} s ({box.boot_state})" if box and box.boot_seconds else ""))
            assert not leftovers, f"cgroups left behind: {leftovers}"
