"""chatd logging through a REAL rsyslogd on a private socket.

Never the system rsyslog and never /dev/log: each test runs its own `rsyslogd -n -iNONE`
with a config in tmp_path, listening on tmp_path/log, and stops it by pid.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require_real
from support import REPO, LineClient, wait_for

RSYSLOGD = "/usr/sbin/rsyslogd"
TEMPLATE = "%syslogtag%%msg%|fac=%syslogfacility-text% sev=%syslogseverity-text% pid=%procid%\\n"


class Rsyslogd:
    """One private rsyslogd: config, socket and output files under `directory`."""

    def __init__(self, directory: Path, rules: str = "") -> None:
        self.dir = directory
        self.dir.mkdir(exist_ok=True)
        self.socket = self.dir / "log"
        self.messages = self.dir / "messages"
        self.conf = self.dir / "rsyslog.conf"
        self.output = self.dir / "rsyslogd.out"
        self.proc: subprocess.Popen | None = None
        assert len(str(self.socket)) < 100, f"AF_UNIX path too long: {self.socket}"
        self.conf.write_text(
            f'global(workDirectory="{self.dir}")\n'
            'module(load="imuxsock" SysSock.Use="off")\n'
            f'input(type="imuxsock" Socket="{self.socket}" CreatePath="on")\n'
            f'template(name="chatdtest" type="string" string="{TEMPLATE}")\n'
            f"{rules}"
            f'*.* action(type="omfile" file="{self.messages}" template="chatdtest")\n')

    def check(self) -> subprocess.CompletedProcess:
        return subprocess.run([RSYSLOGD, "-N1", "-f", str(self.conf)], capture_output=True,
                              stdin=subprocess.DEVNULL, timeout=30)

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        try:
            self.socket.unlink()   # a leftover would pass for the new daemon's socket
        except FileNotFoundError:
            pass
        with open(self.output, "ab") as out:
            self.proc = subprocess.Popen([RSYSLOGD, "-n", "-iNONE", "-f", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                         start_new_session=True)
        wait_for(lambda: self.socket.is_socket() or self.proc.poll() is not None,
                 what="rsyslogd's socket")
        assert self.proc.poll() is None, f"rsyslogd exited {self.proc.returncode}: {self.output.read_text()}"

    def stop(self) -> None:
        """TERM, wait, KILL: by the pid this test started."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)

    def lines(self) -> list[str]:
        try:
            return self.messages.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_line(self, pattern: str, start: int = 0, timeout: float = 10.0) -> str:
        """The first line (from index `start`) matching the regex `pattern`."""
        def found():
            return next((line for line in self.lines()[start:] if re.search(pattern, line)), None)
        try:
            return wait_for(found, timeout=timeout, what=f"a syslog line matching {pattern!r}")
        except AssertionError:
            raise AssertionError(f"no line matching {pattern!r} in {self.lines()[-10:]!r}") from None


@pytest.fixture
def rsyslogd(tmp_path):
    if not os.path.exists(RSYSLOGD):
        require_real("rsyslogd")
    daemon = Rsyslogd(tmp_path / "rs")
    check = daemon.check()
    assert check.returncode == 0, check.stderr
    try:
        daemon.start()
        yield daemon
    finally:
        daemon.stop()


def log_to_syslog(chatd, socket: Path, facility: str = "local3") -> None:
    text = chatd.config.read_text()
    old = f'target = "{chatd.logfile}"'
    assert old in text
    chatd.config.write_text(text.replace(
        old, f'target = "syslog"\nsyslog_socket = "{socket}"\nfacility = "{facility}"'))


def echo(chatd, data: bytes = b"ping\n") -> None:
    with LineClient(chatd.port) as c:
        c.send(data)
        assert c.recv_line() == data


def test_chatd_lines_reach_rsyslogd_with_tag_facility_and_severity(chatd, rsyslogd):
    log_to_syslog(chatd, rsyslogd.socket)
    pid = chatd.start()
    tag = re.escape(f"chatd[{pid}]:")
    info = re.escape(f"|fac=local3 sev=info pid={pid}") + "$"
    rsyslogd.wait_line(rf"^{tag} chatd \S+ starting \(pid {pid}, config {re.escape(str(chatd.config))}\){info}")
    rsyslogd.wait_line(rf"^{tag} ready: echo mode on 127\.0\.0\.1:{chatd.port}, event loop .*{info}")
    echo(chatd)
    rsyslogd.wait_line(rf"^{tag} connect 127\.0\.0\.1:\d+ .*{info}")
    rsyslogd.wait_line(rf"^{tag} disconnect 127\.0\.0\.1:\d+: .*{info}")

    good = chatd.config.read_text()
    chatd.config.write_text(good + "\n[server\n")   # not TOML
    chatd.cmd("restart", check=6)
    rsyslogd.wait_line(rf"^{tag} restart rejected: .*" + re.escape(f"|fac=local3 sev=warning pid={pid}") + "$")
    chatd.config.write_text(good)
    echo(chatd)   # still serving with the old config

    # No NUL or other control bytes leak into the file, and nothing went to the fallback.
    assert not any("#000" in line or "\x00" in line for line in rsyslogd.lines()), rsyslogd.lines()
    assert not chatd.logfile.exists() or chatd.logfile.read_text() == "", chatd.logfile.read_text()
    assert b"failing" not in chatd.cmd("status", check=0).stdout


def test_chatd_reconnects_to_a_restarted_rsyslogd(chatd, rsyslogd):
    """rsyslogd restarts while chatd has nothing to log: the next line goes to the new one."""
    log_to_syslog(chatd, rsyslogd.socket)
    pid = chatd.start()
    rsyslogd.wait_line(rf"^chatd\[{pid}\]: ready: ")
    rsyslogd.stop()
    rsyslogd.start()
    seen = len(rsyslogd.lines())
    echo(chatd)
    rsyslogd.wait_line(rf"^chatd\[{pid}\]: connect 127\.0\.0\.1:\d+ .*\|fac=local3 sev=info pid={pid}$",
                       start=seen, timeout=5)
    assert not chatd.logfile.exists() or chatd.logfile.read_text() == "", chatd.logfile.read_text()


@pytest.mark.slow
def test_rsyslogd_down_chatd_serves_to_its_fallback_then_returns_to_syslog(chatd, rsyslogd):
    """1. rsyslogd stops: chatd keeps serving and logs to X.log beside its pid file X.pid;
    2. a new rsyslogd on the same socket: within the retry interval (10 s) chatd's lines
    arrive there again and status no longer says failing."""
    log_to_syslog(chatd, rsyslogd.socket)
    pid = chatd.start()
    rsyslogd.wait_line(rf"^chatd\[{pid}\]: ready: ")
    rsyslogd.stop()
    assert not rsyslogd.socket.exists()

    echo(chatd, b"while syslog is down\n")
    fallback = chatd.pidfile.with_suffix(".log")
    wait_for(lambda: fallback.exists() and "log target failed" in fallback.read_text()
             and re.search(rf"chatd\[{pid}\] INFO: connect 127\.0\.0\.1", fallback.read_text()),
             what="chatd's lines in its fallback file")
    status = wait_for(lambda: (p := chatd.cmd("status", check=0)) and b"failing" in p.stdout and p,
                      what="status to show the failing target")
    assert f"writing to {fallback}".encode() in status.stdout

    rsyslogd.start()
    seen = len(rsyslogd.lines())
    pattern = re.compile(rf"^chatd\[{pid}\]: connect 127\.0\.0\.1:\d+ .*\|fac=local3 sev=info pid={pid}$")
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not any(pattern.search(l) for l in rsyslogd.lines()[seen:]):
        echo(chatd)
        time.sleep(0.5)
    assert any(pattern.search(l) for l in rsyslogd.lines()[seen:]), rsyslogd.lines()[-10:]
    wait_for(lambda: b"failing" not in chatd.cmd("status", check=0).stdout,
             what="status to stop saying failing")


def test_shipped_snippet_sends_chatd_to_its_own_file_and_not_to_the_general_log(make_chatd, tmp_path):
    """etc/chatd.rsyslog, included before a catch-all rule as Debian's rsyslog.conf does,
    with its path moved into tmp_path."""
    if not os.path.exists(RSYSLOGD):
        require_real("rsyslogd")
    own = tmp_path / "rs" / "var-log-chatd" / "chatd.log"
    snippet = (REPO / "etc" / "chatd.rsyslog").read_text()
    assert "/var/log/chatd/chatd.log" in snippet
    snippet = snippet.replace("/var/log/chatd/chatd.log", str(own))
    if os.geteuid() != 0:   # only root may give the file to root:adm
        snippet = re.sub(r'\s(fileOwner|fileGroup)="[^"]*"', "", snippet)
    (tmp_path / "30-chatd.conf").write_text(snippet)
    daemon = Rsyslogd(tmp_path / "rs", rules=f'include(file="{tmp_path / "30-chatd.conf"}")\n')
    check = daemon.check()
    assert check.returncode == 0, check.stderr
    chatd = make_chatd()
    log_to_syslog(chatd, daemon.socket, facility="daemon")
    try:
        daemon.start()
        pid = chatd.start()
        echo(chatd)
        # another program's line still reaches the general rule
        other = logging.handlers.SysLogHandler(address=str(daemon.socket), facility="daemon")
        other.ident = "other[1]: "
        try:
            other.handle(logging.makeLogRecord({"msg": "not chatd", "levelno": logging.INFO,
                                                "levelname": "INFO"}))
        finally:
            other.close()
        wait_for(lambda: own.exists() and re.search(rf" chatd\[{pid}\]: disconnect 127\.0\.0\.1", own.read_text()),
                 what="chatd's lines in its own file")
        daemon.wait_line(r"^other\[1\]: not chatd\|fac=daemon sev=info")
    finally:
        daemon.stop()
    text = own.read_text()
    assert re.search(rf" chatd\[{pid}\]: ready: echo mode on 127\.0\.0\.1:{chatd.port}", text), text
    assert "not chatd" not in text
    assert not any(line.startswith("chatd") for line in daemon.lines()), daemon.lines()
    assert own.stat().st_mode & 0o777 == 0o640


def test_json_lines_are_parsed_by_rsyslogs_mmjsonparse(chatd, tmp_path):
    """`[log] format = "json"`: the message after chatd's tag is one JSON object, which
    mmjsonparse with an empty cookie (README "Logging") parses into fields."""
    if not os.path.exists(RSYSLOGD):
        require_real("rsyslogd")
    parsed = tmp_path / "rs" / "parsed"
    daemon = Rsyslogd(tmp_path / "rs", rules=(
        'module(load="mmjsonparse")\n'
        'template(name="fields" type="string" string="%parsesuccess% %$!event% %$!peer% %$!clients%\\n")\n'
        'if $programname == "chatd" then {\n'
        '  action(type="mmjsonparse" cookie="")\n'
        f'  action(type="omfile" file="{parsed}" template="fields")\n'
        '}\n'))
    check = daemon.check()
    assert check.returncode == 0, check.stderr
    log_to_syslog(chatd, daemon.socket)
    chatd.config.write_text(chatd.config.read_text() + 'format = "json"\n')   # [log] is the last table
    try:
        daemon.start()
        chatd.start()
        echo(chatd)
        wait_for(lambda: parsed.exists() and " disconnect " in parsed.read_text(), what="the parsed disconnect")
    finally:
        daemon.stop()
    lines = parsed.read_text().splitlines()
    assert lines and all(line.startswith("OK ") for line in lines), lines
    assert any(re.fullmatch(r"OK connect 127\.0\.0\.1:\d+ 1", line) for line in lines), lines
    assert any(re.fullmatch(r"OK disconnect 127\.0\.0\.1:\d+ 0", line) for line in lines), lines
