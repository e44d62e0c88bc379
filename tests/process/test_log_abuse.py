"""Attacks through the log, on the real daemon (README "Logging").

1. A log flood: one client churns connections as fast as it can for CHURN_S seconds, half of
   them refused (`max_clients_per_ip`). Past `logged_per_ip` newcomers an interval from one address,
   connects, disconnects and refusals are counted, not logged, and one summary line per address
   and interval gives the counts: the log grows by a bounded amount, and what was logged one by
   one plus what the summaries count is exactly what the client did. Likewise for one
   connection after another from each of many addresses: newcomers are logged one by one up
   to a cap in all, and the summary lines are bounded too.
2. A log target that stops reading: a private "syslog" (a Unix datagram socket bound in the
   test's directory that nobody ever reads, so its queue fills), and stderr under `chatd run`
   as a pipe or a stream socket (the journal's kind) that nobody reads, each holding about a
   page. Echo keeps answering every client, the lines go to X.log, the failure is said once,
   and `status` says "failing".
3. A stream syslog that stops accepting: its backlog full, no connect() waits for it, at start,
   restart or the retry.

Each test prints its `FIGURES` lines. Traffic goes to 127.0.0.1 only; every process is stopped by
its pid; every wait has a deadline.
"""

from __future__ import annotations

import fcntl
import os
import re
import socket
import subprocess
import time

import pytest

from chatd.config import KEYS
from chatd.connection import CHURN_ALL, CHURN_INTERVAL_S, CHURN_SOURCES
from chatd.log import RETRY_S
from support import LineClient, alive, chatd_command, figures, wait_for

CHURN_S = 3.0
LOGGED_PER_IP = KEYS["limits.logged_per_ip"].default
NEWCOMER_BYTES = 512    # the log lines of one newcomer, at most: accepted, connect, disconnect, closed
SUMMARY = re.compile(r"churn from 127\.0\.0\.1 in \d+ s: (\d+) connects, (\d+) disconnects, (\d+) refused")
ANY_SUMMARY = re.compile(r"churn from (.+?) in \d+ s: (\d+) connects, (\d+) disconnects, (\d+) refused")
SUMMARY_BYTES = 160     # a summary line, at most
SPREAD_ADDRESSES = 1000  # source addresses in 127.2.0.0/16 of the spread churn
SPREAD_EACH = 2         # connections from each of them
SPREAD_LOGGED = 10      # its logged_per_ip, so that the cap in all (CHURN_ALL of it) is soon reached
FULL = b"ERR server full\r\n"
ECHOES = 50             # clients echoed one after the other while the log target stops reading
ECHO_TIMEOUT_S = 2.0
F_SETPIPE_SZ = 1031


def set_level(inst, level: str) -> None:
    inst.config.write_text(inst.config.read_text().replace('level = "debug"', f'level = "{level}"'))


@pytest.mark.parametrize("level", ["info", "debug"])
def test_a_client_churning_connections_cannot_flood_the_log(make_chatd, level):
    """1. a witness stays connected, with max_clients_per_ip = 2; 2. for CHURN_S seconds a client
    opens two connections at a time (the first echoed, the second told "server full" while the
    previous one is still being let go), sends a line on each, reads the answer and closes;
    3. `chatd stop`.
    Result: the log grew by at most `logged_per_ip` newcomers' lines a started interval; the connects,
    disconnects and refusals logged one by one plus those the summary lines count equal the
    client's own counts."""
    inst = make_chatd(extra_config="[limits]\nmax_clients_per_ip = 2\n")
    set_level(inst, level)
    pid = inst.start()
    witness = LineClient(inst.port)
    witness.send(b"witness\n")
    assert witness.recv_line() == b"witness\n"
    before = inst.logfile.stat().st_size
    admitted = refused = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < CHURN_S:
        pair = [LineClient(inst.port, timeout=5), LineClient(inst.port, timeout=5)]
        for c in pair:
            c.send(b"x\n")
        for c in pair:
            answer = c.recv_line()
            assert answer in (b"x\n", FULL), answer
            admitted += answer == b"x\n"
            refused += answer == FULL
            c.close()
    churn_s = time.monotonic() - t0
    witness.close()
    inst.cmd("stop", check=0)
    text = inst.log_text()
    grown = len(text.encode()) - before
    summaries = [tuple(map(int, m)) for m in SUMMARY.findall(text)]
    counted = [sum(s[i] for s in summaries) for i in range(3)]
    logged = [len(re.findall(r"INFO: connect 127\.0\.0\.1:", text)),
              len(re.findall(r"INFO: disconnect 127\.0\.0\.1:", text)),
              len(re.findall(r"WARNING: refused 127\.0\.0\.1:", text))]
    intervals = int(churn_s // CHURN_INTERVAL_S) + 2   # the churn may straddle a boundary
    bound = intervals * LOGGED_PER_IP * NEWCOMER_BYTES + 4096
    figures(f"log_flood[{level}]", churn_s=round(churn_s, 2), admitted=admitted, refused=refused,
            log_bytes=grown, log_bytes_per_s=round(grown / churn_s), bound=bound,
            summary_lines=len(summaries), logged=logged, counted=counted)
    assert grown <= bound, f"{grown} bytes of log for {churn_s:.1f} s of churn (bound {bound})"
    assert [l + c for l, c in zip(logged, counted)] == [admitted + 1, admitted + 1, refused], (
        f"logged {logged} + counted {counted} != the client's {admitted + 1} connects and "
        f"disconnects (the witness too) and {refused} refusals")
    assert admitted > LOGGED_PER_IP and refused, "the churn was too slow to test anything"
    assert not alive(pid)


def test_churn_from_many_addresses_cannot_flood_the_log(make_chatd):
    """1. level info, logged_per_ip = SPREAD_LOGGED; 2. SPREAD_EACH rounds of one connection
    from each of SPREAD_ADDRESSES addresses of 127.2.0.0/16 (bound before connecting), each
    closed at once; 3. `chatd stop`.
    Result: per started interval, at most CHURN_ALL × logged_per_ip newcomers were logged one
    by one (a connect and a disconnect line each) and at most CHURN_SOURCES + 1 summary lines;
    the connects and disconnects logged plus those the summaries count equal the client's."""
    inst = make_chatd(extra_config=f"[limits]\nlogged_per_ip = {SPREAD_LOGGED}\n")
    set_level(inst, "info")
    pid = inst.start()
    before = inst.logfile.stat().st_size
    t0 = time.monotonic()
    for _ in range(SPREAD_EACH):
        for a in range(SPREAD_ADDRESSES):
            with socket.socket() as s:
                s.bind((f"127.2.{a // 250}.{1 + a % 250}", 0))
                s.connect(("127.0.0.1", inst.port))
    churn_s = time.monotonic() - t0
    inst.cmd("stop", check=0)
    grown = inst.log_text().encode()[before:].decode()
    summaries = [(m[0], int(m[1]), int(m[2])) for m in ANY_SUMMARY.findall(grown)]
    logged = [len(re.findall(r"INFO: connect 127\.2\.", grown)),
              len(re.findall(r"INFO: disconnect 127\.2\.", grown))]
    counted = [sum(s[1] for s in summaries), sum(s[2] for s in summaries)]
    intervals = int(churn_s // CHURN_INTERVAL_S) + 2   # the churn may straddle a boundary
    newcomers = intervals * CHURN_ALL * SPREAD_LOGGED
    lines_bound = 2 * newcomers + intervals * (CHURN_SOURCES + 1) + 10
    bound = newcomers * NEWCOMER_BYTES + intervals * (CHURN_SOURCES + 1) * SUMMARY_BYTES + 4096
    lines = grown.count("\n")
    made = SPREAD_ADDRESSES * SPREAD_EACH
    figures("log_flood[many addresses]", churn_s=round(churn_s, 2), connects=made, log_lines=lines,
            lines_bound=lines_bound, log_bytes=len(grown), bound=bound, summary_lines=len(summaries),
            logged=logged, counted=counted)
    assert lines <= lines_bound and len(grown) <= bound, (
        f"{lines} lines, {len(grown)} bytes of log for {made} connects (bound {lines_bound}, {bound})")
    assert len(summaries) <= intervals * (CHURN_SOURCES + 1)
    assert [l + c for l, c in zip(logged, counted)] == [made, made], (
        f"logged {logged} + counted {counted} != the client's {made} connects and disconnects")
    assert not alive(pid)


def echo_one_by_one(port: int) -> tuple[int, list[float]]:
    """ECHOES clients in turn, each echoed once: how many were answered, and their latencies."""
    latencies = []
    for i in range(ECHOES):
        line = b"ping %d\n" % i
        t0 = time.monotonic()
        try:
            with LineClient(port, timeout=ECHO_TIMEOUT_S) as c:
                c.send(line)
                if c.recv_line() != line:
                    break
        except (AssertionError, OSError):
            break
        latencies.append(time.monotonic() - t0)
    return len(latencies), latencies


def check_failed_over(inst, problems: list[str]) -> str:
    """The lines reached X.log, the failure was said once, and status says why it is failing."""
    fallback = inst.pidfile.with_suffix(".log")
    text = fallback.read_text(errors="replace") if fallback.exists() else ""
    if text.count("log target failed") != 1:
        problems.append(f'"log target failed" said {text.count("log target failed")} times in X.log')
    if "disconnect 127.0.0.1" not in text:
        problems.append("no disconnect line in X.log")
    status = inst.cmd("status", check=0).stdout.decode()
    if "(failing: BlockingIOError: [Errno 11] " not in status or "is not reading" not in status:
        problems.append(f"status does not say that the target is not reading: {status!r}")
    return status


def figures_of_echo(name: str, answered: int, latencies: list[float], **more: object) -> None:
    ms = sorted(1000 * t for t in latencies) or [0.0]
    figures(name, answered=f"{answered}/{ECHOES}", p50_ms=round(ms[len(ms) // 2], 2),
            max_ms=round(ms[-1], 2), **more)


def test_a_syslog_that_stops_reading_never_freezes_the_daemon(chatd, tmp_path):
    """1. chatd logs (level debug) to a "syslog" socket that is never read; 2. ECHOES clients
    connect one after the other and send a line.
    Result: every one is echoed within ECHO_TIMEOUT_S; the lines go to X.log; "log target
    failed" is said once; status says failing."""
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "log"
    sink.bind(str(path))
    try:
        chatd.config.write_text(chatd.config.read_text().replace(
            f'target = "{chatd.logfile}"', f'target = "syslog"\nsyslog_socket = "{path}"'))
        pid = chatd.start()
        answered, latencies = echo_one_by_one(chatd.port)
        problems = [] if answered == ECHOES else [f"echo stopped answering at client {answered + 1}"]
        if answered == ECHOES:
            check_failed_over(chatd, problems)
        figures_of_echo("syslog_stops_reading", answered, latencies, alive=alive(pid))
        assert not problems, "\n".join(problems)
    finally:
        sink.close()


def stalled_stderr(kind: str) -> tuple[int, int]:
    """(the daemon's end, the test's end) of a stderr that holds about one page and is never
    read: a pipe shrunk with F_SETPIPE_SZ, or a stream socket (as the journal's) with a small
    send buffer."""
    if kind == "pipe":
        r, w = os.pipe()
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        return w, r
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return ours.detach(), theirs.detach()


@pytest.mark.parametrize("kind", ["pipe", "socket"])
def test_stderr_that_nobody_reads_never_freezes_chatd_run(chatd, kind):
    """1. `chatd run` (level debug) with stderr a pipe or a stream socket the test holds and
    never reads (`stalled_stderr`); 2. ECHOES clients connect one after the other and send a line.
    Result: every one is echoed within ECHO_TIMEOUT_S; the lines go to X.log; the failure is
    said once; status says failing; and the daemon's stderr (the test holds the same open file
    description) was not made non-blocking."""
    chatd.config.write_text(chatd.config.read_text().replace(f'target = "{chatd.logfile}"', ""))
    daemons_end, tests_end = stalled_stderr(kind)
    try:
        proc = subprocess.Popen(chatd_command() + ["run", "-c", str(chatd.config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=daemons_end,
                                start_new_session=True)
        chatd.popens.append(proc)
        chatd.pids.add(proc.pid)
        wait_for(lambda: chatd.cmd("status").returncode == 0 or proc.poll() is not None,
                 what="chatd run to serve")
        answered, latencies = echo_one_by_one(chatd.port)
        problems = [] if answered == ECHOES else [f"echo stopped answering at client {answered + 1}"]
        if answered == ECHOES:
            check_failed_over(chatd, problems)
        if fcntl.fcntl(daemons_end, fcntl.F_GETFL) & os.O_NONBLOCK:
            problems.append("the daemon made the shared stderr description non-blocking")
        figures_of_echo(f"stderr_nobody_reads[{kind}]", answered, latencies, alive=proc.poll() is None)
        assert not problems, "\n".join(problems)
        chatd.cmd("stop", check=0)
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(daemons_end)
        os.close(tests_end)


@pytest.mark.slow
def test_a_stream_syslog_that_stops_accepting_never_freezes_the_daemon(chatd, tmp_path):
    """1. a stream "syslog" socket that never accepts (listen(0)), its backlog filled by the
    test's own connection; 2. `chatd start` (level debug) with it as `syslog_socket`; ECHOES
    clients; 3. `chatd restart`; ECHOES clients; 4. past RETRY_S, when chatd tries syslog again,
    ECHOES clients.
    Result: start and restart finish, every client is echoed within ECHO_TIMEOUT_S each time
    (a blocking connect() froze the daemon for good); the lines go to X.log; status says failing."""
    path = tmp_path / "log"
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.bind(str(path))
    stuck.listen(0)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))   # the one connection a backlog of 0 takes: the next would wait
    try:
        chatd.config.write_text(chatd.config.read_text().replace(
            f'target = "{chatd.logfile}"', f'target = "syslog"\nsyslog_socket = "{path}"'))
        chatd.cmd("start", timeout=10, check=0)
        pid = chatd.pid()
        echoed = {"start": echo_one_by_one(chatd.port)}
        chatd.cmd("restart", timeout=10, check=0)
        echoed["restart"] = echo_one_by_one(chatd.port)
        time.sleep(RETRY_S + 1)
        echoed["retry"] = echo_one_by_one(chatd.port)
        problems = [f"echo answered {n}/{ECHOES} after the {when}"
                    for when, (n, _) in echoed.items() if n != ECHOES]
        if not problems:
            fallback = chatd.pidfile.with_suffix(".log").read_text(errors="replace")
            if "log target failed" not in fallback or "disconnect 127.0.0.1" not in fallback:
                problems.append("the lines did not reach X.log")
            status = chatd.cmd("status", timeout=10, check=0).stdout.decode()
            if "(failing: BlockingIOError: " not in status:
                problems.append(f"status does not say that syslog is failing: {status!r}")
        for when, (n, latencies) in echoed.items():
            figures_of_echo(f"stream_syslog_stops_accepting[{when}]", n, latencies, alive=alive(pid))
        assert not problems, "\n".join(problems)
    finally:
        filler.close()
        stuck.close()
