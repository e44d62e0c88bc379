"""Where an instance keeps its files: the pid file and, beside it, the guard, state and log files.

The pid file is `--pidfile`, else `[daemon] pidfile`, else DIR/NAME.pid, NAME
being "chatd" or the stem of the `-c` file, so instances with different
configs get different files. Its siblings share the stem: X.pid has the guard
X.lock, the state file X.state, the fallback log X.log and the control socket X.sock.

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
    control: str = ""   # the control socket (moderation.py)


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
    return InstancePaths(pidfile, stem + ".lock", stem + ".state", stem + ".log", default_dir,
                         stem + ".sock")


def instance_paths(cfg: Config, directory: str | None = None) -> InstancePaths:
    """The instance's file names (nothing is created here)."""
    if cfg.daemon.pidfile:
        return siblings(cfg.daemon.pidfile)
    name = "chatd"
    if cfg.path:
        name = os.path.splitext(os.path.basename(cfg.path))[0] or "chatd"
    return siblings(os.path.join(directory or default_directory(), name + ".pid"), default_dir=True)


def prepare_directory(cfg: Config, paths: InstancePaths) -> InstancePaths:
    """Make sure the pid file's directory exists, is ours and is safe; create a default one.
    The same files are returned, named through the directory's resolved path.

    A directory that another user owns, or that others may write, is refused,
    default or not, and so is one reached through such a directory or another user's
    symbolic link (`files.resolve_directory`): whoever controls it controls which pid
    our `stop` signals, and where root's writes land. A default directory must be our own.
    """
    directory = os.path.dirname(paths.pidfile)
    owners = None
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
        owners = {os.geteuid()}
    elif not os.path.isdir(directory):
        raise setting_error(cfg.origin("daemon.pidfile"),
                            f"the pid file's directory {directory} does not exist")
    paths = secured(paths, owners)
    _check_writable(os.path.dirname(paths.pidfile))
    return paths


def secured(paths: InstancePaths, owners: set[int] | None = None) -> InstancePaths:
    """`paths` named through their directory's resolved path, which must be safe for `owners`
    (default: trusted users) to hold chatd's files (`check_directory`). Every command checks
    this before it believes a pid file: `stop` signals the pid it names."""
    directory = check_directory(os.path.dirname(paths.pidfile), "pid directory", owners)
    return siblings(os.path.join(directory, os.path.basename(paths.pidfile)), paths.default_dir)


def check_directory(directory: str, what: str, owners: set[int] | None = None) -> str:
    """The directory's resolved path; PrivilegeError (exit 4) if another user owns it, others
    may write it, or either is true of a directory or link on the way (`files.resolve_directory`)."""
    resolved, problem = files.resolve_directory(directory, owners)
    if problem:
        raise PrivilegeError(f"{what} {directory}: {problem}; refusing it")
    return resolved


def check_log_file(path: str) -> str:
    """The log file's resolved path; PrivilegeError (exit 4) for a log directory or file that
    the daemon would refuse. Checked before `start` forks and before `restart` applies a new
    target: no path of another user's choosing is ever opened by root."""
    path = os.path.join(check_directory(os.path.dirname(path), "log directory"), os.path.basename(path))
    try:
        os.close(files.open_file(path, os.O_WRONLY | os.O_APPEND))
    except files.UnsafeFile as e:
        raise PrivilegeError(f"cannot open log file {path}: {e.strerror}") from None
    except OSError:
        pass   # missing, or not ours to open: the daemon creates it, or says why it cannot
    return path


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
