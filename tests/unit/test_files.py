"""Opening files with privilege (`chatd.files`), the state file's descriptors and locks, and the
log file's reopen: real symlinks, hardlinks, FIFOs, directories and another user's files
(chowned to nobody), in the test's own temporary directory. Every open that could block is a
FIFO opened by the code under test: a hang would be the failure (pytest's own timeout is the
suite's, so each such case runs in a child process with a deadline instead).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import subprocess
import sys
import time

import pytest

from chatd import files
from chatd.errors import PrivilegeError
from chatd.log import FileTarget
from chatd.state import StateFile, read_state

NOBODY = 65534


@pytest.fixture(autouse=True)
def no_extra_trust(monkeypatch):
    monkeypatch.setattr(files, "_trusted", set())


def in_child(code: str, timeout: float = 10.0) -> str:
    """Run `code` in a fresh interpreter (chatd importable); its stdout, or fail on a hang."""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret"
    path.write_bytes(b"root only\n")
    path.chmod(0o600)
    return path


def test_a_plain_file_of_ours_is_opened_and_created(tmp_path):
    fd = files.open_file(str(tmp_path / "new"), os.O_WRONLY | os.O_CREAT, 0o640)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        assert flags & fcntl.FD_CLOEXEC
        assert os.stat(tmp_path / "new").st_mode & 0o777 == 0o640
    finally:
        os.close(fd)


def test_a_symlink_is_refused_and_its_target_untouched(tmp_path, secret):
    link = tmp_path / "x.log"
    link.symlink_to(secret)
    with pytest.raises(files.UnsafeFile, match="symbolic link; refusing it") as info:
        files.open_file(str(link), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    assert info.value.errno == errno.EPERM
    assert secret.read_bytes() == b"root only\n"


def test_a_hardlink_is_refused_and_its_target_untouched(tmp_path, secret):
    os.link(secret, tmp_path / "x.pid")
    with pytest.raises(files.UnsafeFile, match="2 hard links"):
        files.open_file(str(tmp_path / "x.pid"), os.O_RDWR | os.O_CREAT, 0o644)
    assert secret.read_bytes() == b"root only\n" and secret.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("flags", ["O_RDONLY", "O_WRONLY", "O_RDWR"])
def test_a_fifo_never_blocks_the_open_and_is_refused(tmp_path, flags):
    fifo = tmp_path / "x.state"
    os.mkfifo(fifo)
    said = in_child(f"import os\nfrom chatd import files\ntry:\n"
                    f"    files.open_file({str(fifo)!r}, os.{flags} | os.O_CREAT)\n"
                    f"except files.UnsafeFile as e:\n    print(e.strerror)\n")
    assert said.startswith("it is a FIFO") and said.endswith("refusing it"), said


@pytest.mark.parametrize("flags", ["O_RDONLY", "O_RDWR"])
def test_a_directory_is_refused(tmp_path, flags):
    (tmp_path / "x.pid").mkdir()
    with pytest.raises(files.UnsafeFile, match="it is a directory"):
        files.open_file(str(tmp_path / "x.pid"), getattr(os, flags))


def test_another_users_file_is_refused_unless_trusted(tmp_path):
    tmp_path.chmod(0o777)   # a directory others may write: its owner (root) adds no trust
    path = tmp_path / "x.log"
    path.write_bytes(b"")
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(files.UnsafeFile, match=f"belongs to uid {NOBODY}"):
        files.open_file(str(path), os.O_WRONLY)
    files.trust(NOBODY)   # the user a root daemon drops to
    os.close(files.open_file(str(path), os.O_WRONLY))


def test_a_file_others_may_write_is_refused(tmp_path):
    path = tmp_path / "x.pid"
    path.write_bytes(b"")
    path.chmod(0o666)
    with pytest.raises(files.UnsafeFile, match="may be written by others"):
        files.open_file(str(path), os.O_RDONLY)


def test_temporary_files_are_new_and_unpredictable(tmp_path):
    base = str(tmp_path / "x.state")
    made = [files.create_temp(base) for _ in range(5)]
    try:
        names = {name for _, name in made}
        assert len(names) == 5 and all(n.startswith(base + ".") and n.endswith(".tmp") for n in names)
        assert f"{base}.{os.getpid()}.tmp" not in names
    finally:
        for fd, name in made:
            os.close(fd)
            os.unlink(name)


@pytest.mark.parametrize("owner, mode, problem", [
    (0, 0o1777, "may be written by others"), (NOBODY, 0o755, f"belongs to uid {NOBODY}"),
    (0, 0o775, "may be written by others"), (0, 0o755, ""),
])
def test_directory_problem(tmp_path, owner, mode, problem):
    d = tmp_path / "d"
    d.mkdir()
    os.chown(d, owner, owner)
    d.chmod(mode)
    found = files.resolve_directory(str(d))[1]
    assert (problem in found) if problem else found == "", found


def test_a_directory_symlink_counts_only_if_a_trusted_user_made_it(tmp_path):
    (tmp_path / "real").mkdir(mode=0o755)
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "real")
    assert files.resolve_directory(str(link)) == (str(tmp_path / "real"), "")
    os.lchown(link, NOBODY, NOBODY)
    assert "symbolic link of uid 65534" in files.resolve_directory(str(link))[1]


@pytest.mark.parametrize("owner, mode, problem", [
    (0, 0o1777, ""), (0, 0o755, ""), (NOBODY, 0o755, f"belongs to uid {NOBODY}"),
    (0, 0o777, "may be written by others"), (NOBODY, 0o1777, f"belongs to uid {NOBODY}"),
])
def test_every_directory_above_is_checked_too(tmp_path, owner, mode, problem):
    """OpenSSH's secure_path: a directory above must be trusted and written by no one else,
    or be root's and sticky (/tmp); a link on the way must be a trusted user's."""
    above = tmp_path / "above"
    (above / "sub" / "d").mkdir(parents=True, mode=0o755)
    os.chown(above, owner, owner)
    above.chmod(mode)
    resolved, found = files.resolve_directory(str(above / "sub" / "d"))
    assert (problem in found and str(above) in found) if problem else found == "", found
    link = tmp_path / "link"
    link.symlink_to(above / "sub")
    os.lchown(link, NOBODY, NOBODY)
    assert "symbolic link of uid 65534" in files.resolve_directory(f"{link}/d/../d")[1]
    os.lchown(link, 0, 0)
    assert files.resolve_directory(f"{link}/d/../d") == (resolved, found)
    assert found or resolved == str(above / "sub" / "d")


# ------------------------------------------------------------------ the state file

def kept_descriptors(path) -> list[int]:
    """Our descriptors open on `path` (by name, as /proc shows them)."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(path):
                found.append(int(name))
        except OSError:
            pass
    return found


def test_state_file_never_writes_to_or_closes_a_descriptor_it_closed(tmp_path, monkeypatch):
    """1. the state file is open; 2. an update whose reopen of the file fails (EMFILE);
    3. another file takes the freed descriptor number; 4. more updates, then remove.
    Result: the other file's descriptor still names it, and its bytes are untouched.
    (Before: the failed reopen kept the stale number, and the next update closed it.)"""
    sf = StateFile(str(tmp_path / "x.state"))
    sf.open(pid=1)
    (old,) = kept_descriptors(tmp_path / "x.state")
    real_open = os.open

    def emfile_on_the_state_file(path, flags, *args, **kwargs):
        if os.fspath(path) == sf.path:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", emfile_on_the_state_file)
    sf.update(clients=1)
    monkeypatch.setattr(os, "open", real_open)
    victim = tmp_path / "victim"
    victim.write_bytes(b"not the state\n")
    vfd = os.open(victim, os.O_RDWR)
    try:
        if vfd != old:
            os.dup2(vfd, old)   # the freed number, as the next open anywhere in the daemon would get it
        sf.update(clients=2)
        sf.update(clients=3)
        assert os.fstat(old).st_ino == victim.stat().st_ino, "the state file closed another's descriptor"
        sf.remove()
        assert os.fstat(old).st_ino == victim.stat().st_ino, "the state file closed another's descriptor"
        assert victim.read_bytes() == b"not the state\n"
    finally:
        for fd in {vfd, old}:
            try:
                os.close(fd)
            except OSError:
                pass


def test_state_file_is_replaced_with_one_descriptor_kept(tmp_path):
    sf = StateFile(str(tmp_path / "x.state"))
    sf.open(pid=1)
    for n in range(5):
        sf.update(clients=n)
    assert read_state(sf.path)["clients"] == 4
    assert len(kept_descriptors(tmp_path / "x.state")) == 1
    assert sorted(os.listdir(tmp_path)) == ["x.state"]
    sf.remove()
    assert kept_descriptors(tmp_path / "x.state") == [] and os.listdir(tmp_path) == []


def test_state_in_place_rewrite_never_waits_for_a_readers_lock(tmp_path, monkeypatch):
    """Anyone who may read the state file can hold a shared flock on it: the daemon's in-place
    rewrite (used when it may not create files) must not wait for it."""
    sf = StateFile(str(tmp_path / "x.state"))
    sf.open(pid=1)
    def no_new_files(path):
        raise PermissionError(errno.EACCES, "a dropped daemon may not create files here")

    monkeypatch.setattr(files, "create_temp", no_new_files)
    holder = os.open(sf.path, os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_SH)
    try:
        started = time.monotonic()
        sf.update(clients=7)
        assert time.monotonic() - started < 1 and sf.stale
    finally:
        os.close(holder)
    sf.retry()
    assert not sf.stale and read_state(sf.path)["clients"] == 7
    sf.remove()


def test_read_state_never_hangs(tmp_path):
    """A FIFO at X.state, and a state file whose lock another process holds exclusively."""
    fifo = tmp_path / "fifo.state"
    os.mkfifo(fifo)
    assert in_child(f"from chatd.state import read_state\nprint(read_state({str(fifo)!r}))") == "None"
    path = tmp_path / "x.state"
    path.write_text(json.dumps({"pid": 5}))
    fd = os.open(path, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        said = in_child(f"from chatd.state import read_state\nprint(read_state({str(path)!r}))")
        assert said == "{'pid': 5}", said
    finally:
        os.close(fd)


def test_a_directory_at_the_state_file_ends_the_start_with_the_reason(tmp_path):
    (tmp_path / "x.state").mkdir()
    with pytest.raises(PrivilegeError, match="cannot write state file"):
        StateFile(str(tmp_path / "x.state")).open(pid=1)
    assert os.listdir(tmp_path) == ["x.state"]


# ------------------------------------------------------------------ the log file

def test_log_reopen_refuses_a_planted_symlink_and_keeps_writing(tmp_path, secret):
    path = tmp_path / "x.log"
    target = FileTarget(str(path))
    try:
        path.rename(tmp_path / "x.log.1")
        path.symlink_to(secret)
        with pytest.raises(OSError, match="symbolic link"):
            target.reopen()
        target.stream.write("still the old file\n")
        assert secret.read_bytes() == b"root only\n"
        assert (tmp_path / "x.log.1").read_text() == "still the old file\n"
    finally:
        target.close()


def test_the_owner_of_a_directory_only_it_may_write_is_trusted_there(tmp_path):
    """systemd's DynamicUser owns /run/chatd and the daemon's files in it: root's control
    commands must open them. A third user's file there is still refused."""
    d = tmp_path / "run"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    mine = d / "chatd.lock"
    mine.write_bytes(b"")
    os.chown(mine, NOBODY, NOBODY)
    os.close(files.open_file(str(mine), os.O_RDWR))
    other = d / "chatd.pid"
    other.write_bytes(b"")
    os.chown(other, NOBODY + 1, NOBODY + 1)
    with pytest.raises(files.UnsafeFile, match=f"belongs to uid {NOBODY + 1}"):
        files.open_file(str(other), os.O_RDONLY)
