"""The PROXY protocol (v1 text and v2 binary): the real client behind a load balancer or TLS terminator.

On a `proxy://` listener each connection from a trusted proxy (`[access] proxy_from`) starts
with a header naming the client the proxy serves. `parse` is sans-IO: given the bytes read so
far it says "need more" (None), the header, or why they are no header (ProxyError); it never
asks for more than MAX_HEADER bytes. `HeaderStage` reads one header off an accepted socket
before anything else happens to it, and never past the header's end: it peeks, and takes only
what `parse` says is header, so the bytes after it stay in the kernel for the connection that
follows (or a TLS stage). A header must be complete within HEADER_TIMEOUT_S.

LOCAL (v2) and UNKNOWN (v1) headers, and v2's unspecified family, are a proxy's own health
checks: the connection keeps the proxy's address. v2's TLVs are skipped.

Tests: tests/unit/test_proxy.py, tests/process/test_access.py
"""

from __future__ import annotations

import asyncio
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable

V1_MAX = 107                  # the longest v1 line the specification allows, CRLF included
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_MAX_BODY = 2048            # address block and TLVs: what proxies send fits with room to spare
MAX_HEADER = 16 + V2_MAX_BODY
HEADER_TIMEOUT_S = 5.0        # a header not complete by then is cut off
_V1_PREFIX = b"PROXY "
_V2_ADDRESSES = {0x11: (socket.AF_INET, 4, 12), 0x21: (socket.AF_INET6, 16, 36)}   # fam/proto -> (family, size, block)


class ProxyError(ValueError):
    """The bytes are no PROXY header; the message says why, for the log."""


@dataclass(frozen=True)
class Header:
    """A complete header: its `length` in bytes, and the client it names (None: the proxy's
    own connection, a health check)."""

    length: int
    client: tuple[str, int] | None


def parse(data: bytes) -> Header | None:
    """The header at the start of `data`, None if `data` is a proper beginning of one."""
    if not data:
        return None
    if data[0] == V2_SIGNATURE[0]:
        return _parse_v2(data)
    if data[:6] != _V1_PREFIX[:len(data)]:
        raise ProxyError("no PROXY header")
    return _parse_v1(data)


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise ProxyError("PROXY v1 line not ended by CRLF within 107 bytes")
        return None
    fields = data[:end].split(b" ")
    if len(fields) >= 2 and fields[1] == b"UNKNOWN":
        return Header(end + 2, None)
    if len(fields) != 6 or fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyError("malformed PROXY v1 line")
    family = socket.AF_INET if fields[1] == b"TCP4" else socket.AF_INET6
    try:
        hosts = [socket.inet_ntop(family, socket.inet_pton(family, f.decode("ascii"))) for f in fields[2:4]]
    except (OSError, UnicodeDecodeError, ValueError):
        raise ProxyError("bad address in PROXY v1 line") from None
    ports = [_port(f) for f in fields[4:6]]
    return Header(end + 2, (hosts[0], ports[0]))


def _port(text: bytes) -> int:
    if not (text.isdigit() and len(text) <= 5) or (text[:1] == b"0" and text != b"0") or int(text) > 65535:
        raise ProxyError("bad port in PROXY v1 line")
    return int(text)


def _parse_v2(data: bytes) -> Header | None:
    if data[:12] != V2_SIGNATURE[:len(data)]:
        raise ProxyError("no PROXY header")
    if len(data) < 16:
        return None
    version_command, family_protocol, size = struct.unpack_from("!BBH", data, 12)
    if version_command >> 4 != 2 or version_command & 0xF > 1:
        raise ProxyError("unknown PROXY v2 version or command")
    if size > V2_MAX_BODY:
        raise ProxyError(f"PROXY v2 header of {16 + size} bytes (at most {MAX_HEADER})")
    if len(data) < 16 + size:
        return None
    if version_command & 0xF == 0 or family_protocol >> 4 == 0:   # LOCAL, or PROXY over UNSPEC
        return Header(16 + size, None)
    if family_protocol not in _V2_ADDRESSES:
        raise ProxyError("PROXY v2 header for other than TCP over IPv4 or IPv6")
    family, width, block = _V2_ADDRESSES[family_protocol]
    if size < block:
        raise ProxyError("PROXY v2 address block too short")
    host = socket.inet_ntop(family, data[16:16 + width])
    port = struct.unpack_from("!H", data, 16 + 2 * width)[0]
    return Header(16 + size, (host, port))


class HeaderStage:
    """Reads one PROXY header off an accepted socket, then calls `done(header, error)` once:
    the header, or None and why there is none (malformed, closed, too slow)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 done: Callable[[Header | None, str], None], buf: bytes = b"",
                 where: Any = None) -> None:
        """`buf`: what a live upgrade's old process had read of the header already; `where`:
        the caller's (accept.Gate: the peer and the listener, which an upgrade carries)."""
        self.loop = loop
        self.sock = sock
        self.done = done
        self.buf = buf
        self.where = where
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._readable)
        self.timer = loop.call_later(HEADER_TIMEOUT_S, self._finish, None,
                                     f"no complete PROXY header within {HEADER_TIMEOUT_S:g} s")

    def _readable(self) -> None:
        try:
            peeked = self.sock.recv(MAX_HEADER - len(self.buf), socket.MSG_PEEK)
            if not peeked:
                raise ProxyError("closed before its PROXY header was complete")
            data = self.buf + peeked
            header = parse(data)
            # What was peeked is all header while the header is incomplete; else up to its end.
            self.sock.recv(len(peeked) if header is None else header.length - len(self.buf))
        except (BlockingIOError, InterruptedError):
            return
        except ProxyError as e:
            self._finish(None, str(e))
            return
        except OSError as e:
            self._finish(None, e.strerror or str(e))
            return
        if header is None:
            self.buf = data
        else:
            self._finish(header, "")

    def _finish(self, header: Header | None, error: str) -> None:
        self.timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.done(header, error)

    def cancel(self) -> None:
        """Give up without calling `done` (the server is stopping); the caller closes the socket."""
        self.timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
