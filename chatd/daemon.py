"""Becoming a daemon: one named function per step of daemon(7)'s SysV list and APUE 13.3.

Each step's docstring gives its number in daemon(7). They are not called in that
numeric order: `control` and `lifetime` call them in the order the README's table
"The daemon, step by step" lists (signals before the first fork, descriptors closed
after the second; tests/test_readme.py checks the order against the code).

The invoker forks and then waits on a readiness pipe; the daemon writes one
JSON line to it: "ready" once it serves, or "fail" with the reason and the
exit status. EOF without either (the daemon died without a word) is a
failure too, so `chatd start` exits 0 only when chatd really serves. Only this
module forks, and only it ends a forked process (`end`, `fork_again`).

Tests: tests/process/test_detach.py, tests/process/test_start.py
"""

from __future__ import annotations

import ctypes
import json
import os
import resource
import select
import signal
import subprocess
import time
from typing import Any, Callable

from .config import lookup_user, lookup_group
from .errors import ChatdError, PrivilegeError, StartError

UMASK = 0o022
PR_SET_PDEATHSIG = 1   # prctl(2)
PR_SET_CHILD_SUBREAPER = 36
FD_RESERVE = 128     # descriptors kept for listeners, logs, the loop, the pid file and
                     # refused clients being told "server full" (accept.MAX_LINGERING)


class ReadinessPipe:
    """The one-way channel from the daemon to the invoker waiting for it."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()

    # ---- daemon side
    def send(self, **message: Any) -> None:
        if self.w < 0:
            return
        data = (json.dumps(message) + "\n").encode()
        try:
            os.write(self.w, data)
        except OSError:
            pass   # the invoker is gone (killed); the daemon carries on

    def ready(self, **info: Any) -> None:
        self.send(event="ready", **info)
        self.close_write()

    def fail(self, error: ChatdError) -> None:
        """Report a failed start. The pipe stays open until the process exits, so
        the invoker, which waits for EOF, returns only when nothing is left."""
        self.send(event="fail", status=error.status, message=error.message)

    def close_write(self) -> None:
        if self.w >= 0:
            os.close(self.w)
            self.w = -1

    # ---- invoker side
    def wait(self, timeout: float, on_tick: Callable[[int | None], None]) -> dict[str, Any]:
        """Read the daemon's messages until "ready", "fail" or EOF; `on_tick(pid)` runs between reads."""
        os.close(self.w)
        self.w = -1
        buf = b""
        pid = None
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                on_tick(pid)
                ready, _, _ = select.select([self.r], [], [], 0.1)
                if not ready:
                    continue
                chunk = os.read(self.r, 4096)
                if not chunk:
                    return {"event": "eof", "pid": pid}
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    try:
                        message = json.loads(line)
                    except ValueError:
                        continue
                    if message.get("event") == "pid":
                        pid = message.get("pid")
                    elif message.get("event") == "fail":
                        message.setdefault("pid", pid)
                        self._read_to_eof(deadline)
                        return message
                    else:
                        message.setdefault("pid", pid)
                        return message
            return {"event": "timeout", "pid": pid}
        finally:
            os.close(self.r)

    def _read_to_eof(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.r], [], [], 0.1)
            if ready and not os.read(self.r, 4096):
                return


# ------------------------------------------------------------------ the steps

def fork_invoker() -> int:
    """daemon(7) step 5: fork; the parent stays behind as the invoker and waits on the pipe."""
    return os.fork()


def fork_worker() -> int:
    """Fork one of `[server] workers` (workers.py): 0 in the worker, its pid in the supervisor.
    A worker must not outlive its supervisor (alone, it would serve on unsupervised, holding
    the port, and no command could reach it): the kernel sends it SIGTERM when the supervisor
    dies (Linux's PR_SET_PDEATHSIG), and one whose supervisor died before that was set ends."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0 and not die_with_parent(parent):
        os._exit(1)
    return pid


def die_with_parent(parent: int) -> bool:
    """Have the kernel send us SIGTERM when our parent dies; False if `parent` is not our
    parent (any more): it died before. Not Linux: the supervisor's stop still reaches us."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    return os.getppid() == parent


def become_subreaper() -> None:
    """Orphans among our descendants become our children (Linux's PR_SET_CHILD_SUBREAPER): a
    worker's live upgrade starts the new worker from the old one, which then exits, and the
    supervisor must still be its parent (to reap it, and for `die_with_parent`)."""
    _prctl(PR_SET_CHILD_SUBREAPER, 1)


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def spawn(command: list[str], keep: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A live upgrade's new code (upgrade.py): `command` in "/", with descriptor `keep` and
    `env`, nothing else inherited; its stdout and stderr one pipe, for its own last words."""
    return subprocess.Popen(command, pass_fds=(keep,), env=env, cwd="/", stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def reexec(command: list[str], env: dict[str, str]) -> None:
    """A supervisor's live upgrade (workers_upgrade.py): this process runs `command` in its
    place, keeping its pid, its children and its inheritable descriptors; returns only by
    raising OSError."""
    os.execve(command[0], command, env)


def end(code: int) -> None:
    """End a forked daemon process with `code` at once: it must not unwind into the
    invoker's frames, nor run the invoker's atexit handlers a second time."""
    os._exit(code)


def detach_session() -> None:
    """Step 6: setsid(), leaving the invoker's session and its controlling terminal."""
    os.setsid()


def fork_again() -> bool:
    """Steps 7-8: fork again and let the session leader exit, so the daemon is not one
    and can never acquire a controlling terminal (APUE 13.3). True in the daemon."""
    if os.fork() > 0:
        os._exit(0)   # the middle child; the invoker reaps it
    return True


def close_inherited_fds(keep: set[int]) -> None:
    """Step 1: close every inherited descriptor above 2 except `keep`.

    It lists /proc/self/fd, so its cost follows the open descriptors, not
    RLIMIT_NOFILE; without /proc, close_range(2) over the gaps does the same.
    """
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        top = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        lo = 3
        for k in sorted(f for f in keep if f >= 3) + [top]:
            os.closerange(lo, k)
            lo = k + 1
        return
    for fd in fds:
        if fd > 2 and fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass   # the listing's own descriptor, already closed


def set_umask() -> None:
    """Step 10: an explicit umask (022); files get explicit modes as well."""
    os.umask(UMASK)


def change_directory() -> None:
    """Step 11: chdir("/") so no file system is kept busy; paths were resolved before."""
    os.chdir("/")


def raise_fd_limit(max_clients: int) -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard one; lower max_clients if it cannot fit.

    Returns the usable max_clients and a warning, if any.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    if soft == resource.RLIM_INFINITY:
        return max_clients, ""
    room = max(1, soft - FD_RESERVE)
    if soft <= FD_RESERVE:
        return 1, (f"RLIMIT_NOFILE {soft} is within the {FD_RESERVE} descriptors kept in reserve; "
                   f"serving 1 client (raise the limit, e.g. LimitNOFILE= in the unit)")
    if max_clients > room:
        return room, (f"max_clients {max_clients} does not fit RLIMIT_NOFILE {soft}; "
                      f"using {room}")
    # max_clients 0 sets no limit of ours, but descriptors are one: past it a newcomer is
    # told "server full" with a descriptor from the reserve instead of being left hanging.
    return max_clients or room, ""


def check_privilege_drop(user: str, group: str) -> int:
    """Before detaching: only root may switch user or group (exit 4). Returns the uid the
    daemon will run as."""
    if not (user or group):
        return os.geteuid()
    uid, gid = _target_ids(user, group)
    if os.geteuid() != 0 and (uid != os.geteuid() or gid != os.getegid()):
        raise PrivilegeError("only root can switch to another user or group "
                             f"(--user {user or '-'} --group {group or '-'})")
    return uid


def _target_ids(user: str, group: str) -> tuple[int, int]:
    entry = lookup_user(user) if user else None
    if entry is None:
        uid = os.geteuid()
    else:
        uid = entry if isinstance(entry, int) else entry.pw_uid
    if group:
        gid = lookup_group(group)
    elif entry is not None and not isinstance(entry, int):
        gid = entry.pw_gid
    else:
        gid = os.getegid()
    return uid, gid


def drop_privileges(user: str, group: str) -> None:
    """Step 13: become `user`/`group` for good, after binding and after the pid file.

    Supplementary groups come from /etc/group when the user has a name
    (initgroups), else none; then the gid, then the uid, with all of real,
    effective and saved ids changed, and a check that root cannot come back.
    """
    if not (user or group) or os.geteuid() != 0:
        return
    uid, gid = _target_ids(user, group)
    entry = lookup_user(user) if user else None
    try:
        if entry is not None and not isinstance(entry, int):
            os.initgroups(entry.pw_name, gid)
        else:
            os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise StartError(f"cannot drop privileges to uid {uid} gid {gid}: {e.strerror}") from None
    if uid != 0:
        try:
            os.setuid(0)
        except OSError:
            return
        raise StartError("privileges were not dropped: setuid(0) still works")


def redirect_stdio() -> None:
    """Step 9: stdin, stdout and stderr to /dev/null, once logging no longer needs stderr."""
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(fd, target)
    if fd > 2:
        os.close(fd)
