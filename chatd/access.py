"""Who may connect: `[access] allow` and `deny`, the trusted proxies, and `[limits] connect_rate`.

`Access.check(ip)` runs on every accepted connection before a byte is read (accept.Gate), for
the address the kernel shows or, behind a trusted proxy, the client its PROXY header names.
Deny wins; an empty allow list allows all; then the connection rate of the source. A rule is
an address (a /32 or /128) or a CIDR block; an IPv4 rule also matches that address seen as
IPv4-mapped IPv6 (peers are unmapped before they get here, and mapped rules are made IPv4).

Matching stays cheap with hundreds of rules: `Rules` keeps, per prefix length, the set of
network numbers, so a check is one set lookup per distinct prefix length. A ban list (made at
run time) can plug in as one more `Rules` checked beside `deny`.

The rate is a token bucket per source (`connection.churn_source`: an IPv4 address, an IPv6
/64): `connect_burst` connections at once, refilled at `connect_rate` a second. The table
holds at most MAX_SOURCES sources; when it is full, buckets that have filled up again are
dropped (a sweep at most every SWEEP_S), and newcomers that still find no room share one
bucket, so whoever keeps MAX_SOURCES sources busy slows only new sources, never those known.

Tests: tests/unit/test_access_rules.py, tests/process/test_access.py
"""

from __future__ import annotations

import ipaddress
import socket
import time
from typing import Any, Iterable

from .connection import churn_source

DENIED = "denied by [access] deny"
NOT_ALLOWED = "not in [access] allow"
TOO_FAST = "connecting too fast ([limits] connect_rate)"
MAX_SOURCES = 65536   # connection-rate buckets at most (about 210 bytes each: 13 MiB)
SWEEP_S = 5.0         # a full table is swept for refilled buckets at most this often (a sweep
                      # of a full table took 67 ms)
OTHERS = "other sources"
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def network(text: str) -> Network:
    """An address or CIDR block; IPv4-mapped IPv6 made IPv4. ValueError saying what is wrong,
    host bits set included: "10.0.0.1/8" is refused, not read as 10.0.0.0/8."""
    try:
        net = ipaddress.ip_network(text.strip())
    except ValueError as e:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"not an address or CIDR block: {text!r} ({e})") from None
        raise ValueError(f"{text!r} has host bits set; the block is {loose}") from None
    return ipv4_if_mapped(net)


def ipv4_if_mapped(net: Network) -> Network:
    """A block of IPv4-mapped IPv6 addresses (::ffff:a.b.c.d/N, N >= 96) as the IPv4 block it
    stands for: peers are unmapped before they are matched (listen.unmapped)."""
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def number(ip: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an integer); None for what is no address ("?")."""
    try:
        if ":" not in ip:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return None
    if packed.startswith(bytes(10) + b"\xff\xff"):
        return 4, int.from_bytes(packed[12:], "big")
    return 6, int.from_bytes(packed, "big")


class Rules:
    """A set of networks, matched by one set lookup per prefix length."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.nets: dict[int, dict[int, set[int]]] = {4: {}, 6: {}}   # version -> length -> numbers
        for entry in entries:
            net = network(entry)
            self.nets[net.version].setdefault(net.prefixlen, set()).add(
                int(net.network_address) >> (net.max_prefixlen - net.prefixlen))

    def __bool__(self) -> bool:
        return bool(self.nets[4] or self.nets[6])

    def matches(self, address: tuple[int, int] | None) -> bool:
        if address is None:
            return False
        version, n = address
        bits = 32 if version == 4 else 128
        for length, numbers in self.nets[version].items():
            if n >> (bits - length) in numbers:
                return True
        return False


class Access:
    """The rules in force and the rate buckets; `configure` on start and each restart."""

    def __init__(self) -> None:
        self.allow = self.deny = self.proxies = Rules()
        self.rate = 0.0
        self.burst = 1
        self.active = False                        # any rule or rate: else `check` returns at once
        self.buckets: dict[str, list[float]] = {}  # source -> [tokens, when counted]
        self.swept = -SWEEP_S

    def configure(self, cfg: Any) -> None:
        """Take `cfg`'s [access] lists and connect rate, for new connections; the buckets stay."""
        self.allow, self.deny = Rules(cfg.access.allow), Rules(cfg.access.deny)
        self.proxies = Rules(cfg.access.proxy_from)
        self.rate, self.burst = cfg.limits.connect_rate, cfg.limits.connect_burst
        if not self.rate:
            self.buckets.clear()
        self.active = bool(self.allow or self.deny or self.rate)

    def trusted(self, ip: str) -> bool:
        """May `ip` send a PROXY header ([access] proxy_from)?"""
        return self.proxies.matches(number(ip))

    def check(self, ip: str) -> str:
        """Why a newcomer from `ip` is refused: DENIED, NOT_ALLOWED or TOO_FAST; "" if it may in."""
        if not self.active:
            return ""
        address = number(ip)
        if self.deny.matches(address):
            return DENIED
        if self.allow and not self.allow.matches(address):
            return NOT_ALLOWED
        if self.rate and not self._take_token(ip):
            return TOO_FAST
        return ""

    def _take_token(self, ip: str) -> bool:
        now = time.monotonic()
        key = churn_source(ip)
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= MAX_SOURCES and not self._sweep(now):
                key = OTHERS
                bucket = self.buckets.get(key)
            if bucket is None:
                bucket = self.buckets[key] = [float(self.burst), now]
        tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1.0
        return True

    def _sweep(self, now: float) -> bool:
        """Drop the buckets that have filled up again; True if that made room."""
        if now - self.swept >= SWEEP_S:
            self.swept = now
            burst, rate = float(self.burst), self.rate
            self.buckets = {k: b for k, b in self.buckets.items() if b[0] + (now - b[1]) * rate < burst}
        return len(self.buckets) < MAX_SOURCES
