"""Logging targets through the real daemon: syslog datagrams, the fallback file, stderr, levels."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from support import LineClient, chatd_command, wait_for


class FakeSyslog:
    """An AF_UNIX datagram socket standing in for /dev/log."""

    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[bytes] = []

    def collect(self, until, timeout=10.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.messages.append(self.sock.recv(65536))
            except socket.timeout:
                pass
            if until(self.messages):
                return self.messages
        raise AssertionError(f"syslog never got what was expected: {self.messages[-5:]!r}")

    def close(self):
        self.sock.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


@pytest.fixture
def syslog(tmp_path):
    s = FakeSyslog(tmp_path / "log")
    yield s
    s.close()


def test_syslog_target_with_facility_and_pid_tag(chatd, syslog):
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"',
                                            f'target = "syslog"\nsyslog_socket = "{syslog.path}"\nfacility = "local3"')
    chatd.config.write_text(text)
    pid = chatd.start()
    msgs = syslog.collect(lambda m: any(b"ready:" in x for x in m))
    # local3 (19) * 8 + info (6) = 158; the tag carries the daemon's real pid; a NUL ends it
    assert any(x.startswith(b"<158>chatd[%d]: chatd " % pid) and x.endswith(b"\x00") for x in msgs), msgs
    assert b"syslog" in chatd.cmd("status").stdout


def test_detached_default_is_syslog_when_its_socket_exists_else_the_pid_file_log(chatd, syslog):
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"', f'syslog_socket = "{syslog.path}"')
    chatd.config.write_text(text)
    out = chatd.cmd("start", check=0).stdout.decode()
    assert f"log: syslog {syslog.path} (facility daemon)" in out
    syslog.collect(lambda m: any(b"ready:" in x for x in m))
    chatd.cmd("stop", check=0)
    syslog.close()
    out = chatd.cmd("start", check=0).stdout.decode()
    assert f"log: file {chatd.dir}/chatd.log (no syslog socket at {syslog.path})" in out
    wait_for(lambda: "ready:" in chatd.log_text(), what="the fallback log")


def test_a_failing_syslog_falls_back_to_the_pid_file_log_and_says_so(chatd, syslog):
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"',
                                            f'target = "syslog"\nsyslog_socket = "{syslog.path}"')
    chatd.config.write_text(text)
    chatd.start()
    syslog.collect(lambda m: any(b"ready:" in x for x in m))
    syslog.close()   # syslog goes away
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        c.recv_line()
    fallback = chatd.dir / "chatd.log"
    wait_for(lambda: fallback.exists() and "log target failed" in fallback.read_text()
             and "connect 127.0.0.1" in fallback.read_text(), what="the fallback log")
    status = wait_for(lambda: (p := chatd.cmd("status", check=0)) and b"failing" in p.stdout and p,
                      what="status to show the failing target")
    assert f"writing to {fallback}".encode() in status.stdout
    with LineClient(chatd.port) as c:   # still serving
        c.send(b"y\n")
        assert c.recv_line() == b"y\n"


def test_log_level_filters(chatd):
    text = chatd.config.read_text().replace('level = "debug"', 'level = "warning"')
    chatd.config.write_text(text)
    chatd.start()
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        c.recv_line()
    chatd.cmd("stop", check=0)
    assert "connect" not in chatd.log_text() and "ready" not in chatd.log_text()


def test_run_logs_to_stderr_with_journal_prefixes_when_stderr_is_the_journal(chatd, tmp_path):
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"', "")
    chatd.config.write_text(text)
    err_path = tmp_path / "stderr"
    with open(err_path, "wb") as err:
        st = os.fstat(err.fileno())
        env = os.environ | {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        proc = subprocess.Popen(chatd_command() + ["run", "-c", str(chatd.config)], stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, env=env, start_new_session=True)
        chatd.pids.add(proc.pid)
        try:
            wait_for(lambda: b"ready:" in err_path.read_bytes(), what="the ready line")
            os.kill(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    lines = err_path.read_text().splitlines()
    assert any(re.fullmatch(r"<6>ready: echo mode on 127\.0\.0\.1:\d+, event loop .*", l) for l in lines), lines
    assert "<6>stopped" in lines


def test_run_logs_to_stderr_plainly_otherwise(chatd):
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"', "")
    chatd.config.write_text(text)
    proc = chatd.run_foreground()
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    err = chatd.foreground_stderr()
    assert re.search(rb"chatd\[%d\] INFO: ready: " % proc.pid, err), err
    assert re.search(rb"chatd\[%d\] INFO: stopped" % proc.pid, err), err


@pytest.mark.slow
def test_syslog_is_retried_and_used_again_once_it_is_back(chatd, tmp_path):
    """1. syslog goes away, 2. comes back. Result: after the retry interval (10 s) chatd logs
    to syslog again and status no longer says failing."""
    syslog = FakeSyslog(tmp_path / "log")
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"',
                                            f'target = "syslog"\nsyslog_socket = "{syslog.path}"')
    chatd.config.write_text(text)
    chatd.start()
    syslog.collect(lambda m: any(b"ready:" in x for x in m))
    syslog.close()
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        c.recv_line()
    wait_for(lambda: b"failing" in chatd.cmd("status").stdout, what="the failure")
    syslog = FakeSyslog(tmp_path / "log")
    try:
        deadline = time.monotonic() + 20
        # at level debug an "accepted" line comes first: wait for the info line itself
        while time.monotonic() < deadline and not any(b"connect 127.0.0.1" in m for m in syslog.messages):
            with LineClient(chatd.port) as c:
                c.send(b"y\n")
                c.recv_line()
            try:
                syslog.messages.append(syslog.sock.recv(65536))
            except socket.timeout:
                pass
        assert any(b"connect 127.0.0.1" in m for m in syslog.messages), syslog.messages
        assert b"failing" not in chatd.cmd("status").stdout
    finally:
        syslog.close()
