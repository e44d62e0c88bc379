#!/usr/bin/env python3
"""TLS echo load for bench.py: the same verifying echo load over TLS or plaintext, so the two
stand side by side (loadgen.c speaks plaintext only, and libssl's headers may be missing).

    tlsload.py --port P [--tls] [-c CONNS] [-P IN_FLIGHT] [-s SIZE] [-d S] [-w S] [--server-pid PID]

CONNS connections (certificates are not verified: the benchmark's is self-signed) each keep
IN_FLIGHT lines of SIZE bytes outstanding; every echoed line must be the line sent, in order,
or it counts as an error. Lines per second, latency p50 and p99, and the server's CPU (%) and
RSS are measured over `-d` seconds after `-w` seconds of warm-up. On uvloop when importable.
Last line: `RESULT mode=tls key=value ...`, as loadgen's. Loopback only; every phase has a
deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import ssl
import statistics
import sys
import time

CONNECT_S = 20.0
STALL_S = 10.0


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.measuring = False
        self.lines = 0
        self.errors = 0
        self.latencies: list[float] = []
        self.stop = False

    async def conn(self, n: int, ctx: ssl.SSLContext | None) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.args.port, ssl=ctx), CONNECT_S)
        pad = b"x" * (self.args.size - 12)
        sent: list[tuple[bytes, float]] = []
        seq = 0
        try:
            while not self.stop:
                while len(sent) < self.args.in_flight:
                    line = b"%010d" % (n * 1_000_000_000 + seq % 1_000_000_000) + pad + b"\n"
                    seq += 1
                    writer.write(line)
                    sent.append((line, time.perf_counter()))
                got = await asyncio.wait_for(reader.readline(), STALL_S)
                line, began = sent.pop(0)
                if got != line:
                    self.errors += 1
                    return
                if self.measuring:
                    self.lines += 1
                    if len(self.latencies) < 200_000:
                        self.latencies.append(time.perf_counter() - began)
        finally:
            writer.close()

    async def run(self) -> dict[str, str]:
        a = self.args
        ctx = None
        if a.tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        tasks = [asyncio.create_task(self.conn(n, ctx)) for n in range(a.conns)]
        await asyncio.sleep(a.warmup)
        pid = a.server_pid
        cpu0, t0, me0 = cpu_s(pid) if pid else 0.0, time.monotonic(), time.process_time()
        self.measuring = True
        await asyncio.sleep(a.duration)
        self.measuring = False
        elapsed = time.monotonic() - t0
        cpu = (cpu_s(pid) - cpu0) / elapsed * 100 if pid else -1.0
        lg_cpu = (time.process_time() - me0) / elapsed * 100
        rss = rss_kb(pid) if pid else 0
        self.stop = True
        done, pending = await asyncio.wait(tasks, timeout=STALL_S)
        for task in pending:
            task.cancel()
        failed = sum(1 for t in done if not t.cancelled() and t.exception() is not None)
        lat = sorted(self.latencies) or [0.0]
        return {"mode": "tls" if a.tls else "plain", "conns": str(a.conns),
                "lines_per_s": f"{self.lines / elapsed:.0f}",
                "p50_us": f"{statistics.median(lat) * 1e6:.1f}",
                "p99_us": f"{lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0] * 1e6:.1f}",
                "srv_cpu": f"{cpu:.1f}", "srv_rss_kb": str(rss), "lg_cpu": f"{lg_cpu:.0f}",
                "errors": str(self.errors + failed + len(pending))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--port", type=int, required=True)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("-c", "--conns", type=int, default=100)
    ap.add_argument("-P", "--in-flight", type=int, default=1)
    ap.add_argument("-s", "--size", type=int, default=64)
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("-w", "--warmup", type=float, default=1.0)
    ap.add_argument("--server-pid", type=int, default=0)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    if args.size < 16:
        ap.error("--size must be at least 16")
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    try:
        result = loop.run_until_complete(Load(args).run())
    finally:
        loop.close()
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
