"""The listening sockets: the configured endpoints, their addresses, binding, and what a restart changes.

An endpoint is one entry of `[server] listen` (or the old `host`/`port` pair):
`[SCHEME://]HOST:PORT`, where SCHEME says what each connection starts with
(`tcp`, the default; `tls`; `proxy`, a PROXY protocol header; `tls+proxy`,
the header, then TLS) and an empty HOST means every address: one dual-stack
`[::]` socket, which serves IPv4 too, or `0.0.0.0` where the host has no IPv6.

Sockets get SO_REUSEADDR, so a restart never meets TIME_WAIT, and never
SO_REUSEPORT, which would let a second instance share the port unnoticed.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass
from typing import Any

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


SCHEMES = {"tcp": (False, False), "tls": (True, False), "proxy": (False, True),
           "tls+proxy": (True, True), "proxy+tls": (True, True)}   # scheme -> (tls, proxy)
ENDPOINT_RE = re.compile(r"(?:(?P<scheme>[a-z+]{1,16})://)?(?P<host>\[[^\[\]]*\]|[^:\[\]/]*):(?P<port>[0-9]{1,5})")
# The keys that say where chatd listens: a restart that changes one of them rebinds.
ADDRESS_KEYS = ("server.listen", "server.host", "server.port")


@dataclass(frozen=True)
class Endpoint:
    """One configured listener: where, and what each connection on it starts with."""

    host: str            # "" for every address
    port: int
    tls: bool = False
    proxy: bool = False

    @property
    def scheme(self) -> str:
        return {(False, False): "", (True, False): "tls://", (False, True): "proxy://",
                (True, True): "tls+proxy://"}[self.tls, self.proxy]

    def label(self, address: Address) -> str:
        """How a listener on `address` for this endpoint is shown: "tls://127.0.0.1:7443"."""
        return f"{self.scheme}{address}"


def parse_endpoint(text: str) -> Endpoint:
    """`[SCHEME://]HOST:PORT` (HOST may be "[v6]", or empty for every address); ValueError
    with what was expected."""
    m = ENDPOINT_RE.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"expected [tcp|tls|proxy|tls+proxy://]HOST:PORT, \"[v6]:PORT\" or \":PORT\", "
                         f"got {text!r}")
    scheme = m["scheme"] or "tcp"
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r} in {text!r} (known: tcp, tls, proxy, tls+proxy)")
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port} in {text!r}")
    host = m["host"]
    if host.startswith("["):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address in brackets: {m['host']!r}") from None
    tls, proxy = SCHEMES[scheme]
    return Endpoint(host, port, tls, proxy)


def endpoints(cfg: Any) -> list[Endpoint]:
    """The endpoints a config asks for: `[server] listen`, unless it is empty or comes from
    the file while --host or --port are on the command line (which wins), in which case the
    one `host`/`port` pair."""
    flags = {cfg.origin("server.host"), cfg.origin("server.port")}
    if cfg.server.listen and (cfg.origin("server.listen") == "--listen" or not flags & {"--host", "--port"}):
        return [parse_endpoint(text) for text in cfg.server.listen]
    return [Endpoint(cfg.server.host, cfg.server.port)]


def plan(wanted: list[Endpoint]) -> list[tuple[Address, Endpoint]]:
    """Every address the endpoints stand for, each once: StartError when two endpoints
    name the same address or overlap (the second could not be bound)."""
    found: list[tuple[Address, Endpoint]] = []
    for endpoint in wanted:
        for address in resolve(endpoint.host, endpoint.port):
            for have, other in found:
                if have == address or have.overlaps(address):
                    raise StartError(f"{endpoint.label(address)} and {other.label(have)} are both in "
                                     f"[server] listen: one socket cannot serve both; list one")
            found.append((address, endpoint))
    return found


def scheme_for(address: Address, planned: list[tuple[Address, Endpoint]]) -> Endpoint:
    """A socket handed over by socket activation takes the scheme of the configured endpoint
    that serves its address (a `tls://` entry for port 7443 makes the .socket unit's 7443 a
    TLS listener); one no endpoint serves is plain TCP."""
    for have, endpoint in planned:
        if have.serves(address):
            return endpoint
    return Endpoint(address.host, address.port)


def every_address(port: int) -> list[Address]:
    """The default: one dual-stack IPv6 socket where the host has IPv6, else IPv4's wildcard."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return [Address(socket.AF_INET, "0.0.0.0", port)]
    return [Address(socket.AF_INET6, "::", port)]


def resolve(host: str, port: int) -> list[Address]:
    """Every distinct address `host` stands for, IPv4 before IPv6 (an IPv4-mapped one as the
    IPv4 address it is); "" is every address."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        return every_address(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise StartError(f"cannot resolve {host!r}: {e.strerror}") from None
    except UnicodeError:   # IDNA refuses it: a space, a line break, a lone surrogate from argv
        raise StartError(f"cannot resolve {host!r}: not a host name") from None
    found: list[Address] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            ip = ipaddress.ip_address(sockaddr[0])
            if ip.version == 6 and ip.ipv4_mapped:   # an IPv6-only socket cannot bind it (EINVAL)
                family, ip = socket.AF_INET, ip.ipv4_mapped
            addr = Address(family, ip.compressed, port)
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


def unmapped(ip: str) -> str:
    """A peer's address as people write it: an IPv4 client of a dual-stack socket arrives as
    "::ffff:a.b.c.d" and is shown, counted, allowed and banned as "a.b.c.d"."""
    if ip.startswith("::ffff:") and "." in ip:
        return ip[7:]
    return ip
