"""The state file: a small JSON object beside the pid file, through which control commands
learn what the daemon is doing (`status`) and how a restart ended (`RestartOutcome`, which
`restart` and `reload` read back).

It is replaced atomically: a temporary file under an unpredictable name, made with
O_EXCL (nothing planted can stand in for it), then renamed over the file, which
also replaces whatever was planted at the name. The temporary file's descriptor
is kept for in-place rewrites, so no descriptor is ever reopened (a failed
reopen once left a closed number that a later write or close hit). When that fails (a daemon that
dropped privileges may not create files in a root-owned directory; a full
disk has no room for the temp file), it is rewritten in place instead, under
an exclusive flock that readers share.

That flock is a third lock, and this module owns it: it guards only the state
file's bytes during an in-place rewrite (the writer takes it exclusively,
`read_state` shares it). Neither side waits for it: a lock held by someone else
(any user who may read the file can take one) never freezes the daemon or hangs
`status`. The pid-file lock and the guard lock are `pidfile`'s.

Tests: tests/unit/test_files.py, tests/unit/test_state.py, tests/process/test_local_attacks.py
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from typing import Any, Literal

from . import files
from .errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK, PrivilegeError

READ_LOCK_TRIES = 50   # then read anyway: a torn read is invalid JSON, hence None
STATE_KEYS = ("pid", "version", "started", "address", "mode", "loop", "log", "clients",
              "generation", "last_restart", "listeners", "settings")

RestartKind = Literal["applied", "rejected", "failed"]


@dataclass(frozen=True)
class RestartOutcome:
    """How a restart in place ended: the daemon records it (`last_restart`), and `restart` and
    `reload` read it back for their verdict and exit status, so both sides share one shape."""

    kind: RestartKind      # applied; rejected (the config: nothing changed); failed (applying it)
    message: str
    time: float            # when it ended (time.time())

    @property
    def exit_status(self) -> int:
        """What `restart` and `reload` exit with: 0, or 6 for a config rejected, or 1."""
        return {"applied": EXIT_OK, "rejected": EXIT_CONFIG, "failed": EXIT_FAILED}[self.kind]

    def to_state(self) -> dict[str, Any]:
        return {"time": self.time, "outcome": self.kind, "message": self.message}

    @classmethod
    def from_state(cls, value: Any) -> RestartOutcome | None:
        """The outcome `to_state` recorded, or None if `value` is no object. The file may hold
        anything: an unknown outcome counts as failed, a missing message as empty, a time
        that is no number as 0."""
        if not isinstance(value, dict):
            return None
        outcome = value.get("outcome")
        kind: RestartKind = outcome if outcome in ("applied", "rejected") else "failed"
        when = value.get("time")
        return cls(kind, str(value.get("message", "")),
                   when if isinstance(when, (int, float)) and not isinstance(when, bool) else 0.0)


class StateFile:
    """The daemon's writer for its state file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        self._fd: int | None = None   # kept open for in-place rewrites after a privilege drop
        self.stale = False            # the last update could not be written anywhere

    def open(self, **initial: Any) -> None:
        """Create the file (before dropping privileges) with its first contents; failing
        that (a directory at its name, say), the start ends with the reason (exit 4)."""
        self.data = {k: None for k in STATE_KEYS} | initial
        try:
            self._replace()
        except OSError as e:
            raise PrivilegeError(f"cannot write state file {self.path}: {e.strerror}") from None

    @property
    def fd(self) -> int | None:
        """The descriptor kept for in-place rewrites (a live upgrade hands it on)."""
        return self._fd

    def adopt(self, data: dict[str, Any], fd: int | None) -> None:
        """Write on where the process before a live upgrade left off (its `data` and `fd`)."""
        self.data = dict(data)
        self._fd = fd

    def forget(self) -> None:
        """Close our descriptor, write nothing more (a forked worker: the parent owns the file)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.data = {}

    def update(self, **changes: Any) -> None:
        """Record `changes`; on a full disk the file is rewritten in place instead, and if
        even that fails, `stale` is set and `retry` (called every second) tries again."""
        if not self.data:
            return   # not opened yet, or already removed at exit
        self.data.update(changes)
        try:
            self._replace()
        except OSError:
            self.stale = not self._rewrite_in_place()
        else:
            self.stale = False

    def retry(self) -> None:
        if self.stale:
            self.update()

    def _payload(self) -> bytes:
        return (json.dumps(self.data, sort_keys=True) + "\n").encode()

    def _replace(self) -> None:
        """Write a new file and rename it over the old; its descriptor becomes the kept one."""
        fd, tmp = files.create_temp(self.path)
        try:
            os.write(fd, self._payload())
            os.rename(tmp, self.path)
        except OSError:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        old, self._fd = self._fd, fd
        if old is not None:
            os.close(old)

    def _rewrite_in_place(self) -> bool:
        """Overwrite the file through the descriptor kept open; True if it worked.

        The new bytes are written over the old before the file is cut to length:
        truncating first would free its blocks, and on a full disk the write
        could then find none and leave the file empty.
        """
        if self._fd is None:
            return False
        payload = self._payload()
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # busy: stale, retried in a second
            try:
                os.pwrite(self._fd, payload, 0)
                os.ftruncate(self._fd, len(payload))
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError:
            return False
        return True

    def remove(self) -> None:
        """Remove the file at exit; only the process that created it may."""
        if not self.data:
            return
        self.data = {}
        try:
            os.unlink(self.path)
        except OSError:
            if self._fd is not None:
                try:
                    os.ftruncate(self._fd, 0)
                except OSError:
                    pass
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def read_state(path: str) -> dict[str, Any] | None:
    """The daemon's state, or None if there is none (or it cannot be read, or is refused)."""
    try:
        fd = files.open_file(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        for _ in range(READ_LOCK_TRIES):   # a rewrite holds it for microseconds
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break
        raw = b""
        while chunk := os.read(fd, 65536):
            raw += chunk
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
