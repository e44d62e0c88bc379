"""The pid file and the guard lock of libucw's daemon-control protocol.

The daemon holds an `flock` on its pid file for its whole life: that lock, not
the file's existence, means "running", so a pid file left by a killed daemon
is harmless. Control commands serialise on a second lock, the guard file. A pid
is signalled only when the lock is held and the process the file names holds it
now, through a descriptor of its own (/proc/PID/fd and fdinfo): /proc/locks keeps
naming the pid that took a lock after that process has exited and left the
descriptor to a child, and that pid may since belong to anyone. Both files are
opened through `files`, so a link, a FIFO, a directory or a file another user
owns or may write is refused, never followed or waited on. Only this module
takes these two locks; the state file's content lock is `state`'s own (see
there), and no other module locks.

Tests: tests/unit/test_pidfile.py, tests/process/test_start.py, tests/process/test_local_attacks.py
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from . import files
from .errors import ChatdError, PrivilegeError, StartError

GUARD_TIMEOUT_S = 30.0
PID_MAX = 4194304          # the kernel's upper bound for pid_max (PID_MAX_LIMIT)


class AlreadyRunning(StartError):
    """Another daemon holds the pid-file lock."""

    def __init__(self, path: str, pid: int | None, serving: str = "") -> None:
        who = f"pid {pid}" if pid else "pid unknown"
        super().__init__(f"chatd is already running ({who}, pid file {path})"
                         + (f": {serving}" if serving else ""))
        self.pid = pid


def parse_pid(content: bytes) -> int | None:
    """The pid in a pid file's content, or None for anything but a plausible decimal pid."""
    text = content.strip()
    if not text.isdigit() or len(text) > 7:
        return None
    pid = int(text)
    return pid if 1 < pid <= PID_MAX else None


def lock_holders(fd: int) -> set[int]:
    """The pids holding an exclusive flock on the file open at `fd`, from /proc/locks.

    chatd's daemon holds its pid file with LOCK_EX; shared locks are anyone's
    (flock needs only a read-only descriptor) and prove nothing.
    """
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                parts = line.split()
                # "N: FLOCK ADVISORY WRITE PID MAJ:MIN:INODE 0 EOF"; waiters carry "->".
                if len(parts) >= 6 and parts[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and parts[5] == dev:
                    holders.add(int(parts[4]))
    except (OSError, ValueError):
        pass
    return holders


def holds(pid: int, inode: tuple[int, int]) -> bool | None:
    """Does process `pid` hold an exclusive flock on the file (st_dev, st_ino) `inode` through
    a descriptor of its own? None when its descriptors may not be read (another user's)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return None
    except OSError:
        return False
    for name in names:
        try:
            st = os.stat(f"{fd_dir}/{name}")
            if (st.st_dev, st.st_ino) != inode:
                continue
            # fdinfo lists the locks this very open file description holds.
            with open(f"/proc/{pid}/fdinfo/{name}", encoding="ascii", errors="replace") as f:
                if any(line.startswith("lock:") and "FLOCK" in line and "WRITE" in line for line in f):
                    return True
        except OSError:
            continue
    return False


@dataclass(frozen=True)
class Probe:
    """What the pid file says: `running` is true only while its lock is held."""

    path: str
    exists: bool
    running: bool
    pid: int | None          # a pid proven to be the daemon (running) or the stale content
    content: bytes = b""
    problem: str = ""        # why a locked pid file's pid cannot be trusted (or proven)
    inode: tuple[int, int] | None = None   # the pid file's (st_dev, st_ino)

    @property
    def foreign(self) -> bool:
        """Locked, but by no process proven to be chatd: someone sits on the file, and no
        chatd runs from it (a chatd that runs holds its own lock and names itself)."""
        return self.running and self.pid is None


def probe(path: str) -> Probe:
    """Look at the pid file without changing anything (libucw: "try to lock the PID file").

    Raises PrivilegeError when the file exists but cannot be opened or is refused (`files`).
    `pid` is set for a running daemon only if it holds the lock itself, or if it is another
    user's process whose descriptors we may not read (then `problem` says so).
    """
    try:
        fd = files.open_file(path, os.O_RDONLY)
    except FileNotFoundError:
        return Probe(path, exists=False, running=False, pid=None)
    except OSError as e:
        raise PrivilegeError(f"cannot open pid file {path}: {e.strerror}") from None
    try:
        content = os.pread(fd, 64, 0)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pass
        except OSError as e:
            raise PrivilegeError(f"cannot lock pid file {path}: {e.strerror}") from None
        else:
            return Probe(path, exists=True, running=False, pid=parse_pid(content), content=content)
        content = os.pread(fd, 64, 0)   # re-read: the holder may have just written it
        pid = parse_pid(content)
        holders = lock_holders(fd)   # a hint only: the pid that took the lock, alive or not
        st = os.fstat(fd)
        inode = (st.st_dev, st.st_ino)
        problem = ""
        if pid is None:
            problem = f"its content {content[:20]!r} is not a pid"
            problem += f"; the lock is held by {_who(holders)}" if holders else ""
        elif holders and pid not in holders and holds(pid, inode) is not True:
            # /proc/locks names the process that took the lock; after a live upgrade the one
            # that holds it now is another (the same open file), which its fdinfo proves.
            problem = f"it names pid {pid} but the lock is held by {_who(holders)}"
            pid = None
        else:
            held = holds(pid, inode)
            problem = _not_chatd(pid, path) if held is not False else _not_holding(pid)
            if held is None and not problem:
                problem = f"pid {pid} belongs to another user, so chatd cannot prove that it holds the lock"
            elif problem:
                pid = None
        return Probe(path, exists=True, running=True, pid=pid, content=content, problem=problem,
                     inode=inode)
    finally:
        os.close(fd)


def _uid(pid: int) -> tuple[int, int] | None:
    """The real and effective uid of `pid` (/proc/PID/status "Uid:"), or None if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Uid:"):
                    real, effective = line.split()[1:3]
                    return int(real), int(effective)
    except (OSError, ValueError):
        pass
    return None


def _not_chatd(pid: int, path: str) -> str:
    """Why the process holding the pid file's lock is not taken for chatd ("" if it may be):
    a lock proves only that a process holds it, and anyone may lock a file they can read, so
    its real and effective uid must be trusted to own the file (`files.trusted_for`)."""
    uids = _uid(pid)
    if uids is None:
        return f"pid {pid} has exited"
    owners = files.trusted_for(path)
    stranger = [u for u in uids if u not in owners]
    return f"pid {pid} holds the lock but runs as uid {stranger[0]}, not as chatd" if stranger else ""


def _who(holders: set[int]) -> str:
    """"pid N (uid U)": who took the lock (/proc/locks), for the user to look at."""
    pid = min(holders)
    uids = _uid(pid)
    return f"pid {pid}" + (f" (uid {uids[0]})" if uids else "")


class PidFile:
    """The daemon's own pid file: created, locked and written once, held until exit."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self, pid: int) -> None:
        """Lock the pid file and write `pid`; AlreadyRunning if another daemon holds it.

        After locking, the file at the path must still be the one we locked (same
        inode): an exiting daemon unlinks its file while holding the lock, and
        a lock on that deleted file would protect nothing.
        """
        for _ in range(50):
            try:
                fd = files.open_file(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                cls = PrivilegeError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else StartError
                raise cls(f"cannot open pid file {self.path}: {e.strerror}") from None
            if not self._lock(fd):
                if not lock_holders(fd) and os.path.exists("/proc/locks"):
                    # Only shared locks: no chatd holds this file, someone sits on it. Our
                    # caller holds the guard, so replace the file rather than give up.
                    _unlink_if_same(self.path, fd)
                    os.close(fd)
                    continue
                content = os.pread(fd, 64, 0)
                os.close(fd)
                raise AlreadyRunning(self.path, parse_pid(content))
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise StartError(f"pid file {self.path} keeps being replaced; giving up")
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{pid}\n".encode(), 0)
        self.fd = fd

    @staticmethod
    def _lock(fd: int) -> bool:
        # A control command probing with a shared lock holds it for microseconds;
        # retry briefly so such a probe is never taken for a running daemon.
        for attempt in range(10):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                time.sleep(0.005 * (attempt + 1))
        return False

    def rewrite(self, pid: int) -> None:
        """Name `pid` in the file we hold locked (a live upgrade's new process, which holds the
        very open file the lock belongs to: the lock was never released)."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def forget(self) -> None:
        """Close our descriptor and nothing else: in a forked worker, whose parent keeps the
        file and its lock (an flock belongs to the open file, which the parent holds)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Remove the pid file while still holding its lock, then let the lock go.

        A daemon that dropped privileges may no longer unlink it: it truncates
        the file instead, and an empty pid file means "not running".
        """
        if self.fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


def _unlink_if_same(path: str, fd: int) -> None:
    try:
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            os.unlink(path)
    except OSError:
        pass


def clear_stale(path: str) -> None:
    """Remove a pid file whose lock is free (call only while holding the guard)."""
    try:
        fd = files.open_file(path, os.O_RDWR)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.path.samestat(os.fstat(fd), os.stat(path)):
            try:
                os.unlink(path)
            except OSError:
                os.ftruncate(fd, 0)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def guard(path: str, timeout: float = GUARD_TIMEOUT_S, read_only: bool = False) -> Iterator[None]:
    """Hold the guard lock that serialises control commands (libucw), waiting at most `timeout`.

    With `read_only`, a guard file we may not create (another user's instance)
    is opened read-only if it exists, or skipped: `status` only looks.
    """
    try:
        # 0600: flock needs only a read-only descriptor, so a lock file others may
        # read is one any user could hold forever, locking root out of `chatd stop`.
        fd = files.open_file(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.fchmod(fd, 0o600)
    except OSError as e:
        if e.errno == errno.ENOENT:
            yield   # no directory: no instance there to guard (systemd makes it at start)
            return
        if not read_only or isinstance(e, files.UnsafeFile):
            cls = PrivilegeError if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ChatdError
            raise cls(f"cannot open guard lock {path}: {e.strerror}") from None
        try:
            fd = files.open_file(path, os.O_RDONLY)
        except files.UnsafeFile as e2:
            raise PrivilegeError(f"cannot open guard lock {path}: {e2.strerror}") from None
        except OSError:
            yield
            return
    try:
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise ChatdError(f"busy: another chatd command has held {path} "
                                     f"for {timeout:g} s; try again") from None
                time.sleep(delay)
                delay = min(delay * 2, 0.1)
        yield
    finally:
        try:   # unlocked, not only closed: a worker forked meanwhile (`chatd run` with
            fcntl.flock(fd, fcntl.LOCK_UN)   # workers) holds a copy of the descriptor, and the
        except OSError:                      # lock belongs to the open file they share
            pass
        os.close(fd)



def open_holder(found: Probe) -> int:
    """A pidfd for the daemon that holds the pid file now, for signals that cannot reach
    another process: the pidfd is opened first, then the process it names is checked (a
    pid recycled in between fails the check, or leaves the pidfd naming a dead process)."""
    if found.pid is None or found.inode is None:
        raise ChatdError(f"pid file {found.path} is locked, but {found.problem}; not signalling anything")
    try:
        pidfd = os.pidfd_open(found.pid)
    except ProcessLookupError:
        raise ChatdError(f"chatd (pid {found.pid}) exited meanwhile; not signalling anything") from None
    held = holds(found.pid, found.inode)
    problem = _not_chatd(found.pid, found.path) if held is not False else _not_holding(found.pid)
    if held and not problem:
        return pidfd
    os.close(pidfd)
    if held is None and not problem:
        raise PrivilegeError(f"not allowed to signal chatd (pid {found.pid}): it belongs to another user")
    raise ChatdError(f"pid file {found.path} is locked, but {problem}; not signalling anything")


def _not_holding(pid: int) -> str:
    return (f"it names pid {pid}, which does not hold the lock (handed on to another process, "
            f"or the pid was reused)")
