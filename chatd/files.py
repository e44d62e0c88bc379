"""Opening the instance's files with privilege: never through a link, never blocking, never a
file another user controls.

A root chatd writes its pid, guard, state and log files where someone else may
have been first: a symlink or a hardlink planted there would make root write to
a file of the planter's choosing, a FIFO would hang open(2) (and with it the
event loop), a directory would crash the command. So every such open is
O_NOFOLLOW (no symlink as the last component), O_NONBLOCK (a FIFO cannot hang
the open) and O_CLOEXEC, and then `fstat` must show a regular file with one link,
owned by a trusted user and writable by no one else; anything else raises
UnsafeFile, which says why. Temporary files get an unpredictable name and
O_EXCL, so nothing planted can stand in for them. The directories these files
live in pass an owner and mode check too, and so does every directory and link above
them (`resolve_directory`).

Trusted owners are root, the user chatd runs as, the user a root daemon will drop
to (`trust`: a daemon that dropped privileges reopens its log as that user, and
its files may have been made by it), and the owner of the file's directory when
no one else may write that directory: that user can replace any file in it
anyway, so refusing its files would protect nothing, and it is how systemd's
DynamicUser owns /run/chatd, where root's `chatd status` and `stop` must work.
(`start` refuses such a directory itself unless its owner is trusted already.)

Tests: tests/unit/test_files.py, tests/process/test_local_attacks.py
"""

from __future__ import annotations

import errno
import os
import secrets
import stat

FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_OPEN_REFUSALS = {errno.ELOOP: "it is a symbolic link", errno.EISDIR: "it is a directory",
                  errno.ENXIO: "it is a FIFO or a socket"}
_trusted: set[int] = set()


class UnsafeFile(OSError):
    """A path chatd refuses to use. errno is EPERM, so callers class it as a privilege
    error (exit 4); strerror says why."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(errno.EPERM, f"{reason}; refusing it", path)


def trust(uid: int) -> None:
    """Also accept files and directories of `uid`: the user a root daemon drops to."""
    _trusted.add(uid)


def trusted() -> set[int]:
    return {0, os.geteuid()} | _trusted


def open_file(path: str, flags: int, mode: int = 0o600) -> int:
    """os.open with FLAGS, then refuse anything but a plain file of a trusted user."""
    try:
        fd = os.open(path, flags | FLAGS, mode)
    except OSError as e:
        if e.errno in _OPEN_REFUSALS:
            raise UnsafeFile(path, _OPEN_REFUSALS[e.errno]) from None
        raise
    reason = file_problem(os.fstat(fd), trusted_for(path))
    if reason:
        os.close(fd)
        raise UnsafeFile(path, reason)
    return fd


def read_regular(path: str, limit: int | None = None) -> bytes:
    """The bytes of a file that is read, not written, such as a config (links are followed,
    any owner will do): only a FIFO's open or read could hang, so only a regular file is read;
    one of more than `limit` bytes (a link to /proc/kcore, say) is refused, not read whole."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, file_problem(st, trusted()) or "it is not a regular file")
        chunks = []
        total = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            total += len(chunk)
            if limit is not None and total > limit:
                raise UnsafeFile(path, f"it holds more than {limit >> 20} MiB")
        return b"".join(chunks)
    finally:
        os.close(fd)


def create_temp(path: str, mode: int = 0o644) -> tuple[int, str]:
    """A new file beside `path`, named `path`.<random>.tmp, made with O_EXCL: (fd, name)."""
    for _ in range(10):
        name = f"{path}.{secrets.token_hex(8)}.tmp"
        try:
            return os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | FLAGS, mode), name
        except FileExistsError:
            continue
    raise UnsafeFile(path, "ten random temporary names beside it were all taken")


def _directory_owner(path: str) -> set[int]:
    """The owner of `path`'s directory, if no one else may write it; else nobody."""
    try:
        st = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return set()
    return set() if st.st_mode & 0o022 else {st.st_uid}


def file_problem(st: os.stat_result, owners: set[int]) -> str:
    """Why a file with this stat may not be used ("" if it may); `owners`: who may own it."""
    if stat.S_ISDIR(st.st_mode):
        return "it is a directory"
    if stat.S_ISFIFO(st.st_mode):
        return "it is a FIFO"
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_nlink != 1:
        return f"it has {st.st_nlink} hard links"
    return _owner_problem(st, owners)


def resolve_directory(directory: str, owners: set[int] | None = None) -> tuple[str, str]:
    """`directory` with every symbolic link resolved, and why it may not hold chatd's files
    ("" if it may): whoever may write it, or any directory above it, or may repoint a link on
    the way, can swap in files of their own after any check, so the whole path is walked
    (OpenSSH's secure_path). A link must belong to a trusted user; a directory above must
    belong to a trusted user and be writable by no one else, or be root's and sticky (/tmp);
    the directory itself must belong to one of `owners` (default: trusted) and be writable by
    no one else. A path that does not exist yet is refused no further than it exists: the
    caller says what is missing."""
    owners = trusted() if owners is None else owners
    parts = [p for p in os.path.abspath(directory).split("/") if p][::-1]   # a stack: next one last
    done, hops = "/", 0
    while parts:
        name = parts.pop()
        if name in (".", ".."):
            done = os.path.dirname(done) if name == ".." else done
            continue
        path = os.path.join(done, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return os.path.join(path, *parts[::-1]), ""
        except OSError as e:
            return path, f"{path}: {e.strerror}"
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                return path, f"{path}: too many levels of symbolic links"
            if st.st_uid not in trusted():
                return path, f"{path} is a symbolic link of uid {st.st_uid}"
            target = os.readlink(path)
            done = "/" if target.startswith("/") else done
            parts.extend([p for p in target.split("/") if p][::-1])
            continue
        if not stat.S_ISDIR(st.st_mode):
            return path, f"{path} is not a directory"
        if parts and not (st.st_uid == 0 and st.st_mode & stat.S_ISVTX):
            problem = _owner_problem(st, trusted())
            if problem:
                return path, f"{path} above it: {problem}"
        done = path
    try:
        return done, _owner_problem(os.stat(done), owners)
    except OSError as e:
        return done, f"{done}: {e.strerror}"


def trusted_for(path: str) -> set[int]:
    """Who may own the file at `path` or hold its lock: trusted users and, if no one else may
    write the file's directory, its owner (see the module's docstring)."""
    return trusted() | _directory_owner(path)


def _owner_problem(st: os.stat_result, owners: set[int]) -> str:
    if st.st_uid not in owners:
        return f"it belongs to uid {st.st_uid}, not to us (uid {os.geteuid()})"
    if st.st_mode & 0o022:
        return f"it may be written by others (mode {stat.S_IMODE(st.st_mode):04o})"
    return ""
