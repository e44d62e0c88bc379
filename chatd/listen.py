"""The listening sockets: resolve the configured address, bind it, and tell what changed on restart.

Sockets get SO_REUSEADDR, so a restart never meets TIME_WAIT, and never
SO_REUSEPORT, which would let a second instance share the port unnoticed.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from .errors import ChatdError, PrivilegeError, StartError


@dataclass(frozen=True)
class Address:
    """One address to listen on."""

    family: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if self.family == socket.AF_INET6 else f"{self.host}:{self.port}"

    @property
    def wildcard(self) -> bool:
        return ipaddress.ip_address(self.host).is_unspecified

    def serves(self, wanted: Address) -> bool:
        """Does a listener on `self` accept connections to `wanted`? (A wildcard covers its
        family; "::" is bound dual-stack, so it covers IPv4 too.)"""
        if self.port != wanted.port:
            return False
        if self == wanted:
            return True
        return self.wildcard and (self.family == wanted.family or self.family == socket.AF_INET6)

    def overlaps(self, other: Address) -> bool:
        """Would binding `other` clash with a listener on `self` (same port, covering hosts)?"""
        if self.port != other.port or self == other:
            return False
        if self.family == other.family:
            return self.wildcard or other.wildcard
        # "::" is bound dual-stack, so it covers IPv4 too.
        v6 = self if self.family == socket.AF_INET6 else other
        return v6.wildcard


def resolve(host: str, port: int) -> list[Address]:
    """Every distinct address `host` stands for, IPv4 before IPv6."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartError(f"cannot resolve {host!r}: {e.strerror}") from None
    found: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            addr = Address(family, ipaddress.ip_address(sockaddr[0]).compressed, port)
            if addr not in found:
                found.append(addr)
    return sorted(found, key=lambda a: a.family != socket.AF_INET)


def bind(address: Address, backlog: int) -> socket.socket:
    """A listening, non-blocking socket on `address`; a clear error if that is not possible."""
    sock = socket.socket(address.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Telnet's Synch sends IAC DM with the IAC as urgent data: keep it in the stream
        # (accepted sockets inherit this), so the decoder drops the whole sequence.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
        if address.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address.wildcard else 1)
        sock.bind((address.host, address.port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise _bind_error(address, e) from None
    return sock


def bind_all(addresses: list[Address], backlog: int) -> list[socket.socket]:
    socks: list[socket.socket] = []
    try:
        for address in addresses:
            socks.append(bind(address, backlog))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _bind_error(address: Address, e: OSError) -> ChatdError:
    if e.errno == errno.EADDRINUSE:
        return StartError(f"cannot listen on {address}: address already in use "
                          f"(another program has port {address.port}; stop it or choose another --port)",
                          errno_value=e.errno)
    if e.errno in (errno.EACCES, errno.EPERM):
        return PrivilegeError(f"cannot listen on {address}: permission denied "
                              f"(ports below 1024 need root)", errno_value=e.errno)
    if e.errno == errno.EADDRNOTAVAIL:
        return StartError(f"cannot listen on {address}: no such address on this machine",
                          errno_value=e.errno)
    return StartError(f"cannot listen on {address}: {e.strerror}", errno_value=e.errno)


def family_of(host: str) -> int:
    """The address family of a numeric host address."""
    return socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET


def address_of(sock: socket.socket) -> Address:
    """The address a listening socket (one handed over, say) is bound to."""
    host, port = sock.getsockname()[:2]
    return Address(sock.family, ipaddress.ip_address(host).compressed, port)


def describe(addresses: list[Address], names: list[str] | None = None) -> str:
    """"0.0.0.0:7777", or with socket activation's names "127.0.0.1:7778 (systemd: tcp)"."""
    if not names:
        return ", ".join(str(a) for a in addresses)
    return ", ".join(f"{a} (systemd: {n})" for a, n in zip(addresses, names))
