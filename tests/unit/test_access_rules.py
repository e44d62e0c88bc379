"""access in-process: rule matching (CIDR, IPv6, IPv4-mapped), deny before allow, the connect-rate
buckets and their bounded table; and max_clients_per_ip counting an IPv6 /64 as one address."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from chatd import access
from chatd.access import DENIED, NOT_ALLOWED, TOO_FAST, Access, Rules, network, number
from chatd.config import LimitsConfig
from chatd.connection import ServerState


def configured(allow=(), deny=(), proxy_from=(), rate=0.0, burst=1) -> Access:
    a = Access()
    a.configure(SimpleNamespace(access=SimpleNamespace(allow=allow, deny=deny, proxy_from=proxy_from),
                                limits=SimpleNamespace(connect_rate=rate, connect_burst=burst)))
    return a


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: now[0])
    return now


def test_rules_match_addresses_blocks_and_ipv4_mapped_rules():
    rules = Rules(["10.0.0.0/8", "192.0.2.7", "2001:db8::/32", "::1", "::ffff:198.51.100.0/120"])
    for ip in ("10.9.8.7", "192.0.2.7", "2001:db8:ffff::1", "::1", "198.51.100.9", "::ffff:10.1.1.1"):
        assert rules.matches(number(ip)), ip
    for ip in ("11.0.0.1", "192.0.2.8", "2001:db9::1", "::2", "198.51.101.1", "?", "fe80::1%lo"):
        assert not rules.matches(number(ip)), ip
    assert not Rules() and Rules(["::1"])


def test_a_rule_is_an_address_or_a_block_with_no_host_bits():
    assert str(network("192.0.2.7")) == "192.0.2.7/32" and str(network("::ffff:192.0.2.0/120")) == "192.0.2.0/24"
    for bad, message in [("10.0.0.1/33", "not an address or CIDR block"), ("10.0.0.1/8", "host bits set"),
                         ("example.org", "not an address or CIDR block"), ("", "not an address")]:
        with pytest.raises(ValueError, match=message):
            network(bad)


def test_deny_wins_and_an_empty_allow_list_allows_all():
    assert configured().check("192.0.2.1") == ""
    a = configured(allow=["192.0.2.0/24"], deny=["192.0.2.66"])
    assert [a.check(ip) for ip in ("192.0.2.1", "192.0.2.66", "198.51.100.1")] == ["", DENIED, NOT_ALLOWED]
    assert configured(deny=["192.0.2.66"]).check("198.51.100.1") == ""
    assert configured(proxy_from=["127.0.0.1"]).trusted("127.0.0.1")
    assert not configured(proxy_from=["127.0.0.1"]).trusted("127.0.0.2")


def test_the_rate_is_a_bucket_per_ipv4_address_and_per_ipv6_64(clock):
    a = configured(rate=2.0, burst=3)
    assert [a.check("192.0.2.1") for _ in range(4)] == ["", "", "", TOO_FAST]
    assert a.check("192.0.2.2") == ""
    assert [a.check(f"2001:db8:0:1::{i}") for i in range(1, 5)] == ["", "", "", TOO_FAST]
    assert a.check("2001:db8:0:2::1") == ""
    clock[0] += 0.5                                   # one token back
    assert [a.check("192.0.2.1") for _ in range(2)] == ["", TOO_FAST]


def test_the_table_is_bounded_refilled_buckets_go_first_then_newcomers_share_one(clock, monkeypatch):
    monkeypatch.setattr(access, "MAX_SOURCES", 4)
    a = configured(rate=1.0, burst=2)
    for i in range(4):
        assert a.check(f"192.0.2.{i}") == ""
    assert a.check("198.51.100.1") == "" and a.check("198.51.100.2") == ""   # both share "other sources"
    assert a.check("198.51.100.3") == TOO_FAST
    assert len(a.buckets) == 5 and access.OTHERS in a.buckets
    clock[0] += 10.0                                  # every bucket full again: swept
    assert a.check("198.51.100.4") == ""
    assert set(a.buckets) == {"198.51.100.4"}


def test_a_rate_of_0_keeps_no_bucket():
    a = configured(rate=0.0)
    assert all(a.check("192.0.2.1") == "" for _ in range(1000)) and a.buckets == {}


def test_max_clients_per_ip_counts_an_ipv6_64_as_one_address():
    state = ServerState(LimitsConfig(max_clients_per_ip=2), 0, asyncio.new_event_loop())
    try:
        assert state.admit("2001:db8:0:1::1") == "" and state.admit("2001:db8:0:1::2") == ""
        assert "too many connections from one address" in state.admit("2001:db8:0:1::3")
        assert state.admit("2001:db8:0:2::1") == ""
        state.release("2001:db8:0:1::1")
        assert state.admit("2001:db8:0:1::4") == ""
        assert state.per_ip == {"2001:db8:0:1::/64": 2, "2001:db8:0:2::/64": 1}
    finally:
        state.loop.close()
