"""Real clients against a started chatd (README "Echo mode"): nc, telnet through a pty, raw telnet bytes.

What inetutils telnet (the /usr/bin/telnet here) sends, seen against a logging server: on a
non-telnet port it starts no negotiation and sends a typed line as `line\\r\\n`; Ctrl-C, with the
pty as its controlling terminal, sends `IAC IP IAC DO TIMING-MARK` (ff f4 ff fd 06) and then
discards all output until `IAC WILL TIMING-MARK` arrives. A server that never answers leaves the
screen frozen: later echoes are never shown. (Without a controlling terminal, Ctrl-C is only
echoed by the line discipline as "^C" and nothing is sent, so the pty must be telnet's
controlling terminal: pty.fork.)

Every wait has a deadline; every process started here is stopped by its pid.
"""

from __future__ import annotations

import importlib.util
import contextlib
import os
import select
import signal
import socket
import subprocess
import time

import pytest

from conftest import LOOPS, require_real
from telnet_pty import TELNET, connected_telnet, need
from support import LineClient, kill_and_wait, wait_for

NC = "/usr/bin/nc"
HOST = "127.0.0.1"
TIMEOUT = 10.0

IAC, DONT, DO, WONT, WILL, SB, SE = 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF0
ECHO, SGA, TIMING_MARK, TTYPE, NAWS = 0x01, 0x03, 0x06, 0x18, 0x1F


# ------------------------------------------------------------------ 1. nc (netcat-openbsd)

def nc(port: int, data: bytes, *args: str, timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """`nc -N 127.0.0.1 PORT` with `data` on stdin; stdout and stderr captured."""
    return subprocess.run([NC, "-N", *args, HOST, str(port)], input=data, capture_output=True,
                          timeout=timeout)


def read_pipe_until(proc: subprocess.Popen, have: bytes, want: bytes, timeout: float = TIMEOUT) -> bytes:
    """Read `proc.stdout` (raw fd, select with a deadline) until the bytes read hold `want`."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    while want not in have:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"timed out waiting for {want!r}; got {have[-200:]!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"EOF waiting for {want!r}; got {have[-200:]!r}")
            have += chunk
    return have


def test_nc_printf_a_newline_b_prints_exactly_that_and_exits_0(loop_chatd):
    """1. start chatd, 2. `printf 'a\\nb' | nc -N 127.0.0.1 PORT`. Result: `a\\nb`, exit 0."""
    need(NC, "nc")
    loop_chatd.start()
    proc = subprocess.run(["sh", "-c", f"printf 'a\\nb' | {NC} -N {HOST} {loop_chatd.port}"],
                          capture_output=True, timeout=TIMEOUT)
    assert (proc.returncode, proc.stdout) == (0, b"a\nb"), proc.stderr


def test_nc_multi_line_crlf_input_comes_back_byte_exact(loop_chatd):
    need(NC, "nc")
    loop_chatd.start()
    small = b"first line\r\nsecond\r\n\r\n  spaced  \r\nmixed LF\nno terminator"
    proc = nc(loop_chatd.port, small)
    assert (proc.returncode, proc.stdout) == (0, small), proc.stderr
    # many lines, more than one socket buffer's worth, CRLF and LF mixed
    big = b"".join(b"line %06d %s\r\n" % (i, b"x" * (i % 97)) if i % 3 else b"lf %d\n" % i
                   for i in range(20000))
    proc = nc(loop_chatd.port, big, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout) == len(big)
    assert proc.stdout == big


def test_several_nc_clients_at_once(loop_chatd):
    """1. open 8 nc clients, 2. each sends a line while all are open. Result: each gets its own
    echo at once (no client waits for another), then its tail at EOF, and exits 0."""
    need(NC, "nc")
    loop_chatd.start()
    procs = []
    try:
        for i in range(8):
            procs.append(subprocess.Popen([NC, "-N", HOST, str(loop_chatd.port)], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          start_new_session=True))
        got = [b""] * len(procs)
        for i, p in enumerate(procs):          # every client connected and echoing...
            p.stdin.write(b"client %d hello\r\n" % i)
            p.stdin.flush()
        for i, p in enumerate(procs):          # ...while every other one is still open
            got[i] = read_pipe_until(p, got[i], b"client %d hello\r\n" % i)
            assert got[i] == b"client %d hello\r\n" % i
        for i in reversed(range(len(procs))):  # the last to connect finishes first
            p = procs[i]
            out, err = p.communicate(b"second %d\ntail %d" % (i, i), timeout=TIMEOUT)
            assert p.returncode == 0, err
            assert got[i] + out == b"client %d hello\r\nsecond %d\ntail %d" % (i, i, i)
    finally:
        for p in procs:
            kill_and_wait(p.pid)
            p.wait(timeout=5)
            for f in (p.stdin, p.stdout, p.stderr):
                try:
                    f.close()
                except OSError:
                    pass


def test_nc_never_receives_an_iac_byte_it_did_not_send(make_chatd):
    """Echoes of every other byte value, ERR lines, and `ERR server full`: never a 0xFF."""
    need(NC, "nc")
    inst = make_chatd(extra_config="[limits]\nmax_line = 64\nmax_clients = 1\n")
    inst.start()
    every = bytes(range(255))                                  # 0x00 .. 0xFE
    lines = b"".join(every[i:i + 40] + b"\r\n" for i in range(0, 255, 40))
    data = lines + b"y" * 100 + b"\n" + b"\xfe\xfd\xfc\xfb\xfa\xf0\n" + b"end"
    proc = nc(inst.port, data)
    assert proc.returncode == 0, proc.stderr
    assert b"\xff" not in proc.stdout
    assert proc.stdout == (lines + b"ERR line too long (max 64 bytes)\r\n"
                           + b"\xfe\xfd\xfc\xfb\xfa\xf0\n" + b"end")
    with LineClient(inst.port) as holder:                      # the one allowed client
        holder.send(b"hold\n")
        assert holder.recv_line() == b"hold\n"
        proc = nc(inst.port, b"")              # sends nothing: see the test below for why
        assert b"\xff" not in proc.stdout
        assert proc.stdout == b"ERR server full\r\n"


@pytest.mark.parametrize("loop", LOOPS)
def test_nc_refused_when_full_reads_err_server_full_even_if_it_sent_data(make_chatd, loop):
    """1. one client holds the only place (max_clients = 1), 2. with chatd stopped (SIGSTOP), an
    nc client connects and sends a line (the kernel queues both), 3. SIGCONT. Result: nc prints
    `ERR server full` (README "Echo mode": "a new client gets `ERR server full` and is closed").

    Closing a socket whose receive queue holds unread bytes makes the kernel send RST instead of
    FIN, and the client then loses the line already sent to it. The SIGSTOP makes the race that a
    busy server or a quick client hits (here 10-80 % of plain `nc` runs) happen every time."""
    need(NC, "nc")
    if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        require_real("uvloop")
    inst = make_chatd(loop=loop, extra_config="[limits]\nmax_clients = 1\n")
    pid = inst.start()
    with LineClient(inst.port) as holder:
        holder.send(b"hold\n")
        assert holder.recv_line() == b"hold\n"
        os.kill(pid, signal.SIGSTOP)
        try:
            proc = subprocess.Popen([NC, "-N", HOST, str(inst.port)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
            try:
                proc.stdin.write(b"let me in\n")
                proc.stdin.flush()                   # communicate() closes stdin later
                time.sleep(0.3)                      # connected (by the kernel) and sent
                os.kill(proc.pid, signal.SIGSTOP)    # nc reads its answer only once chatd is done
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_for(lambda: "refused" in inst.log_text(), what="chatd to refuse the client")
            time.sleep(0.2)
            os.kill(proc.pid, signal.SIGCONT)
            out, err = proc.communicate(timeout=TIMEOUT)
        finally:
            os.kill(pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            kill_and_wait(proc.pid)
            proc.wait(timeout=5)
        assert out == b"ERR server full\r\n", err
        holder.send(b"still served\n")
        assert holder.recv_line() == b"still served\n"


# ------------------------------------------------------------------ 2. telnet through a pty

def test_telnet_line_is_echoed_and_ctrl_c_does_not_freeze_the_session(loop_chatd):
    """1. telnet to chatd, 2. type a line, 3. Ctrl-C (telnet sends IAC IP IAC DO TIMING-MARK and
    discards output until WILL TIMING-MARK), 4. type another line. Result: both lines echoed."""
    need(TELNET, "telnet")
    loop_chatd.start()
    t = connected_telnet(loop_chatd.port)
    try:
        t.type_line_and_see_echo("hello-123")
        assert t.out.count(b"hello-123\r\n") == 2
        t.write(b"\x03")
        t.wait_output(lambda out: b"^C" in out, "the tty to show ^C")
        t.settle(0.3)                     # telnet's SIGINT handler has sent IP + DO TM by now
        t.type_line_and_see_echo("after-ctrl-c-456")
        t.write(b"\x03")                  # and again: not a one-off
        t.settle(0.3)
        t.type_line_and_see_echo("second-ctrl-c-789")
        assert t.poll() is None, "telnet exited"
    finally:
        t.stop()


def test_telnet_escape_then_quit_ends_the_session_cleanly(loop_chatd):
    """1. telnet, 2. a line, 3. ^] then `quit`. Result: telnet exits 0, chatd goes on serving."""
    need(TELNET, "telnet")
    loop_chatd.start()
    t = connected_telnet(loop_chatd.port)
    try:
        t.type_line_and_see_echo("before-quit-1")
        t.write(b"\x1d")
        t.wait_output(lambda out: b"telnet>" in out, "the telnet> prompt")
        t.write(b"quit\r")
        assert t.wait_exit() == 0, t.out
        assert b"Connection closed" in t.out
    finally:
        t.stop()
    with LineClient(loop_chatd.port) as c:
        c.send(b"still here\n")
        assert c.recv_line() == b"still here\n"


def test_telnet_character_mode_negotiation_is_refused_and_typing_still_works(loop_chatd):
    """1. telnet, 2. ^] `mode character` (telnet sends IAC DO SGA IAC DO ECHO), 3. type a line,
    4. Ctrl-C and another line. Result: chatd answers WONT SGA / WONT ECHO, telnet stays in line
    mode, and every line is echoed."""
    need(TELNET, "telnet")
    loop_chatd.start()
    t = connected_telnet(loop_chatd.port)
    try:
        t.type_line_and_see_echo("linemode-1")
        t.write(b"\x1d")
        t.wait_output(lambda out: b"telnet>" in out, "the telnet> prompt")
        t.write(b"mode character\r")
        t.settle(0.5)
        t.write(b"charmode-321\r")
        t.wait_output(lambda out: out.count(b"charmode-321") >= 2, "the server's echo in character mode")
        # refused, telnet falls back to line mode, where Ctrl-C is IAC IP IAC DO TIMING-MARK again
        t.write(b"\x03")
        t.settle(0.3)
        t.type_line_and_see_echo("after-mode-ctrl-c-654")
        assert t.poll() is None, "telnet exited"
    finally:
        t.stop()


def test_closing_the_pty_ends_telnet(loop_chatd):
    """Closing telnet's terminal (hang-up) ends it; chatd serves the next client."""
    need(TELNET, "telnet")
    loop_chatd.start()
    t = connected_telnet(loop_chatd.port)
    try:
        t.type_line_and_see_echo("hangup-1")
        os.close(t.fd)
        t.fd = os.open("/dev/null", os.O_RDONLY)              # keep stop()'s close harmless
        deadline = time.monotonic() + TIMEOUT
        while t.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert t.poll() is not None, "telnet survived the hang-up"
    finally:
        t.stop()
    with LineClient(loop_chatd.port) as c:
        c.send(b"next\n")
        assert c.recv_line() == b"next\n"


# ------------------------------------------------------------------ 3. telnet bytes on a socket

def client(port: int) -> LineClient:
    c = LineClient(port)
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def assert_nothing_pending(c: LineClient) -> None:
    """The next echoed line is the first thing that arrives: no stray reply before it."""
    c.send(b"probe\n")
    assert c.recv_exact(6) == b"probe\n"
    assert c.buf == b""


def send_slowly(c: LineClient, data: bytes, pause: float = 0.005) -> None:
    for b in data:
        c.send(bytes([b]))
        time.sleep(pause)


@pytest.mark.parametrize("option", [ECHO, SGA, NAWS, TTYPE, 0x99])
def test_do_is_refused_with_wont(loop_chatd, option):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(bytes([IAC, DO, option]))
        assert c.recv_exact(3) == bytes([IAC, WONT, option])
        assert_nothing_pending(c)


@pytest.mark.parametrize("option", [TTYPE, ECHO, SGA, NAWS, 0x99])
def test_will_is_refused_with_dont(loop_chatd, option):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(bytes([IAC, WILL, option]))
        assert c.recv_exact(3) == bytes([IAC, DONT, option])
        assert_nothing_pending(c)


def test_do_timing_mark_is_answered_with_will_timing_mark(loop_chatd):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(bytes([IAC, DO, TIMING_MARK]))
        assert c.recv_exact(3) == bytes([IAC, WILL, TIMING_MARK])
        # what telnet sends on Ctrl-C: IAC IP IAC DO TIMING-MARK
        c.send(bytes([IAC, 0xF4, IAC, DO, TIMING_MARK]))
        assert c.recv_exact(3) == bytes([IAC, WILL, TIMING_MARK])
        assert_nothing_pending(c)


@pytest.mark.parametrize("verb", [DONT, WONT])
def test_dont_and_wont_get_no_answer(loop_chatd, verb):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        for option in (ECHO, SGA, TIMING_MARK, TTYPE, 0x99):
            c.send(bytes([IAC, verb, option]))
        time.sleep(0.05)
        c.send(b"next line\r\n")
        assert c.recv_line() == b"next line\r\n"     # nothing came before it
        assert c.buf == b""
        c.send(b"x" + bytes([IAC, verb, ECHO]) + b"y\n")
        assert c.recv_line() == b"xy\n"
        assert_nothing_pending(c)


def test_iac_iac_is_a_literal_ff_echoed_as_iac_iac(loop_chatd):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(b"a\xff\xffb\n")
        assert c.recv_line() == b"a\xff\xffb\n"
        c.send(b"\xff\xff\xff\xff\r\n")
        assert c.recv_line() == b"\xff\xff\xff\xff\r\n"
        assert_nothing_pending(c)


def test_subnegotiation_inside_a_line_is_removed(loop_chatd):
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(b"ab" + bytes([IAC, SB, TTYPE, 0]) + b"xterm" + bytes([IAC, SE]) + b"cd\n")
        assert c.recv_line() == b"abcd\n"
        # an IAC IAC inside the payload does not end it; a newline inside it is no line end
        c.send(b"e" + bytes([IAC, SB, NAWS, 0, 80, IAC, IAC, 24]) + b"\n" + bytes([IAC, SE]) + b"f\n")
        assert c.recv_line() == b"ef\n"
        assert_nothing_pending(c)


@pytest.mark.parametrize("command", [0xF4, 0xF1, 0xF2, 0xF5, 0xF6, 0xF9, 0x41])
def test_iac_command_inside_a_line_is_removed(loop_chatd, command):
    """IAC IP (and NOP, DM, AO, AYT, GA, an unknown byte) inside a line: both bytes dropped."""
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(b"ab" + bytes([IAC, command]) + b"cd\n")
        assert c.recv_line() == b"abcd\n"
        assert_nothing_pending(c)


def test_iac_sequences_split_across_segments(loop_chatd):
    """Every sequence sent one byte per TCP segment is still recognised and answered once."""
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        send_slowly(c, bytes([IAC, DO, TIMING_MARK]))
        assert c.recv_exact(3) == bytes([IAC, WILL, TIMING_MARK])
        send_slowly(c, bytes([IAC, WILL, TTYPE]))
        assert c.recv_exact(3) == bytes([IAC, DONT, TTYPE])
        send_slowly(c, bytes([IAC, WONT, ECHO]))
        assert_nothing_pending(c)

        data = (b"x" + bytes([IAC, DO, ECHO]) + b"y" + bytes([IAC, IAC])
                + bytes([IAC, SB, TTYPE, 0]) + b"vt100" + bytes([IAC, SE])
                + b"z" + bytes([IAC, 0xF4]) + b"\r\n")
        send_slowly(c, data)
        reply, echo = bytes([IAC, WONT, ECHO]), b"xy\xff\xffz\r\n"
        got = c.recv_exact(len(reply) + len(echo))
        assert got in (reply + echo, echo + reply)
        assert_nothing_pending(c)


def test_split_iac_iac_and_subnegotiation_end(loop_chatd):
    """`IAC | IAC` and `IAC SB ... IAC | SE` split at the worst byte."""
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(b"a\xff")
        time.sleep(0.05)
        c.send(b"\xffb\n")
        assert c.recv_line() == b"a\xff\xffb\n"
        c.send(b"c" + bytes([IAC, SB, TTYPE]) + b"data" + bytes([IAC]))
        time.sleep(0.05)
        c.send(bytes([SE]) + b"d\n")
        assert c.recv_line() == b"cd\n"
        assert_nothing_pending(c)


def test_telnet_replies_keep_their_place_in_the_stream(loop_chatd):
    """RFC 860: WILL TIMING-MARK marks the point in the output where the DO was processed; telnet
    discards everything before it. Echoes of lines sent before the DO come before the reply,
    echoes of lines sent after it come after it, even when all arrive in one segment."""
    loop_chatd.start()
    with client(loop_chatd.port) as c:
        c.send(b"before\n" + bytes([IAC, DO, TIMING_MARK]) + b"after\n")
        want = b"before\n" + bytes([IAC, WILL, TIMING_MARK]) + b"after\n"
        assert c.recv_exact(len(want)) == want
        # what telnet sends on Ctrl-C followed at once by the next typed line
        c.send(bytes([IAC, 0xF4, IAC, DO, TIMING_MARK]) + b"typed after ^C\r\n")
        want = bytes([IAC, WILL, TIMING_MARK]) + b"typed after ^C\r\n"
        assert c.recv_exact(len(want)) == want
        assert_nothing_pending(c)
