"""moderation.py in-process: durations, addresses and CIDRs (IPv4-mapped IPv6 too), the ban
list's matching and expiry, and the command line's requests (cli.moderation_request)."""

from __future__ import annotations

import ipaddress
import time

import pytest
from hypothesis import given, strategies as st

from chatd.cli import moderation_request
from chatd.errors import UsageError
from chatd.moderation import Bans, client_address, parse_duration, parse_network, show_network


@pytest.mark.parametrize("text, seconds", [("30s", 30), ("10m", 600), ("2h", 7200), ("1d", 86400),
                                           ("45", 45), ("1.5", 1.5), ("0.5m", 30), (" 2s ", 2),
                                           ("366d", 366 * 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "0s", "-5", "10x", "1w", "s", "1 m", "1e3", "367d", "nan",
                                  "inf", "１０"])
def test_bad_durations_are_usage_errors(text):
    with pytest.raises(UsageError, match="bad duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**6), st.sampled_from(["", "s", "m", "h", "d"]))
def test_any_whole_duration_up_to_the_cap(n, unit):
    seconds = n * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    if seconds <= 366 * 86400:
        assert parse_duration(f"{n}{unit}") == seconds
    else:
        with pytest.raises(UsageError):
            parse_duration(f"{n}{unit}")


@pytest.mark.parametrize("text, shown", [
    ("192.0.2.7", "192.0.2.7"), ("192.0.2.7/32", "192.0.2.7"), ("10.1.2.3/8", "10.0.0.0/8"),
    ("2001:db8::1", "2001:db8::1"), ("2001:DB8::/32", "2001:db8::/32"),
    ("::ffff:192.0.2.7", "192.0.2.7"), ("::ffff:10.0.0.0/104", "10.0.0.0/8"), ("fe80::1%eth0", "fe80::1"),
])
def test_addresses_and_cidrs(text, shown):
    assert show_network(parse_network(text)) == shown


@pytest.mark.parametrize("text", ["", "example.org", "1.2.3.4/33", "1.2.3", "::g", "10.0.0.0/-1",
                                  "2001:db8::/129"])
def test_bad_addresses_are_usage_errors(text):
    with pytest.raises(UsageError, match="bad address"):
        parse_network(text)


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32))
def test_an_ipv4_ban_matches_the_client_as_ipv4_and_as_ipv4_mapped_ipv6(addr, prefix):
    bans = Bans()
    net = parse_network(f"{addr}/{prefix}")
    bans.add(net, None)
    assert bans.match(str(addr)) == net
    assert bans.match(f"::ffff:{addr}") == net
    assert client_address(f"::ffff:{addr}") == addr


@given(st.ip_addresses(v=6), st.integers(min_value=0, max_value=128), st.ip_addresses(v=6))
def test_an_ipv6_ban_matches_exactly_its_network(addr, prefix, other):
    net = parse_network(f"{addr}/{prefix}")
    bans = Bans()
    bans.add(net, None)
    client = client_address(str(other))
    covered = client in net if client is not None and client.version == net.version else False
    assert (bans.match(str(other)) is not None) == covered


def test_a_ban_expires_and_unban_removes_it():
    bans = Bans()
    bans.add(parse_network("192.0.2.0/24"), 0.05)
    bans.add(parse_network("198.51.100.1"), None)
    assert bans.match("192.0.2.9") == ipaddress.ip_network("192.0.2.0/24")
    assert [b["ban"] for b in bans.listing()] == ["192.0.2.0/24", "198.51.100.1"]
    time.sleep(0.06)
    assert bans.match("192.0.2.9") is None
    assert bans.listing() == [{"ban": "198.51.100.1", "expires_in_s": None}]
    assert bans.remove(parse_network("198.51.100.1")) is True
    assert bans.remove(parse_network("198.51.100.1")) is False
    assert not bans
    assert bans.match("not an address") is None


@pytest.mark.parametrize("argv, request_", [
    (["who"], {"cmd": "who"}),
    (["kick", "alice"], {"cmd": "kick", "target": "alice", "reason": ""}),
    (["kick", "alice", "no", "spam"], {"cmd": "kick", "target": "alice", "reason": "no spam"}),
    (["ban", "::ffff:192.0.2.1", "1h"], {"cmd": "ban", "target": "192.0.2.1", "seconds": 3600}),
    (["ban", "10.9.8.7/8"], {"cmd": "ban", "target": "10.0.0.0/8"}),
    (["say", "hello", "all"], {"cmd": "say", "text": "hello all"}),
])
def test_requests(argv, request_):
    assert moderation_request(argv[0], argv[1:]) == request_


@pytest.mark.parametrize("argv, message", [
    (["kick"], "kick: missing TARGET"), (["say"], "say: missing TEXT"), (["say", " "], "say: missing TEXT"),
    (["ban", "a", "b", "c"], "ban: unexpected 'c'"), (["ban", "a"], "bad address 'a'"), (["unban", "1.2.3.4", "5"], "unban: unexpected '5'"),
    (["stats", "x"], "stats: unexpected 'x'"),
])
def test_bad_requests(argv, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(")):
        moderation_request(argv[0], argv[1:])


def test_many_bans_of_many_lengths_are_found_and_dropped():
    """The index by prefix length agrees with testing every ban, and forgets what is removed."""
    bans = Bans()
    nets = [parse_network(f"10.{i}.0.0/{16 + i % 17}") for i in range(200)]
    nets += [parse_network(f"2001:db8:{i:x}::/{48 + i % 80}") for i in range(200)]
    for net in nets:
        bans.add(net, None)
    for ip in ["10.5.0.1", "10.5.255.255", "10.199.0.0", "10.200.0.0", "2001:db8:7::1", "2001:db9::1",
               "::ffff:10.16.0.9", "192.0.2.1"]:
        addr = client_address(ip)
        wanted = [n for n in nets if n.version == addr.version and addr in n]
        assert bans.match(ip) == (wanted[0] if wanted else None), ip
    for net in nets:
        assert bans.remove(net)
    assert not bans and not bans.index and not bans.lengths
