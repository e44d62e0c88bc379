#!/usr/bin/env python3
"""Live-upgrade load for bench.py (the `u` workloads): what a client sees while `chatd upgrade`
hands a running echo daemon to new code, again and again.

    upgradeload.py --port P --pidfile F [--workers] -u N [-c CONNS] [-a ACTIVE] [--gap S] -- UPGRADE-COMMAND...

CONNS connections (1,000 by default) are opened and each echoes one probe line, so that every one
is a client of the daemon before the first upgrade. ACTIVE of them (32) then keep one 64-byte line
in flight each, a new one `--interval` after each reply (1 ms: a moderate load, not a saturating
one), every round trip timed and every reply compared byte for byte with its line; the others
stay idle, and anything they receive, an end of input included, is an error. Beside them a
client connects in a loop (connect, one line, its echo, close; `--churn-interval` apart),
counting connects that fail. After `--gap` seconds it runs UPGRADE-COMMAND (say `chatd upgrade
-c CONF`) N times, `--gap` seconds apart, and measures for each:

* `cmd_ms`: the command's wall time, which must exit 0;
* `serve_ms`: from its start until the new code serves: the pid file (read every millisecond)
  names another pid (with `--workers`: the supervisor it names has none of its old workers
  left as children), and a fresh connection opened after that echoes its line;
* `pause_ms`: the longest round trip of any active client that overlapped the upgrade (from
  the command's start until both of the above), against the round trips outside upgrades
  (`rtt_p50_us`, `rtt_p99_us`, `rtt_max_us`).

The old pid (old workers) must be gone within 5 s of the successor serving. At the end every connection,
idle or active, must echo one more line within `--stall` seconds. Errors (`errors=`, the sum):
`garbled` (a reply that is not its line), `disconnects` (a connection closed or reset by the
server, or sent something unasked), `stalled` (a line unanswered for `--stall` seconds),
`refused` (a fresh connection that failed: refused, reset, closed or wrong), `upgrade_failed`
(the command's exit status, an old pid that lives on, a pid that does not change or code that
does not serve within `--serve-timeout` seconds) and `unanswered` (connections that did not
echo at the end). Last line: `RESULT mode=upgrade key=value ...`, the per-upgrade figures as
comma-separated lists. Loopback only; every phase has a deadline.
"""

from __future__ import annotations

import argparse
import errno
import os
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from array import array

SIZE = 64                 # bytes per line, LF included
CONNECT_S = 20.0          # to open and probe every connection
GONE_S = 5.0              # for the old pid to exit once the new one serves
READ = 65536


def line_for(conn: int, seq: int) -> bytes:
    """The line `seq` of connection `conn`: unique, so a reply is checked against what was sent."""
    head = b"%06d:%012d:" % (conn, seq)
    return head + b"x" * (SIZE - len(head) - 1) + b"\n"


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:   # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def read_pid(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def serving(pidfile: str, workers: bool) -> set[int]:
    """The pids that serve: the one the pid file names, or with workers its children."""
    pid = read_pid(pidfile)
    if not workers or not pid:
        return {pid} - {0}
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return {int(p) for p in f.read().split()}
    except (OSError, ValueError):
        return set()


class Conn:
    """One held connection: idle, or active with one line in flight."""

    def __init__(self, n: int, sock: socket.socket) -> None:
        self.n = n
        self.sock = sock
        self.seq = 0
        self.buf = b""
        self.expect = b""         # the line in flight ("" when none)
        self.sent_at = 0.0
        self.next_at = 0.0        # when an active connection sends its next line
        self.dead = False


class Fresh:
    """The fresh connection of the moment: connect, one line, its echo, close."""

    def __init__(self, sock: socket.socket, line: bytes, opened: float) -> None:
        self.sock = sock
        self.line = line
        self.opened = opened
        self.sent = False
        self.got = b""


class Load:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.conns: list[Conn] = []
        self.active: list[Conn] = []
        # every active round trip's send and reply times: arrays, which the garbage collector
        # does not walk (a run's hundreds of thousands of tuples would make its passes long)
        self.sent = array("d")
        self.got = array("d")
        self.count = dict.fromkeys(("garbled", "disconnects", "stalled", "refused", "upgrade_failed",
                                    "unanswered"), 0)
        self.problems: list[str] = []
        self.fresh: Fresh | None = None
        self.fresh_next = 0.0
        self.fresh_done = 0
        self.fresh_echoed = (0.0, 0.0)   # when the last fresh connection that echoed was opened, and its echo

    def problem(self, kind: str, text: str) -> None:
        self.count[kind] += 1
        if len(self.problems) < 5:
            self.problems.append(text)

    # ------------------------------------------------------------------ opening

    def open_all(self) -> None:
        """Every connection, each echoing one probe line before the load begins."""
        a = self.args
        deadline = time.monotonic() + CONNECT_S
        for n in range(a.conns):
            sock = socket.create_connection(("127.0.0.1", a.port), timeout=CONNECT_S)
            sock.setblocking(False)
            conn = Conn(n, sock)
            self.conns.append(conn)
            self.sel.register(sock, selectors.EVENT_READ, conn)
        for conn in self.conns:
            self.send(conn, time.perf_counter())
        while any(c.expect and not c.dead for c in self.conns) and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.1):
                self.on_readable(key.data, time.perf_counter(), record=False)
        for conn in self.conns:
            if conn.expect and not conn.dead:
                self.problem("unanswered", f"connection {conn.n}: no echo of its first line")
        self.active = self.conns[:a.active]

    # ------------------------------------------------------------------ held connections

    def send(self, conn: Conn, now: float) -> None:
        conn.expect = line_for(conn.n, conn.seq)
        conn.seq += 1
        conn.sent_at = now
        try:
            conn.sock.send(conn.expect)   # 64 bytes into an empty socket buffer: all of it
        except OSError as e:
            self.lost(conn, f"send: {e}")

    def lost(self, conn: Conn, why: str) -> None:
        if not conn.dead:
            conn.dead = True
            self.sel.unregister(conn.sock)
            self.problem("disconnects", f"connection {conn.n}: {why}")

    def on_readable(self, conn: Conn, now: float, record: bool = True) -> None:
        try:
            data = conn.sock.recv(READ)
        except OSError as e:
            self.lost(conn, f"recv: {e}")
            return
        if not data:
            self.lost(conn, "closed by the server")
            return
        conn.buf += data
        if not conn.expect:
            self.lost(conn, f"{len(conn.buf)} bytes unasked")
            return
        if len(conn.buf) < len(conn.expect):
            return
        if conn.buf != conn.expect:
            conn.dead = True
            self.sel.unregister(conn.sock)
            self.problem("garbled", f"connection {conn.n}: {conn.buf[:80]!r} for {conn.expect[:80]!r}")
            return
        conn.buf = conn.expect = b""
        if record:
            self.sent.append(conn.sent_at)
            self.got.append(now)
        conn.next_at = now + self.args.interval

    # ------------------------------------------------------------------ the fresh connections

    def fresh_open(self, now: float) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex(("127.0.0.1", self.args.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self.problem("refused", f"fresh connection: connect: {os.strerror(code)}")
            self.fresh_next = now + self.args.churn_interval
            return
        self.fresh = Fresh(sock, line_for(999999, self.fresh_done), now)
        self.sel.register(sock, selectors.EVENT_WRITE, None)

    def fresh_event(self, now: float) -> None:
        fresh = self.fresh
        assert fresh is not None
        try:
            if not fresh.sent:   # connected (or not): send the line
                code = fresh.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    raise OSError(code, os.strerror(code))
                fresh.sock.send(fresh.line)
                fresh.sent = True
                self.sel.modify(fresh.sock, selectors.EVENT_READ, None)
                return
            data = fresh.sock.recv(READ)
            if not data:
                raise OSError("closed by the server")
            fresh.got += data
            if len(fresh.got) < len(fresh.line):
                return
            if fresh.got != fresh.line:
                raise OSError(f"{fresh.got[:80]!r} for {fresh.line[:80]!r}")
        except OSError as e:
            self.problem("refused", f"fresh connection: {e}")
        else:
            self.fresh_done += 1
            self.fresh_echoed = (fresh.opened, now)
        self.fresh_close(now)

    def fresh_close(self, now: float) -> None:
        assert self.fresh is not None
        self.sel.unregister(self.fresh.sock)
        self.fresh.sock.close()
        self.fresh = None
        self.fresh_next = now + self.args.churn_interval

    # ------------------------------------------------------------------ the loop

    def step(self, timeout: float) -> None:
        """One pass: due lines sent, events handled, stalls and the fresh connection looked after."""
        now = time.perf_counter()
        stall = self.args.stall
        soonest = now + timeout
        for conn in self.active:
            if conn.dead:
                continue
            if conn.expect:
                if now - conn.sent_at > stall:
                    self.problem("stalled", f"connection {conn.n}: no echo for {stall:g} s")
                    conn.dead = True
                    self.sel.unregister(conn.sock)
            elif conn.next_at <= now:
                self.send(conn, now)
            else:
                soonest = min(soonest, conn.next_at)
        if self.fresh is None and self.fresh_next <= now:
            self.fresh_open(now)
        elif self.fresh is not None and now - self.fresh.opened > stall:
            self.problem("refused", f"fresh connection: no echo for {stall:g} s")
            self.fresh_close(now)
        elif self.fresh is None:
            soonest = min(soonest, self.fresh_next)
        for key, _ in self.sel.select(max(0.0, soonest - time.perf_counter())):
            if key.data is None:
                self.fresh_event(time.perf_counter())
            else:
                self.on_readable(key.data, time.perf_counter())

    def run_for(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.step(min(0.01, end - time.perf_counter()))

    def upgrade(self, out: str) -> tuple[float, float, float]:
        """One upgrade: its command's wall time, the time until the new code serves, and how
        long from the start round trips count as the upgrade's (until both), in seconds."""
        a = self.args
        old = serving(a.pidfile, a.workers)
        with open(out, "ab") as sink:
            began = time.perf_counter()
            proc = subprocess.Popen(a.command, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        cmd_s = serve_s = changed_at = 0.0
        next_read = began
        while not (cmd_s and serve_s):
            now = time.perf_counter()
            if now - began > a.serve_timeout:
                self.problem("upgrade_failed", f"no new chatd serving within {a.serve_timeout:g} s")
                break
            if not cmd_s and proc.poll() is not None:
                cmd_s = now - began
                if proc.returncode != 0:
                    self.problem("upgrade_failed", f"{' '.join(a.command)} exited {proc.returncode}")
                    break
            if not changed_at and now >= next_read:
                new = serving(a.pidfile, a.workers)
                if new and not new & old:
                    changed_at = now
                next_read = now + 0.001
            opened, echoed = self.fresh_echoed
            if changed_at and not serve_s and opened > changed_at:
                serve_s = echoed - began
            self.step(0.001)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if cmd_s and serve_s:
            deadline = time.monotonic() + GONE_S
            while any(alive(p) for p in old) and time.monotonic() < deadline:
                self.step(0.01)
            for pid in filter(alive, old):
                self.problem("upgrade_failed", f"the old chatd (pid {pid}) still runs")
        return cmd_s, serve_s, max(cmd_s, serve_s)

    def finish(self) -> None:
        """Every connection still held must echo one more line within `--stall` seconds."""
        for conn in self.conns:
            if not conn.dead and not conn.expect:
                self.send(conn, time.perf_counter())
        deadline = time.monotonic() + self.args.stall
        while any(c.expect and not c.dead for c in self.conns) and time.monotonic() < deadline:
            for key, _ in self.sel.select(0.1):
                if key.data is not None:
                    self.on_readable(key.data, time.perf_counter(), record=False)
        self.count["unanswered"] += sum(1 for c in self.conns if c.dead or c.expect)
        for conn in self.conns:
            conn.sock.close()
        if self.fresh is not None:
            self.fresh.sock.close()

    def run(self) -> dict[str, str]:
        a = self.args
        self.open_all()
        self.run_for(a.gap)
        windows: list[tuple[float, float]] = []
        cmd_ms, serve_ms = [], []
        with tempfile.NamedTemporaryFile(prefix="upgradeload-") as out:
            for _ in range(a.upgrades):
                began = time.perf_counter()
                cmd_s, serve_s, took = self.upgrade(out.name)
                windows.append((began, began + took))
                cmd_ms.append(cmd_s * 1e3)
                serve_ms.append(serve_s * 1e3)
                self.run_for(a.gap)
            said = open(out.name, "rb").read().decode(errors="replace").strip()
        self.finish()
        rtts = list(zip(self.sent, self.got))
        pauses = [max([got - sent for sent, got in rtts if sent < end and got > start] or [0.0])
                  for start, end in windows]
        outside = sorted(got - sent for sent, got in rtts
                         if not any(sent < end and got > start for start, end in windows)) or [0.0]
        result = {"mode": "upgrade", "conns": str(a.conns), "active": str(a.active),
                  "upgrades": str(a.upgrades),
                  "cmd_ms": ",".join(f"{v:.1f}" for v in cmd_ms),
                  "serve_ms": ",".join(f"{v:.1f}" for v in serve_ms),
                  "pause_ms": ",".join(f"{v * 1e3:.1f}" for v in pauses),
                  "rtt_p50_us": f"{statistics.median(outside) * 1e6:.1f}",
                  "rtt_p99_us": f"{outside[int(len(outside) * 0.99) - 1 if len(outside) > 1 else 0] * 1e6:.1f}",
                  "rtt_max_us": f"{outside[-1] * 1e6:.1f}",
                  "lines": str(len(self.sent)), "fresh": str(self.fresh_done), **{k: str(v) for k, v in self.count.items()},
                  "errors": str(sum(self.count.values()))}
        for text in self.problems + ([said.splitlines()[-1]] if said and self.count["upgrade_failed"] else []):
            print(f"upgradeload: {text}", file=sys.stderr)
        return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--port", type=int, required=True)
    ap.add_argument("--pidfile", required=True, help="the daemon's pid file, which the upgrade rewrites")
    ap.add_argument("--workers", action="store_true",
                    help="the daemon has workers: the new code serves once they are all new")
    ap.add_argument("-u", "--upgrades", type=int, default=5)
    ap.add_argument("-c", "--conns", type=int, default=1000)
    ap.add_argument("-a", "--active", type=int, default=32)
    ap.add_argument("--interval", type=float, default=0.001, help="seconds from a reply to the next line")
    ap.add_argument("--churn-interval", type=float, default=0.001, help="seconds between fresh connections")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds before, between and after upgrades")
    ap.add_argument("--stall", type=float, default=10.0, help="seconds a line may wait for its echo")
    ap.add_argument("--serve-timeout", type=float, default=60.0,
                    help="seconds for the new code to serve after the command starts")
    ap.add_argument("command", nargs="+", help="the upgrade command")
    args = ap.parse_args()
    if not 0 < args.active <= args.conns:
        ap.error("--active must be between 1 and --conns")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        result = Load(args).run()
    except OSError as e:   # the connections could not be opened: the daemon is not serving
        print(f"upgradeload: {e}", file=sys.stderr)
        return 1
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
