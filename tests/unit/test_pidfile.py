"""The pid file and guard lock (README "Signals"), with real files, real flock and real processes.

Other lock holders are real child processes (python running a small script); each is stopped by
its pid in a `finally` (TERM, wait, KILL). Every wait has a deadline.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import stat
import subprocess
import sys
import time

import pytest

from chatd.errors import EXIT_FAILED, EXIT_PRIVILEGE, ChatdError, PrivilegeError, StartError
from chatd.pidfile import PID_MAX, AlreadyRunning, PidFile, clear_stale, guard, open_holder, parse_pid, probe
from support import flock_held, kill_and_wait

DEADLINE = 10.0

# argv: PATH CONTENT. Opens PATH, takes an exclusive flock, writes CONTENT ("SELF": its own pid
# and a newline; "-": writes nothing), prints "locked", then obeys commands on stdin:
# "unlink DELAY" (sleep, unlink PATH, close it: an exiting daemon), "release DELAY" (sleep, close).
HOLDER = r"""
import fcntl, os, sys, time
path, content = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
if content != "-":
    data = f"{os.getpid()}\n" if content == "SELF" else content
    os.ftruncate(fd, 0)
    os.pwrite(fd, data.encode(), 0)
print("locked", flush=True)
for line in sys.stdin:
    cmd, _, delay = line.partition(" ")
    time.sleep(float(delay or 0))
    if cmd == "unlink":
        os.unlink(path)
    os.close(fd)
    print("done", flush=True)
    break
time.sleep(120)
"""

# argv: PATH. Holds chatd's own guard() and prints "guarded"; "release DELAY" on stdin leaves it.
GUARD_HOLDER = r"""
import sys, time
from chatd.pidfile import guard
with guard(sys.argv[1], timeout=5):
    print("guarded", flush=True)
    line = sys.stdin.readline()
    time.sleep(float(line.split()[1]) if line.split()[1:] else 0)
print("done", flush=True)
time.sleep(120)
"""


def read_line(proc: subprocess.Popen, timeout: float = DEADLINE) -> str:
    """One line from the child's stdout, or fail after `timeout` seconds."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"child {proc.pid} said nothing within {timeout} s")
    line = proc.stdout.readline()
    if not line:
        raise AssertionError(f"child {proc.pid} exited early: {proc.stderr.read()!r}")
    return line.strip()


def stop(proc: subprocess.Popen) -> None:
    """TERM, wait, KILL, wait: only the pid this test started."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream:
            stream.close()


@contextlib.contextmanager
def child(script: str, *args: str, ready: str):
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc) == ready
        yield proc
    finally:
        stop(proc)


def holder(path, content: str = "SELF"):
    """A child process holding an exclusive flock on `path` (and having written `content`)."""
    return child(HOLDER, str(path), content, ready="locked")


def command(proc: subprocess.Popen, text: str) -> None:
    proc.stdin.write(text + "\n")
    proc.stdin.flush()


# ------------------------------------------------------------------ parse_pid

@pytest.mark.parametrize("content", [
    b"", b"\n", b"0", b"0\n", b"1", b"1\n", b"-1", b"-1234\n", b"+1234", b"abc", b"12abc", b"12 34",
    b"1234x\n", b"0x10", b"99999999999", b"9" * 100 + b"\n", b"4194305", str(PID_MAX + 1).encode(),
    b"1e3", b"12.0", b"\x00", b"\xff\xfe", "١٢٣٤".encode(),
])
def test_parse_pid_rejects_garbage(content):
    assert parse_pid(content) is None


@pytest.mark.parametrize("content,pid", [(b"1234\n", 1234), (b"1234", 1234), (b" 1234 \n", 1234),
                                         (b"2\n", 2), (str(PID_MAX).encode(), PID_MAX)])
def test_parse_pid_accepts_a_decimal_pid(content, pid):
    assert parse_pid(content) == pid


# ------------------------------------------------------------------ probe

def test_probe_missing_file_is_not_running(tmp_path):
    p = probe(str(tmp_path / "chatd.pid"))
    assert (p.exists, p.running, p.pid) == (False, False, None)


def test_probe_empty_file_is_not_running(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"")
    p = probe(str(path))
    assert (p.exists, p.running, p.pid, p.content) == (True, False, None, b"")


def test_probe_stale_file_is_not_running_and_reports_its_content(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"1234\n")
    p = probe(str(path))
    assert (p.exists, p.running, p.pid, p.content) == (True, False, 1234, b"1234\n")


def test_probe_stale_garbage_is_not_running_without_pid(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"-1\n")
    p = probe(str(path))
    assert (p.exists, p.running, p.pid) == (True, False, None)


def test_probe_changes_nothing(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"1234\n")
    before = os.stat(path)
    probe(str(path))
    after = os.stat(path)
    assert path.read_bytes() == b"1234\n"
    assert (before.st_ino, before.st_mode, before.st_mtime_ns) == (after.st_ino, after.st_mode, after.st_mtime_ns)
    assert not flock_held(path)
    assert not (tmp_path / "chatd.lock").exists()


def test_probe_file_locked_by_another_process_is_running_with_its_pid(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        p = probe(str(path))
        assert (p.exists, p.running, p.pid, p.problem) == (True, True, proc.pid, "")
        assert p.content == f"{proc.pid}\n".encode()


def test_probe_lock_held_but_content_names_another_pid(tmp_path):
    path = tmp_path / "chatd.pid"
    other = os.getpid()                      # a live pid that is not the lock holder
    with holder(path, f"{other}\n") as proc:
        p = probe(str(path))
        assert p.running and p.exists
        assert p.pid is None, "a pid the lock does not prove must never be returned"
        assert p.problem
        assert str(proc.pid) in p.problem and str(other) in p.problem


@pytest.mark.parametrize("content", ["-", "garbage\n", "0\n", "-1\n", "99999999999\n"])
def test_probe_lock_held_with_garbage_content(tmp_path, content):
    path = tmp_path / "chatd.pid"
    with holder(path, content):
        p = probe(str(path))
        assert p.running and p.exists
        assert p.pid is None
        assert p.problem


def test_probe_after_the_holder_exits_is_not_running(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        pid = proc.pid
    p = probe(str(path))                     # killed: the file stays, the lock is gone
    assert (p.exists, p.running, p.pid) == (True, False, pid)


def test_probe_symlink_cannot_tell(tmp_path):
    target = tmp_path / "real.pid"
    target.write_bytes(b"1234\n")
    link = tmp_path / "chatd.pid"
    link.symlink_to(target)
    with pytest.raises(PrivilegeError) as info:
        probe(str(link))
    assert info.value.status == EXIT_PRIVILEGE


# ------------------------------------------------------------------ PidFile

def test_acquire_writes_the_pid_and_holds_the_lock(tmp_path):
    path = tmp_path / "chatd.pid"
    pf = PidFile(str(path))
    pf.acquire(os.getpid())
    try:
        assert path.read_bytes() == f"{os.getpid()}\n".encode()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
        assert flock_held(path)
        p = probe(str(path))
        assert (p.running, p.pid, p.problem) == (True, os.getpid(), "")
    finally:
        pf.release()


def test_acquire_truncates_longer_old_content(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"4000000\nleftover garbage from a crash\n")
    pf = PidFile(str(path))
    pf.acquire(42)
    try:
        assert path.read_bytes() == b"42\n"
    finally:
        pf.release()


def test_release_removes_the_file_and_the_lock(tmp_path):
    path = tmp_path / "chatd.pid"
    pf = PidFile(str(path))
    pf.acquire(os.getpid())
    pf.release()
    assert not path.exists()
    assert pf.fd is None
    pf.release()                             # a second release is harmless
    p = probe(str(path))
    assert (p.exists, p.running) == (False, False)


def test_acquire_again_after_release(tmp_path):
    path = tmp_path / "chatd.pid"
    for _ in range(3):
        pf = PidFile(str(path))
        pf.acquire(os.getpid())
        pf.release()
    assert not path.exists()


def test_acquire_over_a_stale_file(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path):
        pass                                 # a daemon killed with SIGKILL leaves its file
    assert path.read_bytes().strip().isdigit()
    pf = PidFile(str(path))
    pf.acquire(os.getpid())
    try:
        assert path.read_bytes() == f"{os.getpid()}\n".encode()
    finally:
        pf.release()


def test_acquire_while_another_process_holds_the_lock(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        pf = PidFile(str(path))
        with pytest.raises(AlreadyRunning) as info:
            pf.acquire(os.getpid())
        assert info.value.pid == proc.pid
        assert info.value.status == EXIT_FAILED
        assert isinstance(info.value, StartError)
        assert str(proc.pid) in str(info.value)
        assert pf.fd is None
        assert path.read_bytes() == f"{proc.pid}\n".encode()   # untouched
        assert probe(str(path)).pid == proc.pid


def test_two_pidfiles_in_one_process_exclude_each_other(tmp_path):
    path = tmp_path / "chatd.pid"
    first = PidFile(str(path))
    first.acquire(os.getpid())
    try:
        with pytest.raises(AlreadyRunning):
            PidFile(str(path)).acquire(os.getpid())
    finally:
        first.release()


def test_acquire_after_the_file_was_replaced_locks_the_file_at_the_path(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        os.rename(path, tmp_path / "old.pid")          # the locked file is no longer at the path
        path.write_bytes(f"{proc.pid}\n".encode())     # a new, unlocked file is
        pf = PidFile(str(path))
        pf.acquire(os.getpid())
        try:
            assert os.path.samestat(os.fstat(pf.fd), os.stat(path))
            assert path.read_bytes() == f"{os.getpid()}\n".encode()
            assert probe(str(path)).pid == os.getpid()
        finally:
            pf.release()


def test_acquire_racing_an_exiting_daemon_never_locks_a_deleted_file(tmp_path):
    # The old daemon unlinks its pid file while holding the lock, then lets go: a starter that
    # opened the old file and then got its lock must notice the file is gone and start over.
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        command(proc, "unlink 0.05")
        pf = PidFile(str(path))
        deadline = time.monotonic() + DEADLINE
        while True:
            try:
                pf.acquire(os.getpid())
                break
            except AlreadyRunning:
                assert time.monotonic() < deadline, "the lock was never released"
        try:
            assert read_line(proc) == "done"
            assert os.path.samestat(os.fstat(pf.fd), os.stat(path)), "locked a deleted file"
            assert path.read_bytes() == f"{os.getpid()}\n".encode()
            assert probe(str(path)).pid == os.getpid()
        finally:
            pf.release()


# ------------------------------------------------------------------ guard

def test_guard_creates_the_lock_file_and_holds_it(tmp_path):
    path = tmp_path / "chatd.lock"
    with guard(str(path), timeout=1):
        assert path.exists()
        assert flock_held(path)
    assert not flock_held(path)


def test_guard_times_out_busy_while_another_process_holds_it(tmp_path):
    path = tmp_path / "chatd.lock"
    with child(GUARD_HOLDER, str(path), ready="guarded"):
        started = time.monotonic()
        with pytest.raises(ChatdError) as info:
            with guard(str(path), timeout=0.3):
                pytest.fail("got the guard while another process holds it")
        elapsed = time.monotonic() - started
        assert "busy" in str(info.value)
        assert info.value.status == EXIT_FAILED
        assert 0.3 <= elapsed < 3.0


def test_guard_waits_for_the_holder_to_let_go(tmp_path):
    path = tmp_path / "chatd.lock"
    with child(GUARD_HOLDER, str(path), ready="guarded") as proc:
        command(proc, "release 0.3")
        started = time.monotonic()
        with guard(str(path), timeout=DEADLINE):
            waited = time.monotonic() - started
            assert read_line(proc) == "done"
        assert 0.2 <= waited < DEADLINE


def test_guard_serialises_within_one_process_too(tmp_path):
    path = tmp_path / "chatd.lock"
    with guard(str(path), timeout=1):
        with pytest.raises(ChatdError, match="busy"):
            with guard(str(path), timeout=0.3):
                pass
    with guard(str(path), timeout=1):
        pass


def test_guard_released_on_exception(tmp_path):
    path = tmp_path / "chatd.lock"
    with pytest.raises(RuntimeError):
        with guard(str(path), timeout=1):
            raise RuntimeError("boom")
    assert not flock_held(path)


def test_guard_in_a_missing_directory_guards_nothing_and_creates_nothing(tmp_path):
    """No directory, no instance there (systemd makes RuntimeDirectory= only at start):
    a control command goes on without the lock rather than failing."""
    with guard(str(tmp_path / "absent" / "chatd.lock"), timeout=0.3):
        pass
    assert not (tmp_path / "absent").exists()


# ------------------------------------------------------------------ clear_stale

def test_clear_stale_removes_an_unlocked_pid_file(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"1234\n")
    clear_stale(str(path))
    assert not path.exists()


def test_clear_stale_removes_a_garbage_pid_file(tmp_path):
    path = tmp_path / "chatd.pid"
    path.write_bytes(b"garbage")
    clear_stale(str(path))
    assert not path.exists()


def test_clear_stale_never_removes_a_locked_pid_file(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        clear_stale(str(path))
        assert path.read_bytes() == f"{proc.pid}\n".encode()
        assert probe(str(path)).pid == proc.pid


def test_clear_stale_never_removes_our_own_pid_file(tmp_path):
    path = tmp_path / "chatd.pid"
    pf = PidFile(str(path))
    pf.acquire(os.getpid())
    try:
        clear_stale(str(path))
        assert path.read_bytes() == f"{os.getpid()}\n".encode()
    finally:
        pf.release()


def test_clear_stale_missing_file_is_fine(tmp_path):
    clear_stale(str(tmp_path / "chatd.pid"))


# ------------------------------------------------------------------ a lock handed on

# argv: PATH. Takes an exclusive flock on PATH, writes its own pid, forks a child that keeps the
# descriptor (and so the lock) for 60 s, prints the child's pid and exits: /proc/locks keeps
# naming the exited pid.
HANDER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
child = os.fork()
if child == 0:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 1)   # let the parent's reader see EOF
    os.dup2(null, 2)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
"""


def test_probe_a_lock_handed_on_by_a_process_that_exited_proves_no_pid(tmp_path):
    """/proc/locks names the exited pid; only /proc/PID/fd can tell that it holds nothing."""
    path = tmp_path / "chatd.pid"
    done = subprocess.run([sys.executable, "-c", HANDER, str(path)], capture_output=True, text=True,
                          timeout=DEADLINE)
    child = int(done.stdout)
    try:
        p = probe(str(path))
        assert p.running and p.pid is None, p
        assert "does not hold the lock" in p.problem, p.problem
        with pytest.raises(ChatdError, match="not signalling anything"):
            open_holder(p)
    finally:
        kill_and_wait(child)


def test_open_holder_gives_a_pidfd_for_the_real_holder(tmp_path):
    path = tmp_path / "chatd.pid"
    with holder(path) as proc:
        pidfd = open_holder(probe(str(path)))
        try:
            assert os.readlink(f"/proc/self/fd/{pidfd}") == "anon_inode:[pidfd]"
            assert f"Pid:\t{proc.pid}" in open(f"/proc/self/fdinfo/{pidfd}").read()
        finally:
            os.close(pidfd)


@pytest.mark.parametrize("what", ["fifo", "dir", "symlink", "others-writable"])
def test_probe_and_guard_refuse_what_is_not_a_plain_file_of_ours(tmp_path, what):
    for name in ("chatd.pid", "chatd.lock"):
        path = tmp_path / name
        if what == "fifo":
            os.mkfifo(path)
        elif what == "dir":
            path.mkdir()
        elif what == "symlink":
            path.symlink_to(tmp_path / "elsewhere")
        else:
            path.write_bytes(b"")
            path.chmod(0o666)
    with pytest.raises(PrivilegeError, match="refusing it"):
        probe(str(tmp_path / "chatd.pid"))
    with pytest.raises(PrivilegeError, match="refusing it"):
        with guard(str(tmp_path / "chatd.lock"), timeout=0.3):
            pass
