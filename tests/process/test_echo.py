"""Echo mode through the real daemon (README "Echo mode"), on both event loops."""

from __future__ import annotations

import socket
import time

import pytest

from support import LineClient, alive, rss_kib, wait_for
import struct


def test_lines_come_back_byte_for_byte(loop_chatd):
    """1. start chatd, 2. send LF and CRLF lines. Result: each comes back as sent."""
    loop_chatd.start()
    with LineClient(loop_chatd.port) as c:
        c.send(b"hello\n")
        assert c.recv_line() == b"hello\n"
        c.send(b"crlf line\r\n")
        assert c.recv_line() == b"crlf line\r\n"
        c.send(b"\n")
        assert c.recv_line() == b"\n"
        c.send(bytes(range(1, 10)) + b"\x80\xfe tail\n")
        assert c.recv_line() == bytes(range(1, 10)) + b"\x80\xfe tail\n"


def test_many_lines_in_one_segment_all_come_back_in_order(loop_chatd):
    loop_chatd.start()
    payload = b"".join(b"line %d\n" % i for i in range(500))
    with LineClient(loop_chatd.port) as c:
        c.send(payload)
        assert c.recv_exact(len(payload)) == payload


def test_line_split_across_segments_is_joined(loop_chatd):
    """1. send a line one byte at a time with pauses. Result: it comes back once, whole."""
    loop_chatd.start()
    with LineClient(loop_chatd.port) as c:
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"split li":
            c.send(bytes([b]))
            time.sleep(0.002)
        c.send(b"ne\r")
        time.sleep(0.02)
        c.send(b"\nnext\n")
        assert c.recv_exact(len(b"split line\r\nnext\n")) == b"split line\r\nnext\n"


def test_half_close_echoes_the_unterminated_tail_then_closes(loop_chatd):
    loop_chatd.start()
    with LineClient(loop_chatd.port) as c:
        c.send(b"a\nb")
        c.shutdown_write()
        assert c.recv_until_eof() == b"a\nb"


def test_over_long_line_gets_one_err_line_and_the_connection_stays(make_chatd):
    inst = make_chatd(extra_config="[limits]\nmax_line = 32\noutput_buffer = 1024\n")
    inst.start()
    with LineClient(inst.port) as c:
        c.send(b"ok\n" + b"x" * 100 + b"\nafter\n")
        assert c.recv_exact(3) == b"ok\n"
        assert c.recv_line() == b"ERR line too long (max 32 bytes)\r\n"
        assert c.recv_line() == b"after\n"
        # exactly max_line bytes is fine, with LF or CRLF; one more is not
        c.send(b"y" * 32 + b"\n" + b"z" * 32 + b"\r\n" + b"w" * 33 + b"\n")
        assert c.recv_line() == b"y" * 32 + b"\n"
        assert c.recv_line() == b"z" * 32 + b"\r\n"
        assert c.recv_line() == b"ERR line too long (max 32 bytes)\r\n"


def test_memory_stays_bounded_while_10_mib_without_a_newline_arrive(loop_chatd):
    """1. 10 MiB with no newline, 2. a newline, 3. a normal line.
    Result: one ERR line, the normal line echoed, and RSS grew by far less than 10 MiB."""
    inst = loop_chatd
    pid = inst.start()
    with LineClient(inst.port) as c:
        c.send(b"warm\n")
        assert c.recv_line() == b"warm\n"
        before = rss_kib(pid)
        peak = before
        chunk = b"x" * 65536
        for i in range(160):
            c.send(chunk)
            if i % 16 == 0:
                peak = max(peak, rss_kib(pid))
        c.send(b"\nnormal\n")
        assert c.recv_line() == b"ERR line too long (max 4096 bytes)\r\n"
        assert c.recv_line() == b"normal\n"
        peak = max(peak, rss_kib(pid))
    assert peak - before < 4 * 1024, (before, peak)


def test_a_client_that_does_not_read_is_paused_not_dropped_nor_buffered(loop_chatd):
    """1. a client with a small receive buffer sends 32 MiB of lines and reads nothing,
    2. then reads everything. Result: chatd's memory stays bounded meanwhile, the client is
    not dropped, and every echo arrives intact and in order."""
    inst = loop_chatd
    pid = inst.start()
    c = LineClient(inst.port, rcvbuf=16384)
    line = b"0123456789" * 10 + b"\n"
    total = 32 * 1024 * 1024 // len(line)
    before = rss_kib(pid)
    c.sock.setblocking(False)
    sent = 0
    data = line * total
    stalled_since = None
    deadline = time.monotonic() + 20
    while sent < len(data) and time.monotonic() < deadline:
        try:
            sent += c.sock.send(data[sent:sent + (1 << 20)])
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.5:
                break   # nothing moves any more: chatd has stopped reading us
            time.sleep(0.01)
    # Paused: the kernel buffers are full and chatd stopped reading long before 32 MiB.
    assert sent < len(data)
    peak = rss_kib(pid)
    assert peak - before < 8 * 1024, (before, peak)
    assert alive(pid)
    # Now read everything, sending the rest as room appears.
    c.sock.setblocking(True)
    received = 0
    expected = len(data)
    c.sock.settimeout(10)
    while received < expected:
        if sent < len(data):
            c.sock.setblocking(False)
            try:
                sent += c.sock.send(data[sent:sent + 65536])
            except BlockingIOError:
                pass
            c.sock.settimeout(10)
        chunk = c.sock.recv(1 << 20)
        assert chunk, "connection closed"
        assert chunk == data[received:received + len(chunk)]
        received += len(chunk)
    c.close()


def test_hundreds_of_concurrent_clients(make_chatd):
    inst = make_chatd(extra_config="[limits]\nmax_clients_per_ip = 0\n")
    inst.start()
    clients = [LineClient(inst.port) for _ in range(600)]
    try:
        for i, c in enumerate(clients):
            c.send(b"client %d\n" % i)
        for i, c in enumerate(clients):
            assert c.recv_line() == b"client %d\n" % i
        status = wait_for(lambda: (p := inst.cmd("status")) and b"clients: 600" in p.stdout,
                          timeout=5, what="status to count 600 clients")
        assert status
    finally:
        for c in clients:
            c.close()


def test_server_full_per_address_and_in_total(make_chatd):
    inst = make_chatd(extra_config="[limits]\nmax_clients = 5\nmax_clients_per_ip = 3\n")
    inst.start()
    held = [LineClient(inst.port) for _ in range(3)]
    for c in held:
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"
    with LineClient(inst.port) as extra:
        assert extra.recv_until_eof() == b"ERR server full\r\n"
    held[0].close()
    wait_for(lambda: "disconnect" in inst.log_text(), what="the close to be seen")
    with LineClient(inst.port) as again:
        again.send(b"y\n")
        assert again.recv_line() == b"y\n"
    for c in held[1:]:
        c.close()
    assert "refused 127.0.0.1" in inst.log_text()
    # in total: max_clients 5 counts every address
    inst.write_config(extra="[limits]\nmax_clients = 2\nmax_clients_per_ip = 0\n")
    inst.cmd("restart", check=0)
    two = [LineClient(inst.port) for _ in range(2)]
    for c in two:
        c.send(b"z\n")
        assert c.recv_line() == b"z\n"
    with LineClient(inst.port) as third:
        assert third.recv_until_eof() == b"ERR server full\r\n"
    for c in two:
        c.close()


def test_idle_clients_are_closed_after_idle_timeout(make_chatd):
    inst = make_chatd(extra_config="[limits]\nidle_timeout = 0.5\n")
    inst.start()
    with LineClient(inst.port) as idle, LineClient(inst.port) as busy:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            busy.send(b"b\n")
            assert busy.recv_line() == b"b\n"
            time.sleep(0.1)
        assert idle.recv_until_eof(timeout=3) == b""
        busy.send(b"still\n")
        assert busy.recv_line() == b"still\n"
    wait_for(lambda: ": idle (" in inst.log_text(), what="the idle disconnect in the log")


def test_connects_and_disconnects_are_logged_without_message_text(chatd):
    chatd.start()
    with LineClient(chatd.port) as c:
        c.send(b"secret-text-123\n")
        assert c.recv_line() == b"secret-text-123\n"
        c.shutdown_write()
        c.recv_until_eof()
    wait_for(lambda: "client closed" in chatd.log_text(), what="the disconnect line")
    log = chatd.log_text()
    assert "connect 127.0.0.1:" in log and "disconnect 127.0.0.1:" in log
    assert "secret-text-123" not in log


def test_clients_that_reset_leave_no_trace_but_a_log_line(loop_chatd):
    """Clients that send and reset (RST) mid-stream: chatd keeps serving, logs no traceback."""
    inst = loop_chatd
    inst.start()
    for _ in range(50):
        s = socket.create_connection(("127.0.0.1", inst.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.sendall(b"abc\n" * 2000)
        s.close()
    with LineClient(inst.port) as c:
        c.send(b"fine\n")
        assert c.recv_line() == b"fine\n"
    assert "Traceback" not in inst.log_text()


def test_any_split_into_segments_gives_the_same_echo(chatd):
    """A hypothesis property through the real daemon: however the input is cut into TCP
    segments (TCP_NODELAY, a pause between them), the echo is the same bytes."""
    from hypothesis import HealthCheck, given, settings, strategies as st

    chatd.start()
    line = st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"").replace(b"\xff", b""))
    term = st.sampled_from([b"\n", b"\r\n"])

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(line, term), min_size=1, max_size=20), st.data())
    def prop(lines, data):
        payload = b"".join(content + t for content, t in lines)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(payload)), max_size=8)))
        with LineClient(chatd.port) as c:
            c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = 0
            for cut in cuts + [len(payload)]:
                if cut > start:
                    c.send(payload[start:cut])
                    time.sleep(0.001)
                    start = cut
            assert c.recv_exact(len(payload)) == payload

    prop()


@pytest.mark.slow
def test_thousands_of_concurrent_clients(make_chatd):
    """3000 clients connected at once, each echoed; none waits for another."""
    import selectors

    inst = make_chatd(extra_config="[limits]\nmax_clients_per_ip = 0\n")
    inst.start()
    socks = []
    try:
        for _ in range(3000):
            s = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
            socks.append(s)
        sel = selectors.DefaultSelector()
        pending = {}
        for i, s in enumerate(socks):
            s.sendall(b"client %d\n" % i)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
            pending[i] = b""
        deadline = time.monotonic() + 30
        done = 0
        while done < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=1):
                i = key.data
                pending[i] += key.fileobj.recv(4096)
                if pending[i].endswith(b"\n"):
                    assert pending[i] == b"client %d\n" % i
                    sel.unregister(key.fileobj)
                    done += 1
        assert done == len(socks)
        assert wait_for(lambda: b"clients: 3000" in inst.cmd("status").stdout, timeout=5,
                        what="status to count 3000 clients")
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("mode, full", [("echo", b"ERR server full\r\n"), ("chat", b"*** server full\r\n")])
def test_running_out_of_descriptors_tells_newcomers_server_full(make_chatd, mode, full):
    """With max_clients = 0 (no limit of ours) and only 300 descriptors, chatd keeps a
    reserve: clients past what fits are told "server full" and closed, none is left hanging,
    and those admitted are served."""
    import resource

    inst = make_chatd(extra_config="[limits]\nmax_clients = 0\nmax_clients_per_ip = 0\nrate = 0\n")
    inst.write_config(mode=mode, extra="[limits]\nmax_clients = 0\nmax_clients_per_ip = 0\nrate = 0\n")
    inst.cmd("start", check=0, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (300, 300)))
    clients = []
    try:
        answers = {"served": 0, "full": 0}
        for i in range(260):
            c = LineClient(inst.port, timeout=5)
            clients.append(c)
            c.send(b"n%d\n" % i)
        for i, c in enumerate(clients):
            first = c.recv_line()
            if first == full:
                assert c.recv_until_eof() == b""
                answers["full"] += 1
            else:
                answers["served"] += 1
        assert answers["served"] >= 150 and answers["full"] >= 50, answers
    finally:
        for c in clients:
            c.close()
    assert "Traceback" not in inst.log_text()
