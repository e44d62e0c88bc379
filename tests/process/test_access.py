"""Who may connect, through the real `chatd`: `[access] allow` and `deny`, `[limits]
connect_rate`, and PROXY protocol v1 and v2 on a `proxy://` listener from trusted and untrusted
addresses. Clients bind 127.0.0.2 and 127.0.0.3 before connecting (all of 127/8 is local on
Linux), or use ::1."""

from __future__ import annotations

import socket
import struct
import time

import pytest

from support import free_port, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def _connect(port: int, src: str = "127.0.0.1", host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((src, 0))
    s.connect((host, port))
    return s


def _received(s: socket.socket, timeout: float = 5) -> bytes:
    """Everything until the server closes (a reset counts as a close)."""
    s.settimeout(timeout)
    got = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = s.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += chunk
    else:
        raise AssertionError(f"not closed within {timeout} s; got {got!r}")
    return got


def _line(s: socket.socket) -> bytes:
    got = b""
    while not got.endswith(b"\n"):
        chunk = s.recv(4096)
        if not chunk:
            break
        got += chunk
    return got


def _echoes(port: int, src: str = "127.0.0.1", host: str = "127.0.0.1", send: bytes = b"ping\n") -> bool:
    with _connect(port, src, host) as s:
        s.sendall(send)
        return _line(s) == b"ping\n"


def _shut_out(port: int, src: str = "127.0.0.1", host: str = "127.0.0.1", send: bytes = b"") -> bool:
    """Closed without a byte: no banner, no echo (send nothing, and the close is a FIN)."""
    with _connect(port, src, host) as s:
        if send:
            s.sendall(send)
        return _received(s) == b""


def _config(chatd, access: str = "", limits: str = "", **server: object) -> None:
    chatd.write_config(extra=(f"[access]\n{access}\n" if access else "") + (f"[limits]\n{limits}\n" if limits else ""),
                       **server)


def _refusal_lines(chatd, ip: str) -> list[str]:
    return [line for line in chatd.log_text().splitlines() if f"refused {ip}:" in line]


# ------------------------------------------------------------------ allow and deny

def test_the_allow_list_admits_its_addresses_and_closes_others_unread(loop_chatd):
    _config(loop_chatd, access='allow = ["127.0.0.2"]')
    loop_chatd.start()
    assert _echoes(loop_chatd.port, "127.0.0.2")
    assert _shut_out(loop_chatd.port, "127.0.0.3")
    assert _shut_out(loop_chatd.port, "127.0.0.1")
    wait_for(lambda: _refusal_lines(loop_chatd, "127.0.0.3"), what="the refusal logged")
    assert "not in [access] allow" in _refusal_lines(loop_chatd, "127.0.0.3")[0]
    assert "connect 127.0.0.3" not in loop_chatd.log_text()


def test_deny_wins_over_allow_and_takes_cidr_blocks(chatd):
    _config(chatd, access='allow = ["127.0.0.0/8"]\ndeny = ["127.0.0.3", "127.0.0.4/30"]')
    chatd.start()
    assert _echoes(chatd.port, "127.0.0.2") and _echoes(chatd.port, "127.0.0.8")
    for src in ("127.0.0.3", "127.0.0.5", "127.0.0.7"):
        assert _shut_out(chatd.port, src), src
    wait_for(lambda: _refusal_lines(chatd, "127.0.0.5"), what="the refusal logged")
    assert "denied by [access] deny" in _refusal_lines(chatd, "127.0.0.5")[0]


def test_an_ipv6_rule_and_an_ipv4_rule_on_the_dual_stack_socket(chatd):
    """deny ::1 refuses ::1; deny 127.0.0.2 refuses 127.0.0.2 arriving as ::ffff:127.0.0.2."""
    port = free_port(socket.AF_INET6)
    _config(chatd, access='deny = ["::1", "127.0.0.2"]', listen=[f":{port}"])
    chatd.start()
    assert _shut_out(port, "::1", "::1")
    assert _shut_out(port, "127.0.0.2")
    assert _echoes(port, "127.0.0.3")
    wait_for(lambda: _refusal_lines(chatd, "[::1]") and _refusal_lines(chatd, "127.0.0.2"),
             what="both refusals logged")


def test_a_restart_changes_the_lists_for_new_connections_at_once(chatd):
    _config(chatd, access='allow = ["127.0.0.2"]')
    chatd.start()
    stays = _connect(chatd.port, "127.0.0.2")
    assert _shut_out(chatd.port, "127.0.0.3")
    _config(chatd, access='allow = ["127.0.0.3"]')
    said = chatd.cmd("restart", check=0).stdout.decode()
    assert "access.allow" in said, said
    assert _echoes(chatd.port, "127.0.0.3")
    assert _shut_out(chatd.port, "127.0.0.2")
    stays.sendall(b"ping\n")                    # connected before: it stays
    assert _line(stays) == b"ping\n"
    stays.close()


def test_a_refused_address_is_logged_once_an_interval_however_often_it_tries(chatd):
    _config(chatd, access='deny = ["127.0.0.3"]')
    chatd.start()
    for _ in range(200):
        assert _shut_out(chatd.port, "127.0.0.3")
    assert _echoes(chatd.port, "127.0.0.2")
    chatd.cmd("stop", check=0)                  # a stop logs the interval's summary
    text = chatd.log_text()
    assert len(_refusal_lines(chatd, "127.0.0.3")) == 1, text[-3000:]
    summaries = [line for line in text.splitlines() if "churn from 127.0.0.3" in line]
    assert len(summaries) == 1 and "199 refused" in summaries[0], summaries


# ------------------------------------------------------------------ connection rate

def test_past_connect_burst_a_source_is_told_to_slow_down_and_its_tokens_come_back(loop_chatd):
    _config(loop_chatd, limits="connect_rate = 2.0\nconnect_burst = 3")
    loop_chatd.start()
    held = [_connect(loop_chatd.port, "127.0.0.2") for _ in range(3)]
    with _connect(loop_chatd.port, "127.0.0.2") as s:
        assert _received(s) == b"ERR too many connections, slow down\r\n"
    assert _echoes(loop_chatd.port, "127.0.0.3")       # another source has a bucket of its own
    for s in held:
        s.sendall(b"ping\n")
        assert _line(s) == b"ping\n"
        s.close()
    time.sleep(0.7)                                     # one token back at 2 a second
    assert _echoes(loop_chatd.port, "127.0.0.2")
    wait_for(lambda: _refusal_lines(loop_chatd, "127.0.0.2"), what="the refusal logged")
    assert "connect_rate" in _refusal_lines(loop_chatd, "127.0.0.2")[0]


def test_chat_mode_says_slow_down_its_way_and_a_restart_applies_a_new_rate_at_once(chatd):
    _config(chatd, limits="connect_rate = 0.1\nconnect_burst = 1", mode="chat")
    chatd.start()
    first = _connect(chatd.port, "127.0.0.2")
    with _connect(chatd.port, "127.0.0.2") as s:
        assert _received(s) == b"*** too many connections, slow down\r\n"
    first.close()
    _config(chatd, limits="connect_rate = 0.0", mode="chat")
    said = chatd.cmd("restart", check=0).stdout.decode()
    assert "limits.connect_rate" in said, said
    for _ in range(5):
        with _connect(chatd.port, "127.0.0.2") as s:
            line = _line(s)
            assert line.startswith(b"***") and b"slow down" not in line, line   # the greeting


# ------------------------------------------------------------------ PROXY protocol

def _v2(client: str, port: int, local: bool = False, tlv: bytes = b"") -> bytes:
    if local:
        return V2_SIGNATURE + b"\x20\x00" + struct.pack("!H", len(tlv)) + tlv
    family = socket.AF_INET6 if ":" in client else socket.AF_INET
    dst = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    body = socket.inet_pton(family, client) + socket.inet_pton(family, dst) + struct.pack("!HH", port, 7777) + tlv
    return V2_SIGNATURE + (b"\x21\x21" if family == socket.AF_INET6 else b"\x21\x11") + struct.pack("!H", len(body)) + body


def _v1(client: str, port: int) -> bytes:
    return f"PROXY TCP4 {client} 127.0.0.1 {port} 7777\r\n".encode()


@pytest.fixture
def behind_proxy(loop_chatd):
    """A chatd with one proxy:// listener that trusts 127.0.0.1 and 127.0.0.4 (and 192.0.2.66
    denied)."""
    _config(loop_chatd, access='proxy_from = ["127.0.0.1", "127.0.0.4"]\ndeny = ["192.0.2.66"]',
            limits="max_clients_per_ip = 1", listen=[f"proxy://127.0.0.1:{loop_chatd.port}"])
    loop_chatd.start()
    return loop_chatd


def test_proxy_v1_and_v2_give_the_real_client_and_keep_the_bytes_after_the_header(behind_proxy):
    chatd, port = behind_proxy, behind_proxy.port
    assert _echoes(port, send=_v1("192.0.2.7", 5001) + b"ping\n")
    assert _echoes(port, send=_v2("192.0.2.8", 5002, tlv=b"\x04\x00\x02ab") + b"ping\n")
    assert _echoes(port, send=_v2("2001:db8::9", 5003) + b"ping\n")
    assert _echoes(port, send=_v2("", 0, local=True) + b"ping\n")   # a health check: the proxy itself
    wait_for(lambda: all(f"connect {peer}" in chatd.log_text() for peer in
                         ("192.0.2.7:5001", "192.0.2.8:5002", "[2001:db8::9]:5003", "127.0.0.1:")),
             what="every real client in the log")
    wait_for(lambda: "disconnect 192.0.2.7:5001" in chatd.log_text(), what="the disconnect line")


def test_a_header_in_pieces_is_read_and_what_follows_is_echoed(behind_proxy):
    with _connect(behind_proxy.port) as s:
        header = _v1("192.0.2.10", 5010)
        s.sendall(header[:9])
        time.sleep(0.2)
        s.sendall(header[9:] + b"pi")
        time.sleep(0.2)
        s.sendall(b"ng\n")
        assert _line(s) == b"ping\n"


def test_through_the_proxy_the_deny_list_and_the_per_address_limit_see_the_real_client(behind_proxy):
    chatd, port = behind_proxy, behind_proxy.port
    assert _shut_out(port, send=_v1("192.0.2.66", 5066) + b"ping\n")
    wait_for(lambda: _refusal_lines(chatd, "192.0.2.66"), what="the real client's refusal")
    first = _connect(port)
    first.sendall(_v1("192.0.2.20", 5020) + b"ping\n")
    assert _line(first) == b"ping\n"
    with _connect(port) as second:              # the same real client: past max_clients_per_ip
        second.sendall(_v1("192.0.2.20", 5021))
        assert _received(second) == b"ERR server full\r\n"
    assert _echoes(port, send=_v1("192.0.2.21", 5022) + b"ping\n")   # the proxy's address is no limit
    first.close()


def test_a_header_from_an_untrusted_address_is_refused(behind_proxy):
    assert _shut_out(behind_proxy.port, "127.0.0.2", send=_v1("192.0.2.30", 5030) + b"ping\n")
    wait_for(lambda: _refusal_lines(behind_proxy, "127.0.0.2"), what="the refusal logged")
    assert "proxy_from" in _refusal_lines(behind_proxy, "127.0.0.2")[0]
    assert "192.0.2.30" not in behind_proxy.log_text()


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_a_malformed_or_slow_header_is_cut_off(behind_proxy):
    chatd, port = behind_proxy, behind_proxy.port
    assert _shut_out(port, send=b"GET / HTTP/1.0\r\n\r\n")
    wait_for(lambda: "no PROXY header" in chatd.log_text(), what="the malformed header logged")
    slow = _connect(port, "127.0.0.4")   # another address: each one's refusals are logged apart
    slow.sendall(b"PROXY TCP4 ")
    began = time.monotonic()
    assert _received(slow, timeout=10) == b""
    took = time.monotonic() - began
    assert 4 < took < 8, took
    slow.close()
    wait_for(lambda: "no complete PROXY header within 5 s" in chatd.log_text(), what="the timeout logged")
    assert _echoes(port, send=_v1("192.0.2.40", 5040) + b"ping\n")


# ------------------------------------------------------------------ config

@pytest.mark.parametrize("text, message", [
    ('[access]\nallow = ["10.0.0.1/33"]\n', "not an address or CIDR block: '10.0.0.1/33'"),
    ('[access]\ndeny = ["10.0.0.1/8"]\n', "'10.0.0.1/8' has host bits set; the block is 10.0.0.0/8"),
    ('[access]\ndeny = [7]\n', "each entry must be a string, got an integer"),
    ('[access]\ndeny = "10.0.0.0/8"\n', "expected an array, got a string"),
    ('[limits]\nconnect_burst = 0\n', "must be at least 1"),
    ('[server]\nlisten = ["proxy://127.0.0.1:{p}"]\n', "proxy:// listeners need [access] proxy_from"),
    ('[server]\nlisten = ["tls+proxy://127.0.0.1:{p}"]\n[access]\nproxy_from = ["127.0.0.1"]\n',
     "tls+proxy://127.0.0.1:{p} needs [tls] certificate and key"),
])
def test_a_bad_access_setting_is_a_config_error_with_its_line(chatd, text, message):
    chatd.config.write_text(text.format(p=chatd.port) + f'[daemon]\npidfile = "{chatd.pidfile}"\n')
    err = chatd.cmd("check-config", check=6).stderr.decode()
    assert message.format(p=chatd.port) in err and f"{chatd.config}:" in err, err
    assert "Traceback" not in err

