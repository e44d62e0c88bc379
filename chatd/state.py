"""The state file: a small JSON object beside the pid file, through which control commands
learn what the daemon is doing (`status`) and how a restart ended (`restart`, `reload`).

It is replaced atomically (temp file, rename). When that fails (a daemon that
dropped privileges may not create files in a root-owned directory; a full
disk has no room for the temp file), it is rewritten in place instead, under
an exclusive flock that readers share.

That flock is a third lock, and this module owns it: it guards only the state
file's bytes during an in-place rewrite (the writer takes it exclusively,
`read_state` shares it). The pid-file lock and the guard lock are `pidfile`'s.
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any

STATE_KEYS = ("pid", "version", "started", "address", "mode", "loop", "log", "clients",
              "generation", "last_restart", "listeners", "settings")


class StateFile:
    """The daemon's writer for its state file."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        self._fd: int | None = None   # kept open for in-place rewrites after a privilege drop
        self.stale = False            # the last update could not be written anywhere

    def open(self, **initial: Any) -> None:
        """Create the file (before dropping privileges) with its first contents."""
        self.data = {k: None for k in STATE_KEYS} | initial
        self._replace()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)

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
        tmp = f"{self.path}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        try:
            try:
                os.write(fd, self._payload())
            finally:
                os.close(fd)
            os.rename(tmp, self.path)
        except OSError:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        if self._fd is not None:
            os.close(self._fd)
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)

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
            fcntl.flock(self._fd, fcntl.LOCK_EX)
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
    """The daemon's state, or None if there is none (or it cannot be read)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
        except OSError:
            pass
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
