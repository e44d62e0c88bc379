"""Where an instance keeps its files: the pid file and, beside it, the guard, state and log files.

The pid file is `--pidfile`, else `[daemon] pidfile`, else DIR/NAME.pid, NAME
being "chatd" or the stem of the `-c` file, so instances with different
configs get different files. Its siblings share the stem: X.pid has the guard
X.lock, the state file X.state and the fallback log X.log.

Tests: tests/unit/test_files.py, tests/process/test_local_attacks.py, tests/process/test_normal_user.py
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass

from . import files
from .config import Config
from .errors import ChatdError, PrivilegeError, setting_error

SYSTEM_DIR = "/run/chatd"


@dataclass(frozen=True)
class InstancePaths:
    pidfile: str
    guard: str
    state: str
    fallback_log: str
    default_dir: bool   # the directory is chatd's own default, which chatd creates


def default_directory() -> str:
    """$RUNTIME_DIRECTORY, /run/chatd for root, $XDG_RUNTIME_DIR/chatd, or /tmp/chatd-$UID."""
    runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0]
    if os.path.isabs(runtime):
        return runtime
    if os.geteuid() == 0:
        return SYSTEM_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(xdg) and os.path.isdir(xdg):
        return os.path.join(xdg, "chatd")
    return f"/tmp/chatd-{os.geteuid()}"


def siblings(pidfile: str, default_dir: bool = False) -> InstancePaths:
    stem = pidfile[:-4] if pidfile.endswith(".pid") else pidfile
    return InstancePaths(pidfile, stem + ".lock", stem + ".state", stem + ".log", default_dir)


def instance_paths(cfg: Config, directory: str | None = None) -> InstancePaths:
    """The instance's file names (nothing is created here)."""
    if cfg.daemon.pidfile:
        return siblings(cfg.daemon.pidfile)
    name = "chatd"
    if cfg.path:
        name = os.path.splitext(os.path.basename(cfg.path))[0] or "chatd"
    return siblings(os.path.join(directory or default_directory(), name + ".pid"), default_dir=True)


def prepare_directory(cfg: Config, paths: InstancePaths) -> None:
    """Make sure the pid file's directory exists, is ours and is safe; create a default one.

    A directory that another user owns, or that others may write, is refused,
    default or not: whoever controls it controls which pid our `stop` signals,
    and where root's writes land. A default directory must be our own.
    """
    directory = os.path.dirname(paths.pidfile)
    if paths.default_dir:
        mode = 0o755 if directory == SYSTEM_DIR else 0o700
        try:
            os.mkdir(directory, mode)
            os.chmod(directory, mode)   # explicit: the umask must not decide
        except FileExistsError:
            pass
        except OSError as e:
            raise _dir_error(directory, e) from None
        try:
            st = os.lstat(directory)
        except OSError as e:
            raise _dir_error(directory, e) from None
        if not stat.S_ISDIR(st.st_mode):
            raise PrivilegeError(f"pid directory {directory} is not a directory; refusing it")
        problem = files.directory_problem(directory, owners={os.geteuid()})
        if problem:
            raise PrivilegeError(f"pid directory {directory}: {problem}; refusing it "
                                 f"(remove it, or use --pidfile)")
    elif not os.path.isdir(directory):
        raise setting_error(cfg.origin("daemon.pidfile"),
                            f"the pid file's directory {directory} does not exist")
    else:
        check_directory(directory, "pid directory")
    _check_writable(directory)


def check_directory(directory: str, what: str) -> None:
    """Refuse (exit 4) a directory another user owns or others may write."""
    problem = files.directory_problem(directory)
    if problem:
        raise PrivilegeError(f"{what} {directory}: {problem}; refusing it")


def _check_writable(directory: str) -> None:
    """Create and remove a file: access(2) says yes to root even on /proc or a read-only mount."""
    try:
        fd, name = files.create_temp(os.path.join(directory, ".chatd-probe"), 0o600)
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise PrivilegeError(f"pid directory {directory} is not writable by uid {os.geteuid()}: "
                             f"{e.strerror}") from None


def _dir_error(directory: str, e: OSError) -> ChatdError:
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PrivilegeError(f"cannot create pid directory {directory}: {e.strerror}")
    return ChatdError(f"cannot create pid directory {directory}: {e.strerror}")
