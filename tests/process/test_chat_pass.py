"""Chat mode writes once per receiver per loop pass (README "Chat mode", issue 13), through
the real daemon on each loop.

The daemon is stopped (SIGSTOP) while three senders each send lines, so that when it goes on
(SIGCONT) one pass of its loop reads all three. What that pass produces for a receiver must
leave in one write: the receiving socket counts the data segments it got (TCP_INFO
`tcpi_data_segs_in`; on loopback with TCP_NODELAY every write is a segment of its own), and
that count must grow by exactly one. Before the change it grew by three, one per sender read.

Every wait has a deadline; the daemon is stopped by pid by the fixture.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest

from support import LineClient

TIMEOUT = 10.0
TCP_INFO_LEN = 232
DATA_SEGS_IN = 152      # offset of tcpi_data_segs_in in struct tcp_info (Linux >= 4.6)


def data_segs_in(sock: socket.socket) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    if len(info) < DATA_SEGS_IN + 4:
        pytest.fail(f"TCP_INFO too short ({len(info)} bytes) for tcpi_data_segs_in")
    return struct.unpack_from("I", info, DATA_SEGS_IN)[0]


def quiet(clients: list[LineClient], settle: float = 0.3) -> None:
    """Read and drop what each client has until none got anything for `settle` s."""
    deadline = time.monotonic() + TIMEOUT
    for c in clients:
        c.sock.setblocking(False)
    last = time.monotonic()
    while time.monotonic() - last < settle:
        assert time.monotonic() < deadline, "the room never went quiet"
        for c in clients:
            try:
                if c.sock.recv(65536):
                    last = time.monotonic()
            except BlockingIOError:
                pass
        time.sleep(0.02)
    for c in clients:
        c.sock.settimeout(TIMEOUT)


def read_until(c: LineClient, count: int) -> bytes:
    """Read until `count` lines came (CRLF-terminated)."""
    got = b""
    deadline = time.monotonic() + TIMEOUT
    while got.count(b"\r\n") < count:
        assert time.monotonic() < deadline, got
        got += c.sock.recv(65536)
    return got


def one_pass(loop_chatd, senders: int, lines: int) -> tuple[list[int], list[bytes]]:
    """`senders` clients each send `lines` lines while the daemon is stopped; returns, for a
    receiver and for each sender, how many segments the pass's output took, and what came."""
    loop_chatd.write_config(mode="chat", extra="")
    pid = loop_chatd.start()
    clients = [LineClient(loop_chatd.port, timeout=TIMEOUT) for _ in range(senders + 1)]
    for i, c in enumerate(clients):
        c.send(f"/nick n{i}\n".encode())
    quiet(clients)
    before = [data_segs_in(c.sock) for c in clients]
    os.kill(pid, signal.SIGSTOP)
    try:
        for i, c in enumerate(clients[1:], 1):
            c.send(b"".join(f"line {k} from n{i}\n".encode() for k in range(lines)))
        time.sleep(0.3)   # every sender's lines wait in the daemon's receive queues
    finally:
        os.kill(pid, signal.SIGCONT)
    got = [read_until(clients[0], senders * lines)]
    got += [read_until(c, (senders - 1) * lines) for c in clients[1:]]
    quiet(clients)
    segments = [data_segs_in(c.sock) - b for c, b in zip(clients, before)]
    for c in clients:
        c.close()
    return segments, got


@pytest.mark.parametrize("lines", [1, 3])
def test_what_one_pass_reads_from_several_senders_leaves_in_one_write(loop_chatd, lines):
    """Three senders' lines read in one pass: the receiver gets all of them in one segment,
    each sender the others' in one, each sender's lines in its order and none of its own."""
    segments, got = one_pass(loop_chatd, senders=3, lines=lines)
    for i, text in enumerate(got):
        mine = [ln for ln in text.split(b"\r\n") if ln]
        assert not any(ln.startswith(b"<n%d> " % i) for ln in mine), text   # no self-echo
        for j in range(1, 4):
            if j != i:
                assert [ln for ln in mine if ln.startswith(b"<n%d> " % j)] == [
                    b"<n%d> line %d from n%d" % (j, k, j) for k in range(lines)], text
    assert segments == [1, 1, 1, 1], (segments, got)
