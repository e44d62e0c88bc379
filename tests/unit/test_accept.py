"""accept.Gate in-process: how a refused newcomer is told and closed, with and without
descriptors to spare, and with the spare descriptor when accept() itself fails."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket

import pytest

from chatd import accept, config
from chatd.accept import FD_MARGIN, Gate
from chatd.connection import ServerState
from chatd.echo import EchoConnection

FULL = EchoConnection.FULL_LINE


def listener() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    return sock


def read_all(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(4096):
        data += chunk
    return data


def make_gate() -> Gate:
    loop = asyncio.get_running_loop()
    gate = Gate(ServerState(config.load().limits, 0, loop), loop)
    gate.connection_class = EchoConnection
    return gate


@pytest.mark.parametrize("spare_fds", [1000, FD_MARGIN])
def test_a_refusal_lingers_only_while_descriptors_are_to_spare(monkeypatch, spare_fds):
    """1. a newcomer sends a line and is refused, with `spare_fds` descriptors left.
    Result: it reads "server full" and EOF either way (no reset); the refusal lingers over its
    input only when more than FD_MARGIN descriptors are left."""
    logging.getLogger("chatd").disabled = True
    lsock = listener()
    client = socket.create_connection(lsock.getsockname())
    client.sendall(b"hello\n")

    async def scenario() -> int:
        gate = make_gate()
        gate.measure()
        soft = gate.fd_base + gate.state.count + spare_fds
        monkeypatch.setattr(accept.resource, "getrlimit",
                            lambda what: (soft, resource.RLIM_INFINITY))
        conn, _ = lsock.accept()
        await asyncio.sleep(0.05)   # the client's line has arrived
        gate.refuse(conn, None, FULL)
        lingering = len(gate.lingering)
        gate.close()
        return lingering

    try:
        lingering = asyncio.run(scenario())
        assert read_all(client) == FULL
    finally:
        client.close()
        lsock.close()
    assert lingering == (1 if spare_fds > FD_MARGIN else 0)


def test_out_of_descriptors_the_spare_tells_each_waiting_newcomer():
    """1. three newcomers wait in the backlog, 2. accept() has failed with EMFILE.
    Result: each reads "server full" and EOF; the spare descriptor is held again; the
    shortage is logged once, and its end once, with the count."""
    lsock = listener()
    lsock.setblocking(False)
    clients = [socket.create_connection(lsock.getsockname()) for _ in range(3)]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    chatd_log = logging.getLogger("chatd")
    chatd_log.disabled = False
    level = chatd_log.level
    chatd_log.setLevel(logging.INFO)
    chatd_log.addHandler(handler)

    async def scenario() -> bool:
        gate = make_gate()
        gate.short_of_fds(lsock, OSError(errno.EMFILE, os.strerror(errno.EMFILE)))
        held = gate.spare.fd is not None
        late = socket.create_connection(lsock.getsockname())
        conn, addr = lsock.accept()
        gate.let_in(conn, addr)   # descriptors again: the shortage ends
        await asyncio.sleep(0.05)
        late.close()
        await asyncio.sleep(0.05)
        gate.close()
        return held

    try:
        held = asyncio.run(scenario())
        assert [read_all(c) for c in clients] == [FULL] * 3
    finally:
        chatd_log.removeHandler(handler)
        chatd_log.setLevel(level)
        for c in clients:
            c.close()
        lsock.close()
    assert held
    shortage = [r for r in records if "out of descriptors" in r]
    over = [r for r in records if "descriptors available again" in r]
    assert len(shortage) == 1 and len(over) == 1, records
    assert "3 newcomers were told" in over[0]
