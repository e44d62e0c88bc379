"""Resource faults through the real daemon (README, README "Measured").

1. File descriptors run out: a low RLIMIT_NOFILE with `max_clients = 0` (as many as fit: the
   limit minus daemon.FD_RESERVE), a burst of far more clients than fit, a limit tighter than
   the reserve itself, and a limit lowered under a running daemon (prlimit(2)). Newcomers past
   the limit are told "server full" and closed, never left hanging; the daemon neither dies
   nor spins (its CPU time is read from /proc/PID/stat); service resumes when clients leave.
2. The log target fails: a file over RLIMIT_FSIZE, a disk that fills (a 64 KiB tmpfs mounted
   in a private mount namespace that only `chatd run` lives in, never on this machine's own
   file systems), a log file made unreadable or its directory deleted before a SIGHUP. chatd
   keeps serving, says so once, and logs again once it can.
3. Memory bounds derived from the README's measured figures; each test prints its formula:
   base     = the daemon's RSS right after it started (measured, not a constant)
   per_conn = 2,048 B (the speed issue's limit; the benchmark measured 1,746 B)
   slack    = 4 MiB
   (a) 10 clients each send a 10 MiB line:  peak <= base + 10 * (max_line + per_conn) + slack
   (b) 1,000 chat readers that never read:  peak <= base + 1000 * (2 * loop_buffer + per_conn) + slack,
       loop_buffer = output_buffer - min(65536, output_buffer // 4)   (connection.py _bound_buffers:
       the kernel's share of output_buffer is capped to a quarter and taken off the loop's share);
       two of them: each holds its own budget for the second or two "too slow" is judged over,
       and chatd holds at most two budgets per client (README "Chat mode": its own queue, and
       what it may queue past others')
   (c) 10,000 idle echo connections:         after <= base + 10000 * per_conn + slack
   The peak is the kernel's high-water mark (VmHWM, reset through /proc/PID/clear_refs once
   the base is read), so no short peak is missed between two samples.

Every test prints one line `FIGURES <test>: key=value ...` (pytest -s shows it). Tests collect
what they find wrong and assert once at the end, so the figures are printed and every problem
is named, not only the first. Traffic goes to 127.0.0.1 only; every process a test starts is
stopped by its pid; every wait has a deadline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from chatd.daemon import FD_RESERVE
from chatd.log import RETRY_S
from conftest import LOOPS, require_real
from support import (LineClient, alive, chatd_command, fd_count, figures, free_port, kill_and_wait,
                     wait_for)

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

CLK_TCK = os.sysconf("SC_CLK_TCK")
FULL = {"echo": b"ERR server full\r\n", "chat": b"*** server full\r\n"}
NO_LIMITS = "[limits]\nmax_clients = 0\nmax_clients_per_ip = 0\nrate = 0\n"
ROSTER = re.compile(rb"\*\*\* #lobby: [^\r\n]*\r\n")
EMFILE_LINE = "out of descriptors"   # chatd's line when accept() fails for lack of them (accept.py)
RECOVERED_LINE = "descriptors available again"
MAX_WAIT_S = 3.0       # "a couple of seconds": the longest a newcomer may wait for its answer
MAX_CPU_PCT = 10.0     # the daemon's CPU time over wall time while it should be (near) idle
MAX_SHORTAGE_LINES = 10   # log lines about one shortage of descriptors: a few, not one per accept

PER_CONN = 2048        # bytes of RSS per connection (the speed issue's limit; measured: 1,746)
SLACK = 4 * 1024 * 1024


# ------------------------------------------------------------------ helpers

def check_loop(loop: str) -> None:
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        require_real("uvloop")


def nofile(limit: int):
    """preexec_fn for `chatd start`: the daemon inherits RLIMIT_NOFILE limit/limit."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def cpu_seconds(pid: int) -> float:
    """utime + stime of /proc/PID/stat, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def soft_nofile(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' in /proc/PID/limits")


def status_field(pid: int, key: str) -> int:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return status_field(pid, "VmRSS")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5", Linux 4.0+); False if not allowed."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mib(n: float) -> str:
    return f"{n / 1048576:.1f}MiB"


def status_clients(inst) -> int | None:
    m = re.search(r"^clients: (\d+)$", inst.cmd("status", check=0).stdout.decode(), re.M)
    return int(m.group(1)) if m else None


def connect_many(port: int, n: int, rcvbuf: int | None = None, batch: int = 256,
                 timeout: float = 60.0) -> list[socket.socket]:
    """`n` non-blocking connects, `batch` at a time, each waited for (SO_ERROR checked)."""
    socks: list[socket.socket] = []
    deadline = time.monotonic() + timeout
    sel = selectors.DefaultSelector()
    try:
        while len(socks) < n:
            pending = set()
            for _ in range(min(batch, n - len(socks))):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                if rcvbuf:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                sel.register(s, selectors.EVENT_WRITE)
                pending.add(s)
                socks.append(s)
            while pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"connects did not complete: {len(pending)} pending")
                for key, _ in sel.select(timeout=0.5):
                    s = key.fileobj
                    sel.unregister(s)
                    pending.discard(s)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise AssertionError(f"connect failed: {os.strerror(err)}")
    except BaseException:
        for s in socks:
            s.close()
        raise
    finally:
        sel.close()
    return socks


def gather(socks: list[socket.socket], complete, started: list[float], timeout: float,
           results: list[dict] | None = None) -> list[dict]:
    """Read every socket until `complete(i, data)` says its answer is whole, or it ends (EOF or
    reset), or `timeout` passes. Per socket: data, end ("eof", "reset" or None), wait (seconds
    from `started[i]` to its first byte or its end; None if nothing came). `results` continues
    an earlier call for the sockets not finished then."""
    if results is None:
        results = [{"data": b"", "end": None, "wait": None, "done": False} for _ in socks]
    sel = selectors.DefaultSelector()
    for i, s in enumerate(socks):
        r = results[i]
        if not r["done"] and r["end"] is None:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
    left = len(sel.get_map())
    deadline = time.monotonic() + timeout
    try:
        while left and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.05):
                i = key.data
                r = results[i]
                try:
                    chunk = key.fileobj.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk, r["end"] = b"", "reset"
                else:
                    if not chunk:
                        r["end"] = "eof"
                if r["wait"] is None:
                    r["wait"] = time.monotonic() - started[i]
                r["data"] += chunk
                if r["end"] or complete(i, r["data"]):
                    r["done"] = r["end"] is None
                    sel.unregister(key.fileobj)
                    left -= 1
    finally:
        sel.close()
    return results


def classify(r: dict, full: bytes) -> str:
    """served / full (told, then closed) / full-open (told, never closed) / silent (closed or
    reset without a word) / hanging (nothing at all) / other."""
    if r["done"]:
        return "served"
    if r["data"] == full:
        return "full" if r["end"] else "full-open"
    if not r["data"]:
        return "silent" if r["end"] else "hanging"
    return "other"


def knock(port: int, full: bytes, timeout: float = MAX_WAIT_S) -> tuple[str, float]:
    """One newcomer that says nothing: what it is told, and how long that took."""
    t0 = time.monotonic()
    data, end = b"", None
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    end = "eof"
                    break
                data += chunk
    except ConnectionResetError:
        end = "reset"
    except socket.timeout:
        pass
    r = {"data": data, "end": end, "done": False}
    return classify(r, full), time.monotonic() - t0


def close_all(socks) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def mode_complete(mode: str, probes: list[bytes] | None = None):
    """What a served client's first answer looks like: its probe echoed, or chat's roster line."""
    if mode == "echo":
        return lambda i, data: data == probes[i]
    return lambda i, data: ROSTER.search(data) is not None


def open_and_probe(port: int, n: int, mode: str, tag: str, timeout: float):
    """`n` newcomers; in echo mode each sends a probe line at once (as a real client would)."""
    socks = connect_many(port, n)
    started = [time.monotonic()] * n
    probes = [b"%s %d\n" % (tag.encode(), i) for i in range(n)]
    if mode == "echo":
        for s, p in zip(socks, probes):
            s.send(p)
    results = gather(socks, mode_complete(mode, probes), started, timeout)
    return socks, results


def counts(results: list[dict], full: bytes) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        k = classify(r, full)
        out[k] = out.get(k, 0) + 1
    return out


def max_wait(results: list[dict]) -> float:
    waits = [r["wait"] for r in results if r["wait"] is not None]
    return max(waits) if waits else 0.0


def still_served(mode: str, socks: list[socket.socket], tag: str, problems: list[str],
                 timeout: float = 10.0) -> None:
    """Echo: every socket echoes a fresh line. Chat: the first says a line, the next ten get it."""
    if not socks:
        problems.append("no admitted client left to check")
        return
    if mode == "echo":
        started = [time.monotonic()] * len(socks)
        lines = [b"%s %d\n" % (tag.encode(), i) for i in range(len(socks))]
        for s, line in zip(socks, lines):
            s.send(line)
        res = gather(socks, lambda i, d: d.endswith(lines[i]), started, timeout)
        bad = sum(1 for r in res if not r["done"])
        if bad:
            problems.append(f"{bad} of {len(socks)} admitted clients no longer echoed ({tag})")
        return
    line = b"%s from the first\n" % tag.encode()
    socks[0].setblocking(True)
    socks[0].sendall(line)
    listeners = socks[1:11]
    started = [time.monotonic()] * len(listeners)
    want = b"> " + line[:-1] + b"\r\n"
    res = gather(listeners, lambda i, d: want in d, started, timeout)
    bad = sum(1 for r in res if not r["done"])
    if bad:
        problems.append(f"{bad} of {len(listeners)} admitted chat clients did not get a line ({tag})")


def log_count(inst, needle: str, start: int = 0) -> int:
    return inst.log_text()[start:].count(needle)


def still_well(port: int, problems: list[str], line: bytes = b"well-behaved\n",
               problem: str = "a well-behaved client was not served at the end") -> None:
    """A new client is echoed `line`; `problem` is noted if not."""
    with LineClient(port, timeout=5) as c:
        c.send(line)
        if c.recv_line() != line:
            problems.append(problem)


def unharmed(inst, pid: int, problems: list[str]) -> None:
    if "Traceback" in inst.log_text() or not alive(pid):
        problems.append("a traceback in the log, or the daemon died")


# ------------------------------------------------------------------ 1. descriptors

def start_short_of_fds(make_chatd, loop: str, limit: int, mode: str = "echo"):
    """A daemon started with RLIMIT_NOFILE `limit` and no client limits of its own
    (max_clients 0: as many as the descriptors fit); the instance and its pid."""
    check_loop(loop)
    inst = make_chatd(loop=loop)
    inst.write_config(mode=mode, extra=NO_LIMITS)
    inst.cmd("start", check=0, preexec_fn=nofile(limit))
    return inst, inst.pid()


LIMIT = 300
BURST = 400


@pytest.mark.parametrize("loop, mode", [   # two of the four in the default step, all in the slow one
    ("uvloop", "chat"), ("asyncio", "echo"),
    pytest.param("uvloop", "echo", marks=pytest.mark.slow),
    pytest.param("asyncio", "chat", marks=pytest.mark.slow)])
def test_descriptors_run_out_newcomers_are_told_and_service_resumes(make_chatd, loop, mode):
    """RLIMIT_NOFILE 300, max_clients 0 (as many as fit: 300 - FD_RESERVE = 172):
    1. 400 clients at once (echo clients send a line at once). Result: 172 served, 228 told
       "server full" and closed, none waits more than MAX_WAIT_S.
    2. the 172 hold on while a newcomer knocks every 50 ms, then all is quiet. Result: every
       knock is told "server full"; the daemon's CPU stays under 10 % of wall time both times.
    3. the admitted are still served; half of them leave. Result: as many newcomers are served
       again, the next one is told "server full"; no traceback, the daemon never died."""
    name = f"test_descriptors_run_out_newcomers_are_told_and_service_resumes[{loop}-{mode}]"
    inst, pid = start_short_of_fds(make_chatd, loop, LIMIT, mode)
    full = FULL[mode]
    fit = LIMIT - FD_RESERVE
    problems: list[str] = []
    if soft_nofile(pid) != LIMIT:
        problems.append(f"the daemon's RLIMIT_NOFILE is {soft_nofile(pid)}, not {LIMIT}")
    socks: list[socket.socket] = []
    kinds: dict[str, int] = {}
    again_kinds: dict[str, int] = {}
    knocks: dict[str, int] = {}
    burst_s = burst_wait = knock_wait = knock_cpu = idle_cpu = 0.0
    peak_fds = 0
    try:
        # 1. the burst
        t0 = time.monotonic()
        socks, results = open_and_probe(inst.port, BURST, mode, "burst", timeout=MAX_WAIT_S + 5)
        burst_s = time.monotonic() - t0
        kinds = counts(results, full)
        peak_fds = fd_count(pid)
        burst_wait = max_wait(results)
        admitted = [s for s, r in zip(socks, results) if classify(r, full) == "served"]
        if kinds.get("served", 0) != fit or kinds.get("full", 0) != BURST - fit:
            problems.append(f"burst of {BURST}: wanted {fit} served and {BURST - fit} told and "
                            f"closed, got {kinds}")
        if burst_wait > MAX_WAIT_S:
            problems.append(f"a newcomer of the burst waited {burst_wait:.2f} s for its answer")
        for s, r in zip(socks, results):
            if classify(r, full) != "served":
                s.close()

        # 2. holding on, with knocks; then quiet
        c0, w0 = cpu_seconds(pid), time.monotonic()
        while time.monotonic() - w0 < 2.0:
            kind, waited = knock(inst.port, full)
            knocks[kind] = knocks.get(kind, 0) + 1
            knock_wait = max(knock_wait, waited)
            time.sleep(0.05)
        knock_cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        if set(knocks) != {"full"}:
            problems.append(f"knocks past the limit were not all told and closed: {knocks}")
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(1.5)
        idle_cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        for what, pct in (("with knocks", knock_cpu), ("idle", idle_cpu)):
            if pct > MAX_CPU_PCT:
                problems.append(f"the daemon used {pct:.1f} % CPU {what} at the limit")

        # 3. still served; half leave; newcomers are served again
        still_served(mode, admitted, "still", problems)
        half = len(admitted) // 2
        close_all(admitted[:half])
        admitted = admitted[half:]
        try:
            wait_for(lambda: status_clients(inst) == len(admitted), timeout=10,
                     what=f"status to count {len(admitted)} clients")
        except AssertionError as e:
            problems.append(str(e))
        again, again_results = open_and_probe(inst.port, half, mode, "again", timeout=MAX_WAIT_S + 5)
        socks += again
        again_kinds = counts(again_results, full)
        if again_kinds.get("served", 0) != half:
            problems.append(f"after {half} left, {half} newcomers: {again_kinds}")
        last, _ = knock(inst.port, full)
        if last != "full":
            problems.append(f"the newcomer past the limit again: {last}")
        if not alive(pid):
            problems.append("the daemon died")
    finally:
        close_all(socks)
    log = inst.log_text()
    if "Traceback" in log:
        problems.append("a traceback in the log")
    if log.count(EMFILE_LINE) > MAX_SHORTAGE_LINES:
        problems.append(f"{log.count(EMFILE_LINE)} log lines \"{EMFILE_LINE}\" for one burst "
                        f"(at most {MAX_SHORTAGE_LINES}: a few, not one per failed accept)")
    figures(name, limit=LIMIT, reserve=FD_RESERVE, fit=fit, burst=BURST,
            served=kinds.get("served", 0), told_full=kinds.get("full", 0),
            other=sum(v for k, v in kinds.items() if k not in ("served", "full")),
            burst_s=f"{burst_s:.2f}", max_wait_s=f"{burst_wait:.2f}", peak_fds=peak_fds,
            knocks=sum(knocks.values()), knock_max_wait_s=f"{knock_wait:.2f}",
            cpu_knocking_pct=f"{knock_cpu:.1f}", cpu_idle_pct=f"{idle_cpu:.1f}",
            served_after_half_left=again_kinds.get("served", 0),
            refused_log_lines=log.count("refused 127.0.0.1"), emfile_log_lines=log.count(EMFILE_LINE))
    assert not problems, "\n".join(problems)


TIGHT_LIMIT = 80
TIGHT_BURST = 150


@pytest.mark.parametrize("loop", LOOPS)
def test_limit_tighter_than_the_reserve(make_chatd, loop):
    """RLIMIT_NOFILE 80, below FD_RESERVE itself: max_clients 0 fits one client, and the
    descriptors left over (about 60) are fewer than the refused clients chatd may keep open
    while it closes them gracefully (connection.MAX_LINGERING, 96).
    1. one client is admitted, 2. 150 newcomers at once, saying nothing.
    Result: the admitted client is served throughout; every newcomer is told "server full"
    within MAX_WAIT_S (none reset without a word, none left hanging); no CPU spin; a few log
    lines about the shortage at most; no traceback; after the admitted client leaves, a new one
    is served."""
    name = f"test_limit_tighter_than_the_reserve[{loop}]"
    inst, pid = start_short_of_fds(make_chatd, loop, TIGHT_LIMIT)
    full = FULL["echo"]
    problems: list[str] = []
    fds_at_start = fd_count(pid)
    first = LineClient(inst.port, timeout=5)
    socks: list[socket.socket] = []
    kinds: dict[str, int] = {}
    wait = cpu = 0.0
    try:
        first.send(b"first\n")
        assert first.recv_line() == b"first\n"
        socks = connect_many(inst.port, TIGHT_BURST)
        started = [time.monotonic()] * len(socks)
        first.send(b"during\n")
        if first.recv_line() != b"during\n":
            problems.append("the admitted client was not echoed during the burst")
        results = gather(socks, lambda i, d: False, started, timeout=MAX_WAIT_S + 5)
        kinds = counts(results, full)
        wait = max_wait(results)
        if kinds.get("full", 0) != len(socks):
            problems.append(f"{len(socks) - kinds.get('full', 0)} of {len(socks)} newcomers were not "
                            f"told \"server full\" and closed: {kinds}")
        if wait > MAX_WAIT_S:
            problems.append(f"a newcomer waited {wait:.2f} s for its answer")
        close_all(socks)
        c0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(2.0)
        cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        if cpu > MAX_CPU_PCT:
            problems.append(f"the daemon used {cpu:.1f} % CPU after the burst")
        first.send(b"after\n")
        if first.recv_line() != b"after\n":
            problems.append("the admitted client was not echoed after the burst")
        first.close()
        wait_for(lambda: status_clients(inst) == 0, timeout=10, what="the admitted client to leave")
        still_well(inst.port, problems, b"next\n", "a new client was not served after the first left")
        if not alive(pid):
            problems.append("the daemon died")
    finally:
        first.close()
        close_all(socks)
    log = inst.log_text()
    if f"RLIMIT_NOFILE {TIGHT_LIMIT} is within the {FD_RESERVE} descriptors kept in reserve" not in log:
        problems.append("no warning at start that the descriptor limit is below the reserve")
    shortage = log.count(EMFILE_LINE)
    if shortage > MAX_SHORTAGE_LINES:
        problems.append(f"{shortage} log lines about the descriptor shortage of one burst")
    if "Traceback" in log:
        problems.append("a traceback in the log")
    figures(name, limit=TIGHT_LIMIT, fds_at_start=fds_at_start, burst=TIGHT_BURST,
            told_full=kinds.get("full", 0), reset_without_a_word=kinds.get("silent", 0),
            hanging=kinds.get("hanging", 0), max_wait_s=f"{wait:.2f}", cpu_after_pct=f"{cpu:.1f}",
            refused_log_lines=log.count("refused 127.0.0.1"), emfile_log_lines=shortage)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("loop", LOOPS)
def test_descriptor_limit_lowered_under_a_running_daemon(make_chatd, loop):
    """The daemon short of descriptors another way: its RLIMIT_NOFILE is lowered (prlimit(2),
    as `prlimit --pid` does) to what it holds, with 40 clients connected.
    1. 20 newcomers connect and send a line; then one knocks every 50 ms for 2 s in all.
       Result: the daemon does not spin (CPU under 10 % over the 2 s), logs the shortage once
       or a few times, not once per attempt; the 40 are still served; every knock is told;
       every newcomer is told "server full" within MAX_WAIT_S, none is left hanging or reset
       without a word (README "Chat mode": chatd keeps one descriptor in reserve to tell it).
    2. the limit is restored and 10 clients leave. Result: new clients are served; no traceback."""
    name = f"test_descriptor_limit_lowered_under_a_running_daemon[{loop}]"
    inst, pid = start_short_of_fds(make_chatd, loop, LIMIT)
    full = FULL["echo"]
    problems: list[str] = []
    held: list[socket.socket] = []
    newcomers: list[socket.socket] = []
    restored = False
    holding = shortage_lines = answered_in_time = 0
    cpu = 0.0
    during: dict[str, int] = {}
    after: dict[str, int] = {}
    knocks: dict[str, int] = {}
    try:
        held, res = open_and_probe(inst.port, 40, "echo", "held", timeout=10)
        assert all(r["done"] for r in res), counts(res, full)
        time.sleep(0.3)
        holding = fd_count(pid)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (holding, LIMIT))   # soft only: raising a hard
        # limit again would need CAP_SYS_RESOURCE
        mark = len(inst.log_text())
        c0, w0 = cpu_seconds(pid), time.monotonic()
        newcomers = connect_many(inst.port, 20)
        started = [time.monotonic()] * len(newcomers)
        probes = [b"new %d\n" % i for i in range(len(newcomers))]
        for s, p in zip(newcomers, probes):
            s.send(p)
        results = gather(newcomers, lambda i, d: d == probes[i], started, timeout=4.0)
        # Still short: a newcomer knocks every 50 ms for 2 s. CPU is read over that whole window
        # (a clock tick is 10 ms: over the burst alone, one tick would read as 10 %).
        while time.monotonic() - w0 < 2.0:
            kind, _ = knock(inst.port, full)
            knocks[kind] = knocks.get(kind, 0) + 1
            time.sleep(0.05)
        cpu = 100 * (cpu_seconds(pid) - c0) / (time.monotonic() - w0)
        shortage_lines = log_count(inst, EMFILE_LINE, mark)
        during = counts(results, full)
        if set(knocks) != {"full"}:
            problems.append(f"knocks while short of descriptors were not all told and closed: {knocks}")
        if cpu > MAX_CPU_PCT:
            problems.append(f"the daemon used {cpu:.1f} % CPU while short of descriptors")
        if not 1 <= shortage_lines <= MAX_SHORTAGE_LINES:
            problems.append(f"{shortage_lines} log lines in 4 s about the descriptor shortage "
                            f"(wanted 1 to {MAX_SHORTAGE_LINES}: said, and not once per accept)")
        still_served("echo", held, "held again", problems)
        # 2. descriptors come back
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        restored = True
        close_all(held[:10])
        held = held[10:]
        results = gather(newcomers, lambda i, d: d == probes[i], started, timeout=MAX_WAIT_S, results=results)
        after = counts(results, full)
        answered_in_time = sum(1 for r in results if r["wait"] is not None and r["wait"] <= MAX_WAIT_S
                               and classify(r, full) in ("served", "full"))
        if answered_in_time != len(newcomers):
            problems.append(f"{len(newcomers) - answered_in_time} of {len(newcomers)} newcomers were "
                            f"neither served nor told \"server full\" within {MAX_WAIT_S} s while "
                            f"the daemon was short of descriptors: {during} during, {after} after "
                            f"the limit came back")
        fresh, fres = open_and_probe(inst.port, 5, "echo", "fresh", timeout=10)
        newcomers += fresh
        if not all(r["done"] for r in fres):
            problems.append(f"fresh clients after the limit came back: {counts(fres, full)}")
        if not alive(pid):
            problems.append("the daemon died")
    finally:
        if not restored and alive(pid):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (LIMIT, LIMIT))
        close_all(held)
        close_all(newcomers)
    log = inst.log_text()
    if "Traceback" in log:
        problems.append("a traceback in the log")
    if RECOVERED_LINE not in log:
        problems.append(f"no \"{RECOVERED_LINE}\" in the log once clients were served again")
    figures(name, held=40, fds_held=holding, newcomers=20, during=during, knocks=knocks, after=after,
            answered_within_s=f"{answered_in_time}/{MAX_WAIT_S}", cpu_pct=f"{cpu:.1f}",
            shortage_log_lines=shortage_lines, log_bytes=len(log))
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ 2. the log target fails

def use_target(inst, target: Path) -> None:
    """Point [log] target at `target` (the fallback stays X.log beside the pid file X.pid)."""
    text = inst.config.read_text().replace(f'target = "{inst.logfile}"', f'target = "{target}"')
    inst.config.write_text(text)


def churn(port: int, n: int) -> None:
    """`n` clients connect, are echoed, and leave: two log lines each."""
    for i in range(n):
        with LineClient(port, timeout=5) as c:
            c.send(b"churn %d\n" % i)
            assert c.recv_line() == b"churn %d\n" % i


def test_log_file_over_its_size_limit_falls_back_and_says_so_once(make_chatd):
    """The log file stops taking writes (RLIMIT_FSIZE lowered to its size under the running
    daemon: EFBIG, and SIGXFSZ, which must not kill it).
    Result: chatd keeps serving; the lines go to the fallback X.log; "log target failed" is
    said exactly once however many lines follow; status says "failing"; the target got not a
    byte more; no traceback."""
    inst = make_chatd()
    target = inst.dir / "target.log"
    fallback = inst.dir / "chatd.log"
    use_target(inst, target)
    pid = inst.start()
    problems: list[str] = []
    wait_for(lambda: target.exists() and "ready:" in target.read_text(), what="ready in the target")
    churn(inst.port, 40)   # a few KiB in the target, so the fallback may grow as large
    wait_for(lambda: target.read_text().count("disconnect") == 40, what="the churn logged")
    size = target.stat().st_size
    resource.prlimit(pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))   # soft only
    try:
        churn(inst.port, 30)
        try:
            wait_for(lambda: fallback.exists() and fallback.read_text().count("disconnect") >= 30,
                     timeout=5, what="the lines in the fallback")
        except AssertionError as e:
            problems.append(str(e))
        status = ""
        try:
            status = wait_for(lambda: (out := inst.cmd("status", check=0).stdout.decode())
                              and "failing" in out and out, timeout=3, what="status to say failing")
        except AssertionError as e:
            problems.append(str(e))
        still_well(inst.port, problems, b"still\n", "not served while the log failed")
        if not alive(pid):
            problems.append("the daemon died (SIGXFSZ?)")
    finally:
        if alive(pid):
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    said = target.read_text(errors="replace").count("log target failed")
    fb = fallback.read_text(errors="replace") if fallback.exists() else ""
    said += fb.count("log target failed")
    if said != 1:
        problems.append(f'"log target failed" said {said} times, not once')
    if target.stat().st_size != size:
        problems.append(f"the target grew past its limit: {size} -> {target.stat().st_size}")
    if "Traceback" in fb + target.read_text(errors="replace"):
        problems.append("a traceback in the log")
    figures("test_log_file_over_its_size_limit_falls_back_and_says_so_once", fsize=size,
            lines_to_fallback=fb.count("\n"), said_failed=said,
            status_failing="failing" in status, alive=alive(pid))
    assert not problems, "\n".join(problems)


def test_log_file_made_unwritable_or_removed_then_sighup(make_chatd):
    """chatd as nobody, its log file nobody's own in a directory nobody cannot write:
    1. chmod 000 on the log file, SIGHUP (chatd reload) twice: the reopen fails each time, and
       each says so in one line, and `chatd reload` says so too; chatd keeps writing to the old
       descriptor and keeps serving.
    2. chmod 644, SIGHUP: reopened, no new warning.
    3. the log's directory deleted, SIGHUP: one warning; serving; lines still reach the old
       (deleted) file, read through /proc/PID/fd. 4. directory back, SIGHUP: new lines there."""
    inst = make_chatd(public=True)
    logdir = inst.dir / "logs"
    logdir.mkdir(mode=0o755)
    target = logdir / "chatd.log"
    target.touch()
    os.chown(target, 65534, 65534)
    target.chmod(0o644)
    inst.write_config(daemon={"user": "nobody"})
    use_target(inst, target)
    inst.logfile = target
    pid = inst.start()
    problems: list[str] = []
    uid = Path(f"/proc/{pid}/status").read_text().split("Uid:")[1].split()[0]
    if uid != "65534":
        problems.append(f"the daemon runs as uid {uid}, not nobody")
    said = "cannot reopen log file"   # in `chatd reload`'s answer, and in the log:
    warn = "WARNING: " + said         # the warning line itself (the restart's line repeats it)

    def reload_and_serve(tag: str, reopened: bool = True) -> None:
        proc = inst.cmd("reload", check=0)
        if b"applied" not in proc.stdout and b"restarted" not in proc.stdout:
            problems.append(f"reload ({tag}): {proc.stdout!r}")
        if (said.encode() in proc.stdout) == reopened:
            problems.append(f"reload ({tag}) does not say whether the log file was reopened: "
                            f"{proc.stdout!r}")
        churn(inst.port, 2)

    connected = "connect 127.0.0.1"   # no message text is logged: count connects
    target.chmod(0)
    reload_and_serve("chmod 000", reopened=False)
    reload_and_serve("chmod 000, again", reopened=False)
    try:
        wait_for(lambda: target.read_text().count(warn) >= 2, timeout=5, what="two reopen warnings")
    except AssertionError as e:
        problems.append(str(e))
    after_chmod = target.read_text()
    if after_chmod.count(warn) != 2:
        problems.append(f"{after_chmod.count(warn)} reopen warnings after two SIGHUPs on a 000 file")
    if after_chmod.split(warn)[-1].count(connected) < 2:
        problems.append("no lines reached the old descriptor after the failed reopen")
    target.chmod(0o644)
    reload_and_serve("chmod 644")
    time.sleep(0.2)
    if target.read_text().count(warn) != 2:
        problems.append("a warning after the file became writable again")
    shutil.rmtree(logdir)
    reload_and_serve("directory deleted", reopened=False)
    time.sleep(0.2)
    old = [f"/proc/{pid}/fd/{fd}" for fd in os.listdir(f"/proc/{pid}/fd")
           if os.readlink(f"/proc/{pid}/fd/{fd}") == f"{target} (deleted)"]
    deleted_text = Path(old[0]).read_text() if old else ""
    gone = f"{warn} {target} (No such file or directory)"
    if not old:
        problems.append("the daemon no longer holds the old log file")
    elif deleted_text.count(gone) != 1 or deleted_text.split(gone)[-1].count(connected) < 2:
        problems.append(f"after the directory was deleted and SIGHUP: {deleted_text.count(gone)} "
                        f"warnings, and the lines after it did not reach the old file")
    logdir.mkdir(mode=0o755)
    target.touch()
    os.chown(target, 65534, 65534)
    reload_and_serve("directory back")
    try:
        wait_for(lambda: target.read_text().count(connected) >= 2, timeout=5,
                 what="lines in the new log file")
    except AssertionError as e:
        problems.append(str(e))
    if warn in target.read_text():
        problems.append("a reopen warning once the directory was back")
    if not alive(pid):
        problems.append("the daemon died")
    figures("test_log_file_made_unwritable_or_removed_then_sighup", sighups=5,
            reopen_warnings=after_chmod.count(warn) + deleted_text.count(gone),
            old_fd_kept=bool(old), alive=alive(pid))
    assert not problems, "\n".join(problems)


TMPFS_SIZE = "64k"


@pytest.mark.slow   # about 12 s, most of it RETRY_S; marked so the rest stays under a minute
def test_disk_full_under_the_log_keeps_serving_says_so_once_and_recovers(tmp_path):
    """`chatd run` alone in a private mount namespace with a 64 KiB tmpfs holding its log target,
    its fallback X.log, pid and state files (nothing is mounted where the test runs).
    1. a filler file (written through /proc/PID/root) fills the tmpfs; 30 clients come and go.
       Result: every one is served; status (run in the daemon's namespace) says "failing".
    2. the filler is removed. Result: "log target failed" said once in all; within RETRY_S the
       target takes lines again and status no longer says failing; no traceback on stderr
       (a file on the real disk) or in the logs; SIGTERM exits 0."""
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        require_real("unshare and nsenter (util-linux)")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs in a private mount namespace needs root")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    port = free_port()
    conf = tmp_path / "chatd.conf"
    conf.write_text(f'[server]\nhost = "127.0.0.1"\nport = {port}\n'
                    f'[daemon]\npidfile = "{mnt}/chatd.pid"\n'
                    f'[log]\ntarget = "{mnt}/target.log"\nlevel = "debug"\n')
    stderr_path = tmp_path / "run.stderr"
    script = f'mount -t tmpfs -o size={TMPFS_SIZE},mode=0755 chatd-test "{mnt}" && exec "$@"'
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
            *chatd_command(), "run", "-c", str(conf)]
    problems: list[str] = []
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
    pid = proc.pid   # unshare and sh exec: the daemon keeps this pid
    inside = Path(f"/proc/{pid}/root") / str(mnt).lstrip("/")

    def read(name: str) -> str:
        try:
            return (inside / name).read_text(errors="replace")
        except OSError:
            return ""

    def status() -> str:
        out = subprocess.run(["nsenter", "--mount", "--target", str(pid), *chatd_command(),
                              "status", "-c", str(conf)], capture_output=True, timeout=30)
        return out.stdout.decode(errors="replace")

    exit_code = None
    failing_seen = recovered = False
    filled = 0
    said = recovered_s = None
    try:
        wait_for(lambda: "ready:" in read("target.log") or proc.poll() is not None,
                 timeout=20, what="chatd run to be ready")
        assert proc.poll() is None, stderr_path.read_bytes()
        mounts = Path(f"/proc/{pid}/mountinfo").read_text()
        assert f" {mnt} " in mounts and "tmpfs" in mounts, "the tmpfs is not in the daemon's namespace"
        assert f" {mnt} " not in Path("/proc/self/mountinfo").read_text(), "the tmpfs leaked out"
        assert os.listdir(mnt) == [], "the daemon's files are on the real disk"
        # 1. fill it
        fd = os.open(inside / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                filled += os.write(fd, b"x" * 512)
        except OSError:
            pass
        finally:
            os.close(fd)
        churn(port, 30)
        try:
            failing_seen = bool(wait_for(lambda: "failing" in status(), timeout=3,
                                         what="status to say failing while the disk is full"))
        except AssertionError as e:
            problems.append(f"{e} (state file: {read('chatd.state')!r})")
        leftovers = [n for n in os.listdir(inside) if n.endswith(".tmp")]
        if leftovers:
            problems.append(f"temporary files left on the full disk: {leftovers}")
        # 2. free it
        os.unlink(inside / "filler")
        freed = time.monotonic()
        connects_before = read("target.log").count("connect 127.0.0.1")

        def target_back() -> bool:
            churn(port, 1)
            time.sleep(0.3)
            return read("target.log").count("connect 127.0.0.1") > connects_before

        try:
            wait_for(target_back, timeout=RETRY_S + 5, what="the target to take lines again")
            recovered = True
        except AssertionError as e:
            problems.append(str(e))
        recovered_s = time.monotonic() - freed
        try:
            wait_for(lambda: "failing" not in status(), timeout=3, what="status to stop saying failing")
        except AssertionError as e:
            problems.append(str(e))
        churn(port, 1)
        said = read("target.log").count("log target failed") + read("chatd.log").count("log target failed")
        if said > 1:
            problems.append(f'"log target failed" said {said} times in one episode')
        logs = read("target.log") + read("chatd.log")
        if "Traceback" in logs:
            problems.append("a traceback in the logs")
    finally:
        if proc.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                exit_code = proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        kill_and_wait(pid)
        if exit_code is None:
            exit_code = proc.wait(timeout=10)
    stderr = stderr_path.read_bytes()
    if b"Traceback" in stderr or b"Logging error" in stderr:
        problems.append(f"stderr: {stderr[-2000:]!r}")
    if exit_code != 0:
        problems.append(f"SIGTERM: exit status {exit_code}")
    figures("test_disk_full_under_the_log_keeps_serving_says_so_once_and_recovers",
            tmpfs=TMPFS_SIZE, filler_bytes=filled, status_failing_while_full=failing_seen,
            said_failed=said, target_back=recovered,
            target_back_after_s=None if recovered_s is None else f"{recovered_s:.1f}",
            stderr_bytes=len(stderr), exit=exit_code)
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ 3. memory bounds

TEN_MIB = 10 * 1024 * 1024


@pytest.mark.parametrize("loop", LOOPS)
def test_ten_clients_send_a_10_mib_line_at_once(make_chatd, loop):
    """10 clients each send 10 MiB without a newline, interleaved, then a newline and a line.
    Result: each gets one "ERR line too long" and its next line echoed; the daemon's peak RSS
    stays within base + 10 * (max_line + per_conn) + slack; a new client is served at the end."""
    check_loop(loop)
    name = f"test_ten_clients_send_a_10_mib_line_at_once[{loop}]"
    max_line = 4096
    inst = make_chatd(loop=loop)
    inst.write_config(extra=f"[limits]\nmax_line = {max_line}\n")
    pid = inst.start()
    base = rss(pid)
    exact_peak = reset_peak(pid)
    bound = base + 10 * (max_line + PER_CONN) + SLACK
    problems: list[str] = []
    socks = connect_many(inst.port, 10)
    sampled = peak = base
    try:
        sent = [0] * 10
        chunk = b"x" * 65536
        sel = selectors.DefaultSelector()
        for i, s in enumerate(socks):
            sel.register(s, selectors.EVENT_WRITE, i)
        deadline = time.monotonic() + 60
        n = 0
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                i = key.data
                try:
                    sent[i] += key.fileobj.send(chunk[: TEN_MIB - sent[i]])
                except BlockingIOError:
                    continue
                if sent[i] >= TEN_MIB:
                    sel.unregister(key.fileobj)
            n += 1
            if n % 64 == 0:
                sampled = max(sampled, rss(pid))
        sel.close()
        assert sent == [TEN_MIB] * 10, sent
        started = [time.monotonic()] * 10
        for i, s in enumerate(socks):
            s.sendall(b"\nnext %d\n" % i)
        want = [b"ERR line too long (max %d bytes)\r\nnext %d\n" % (max_line, i) for i in range(10)]
        res = gather(socks, lambda i, d: d == want[i], started, timeout=10)
        bad = [i for i, r in enumerate(res) if not r["done"]]
        if bad:
            problems.append(f"clients {bad} did not get the ERR line and their next line: "
                            f"{[res[i]['data'][:80] for i in bad]}")
        peak = max(status_field(pid, "VmHWM") if exact_peak else 0, sampled, rss(pid))
        if peak > bound:
            problems.append(f"peak RSS {mib(peak)} over the bound {mib(bound)}")
        still_well(inst.port, problems)
    finally:
        close_all(socks)
    unharmed(inst, pid, problems)
    figures(name, formula="base+10*(max_line+per_conn)+slack", base=mib(base), max_line=max_line,
            per_conn=PER_CONN, slack=mib(SLACK), bound=mib(bound), peak=mib(peak),
            growth_kib=(peak - base) // 1024, peak_exact=exact_peak, bytes_sent=10 * TEN_MIB)
    assert not problems, "\n".join(problems)


SLOW_READERS = 1000
OUTPUT_BUFFER = 16384


def loop_buffer(output_buffer: int) -> int:
    """connection.py _bound_buffers: the kernel's share is min(65536, output_buffer // 4); the
    loop's buffer gets the rest (past which what others say is charged to them)."""
    return output_buffer - min(65536, output_buffer // 4)


@pytest.mark.parametrize("loop", ["uvloop", pytest.param("asyncio", marks=pytest.mark.slow)])
def test_a_thousand_chat_readers_that_never_read(make_chatd, loop):
    """1,000 chat clients (SO_RCVBUF 4096) join #lobby and never read a byte, not even their
    welcome; then a sender floods the room, one line at a time, as fast as a chatty client
    (output_buffer 16384, rate 0); a watcher reads everything.
    Result: every one of the 1,000 is dropped as "too slow" (some already by the joins of the
    others); the daemon's peak RSS, from its start to the last drop, stays within
    base + 1000 * (2 * loop_buffer + per_conn) + slack; the sender and the watcher are never
    dropped, the watcher gets the sender's lines, a newcomer's line reaches the watcher at the
    end; no traceback."""
    check_loop(loop)
    name = f"test_a_thousand_chat_readers_that_never_read[{loop}]"
    inst = make_chatd(loop=loop)
    inst.write_config(mode="chat", extra=f"[limits]\nmax_clients = 0\nmax_clients_per_ip = 0\n"
                                         f"rate = 0\noutput_buffer = {OUTPUT_BUFFER}\n"
                                         f"logged_per_ip = 0\n")   # each drop is counted in the log
    pid = inst.start()
    base = rss(pid)
    exact_peak = reset_peak(pid)
    per_reader = 2 * loop_buffer(OUTPUT_BUFFER) + PER_CONN
    bound = base + SLOW_READERS * per_reader + SLACK
    problems: list[str] = []
    readers: list[socket.socket] = []
    sender = watcher = None
    t_flood = 0.0
    peak = sampled = base
    dropped_by_joins = dropped = seen = sent = 0
    try:
        readers = connect_many(inst.port, SLOW_READERS, rcvbuf=4096, batch=100)
        sender = LineClient(inst.port, timeout=10)
        watcher = LineClient(inst.port, timeout=10)
        for c in (sender, watcher):
            c.recv_line()   # welcome
            c.recv_line()   # roster
            c.sock.setblocking(False)
        dropped_by_joins = log_count(inst, ": too slow")
        line = b"flood " + b"y" * 94 + b"\n"
        t0 = time.monotonic()
        deadline = t0 + 60
        lost = ""
        while time.monotonic() < deadline and not lost:
            try:
                sent += sender.sock.send(line) // len(line)
            except BlockingIOError:
                pass
            except OSError as e:
                lost = f"the sender was disconnected ({e})"
            for who, c in (("sender", sender), ("watcher", watcher)):
                try:
                    while True:
                        chunk = c.sock.recv(1 << 20)
                        if not chunk:
                            lost = f"the {who} was disconnected"
                            break
                        if who == "watcher":
                            seen += chunk.count(b"> flood ")
                except BlockingIOError:
                    pass
                except OSError as e:
                    lost = f"the {who} was disconnected ({e})"
            sampled = max(sampled, rss(pid))
            dropped = log_count(inst, ": too slow")
            if dropped >= SLOW_READERS:
                break
            time.sleep(0.002)
        t_flood = time.monotonic() - t0
        peak = max(status_field(pid, "VmHWM") if exact_peak else 0, sampled, rss(pid))
        if lost:
            problems.append(lost)
        if dropped != SLOW_READERS:
            problems.append(f"{dropped} of {SLOW_READERS} slow readers dropped as too slow")
        if peak > bound:
            problems.append(f"peak RSS {mib(peak)} over the bound {mib(bound)} "
                            f"({(peak - base) // SLOW_READERS} B per slow reader, the bound allows "
                            f"{per_reader})")
        if not seen:
            problems.append("the watcher got none of the sender's lines")
        # a well-behaved newcomer, heard by the watcher
        watcher.sock.setblocking(True)
        watcher.buf = b""
        with LineClient(inst.port, timeout=10) as c:
            c.recv_line()
            roster = c.recv_line()
            if roster.count(b",") != 1:   # the sender and the watcher only
                problems.append(f"the room at the end: {roster[:200]!r}")
            c.send(b"/nick late\nhello watcher\n")
            try:
                wait_for(lambda: watcher._fill(time.monotonic() + 5) is not None
                         and b"<late> hello watcher\r\n" in watcher.buf, timeout=10,
                         what="the watcher to get the newcomer's line")
            except AssertionError as e:
                problems.append(str(e))
    finally:
        close_all(readers)
        for c in (sender, watcher):
            if c is not None:
                c.close()
    unharmed(inst, pid, problems)
    figures(name, formula="base+N*(2*loop_buffer+per_conn)+slack",
            loop_buffer=f"{OUTPUT_BUFFER}-min(65536,{OUTPUT_BUFFER}//4)={loop_buffer(OUTPUT_BUFFER)}",
            base=mib(base), readers=SLOW_READERS, per_conn=PER_CONN, slack=mib(SLACK), bound=mib(bound),
            peak=mib(peak), growth_per_reader=(peak - base) // SLOW_READERS, peak_exact=exact_peak,
            dropped_too_slow=dropped, dropped_by_the_joins=dropped_by_joins, lines_sent=sent,
            flood_s=f"{t_flood:.1f}", watcher_lines=seen)
    assert not problems, "\n".join(problems)


IDLE = 10000


@pytest.mark.parametrize("loop", ["uvloop", pytest.param("asyncio", marks=pytest.mark.slow)])
def test_ten_thousand_idle_connections_each_answer_a_probe(make_chatd, loop):
    """10,000 echo connections, opened with non-blocking connects in batches, each sends one
    probe line and gets it back, then all stay connected and idle (about 7 s per loop, so
    not marked slow).
    Result: RSS <= base + 10000 * per_conn + slack; status counts 10,000; a well-behaved client
    is served at the end; no traceback."""
    check_loop(loop)
    name = f"test_ten_thousand_idle_connections_each_answer_a_probe[{loop}]"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE + 500
    if soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {want}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    inst = make_chatd(loop=loop)
    inst.write_config(extra=f"[limits]\nmax_clients = {IDLE + 10}\nmax_clients_per_ip = 0\n")
    pid = inst.start()
    base = rss(pid)
    bound = base + IDLE * PER_CONN + SLACK
    problems: list[str] = []
    socks: list[socket.socket] = []
    after, answered, connect_s, probe_s = base, 0, 0.0, 0.0
    try:
        t0 = time.monotonic()
        socks = connect_many(inst.port, IDLE, batch=500)
        connect_s = time.monotonic() - t0
        probes = [b"probe %d\n" % i for i in range(IDLE)]
        started = [time.monotonic()] * IDLE
        for s, p in zip(socks, probes):
            s.send(p)
        res = gather(socks, lambda i, d: d == probes[i], started, timeout=60)
        answered = sum(1 for r in res if r["done"])
        probe_s = time.monotonic() - t0 - connect_s
        if answered != IDLE:
            problems.append(f"{IDLE - answered} probes unanswered: {counts(res, FULL['echo'])}")
        try:
            wait_for(lambda: status_clients(inst) == IDLE, timeout=10, what=f"status to count {IDLE}")
        except AssertionError as e:
            problems.append(str(e))
        after = rss(pid)
        if after > bound:
            problems.append(f"RSS {mib(after)} over the bound {mib(bound)}")
        still_well(inst.port, problems)
    finally:
        close_all(socks)
    unharmed(inst, pid, problems)
    figures(name, formula="base+N*per_conn+slack", base=mib(base), n=IDLE, per_conn=PER_CONN,
            slack=mib(SLACK), bound=mib(bound), after=mib(after),
            bytes_per_conn=(after - base) // IDLE, answered=answered,
            connect_s=f"{connect_s:.1f}", probe_s=f"{probe_s:.1f}")
    assert not problems, "\n".join(problems)
