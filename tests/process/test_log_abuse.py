"""Attacks through the log, on the real daemon (README "Logging").

2. A log target that stops reading: a private "syslog" (a Unix datagram socket bound in the
   test's directory that nobody ever reads, so its queue fills), and stderr under `chatd run`
   as a pipe nobody reads (shrunk to one page with F_SETPIPE_SZ). Echo keeps answering every
   client, the lines go to X.log, the failure is said once, and `status` says "failing".

Each test prints one `FIGURES` line. Traffic goes to 127.0.0.1 only; every process is stopped by
its pid; every wait has a deadline.
"""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time

from support import LineClient, alive, chatd_command, figures, wait_for

ECHOES = 50             # clients echoed one after the other while the log target stops reading
ECHO_TIMEOUT_S = 2.0
F_SETPIPE_SZ = 1031


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
    """The lines reached X.log, the failure was said once, and status says "failing"."""
    fallback = inst.pidfile.with_suffix(".log")
    text = fallback.read_text(errors="replace") if fallback.exists() else ""
    if text.count("log target failed") != 1:
        problems.append(f'"log target failed" said {text.count("log target failed")} times in X.log')
    if "disconnect 127.0.0.1" not in text:
        problems.append("no disconnect line in X.log")
    status = inst.cmd("status", check=0).stdout.decode()
    if "failing" not in status:
        problems.append(f"status does not say failing: {status!r}")
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


def test_stderr_that_nobody_reads_never_freezes_chatd_run(chatd):
    """1. `chatd run` (level debug) with stderr a one-page pipe the test holds and never reads;
    2. ECHOES clients connect one after the other and send a line.
    Result: every one is echoed within ECHO_TIMEOUT_S; the lines go to X.log; the failure is
    said once; status says failing; and the test's own end of stderr (the same open file
    description as the daemon's fd 2) was not made non-blocking."""
    chatd.config.write_text(chatd.config.read_text().replace(f'target = "{chatd.logfile}"', ""))
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, 4096)
        proc = subprocess.Popen(chatd_command() + ["run", "-c", str(chatd.config)],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=w,
                                start_new_session=True)
        chatd.popens.append(proc)
        chatd.pids.add(proc.pid)
        wait_for(lambda: chatd.cmd("status").returncode == 0 or proc.poll() is not None,
                 what="chatd run to serve")
        answered, latencies = echo_one_by_one(chatd.port)
        problems = [] if answered == ECHOES else [f"echo stopped answering at client {answered + 1}"]
        if answered == ECHOES:
            check_failed_over(chatd, problems)
        if fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK:
            problems.append("the daemon made the shared stderr description non-blocking")
        figures_of_echo("stderr_nobody_reads", answered, latencies, alive=proc.poll() is None)
        assert not problems, "\n".join(problems)
        chatd.cmd("stop", check=0)
        assert proc.wait(timeout=10) == 0
    finally:
        os.close(r)
        os.close(w)
