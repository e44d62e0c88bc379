"""The benchmark's load generator is a trustworthy verifier: it passes a correct server and
reports errors for every fault py_faulty_server.py can commit.

loadgen (tests/perf/loadgen.c) is built here with the system C compiler, into a temporary
directory. Each case starts py_faulty_server.py on 127.0.0.1 on a free port, runs one short
loadgen run against it (bounded by a subprocess timeout; loadgen also arms its own alarm), reads
loadgen's closing `RESULT key=value ...` line, and stops the server by its pid.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import require_real
from support import free_port, kill_and_wait, listening, wait_for

HERE = Path(__file__).resolve().parent
FAULTY = HERE / "py_faulty_server.py"
# Short runs: 0.1 s of warm-up, 0.5 s measured. A faulty run declares a line unanswered for
# 0.3 s stalled (loadgen's default, 1 s, is longer than the run).
SHORT = ["-d", "0.5", "-w", "0.1"]
FAULT_STALL = ["--stall", "0.3"]
CHAT_FAULT = ["--stall", "1", "--drain", "1.5"]


@pytest.fixture(scope="module")
def loadgen(tmp_path_factory) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        require_real("a C compiler")
    out = tmp_path_factory.mktemp("loadgen") / "loadgen"
    built = subprocess.run([compiler, "-O2", "-o", str(out), str(HERE / "loadgen.c")],
                           capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"{compiler} failed to build loadgen:\n{built.stderr[-3000:]}"
    return out


@contextmanager
def faulty_server(log: Path, *args: str):
    """py_faulty_server.py with `args` on a free loopback port; yields the port, then stops it."""
    port = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, str(FAULTY), "--host", "127.0.0.1", "--port", str(port), *args],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out)
    try:
        wait_for(lambda: proc.poll() is not None or listening(port), what="py_faulty_server.py to listen")
        assert proc.poll() is None, f"py_faulty_server.py {' '.join(args)} exited: {log.read_text()[-2000:]}"
        yield port
    finally:
        kill_and_wait(proc.pid)
        proc.wait(timeout=5)


def run_loadgen(loadgen: Path, port: int, *args: str) -> dict[str, float | str]:
    """One loadgen run; its RESULT line as a dict (numbers as floats)."""
    done = subprocess.run([str(loadgen), *args, "-p", str(port)], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"loadgen {' '.join(args)}: no RESULT line (rc {done.returncode}):\n{done.stdout}\n{done.stderr}"
    result: dict[str, float | str] = {}
    for token in lines[-1].split()[1:]:
        key, _, value = token.partition("=")
        try:
            result[key] = float(value)
        except ValueError:
            result[key] = value
    return result


# (case id, server arguments, loadgen arguments, RESULT fields of which one at least must be > 0)
ECHO_FAULTS = [
    ("corrupt-depth1", ["--fault", "corrupt", "--every", "500"], ["-c", "4"], ["mismatch"]),
    ("corrupt-depth8", ["--fault", "corrupt", "--every", "500"], ["-c", "4", "-P", "8"], ["mismatch"]),
    ("drop-depth1", ["--fault", "drop", "--every", "500"], ["-c", "4"], ["stalled"]),
    ("drop-depth8", ["--fault", "drop", "--every", "500"], ["-c", "4", "-P", "8"], ["mismatch", "stalled"]),
    ("dup-depth1", ["--fault", "dup", "--every", "500"], ["-c", "4"], ["unexpected", "mismatch"]),
    ("dup-depth8", ["--fault", "dup", "--every", "500"], ["-c", "4", "-P", "8"], ["unexpected", "mismatch"]),
    ("close", ["--fault", "close", "--every", "300"], ["-c", "4"], ["closed"]),
    ("stall", ["--fault", "stall", "--every", "300"], ["-c", "4"], ["stalled"]),
]
CHAT_FAULTS = [
    ("corrupt", ["--fault", "corrupt", "--every", "200"], ["garbled"]),
    ("drop", ["--fault", "drop", "--every", "200"], ["lost"]),
    ("dup", ["--fault", "dup", "--every", "200"], ["dup"]),
]
# Chat lines ending in LF (as the reference servers send them) and in CRLF (as chatd does).
ENDINGS = [pytest.param([], id="lf"), pytest.param(["--crlf"], id="crlf")]


def test_echo_passes_a_correct_server(loadgen, tmp_path):
    with faulty_server(tmp_path / "server.log", "--fault", "none") as port:
        r = run_loadgen(loadgen, port, "echo", "-c", "4", "-P", "4", *SHORT)
    assert r["errors"] == 0 and r["lines"] > 1000, r


@pytest.mark.parametrize("server_args, loadgen_args, fields",
                         [pytest.param(s, lg, f, id=name) for name, s, lg, f in ECHO_FAULTS])
def test_echo_reports_each_fault(loadgen, tmp_path, server_args, loadgen_args, fields):
    with faulty_server(tmp_path / "server.log", *server_args) as port:
        r = run_loadgen(loadgen, port, "echo", *loadgen_args, *SHORT, *FAULT_STALL)
    assert r["errors"] > 0 and any(r[f] > 0 for f in fields), r
    if "close" in server_args:
        assert r["closed"] == 4, r
    if "stall" in server_args:
        assert r["stalled"] == 4, r


@pytest.mark.parametrize("ending", ENDINGS)
def test_chat_passes_a_correct_server(loadgen, tmp_path, ending):
    """A prefixed broadcast ("<x> " before each line) is verified clean, with LF or CRLF."""
    with faulty_server(tmp_path / "server.log", "--mode", "chat", "--fault", "none", *ending) as port:
        r = run_loadgen(loadgen, port, "chat", "-c", "5", *SHORT)
    assert r["errors"] == 0 and r["deliveries"] > 100, r


@pytest.mark.parametrize("ending", ENDINGS)
@pytest.mark.parametrize("server_args, fields", [pytest.param(s, f, id=name) for name, s, f in CHAT_FAULTS])
def test_chat_reports_each_fault(loadgen, tmp_path, server_args, fields, ending):
    """Accepting CRLF does not blind the chat verifier: every fault is still reported."""
    with faulty_server(tmp_path / "server.log", "--mode", "chat", *server_args, *ending) as port:
        r = run_loadgen(loadgen, port, "chat", "-c", "5", *SHORT, *CHAT_FAULT)
    assert r["errors"] > 0 and any(r[f] > 0 for f in fields), r


def test_chat_receivers_on_a_second_address_are_verified(loadgen, tmp_path):
    """--conns2: the last receivers connect to --host2/--port2 (another node) and are verified
    as the others: the same server reached twice passes; a second server that is not in the
    same chat (its receivers never get the lines) fails."""
    with faulty_server(tmp_path / "server.log", "--mode", "chat", "--fault", "none", "--crlf") as port:
        r = run_loadgen(loadgen, port, "chat", "-c", "6", "--conns2", "3", "--port2", str(port), *SHORT)
        assert r["errors"] == 0 and r["deliveries"] > 100 and r["receivers2"] == 3, r
        with faulty_server(tmp_path / "other.log", "--mode", "chat", "--fault", "none") as other:
            r = run_loadgen(loadgen, port, "chat", "-c", "6", "--conns2", "3", "--port2", str(other),
                            "--sync-timeout", "1", *SHORT, *CHAT_FAULT)
        assert r["errors"] > 0 and r["sync_missing"] == 3, r
