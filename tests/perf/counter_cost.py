#!/usr/bin/env python3
"""What one count costs on the hot path: prometheus_client's Counter.inc against the int slot
chatd adds to (chatd/metrics.py); echo's counting of a read; what counting lines would cost
(why echo counts bytes only); and echo's whole `consume` of a read in-process, on a transport
that drops what it is given, so that two checkouts can be compared without the noise of a
loaded machine's sockets:

    .venv/bin/python tests/perf/counter_cost.py
    PYTHONPATH=../old .venv/bin/python tests/perf/counter_cost.py    # another checkout's chatd

prometheus_client (the `test` extra) takes a lock in every `inc`; chatd's counters are ints in
a connection's slots. Prints nanoseconds per operation, the best of 5 timeit runs (7 for
`consume`), and which chatd it imported.
"""

from __future__ import annotations

import asyncio
import timeit

from prometheus_client import CollectorRegistry, Counter

import chatd
from chatd.config import Config
from chatd.connection import ServerState
from chatd.echo import EchoConnection

N = 1_000_000
LINE = b"x" * 63 + b"\n"


class Slots:
    __slots__ = ("in_bytes", "in_lines", "out_bytes", "out_lines")

    def __init__(self) -> None:
        self.in_bytes = self.in_lines = self.out_bytes = self.out_lines = 0


class NullTransport:
    """Takes every write and drops it: `consume` alone is measured."""

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass


def ns(stmt: str, namespace: dict) -> float:
    return min(timeit.repeat(stmt, globals=namespace, number=N, repeat=5)) / N * 1e9


def consume_ns(data: bytes) -> float:
    """Echo's `consume` of one read of `data` (the plain path, whole lines)."""
    loop = asyncio.new_event_loop()
    try:
        conn = EchoConnection(ServerState(Config().limits, 0, loop), "127.0.0.1", "127.0.0.1:1")
        conn.transport = NullTransport()
        return min(timeit.repeat(lambda: conn.consume(data), number=N, repeat=7)) / N * 1e9
    finally:
        loop.close()


def main() -> None:
    counter = Counter("bench", "a counter", registry=CollectorRegistry())
    conn = Slots()
    space = {"counter": counter, "conn": conn, "data": LINE, "block": LINE * 16}
    rows = [
        ("empty statement (the loop itself)", ns("pass", space)),
        ("int slot += 1", ns("conn.in_lines += 1", space)),
        ("prometheus_client Counter.inc()", ns("counter.inc()", space)),
        ("prometheus_client Counter.inc(len(data))", ns("counter.inc(len(data))", space)),
        ("echo's counting a read (bytes in and out)",
         ns("conn.in_bytes += len(data); conn.out_bytes += len(data)", space)),
        ("the same with prometheus_client (2 Counter.inc)",
         ns("counter.inc(len(data)); counter.inc(len(data))", space)),
        ("lines of a 1-line read (bytes.count)", ns("data.count(b'\\n')", space)),
        ("lines of a 16-line read (bytes.count)", ns("block.count(b'\\n')", space)),
    ]
    rows += [(f"echo consume, 1-line read (chatd in {chatd.__path__[0]})", consume_ns(LINE)),
             ("echo consume, 16-line read", consume_ns(LINE * 16))]
    for what, cost in rows:
        print(f"{what:<50} {cost:7.1f} ns")


if __name__ == "__main__":
    main()
