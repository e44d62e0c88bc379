"""The daemon's release (`lifetime.Held.release`): everything given back, in its order, once."""

from __future__ import annotations

import logging
import os
import socket

from chatd.lifetime import Held
from chatd.log import Logging
from chatd.pidfile import PidFile, probe
from chatd.state import StateFile


class Witness(logging.Handler):
    """Notes, with each line logged, which of the daemon's files still exist."""

    def __init__(self, *paths: str) -> None:
        super().__init__()
        self.paths = paths
        self.seen: list[tuple[str, list[bool]]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), [os.path.exists(p) for p in self.paths]))


def test_release_gives_everything_back_once_with_the_last_word_before_the_pid_file(tmp_path, caplog,
                                                                                  monkeypatch):
    """1. a daemon's holdings: a listening socket, its pid file (locked), its state file, logging;
    2. the server asks for them back with its last word; then `serve` unwinds and asks again.
    Result: the socket is closed, the state file and then the pid file are gone and the lock is
    free; the last word was logged once, after the state file went and before the pid file did."""
    monkeypatch.setattr(logging, "raiseExceptions", logging.raiseExceptions)   # Logging turns it off
    pid_path, state_path = str(tmp_path / "x.pid"), str(tmp_path / "x.state")
    sock = socket.socket()
    pidfile = PidFile(pid_path)
    pidfile.acquire(os.getpid())
    state = StateFile(state_path)
    state.open(pid=os.getpid())
    held = Held([sock], pidfile, state, Logging(str(tmp_path / "x.log"), on_change=lambda _: None))
    witness = Witness(state_path, pid_path)
    logger = logging.getLogger("chatd")
    logger.disabled = False
    logger.addHandler(witness)
    try:
        with caplog.at_level(logging.INFO, logger="chatd"):
            held.release("stopped")
            held.release()
    finally:
        logger.removeHandler(witness)
    assert witness.seen == [("stopped", [False, True])]
    assert sock.fileno() == -1
    assert not os.path.exists(state_path) and not os.path.exists(pid_path)
    assert not probe(pid_path).running
