"""connection.ChurnLog in-process: the rate per source and in all, the summary lines, the bounded table."""

from __future__ import annotations

import logging

from chatd.connection import CHURN_ALL, CHURN_SOURCES, ChurnLog, churn_source

LIMIT = 100


def test_past_the_rate_newcomers_are_counted_and_summarised_once_per_interval(caplog):
    churn = ChurnLog()
    quiet = [churn.quiet("192.0.2.1", LIMIT) for _ in range(LIMIT + 5)]
    assert quiet == [False] * LIMIT + [True] * 5
    assert churn.quiet("192.0.2.2", LIMIT) is False   # another address has a rate of its own
    for what in (ChurnLog.CONNECTS, ChurnLog.CONNECTS, ChurnLog.DISCONNECTS, ChurnLog.REFUSED):
        churn.count("192.0.2.1", what)
    with caplog.at_level(logging.INFO, logger="chatd"):
        churn.flush()
        churn.flush()   # a new interval: nothing counted yet, nothing said
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "churn from 192.0.2.1 in 10 s: 2 connects, 1 disconnects, 1 refused, not logged "
                    "one by one")]
    assert churn.quiet("192.0.2.1", LIMIT) is False   # the rate starts again


def test_the_table_is_bounded_whoever_connects():
    """Past CHURN_SOURCES addresses, the others share one rate and one count."""
    churn = ChurnLog()
    extra = LIMIT + 400
    quiet = [churn.quiet(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", LIMIT)
             for i in range(CHURN_SOURCES + extra)]
    assert len(churn.sources) == CHURN_SOURCES + 1
    assert quiet == [False] * (CHURN_SOURCES + LIMIT) + [True] * 400


def test_a_limit_of_0_logs_every_newcomer():
    churn = ChurnLog()
    assert not any(churn.quiet("192.0.2.1", 0) for _ in range(1000))
    assert churn.sources == {}


def test_an_ipv6_64_is_one_source_and_ipv4_one_address():
    assert churn_source("2001:db8:1:2:3:4:5:6") == churn_source("2001:db8:1:2::9") == "2001:db8:1:2::/64"
    assert churn_source("::ffff:192.0.2.1") == churn_source("192.0.2.1") == "192.0.2.1"
    churn = ChurnLog()
    quiet = [churn.quiet(f"2001:db8:1:2::{i:x}", LIMIT) for i in range(LIMIT + 5)]
    assert quiet == [False] * LIMIT + [True] * 5
    assert list(churn.sources) == ["2001:db8:1:2::/64"]


def test_past_the_cap_in_all_every_newcomer_is_counted():
    """Many sources, each under its own rate: CHURN_ALL × the limit are logged, no more; the
    summary lines stay at most CHURN_SOURCES + 1 and count the rest."""
    churn, limit = ChurnLog(), 2
    addresses = [f"10.0.{i >> 8}.{i & 255}" for i in range(CHURN_ALL * limit * 3)]
    quiet = [churn.quiet(ip, limit) for ip in addresses]
    assert quiet.count(False) == CHURN_ALL * limit
    for ip, q in zip(addresses, quiet):
        if q:
            churn.count(ip, ChurnLog.CONNECTS)
    assert len(churn.sources) <= CHURN_SOURCES + 1
    assert sum(c[ChurnLog.CONNECTS] for c in churn.sources.values()) == quiet.count(True)
    churn.flush()
    assert churn.quiet("10.9.9.9", limit) is False   # a new interval, a new cap
