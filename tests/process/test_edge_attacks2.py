"""Attacks on TLS, moderation and metrics (README "Running it on the internet"), each a hole
once found, through the real `chatd` command. Every client is local (127.0.0.1) and bounded by
deadlines; every daemon is stopped by pid by the fixtures.
"""

from __future__ import annotations

import json
import socket
import ssl

from support import LineClient, fd_count, free_port, wait_for
from test_metrics import scrape, value
from test_tls import TlsClient, certs, client_context, tls_config  # noqa: F401 - a fixture


def test_kick_reasons_are_one_metrics_series_not_one_each(chatd):
    """1. echo mode with `[metrics] listen`; 2. three clients kicked one by one by address,
    each with a reason of its own (quotes and a backslash in one). Result: /metrics and
    `chatd stats --json` both count 3 disconnects labelled `kicked`, and no label holds the
    operator's text (it was a new series per reason ever given: unbounded cardinality)."""
    port = free_port()
    chatd.write_config(mode="echo", extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    chatd.start()
    for reason in ("spam", 'say "hi" \\ no', "flood 3"):
        with LineClient(chatd.port) as c:
            c.send(b"x\n")
            assert c.recv_line() == b"x\n"
            chatd.cmd("kick", "127.0.0.1", reason, check=0)
            assert c.recv_until_eof() == f"*** you were kicked: {reason}\r\n".encode()
    reasons = {dict(labels)["reason"]: v for (name, labels), v in scrape(port).items()
               if name == "chatd_disconnects_total"}
    assert reasons["kicked"] == 3 and reasons["banned"] == 0, reasons
    assert not [r for r in reasons if ":" in r], reasons
    stats = json.loads(chatd.cmd("stats", "--json", check=0).stdout)
    assert {d["reason"]: d["value"] for d in stats["disconnects_total"]} == reasons


def test_an_oversized_say_or_kick_is_refused_with_the_reason(chatd):
    """1. one echo client; 2. `chatd say` of 100,000 characters, `chatd kick` with a reason
    that long; 3. `chatd say` of 5,000. Result: the first two exit 2 saying the arguments are
    too long (it was the daemon's bare `chatd: bad request`), nothing reaches the client; the
    third is said, cut at 400 characters."""
    chatd.write_config(mode="echo")
    chatd.start()
    with LineClient(chatd.port) as c:
        for args in (("say", "a" * 100_000), ("kick", "127.0.0.1", "b" * 100_000)):
            proc = chatd.cmd(*args, check=2)
            assert proc.stderr.startswith(f"chatd: {args[0]}: the arguments are too long (a request "
                                          f"is at most 8192 bytes; a text is cut at 400 characters "
                                          f"anyway)\n".encode()), proc.stderr
        assert chatd.cmd("say", "c" * 5000, check=0).stdout == b"said to 1 clients\n"
        assert c.recv_line() == b"*** " + b"c" * 400 + b"\r\n"


def ask(inst, line: bytes) -> bytes:
    """`line` on the control socket; the daemon's answer line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(inst.pidfile.with_suffix(".sock")))
        s.sendall(line)
        return s.makefile("rb").readline()


def control(inst, request: dict) -> dict:
    """One request on the control socket, as `chatd` sends it; the daemon's answer."""
    return json.loads(ask(inst, json.dumps(request).encode() + b"\n"))


def test_a_deeply_nested_control_request_is_a_bad_request(chatd):
    """A control request of 8,000 "[" (JSON nested past Python's recursion limit, inside the
    8 KiB line). Result: answered `bad request` (exit 2's status), and the log holds no error
    (it was closed unanswered, the log saying "Unhandled exception ... RecursionError")."""
    chatd.write_config(mode="echo")
    chatd.start()
    assert ask(chatd, b"[" * 8000 + b"\n") == b'{"ok": false, "error": "bad request", "status": 2}\n'
    assert chatd.cmd("who", check=0).stdout == b"no clients\n"
    assert "ERROR" not in chatd.log_text() and "RecursionError" not in chatd.log_text()


def test_a_ban_duration_is_taken_as_given_or_refused_without_a_ban(chatd):
    """1. `chatd ban 127.0.0.9 0.00005` (a duration the command line accepts); 2. a control
    request whose seconds are "10m"; 3. one whose seconds are "soon". Result: 1 exits 0 (the
    daemon re-parsed str(5e-05) and refused '5e-05', a text nobody typed); 2 is answered ok
    with a ban of about 10 minutes (it was answered `bad request` with the ban in force);
    3 is refused, and no ban on it is made."""
    chatd.write_config(mode="echo")
    chatd.start()
    assert chatd.cmd("ban", "127.0.0.9", "0.00005", check=0).stdout == \
        b"banned 127.0.0.9; kicked nobody\n"
    assert control(chatd, {"cmd": "ban", "target": "127.0.0.10", "seconds": "10m"}) == \
        {"ok": True, "ban": "127.0.0.10", "kicked": []}
    answer = control(chatd, {"cmd": "ban", "target": "127.0.0.11", "seconds": "soon"})
    assert answer["ok"] is False and answer["status"] == 2, answer
    bans = json.loads(chatd.cmd("bans", "--json", check=0).stdout)["bans"]
    assert [b["ban"] for b in bans] == ["127.0.0.10"] and 590 < bans[0]["expires_in_s"] <= 600, bans


def test_failed_handshakes_are_counted_so_accepted_is_disconnects_plus_clients(chatd, certs):
    """1. a TLS listener with `[metrics] listen`; 2. three newcomers that send an HTTP request
    instead of a ClientHello; 3. one TLS echo session, closed; 4. one left connected. Result:
    disconnects{reason="handshake failed"} is 3, and accepted = disconnects + clients (the
    failed handshakes were counted as accepted and never again: a handshake flood left no
    trace but a drift between the two)."""
    tls_port, port = free_port(), free_port()
    tls_config(chatd, certs, tls_port, extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    chatd.start()
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            assert s.recv(100) == b""
    with TlsClient(tls_port) as c:
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"
    with TlsClient(tls_port) as c:
        c.send(b"y\n")
        assert c.recv_line() == b"y\n"

        def settled():
            now = scrape(port)
            ended = sum(v for (name, _), v in now.items() if name == "chatd_disconnects_total")
            return now if ended == 4 else None
        now = wait_for(settled, what="four disconnects counted")
        assert value(now, "chatd_disconnects_total", reason="handshake failed") == 3, now
        clients = sum(v for (name, _), v in now.items() if name == "chatd_clients")
        assert value(now, "chatd_connections_accepted_total") == 4 + clients == 5, now


def test_a_ban_reaches_a_tls_client_still_in_its_handshake(loop_chatd, certs):
    """1. a TLS echo listener; 2. a client from 127.0.0.5 connects (accepted: the daemon holds
    one more descriptor) and has not sent its ClientHello; 3. `chatd ban 127.0.0.5`; 4. it
    completes its handshake and sends a line. Result: it is told `*** you were banned` and
    closed, unechoed, and `chatd who` lists nobody (it was served: bans were asked only
    before the handshake)."""
    chatd = loop_chatd   # on both loops
    tls_port = free_port()
    tls_config(chatd, certs, tls_port)
    pid = chatd.start()
    before = fd_count(pid)
    with socket.socket() as raw:
        raw.settimeout(5)
        raw.bind(("127.0.0.5", 0))
        raw.connect(("127.0.0.1", tls_port))
        wait_for(lambda: fd_count(pid) > before, what="the daemon to accept the client")
        assert chatd.cmd("ban", "127.0.0.5", check=0).stdout == b"banned 127.0.0.5; kicked nobody\n"
        with client_context().wrap_socket(raw) as c:
            try:
                c.sendall(b"still here\n")
            except OSError:
                pass   # closed already: what it was told is read below
            got = b""
            try:
                while chunk := c.recv(4096):
                    got += chunk
            except (ssl.SSLError, ConnectionResetError):
                pass   # closed over the unread line, after the notice
            assert got == b"*** you were banned\r\n", got
    assert chatd.cmd("who", check=0).stdout == b"no clients\n"
