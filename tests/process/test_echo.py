"""Echo mode through the real daemon (SPEC section 4), on both event loops."""

from __future__ import annotations

import socket
import time

import pytest

from support import LineClient, wait_for


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
