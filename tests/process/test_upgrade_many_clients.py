"""A live upgrade (README "Live upgrade") of a daemon holding more descriptors than select()
takes: the upgrade channel's descriptor is then past 1,023 in both processes, and the old and
the new chatd must still hear each other (a select() on it failed, and the upgrade with it,
without a word: found by the benchmark's u workloads at 5,000 connections, tests/perf).

Through the real `chatd start` and `chatd upgrade`; the clients are LineClients on
127.0.0.1, every one echoing a line before and after; the daemons are the fixture's,
stopped by pid at teardown.
"""

from __future__ import annotations

import re

from support import LineClient, fd_count, wait_for

CLIENTS = 1100


def echo_all(clients: list[LineClient], tag: bytes) -> None:
    """Every client sends its own line, then every one must get exactly it back."""
    for n, c in enumerate(clients):
        c.send(b"%s %d\n" % (tag, n))
    for n, c in enumerate(clients):
        assert c.recv_line() == b"%s %d\n" % (tag, n), n


def test_upgrade_past_1024_descriptors(make_chatd):
    chatd = make_chatd(extra_config="[limits]\nmax_clients_per_ip = 0\nrate = 0\n")
    old = chatd.start()
    clients: list[LineClient] = []
    try:
        for _ in range(CLIENTS):
            clients.append(LineClient(chatd.port))
        echo_all(clients, b"before")
        assert fd_count(old) > 1024
        done = chatd.cmd("upgrade", timeout=60)
        assert done.returncode == 0, (done.stdout, done.stderr, chatd.log_text()[-2000:])
        assert re.search(rb"in [0-9.]+ s; %d clients carried over" % CLIENTS, done.stdout), done.stdout
        new = chatd.pid()
        assert new != old
        wait_for(lambda: fd_count(new) > CLIENTS, what="the new chatd to hold every client")
        echo_all(clients, b"after")
    finally:
        for c in clients:
            c.close()
