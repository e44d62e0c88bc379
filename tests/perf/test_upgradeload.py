"""The live-upgrade load (upgradeload.py, bench.py's `u` workloads) is a trustworthy verifier: it
passes a real `chatd upgrade`, and it reports what a client would suffer from an upgrade done
as a stop and a start, and from each fault of py_faulty_server.py.

Each case runs upgradeload.py once (bounded by a subprocess timeout; every phase of it has a
deadline too) and reads its closing `RESULT key=value ...` line. The chatd daemons are the
`make_chatd` fixture's, stopped by pid at teardown; py_faulty_server.py is stopped by pid.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import chatd_command
from test_loadgen import faulty_server

HERE = Path(__file__).resolve().parent
LOAD = HERE / "upgradeload.py"
SMALL = ["-c", "40", "-a", "8", "--gap", "0.3"]   # 40 connections, 8 active; 0.3 s between upgrades


def run_load(port: int, pidfile: Path, *args: str, command: list[str]) -> dict[str, str]:
    """One upgradeload.py run; its RESULT line as a dict."""
    done = subprocess.run([sys.executable, str(LOAD), "-p", str(port), "--pidfile", str(pidfile), *args,
                           "--", *command], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"upgradeload: no RESULT line (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
    return dict(token.split("=", 1) for token in lines[-1].split()[1:])


def test_passes_a_live_upgrade(chatd):
    """Two real upgrades: every line echoed, nothing lost, each timed; the pid changed."""
    first = chatd.start()
    r = run_load(chatd.port, chatd.pidfile, *SMALL, "-u", "2",
                 command=[*chatd_command(), "upgrade", "-c", str(chatd.config)])
    chatd.remember_pid()
    assert r["errors"] == "0" and int(r["lines"]) > 100 and int(r["fresh"]) > 10, r
    for key in ("cmd_ms", "serve_ms", "pause_ms"):
        values = [float(v) for v in r[key].split(",")]
        assert len(values) == 2 and all(v > 0 for v in values), (key, r)
    assert chatd.pid() != first


def test_reports_a_stop_and_start(chatd):
    """An "upgrade" that stops chatd and starts it again: every held connection is lost and
    fresh connections are refused meanwhile, though the pid changes and the new one serves."""
    chatd.start()
    chatd_cmd = " ".join(chatd_command())
    restart = f"{chatd_cmd} stop -c {chatd.config} && {chatd_cmd} start -c {chatd.config}"
    r = run_load(chatd.port, chatd.pidfile, *SMALL, "-u", "1", command=["sh", "-c", restart])
    chatd.remember_pid()
    assert r["disconnects"] == "40" and r["unanswered"] == "40", r
    assert int(r["refused"]) > 0 and r["upgrade_failed"] == "0", r
    assert int(r["errors"]) >= 80, r


@pytest.mark.parametrize("fault, counter", [("corrupt", "garbled"), ("close", "disconnects"),
                                            ("stall", "stalled")])
def test_reports_each_fault(tmp_path, fault, counter):
    """py_faulty_server.py's faults, with an "upgrade" that only writes a live pid (this
    test's) over one that has exited: each shows in its counter."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    pidfile = tmp_path / "server.pid"
    pidfile.write_text(f"{gone.pid}\n")
    with faulty_server(tmp_path / "server.log", "--fault", fault, "--every", "150") as port:
        r = run_load(port, pidfile, *SMALL, "-u", "1", "--stall", "0.5", "--serve-timeout", "2",
                     command=["sh", "-c", f"echo {os.getpid()} > {pidfile}"])
    assert int(r["errors"]) > 0 and int(r[counter]) > 0, r
