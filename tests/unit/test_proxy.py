"""proxy.parse in-process: v1 and v2 byte for byte, and for any bytes a header, "need more" or
a clean ProxyError, never an exception or a request for more than MAX_HEADER bytes."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings, strategies as st

from chatd.proxy import MAX_HEADER, V1_MAX, V2_SIGNATURE, Header, ProxyError, parse


def v2(command: int, family_protocol: int, body: bytes) -> bytes:
    return V2_SIGNATURE + bytes([0x20 | command, family_protocol]) + struct.pack("!H", len(body)) + body


V4_BODY = socket.inet_aton("192.0.2.1") + socket.inet_aton("192.0.2.2") + struct.pack("!HH", 4000, 80)
V6_BODY = (socket.inet_pton(socket.AF_INET6, "2001:db8::1") + socket.inet_pton(socket.AF_INET6, "::1")
           + struct.pack("!HH", 4001, 80))
VALID = [
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 80\r\n", ("192.0.2.1", 4000)),
    (b"PROXY TCP6 2001:DB8::1 ::1 4001 80\r\n", ("2001:db8::1", 4001)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", None),
    (v2(1, 0x11, V4_BODY), ("192.0.2.1", 4000)),
    (v2(1, 0x21, V6_BODY + b"\x04\x00\x01x"), ("2001:db8::1", 4001)),   # a TLV, skipped
    (v2(0, 0x00, b""), None),                                            # LOCAL
    (v2(0, 0x11, V4_BODY), None),                                        # LOCAL keeps the proxy
    (v2(1, 0x00, b""), None),                                            # UNSPEC
]


@pytest.mark.parametrize("header, client", VALID)
def test_a_header_is_read_to_its_end_and_not_past_it(header, client):
    assert parse(header + b"hello\r\n") == Header(len(header), client)
    for n in range(len(header)):
        assert parse(header[:n]) is None, n


@pytest.mark.parametrize("data, message", [
    (b"GET / HTTP/1.0\r\n", "no PROXY header"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000\r\n", "malformed PROXY v1 line"),
    (b"PROXY TCP4 2001:db8::1 ::1 4000 80\r\n", "bad address"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 04000 80\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 65536 80\r\n", "bad port"),
    (b"PROXY TCP4 192.0.2.1 192.0.2.2 4000 80\n", "not ended by CRLF"),
    (b"PROXY UNKNOWN " + b"x" * 100, "not ended by CRLF"),
    (v2(1, 0x11, V4_BODY[:8]), "address block too short"),
    (v2(1, 0x31, b"x" * 216), "other than TCP"),
    (v2(1, 0x12, V4_BODY), "other than TCP"),
    (v2(2, 0x11, V4_BODY), "unknown PROXY v2 version or command"),
    (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    (b"\r\n\r\n\x00\r\nQUIX", "no PROXY header"),
])
def test_what_is_no_header_is_a_clean_error(data, message):
    with pytest.raises(ProxyError, match=message):
        parse(data)


@settings(max_examples=2000)
@given(st.one_of(st.binary(max_size=300),
                 st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
                 st.builds(lambda b: V2_SIGNATURE + b, st.binary(max_size=300))))
def test_any_bytes_give_a_header_need_more_or_a_proxy_error(data):
    try:
        header = parse(data)
    except ProxyError:
        return
    if header is None:
        assert len(data) < MAX_HEADER
        if not data.startswith(V2_SIGNATURE[:1]):
            assert len(data) < V1_MAX
    else:
        assert 15 <= header.length <= len(data) and header.length <= MAX_HEADER


@given(st.sampled_from(VALID), st.binary(max_size=64))
def test_what_follows_a_header_never_changes_it(valid, tail):
    header, client = valid
    assert parse(header + tail) == Header(len(header), client)
