#!/usr/bin/env python3
"""What one count costs on the hot path: prometheus_client's Counter.inc against the int slot
chatd adds to (chatd/metrics.py), and against echo's whole per-read counting.

    .venv/bin/python tests/perf/counter_cost.py

prometheus_client (the `test` extra) takes a lock in every `inc`; chatd's counters are ints in
a connection's slots. Prints nanoseconds per operation, the best of 5 timeit runs.
"""

from __future__ import annotations

import timeit

from prometheus_client import CollectorRegistry, Counter

N = 1_000_000
LINE = b"x" * 63 + b"\n"


class Slots:
    __slots__ = ("in_bytes", "in_lines", "out_bytes", "out_lines")

    def __init__(self) -> None:
        self.in_bytes = self.in_lines = self.out_bytes = self.out_lines = 0


def ns(stmt: str, namespace: dict) -> float:
    return min(timeit.repeat(stmt, globals=namespace, number=N, repeat=5)) / N * 1e9


def main() -> None:
    counter = Counter("bench", "a counter", registry=CollectorRegistry())
    conn = Slots()
    space = {"counter": counter, "conn": conn, "data": LINE}
    rows = [
        ("empty statement (the loop itself)", ns("pass", space)),
        ("int slot += 1", ns("conn.in_lines += 1", space)),
        ("prometheus_client Counter.inc()", ns("counter.inc()", space)),
        ("prometheus_client Counter.inc(len(data))", ns("counter.inc(len(data))", space)),
        ("echo's per-read counting (count, 4 slot adds)",
         ns("k = data.count(b'\\n'); conn.in_bytes += len(data); conn.in_lines += k; "
            "conn.out_bytes += len(data); conn.out_lines += k", space)),
        ("the same with prometheus_client (4 Counter.inc)",
         ns("k = data.count(b'\\n'); counter.inc(len(data)); counter.inc(k); "
            "counter.inc(len(data)); counter.inc(k)", space)),
    ]
    for what, cost in rows:
        print(f"{what:<50} {cost:7.1f} ns")


if __name__ == "__main__":
    main()
