"""`[log] level = "debug"` through the real daemon, on both event loops: what debug adds
(connections accepted and closed with byte counts, reading paused and resumed, chat drops,
restart diffs, the signals dispatched), and that level info logs none of it."""

from __future__ import annotations

import os
import re
import signal
import time

import pytest

from support import LineClient, alive, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

WELCOME = re.compile(rb"\*\*\* Welcome to chatd, (guest[0-9]+)\. Type /help for commands\.\r\n")
SLOW_DOWN = b"*** error: slow down, line dropped\r\n"
OPEN = r", open \d+\.\d{3} s"
# Every debug message starts with one of these; none may appear at level info.
DEBUG_STARTS = ("accepted ", "closed ", "paused reading ", "resumed reading ", "dropped ",
                "restart: ", "signal ")


# ------------------------------------------------------------------ helpers

def configure(inst, level: str, extra: str = "", **server) -> None:
    """The fixture's config with [log] level set to `level` (the fixture writes "debug")."""
    inst.write_config(extra=extra, **server)
    text = inst.config.read_text()
    assert text.count('level = "debug"') == 1, text
    inst.config.write_text(text.replace('level = "debug"', f'level = "{level}"'))


def config_line(inst, starts: str) -> int:
    """The 1-based number of the config file's line that starts with `starts`."""
    lines = inst.config.read_text().splitlines()
    found = [n for n, line in enumerate(lines, 1) if line.startswith(starts)]
    assert len(found) == 1, (starts, lines)
    return found[0]


def messages(inst, level: str = "DEBUG") -> list[str]:
    """The messages the daemon logged at `level`, in order."""
    tag = f" {level}: "
    return [line.split(tag, 1)[1] for line in inst.log_text().splitlines() if tag in line]


def wait_message(inst, pattern: str, level: str = "DEBUG") -> str:
    """Wait for a message at `level` matching `pattern` in full; return it."""
    def found():
        return next((m for m in messages(inst, level) if re.fullmatch(pattern, m)), None)
    return wait_for(found, what=f"a {level} line matching {pattern!r}; log:\n{inst.log_text()[-3000:]}")


def peer_of(c: LineClient) -> str:
    return "127.0.0.1:%d" % c.sock.getsockname()[1]


def echo_exchange(inst) -> tuple[str, int]:
    """A client connects, sends known bytes, reads them back and closes; its peer and the count."""
    payload = b"".join(b"PAYLOAD-TEXT line %03d\n" % i for i in range(50)) + b"\r\nlast\r\n"
    with LineClient(inst.port) as c:
        peer = peer_of(c)
        c.send(payload)
        assert c.recv_exact(len(payload)) == payload
    wait_message(inst, rf"disconnect {peer}: client closed \(0 clients\)", "INFO")
    return peer, len(payload)


def stop_reading_then_read(inst, on_stalled=None) -> str:
    """A client with a small receive buffer sends lines without reading until nothing moves
    (chatd has paused reading it), calls `on_stalled(peer)`, then reads every echo, sending
    nothing more; returns its peer once every whole line it sent has come back."""
    c = LineClient(inst.port, rcvbuf=4096)
    peer = peer_of(c)
    c.sock.setblocking(False)
    line = b"z" * 999 + b"\n"
    sent = 0
    stalled_since = None
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            sent += c.sock.send(line[sent % len(line):])   # the stream stays whole lines
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.3:
                break
            time.sleep(0.01)
    assert stalled_since is not None, "chatd never stopped reading the client"
    if on_stalled is not None:
        on_stalled(peer)
    c.sock.settimeout(10)
    received = 0
    whole_lines = sent - sent % len(line)   # a partial last line is not echoed
    # The echo drains as fast as the client reads: a receive buffer below a loopback segment
    # once made each window update wait for the kernel's zero-window probes (105 s in all).
    read_by = time.monotonic() + 10
    while received < whole_lines:
        assert time.monotonic() < read_by, f"only {received} of {whole_lines} bytes in 10 s"
        chunk = c.sock.recv(1 << 20)
        assert chunk, f"closed after {received} of {whole_lines} bytes"
        received += len(chunk)
    assert received == whole_lines
    c.close()
    return peer


def join(port: int) -> tuple[LineClient, str]:
    """A chat client that has read its welcome and the roster line; (client, nick)."""
    c = LineClient(port, timeout=5)
    m = WELCOME.fullmatch(c.recv_line())
    assert m
    assert c.recv_line().startswith(b"*** #lobby: ")
    return c, m.group(1).decode()


def expect(c: LineClient, *lines: bytes) -> None:
    for want in lines:
        assert c.recv_line() == want


def said(nick: str, text: str) -> bytes:
    return f"<{nick}> {text}\r\n".encode()


def terminate(inst, pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not alive(pid), what="chatd to exit on SIGTERM")


# ------------------------------------------------------------------ level debug

def test_debug_logs_an_echo_client_accepted_and_closed_with_exact_byte_counts(loop_chatd):
    """1. level debug, 2. a client sends N known bytes, reads the echo, closes, 3. SIGTERM.
    Result: "accepted PEER on LOCAL", then "closed PEER (client closed): received N bytes,
    sent N bytes, open T s", around the info lines that were there before; the SIGTERM is
    logged as seen; nothing the client sent is in the log."""
    inst = loop_chatd
    configure(inst, "debug")
    pid = inst.start()
    peer, n = echo_exchange(inst)
    closed = wait_message(inst, rf"closed {peer} .*")
    assert re.fullmatch(rf"closed {peer} \(client closed\): received {n} bytes, sent {n} bytes{OPEN}",
                        closed), closed
    debug = messages(inst)
    accepted = f"accepted {peer} on 127.0.0.1:{inst.port}"
    assert debug.count(accepted) == 1 and debug.index(accepted) < debug.index(closed), debug
    info = messages(inst, "INFO")
    assert f"connect {peer} (1 clients)" in info
    assert f"disconnect {peer}: client closed (0 clients)" in info
    terminate(inst, pid)
    assert messages(inst)[-1:] == ["signal SIGTERM: stop requested"]
    assert "PAYLOAD" not in inst.log_text()


def test_debug_logs_reading_paused_then_resumed(loop_chatd):
    """1. level debug, output_buffer 16384, 2. a client sends without reading until chatd stops
    reading it, 3. it reads everything. Result: "paused reading PEER: U bytes unsent, budget
    12288" (output_buffer less the kernel's quarter) with U over the budget while it is stuck,
    then "resumed reading PEER after T s" once it reads; as many resumes as pauses in the end."""
    inst = loop_chatd
    configure(inst, "debug", extra="[limits]\noutput_buffer = 16384\n")
    inst.start()
    seen = {}

    def while_stuck(peer: str) -> None:
        paused = wait_message(inst, rf"paused reading {peer}: \d+ bytes unsent, budget 12288")
        assert int(paused.split(": ")[1].split()[0]) > 12288, paused
        mine = [m for m in messages(inst) if m.startswith(("paused reading ", "resumed reading "))]
        seen["stuck"] = mine
        # Paused now: one more pause than resumes (the kernel may have let it go on once).
        assert sum(m.startswith("paused") for m in mine) == sum(m.startswith("resumed") for m in mine) + 1

    peer = stop_reading_then_read(inst, while_stuck)
    assert all(peer in m for m in seen["stuck"]), seen
    resumed = wait_message(inst, rf"resumed reading {peer} after \d+\.\d{{3}} s")
    mine = [m for m in messages(inst) if m.startswith(("paused reading ", "resumed reading "))]
    assert mine[0].startswith("paused") and resumed in mine
    assert sum(m.startswith("paused") for m in mine) == sum(m.startswith("resumed") for m in mine), mine


def test_debug_logs_chat_lines_dropped_and_a_flooder_dropped(loop_chatd):
    """1. level debug, chat mode, rate 2, burst 3, max_line 32, 2. a client sends four lines at
    once, then an over-long line, 3. another sends 50 lines at once. Result: one line each for
    each line over the rate, the over-long line and the flooder, naming the peer, never the
    text."""
    inst = loop_chatd
    configure(inst, "debug", mode="chat", extra="[limits]\nrate = 2.0\nburst = 3\nmax_line = 32\n")
    inst.start()
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    pa = peer_of(a)
    a.send(b"secret-1\nsecret-2\nsecret-3\nsecret-4\n")
    expect(b, said(na, "secret-1"), said(na, "secret-2"), said(na, "secret-3"))
    expect(a, SLOW_DOWN)
    wait_message(inst, rf"dropped a line from {pa} \(rate limit\): rate 2, burst 3")
    a.send(b"secret-" + b"L" * 40 + b"\n")
    expect(a, b"*** error: line too long (max 32 bytes), dropped\r\n")
    wait_message(inst, rf"dropped a line from {pa} \(too long\): max_line 32")
    f, nf = join(inst.port)
    pf = peer_of(f)
    f.send(b"".join(b"secret-f%d\n" % i for i in range(50)))
    wait_message(inst, rf"dropped {pf} \(flooding\): 3 lines over the rate within 10 s")
    closed = wait_message(inst, rf"closed {pf} .*")
    assert re.fullmatch(rf"closed {pf} \(flooding\): received \d+ bytes, sent \d+ bytes{OPEN}", closed), closed
    for c in (a, b, f):
        c.close()
    dropped = [m for m in messages(inst) if m.startswith("dropped ")]
    # The flooder's first two lines over the rate are dropped, the third drops the flooder.
    assert dropped == [f"dropped a line from {pa} (rate limit): rate 2, burst 3",
                       f"dropped a line from {pa} (too long): max_line 32",
                       f"dropped a line from {pf} (rate limit): rate 2, burst 3",
                       f"dropped a line from {pf} (rate limit): rate 2, burst 3",
                       f"dropped {pf} (flooding): 3 lines over the rate within 10 s"], dropped
    assert "secret" not in inst.log_text()


@pytest.mark.slow
def test_debug_logs_a_chat_reader_dropped_as_too_slow(loop_chatd):
    """1. level debug, chat mode, output_buffer 16384, 2. a client never reads while another
    says 400 KB. Result: "dropped PEER (too slow): took T bytes in 3 s, U bytes unsent, budget
    B" with T under a line, then its closed line gives the reason "too slow"."""
    inst = loop_chatd
    configure(inst, "debug", mode="chat", extra="[limits]\nrate = 0\noutput_buffer = 16384\n")
    inst.start()
    slow = LineClient(inst.port, rcvbuf=4096)
    ps = peer_of(slow)
    wait_message(inst, rf"accepted {ps} on 127\.0\.0\.1:{inst.port}")
    sender, _ = join(inst.port)
    for _ in range(400):
        sender.send(b"x" * 999 + b"\n")
    dropped = wait_message(inst, rf"dropped {ps} \(too slow\): took \d+ bytes in 3 s, \d+ bytes "
                                 rf"unsent, budget \d+")
    taken, _, unsent, budget = map(int, re.findall(r"\d+", dropped.split("too slow")[1]))
    assert taken < 4096 and unsent > 0, dropped
    closed = wait_message(inst, rf"closed {ps} .*")
    assert re.match(rf"closed {ps} \(too slow\): received 0 bytes, sent \d+ bytes", closed), closed
    # Debug lines do not look like the info line "disconnect PEER: too slow (N clients)", which
    # other tests count.
    assert inst.log_text().count(": too slow") == 1
    sender.close()
    slow.close()


def test_debug_logs_restart_diffs_and_the_signals_seen(loop_chatd):
    """1. level debug, a client connected, 2. max_line changed in the file, chatd restart,
    3. chatd restart with nothing changed, 4. chatd stop (graceful) with the client still there.
    Result: each SIGHUP and the SIGUSR1 logged as seen; "restart: limits.max_line 4096 -> 100
    (from FILE:LINE)" before the info outcome; "restart: nothing changed"; the client's closed
    line after the graceful stop, with its counts."""
    inst = loop_chatd
    configure(inst, "debug")
    inst.start()
    c = LineClient(inst.port)
    peer = peer_of(c)
    c.send(b"hi\n")
    assert c.recv_line() == b"hi\n"
    configure(inst, "debug", extra="[limits]\nmax_line = 100\n")
    where = f"{inst.config}:{config_line(inst, 'max_line = 100')}"
    inst.cmd("restart", check=0)
    diff = f"restart: limits.max_line 4096 -> 100 (from {where})"
    debug = messages(inst)
    assert debug[-2:] == ["signal SIGHUP: restart requested", diff], debug
    assert messages(inst, "INFO")[-1] == "restart applied: changed limits.max_line 4096 -> 100"
    log = inst.log_text()
    assert log.index(diff) < log.index("restart applied: changed limits.max_line")
    inst.cmd("restart", check=0)
    assert messages(inst)[-2:] == ["signal SIGHUP: restart requested", "restart: nothing changed"]
    assert messages(inst, "INFO")[-1] == "restart applied: config re-read; nothing changed"
    inst.cmd("stop", check=0)
    assert c.recv_until_eof() == b""
    c.close()
    debug = messages(inst)
    assert "signal SIGUSR1: graceful stop requested" in debug
    assert debug.count("signal SIGHUP: restart requested") == 2
    closed = [m for m in debug if m.startswith(f"closed {peer} ")]
    assert len(closed) == 1 and re.fullmatch(
        rf"closed {peer} \(server shutting down\): received 3 bytes, sent 3 bytes{OPEN}", closed[0]), closed


def test_a_restart_turns_debug_on_and_off_for_new_connections(loop_chatd):
    """1. level info: a client comes and goes, 2. the file says debug, chatd restart: another,
    3. info again, chatd restart: a third. Result: only the second has accepted and closed lines;
    the switch to debug is itself logged as a diff; all three have their info lines."""
    inst = loop_chatd
    configure(inst, "info")
    inst.start()
    first, _ = echo_exchange(inst)
    configure(inst, "debug")
    inst.cmd("restart", check=0)
    wait_message(inst, rf"restart: log\.level 'info' -> 'debug' \(from {re.escape(str(inst.config))}:"
                       rf"{config_line(inst, 'level = ')}\)")
    second, n = echo_exchange(inst)
    wait_message(inst, rf"closed {second} \(client closed\): received {n} bytes, sent {n} bytes{OPEN}")
    configure(inst, "info")
    inst.cmd("restart", check=0)
    third, _ = echo_exchange(inst)
    debug = messages(inst)
    assert any(m.startswith(f"accepted {second} on ") for m in debug)
    for peer in (first, third):
        assert not [m for m in debug if f"{peer} " in m], debug
    info = messages(inst, "INFO")
    for peer in (first, second, third):
        assert f"connect {peer} (1 clients)" in info and f"disconnect {peer}: client closed (0 clients)" in info


def test_the_log_level_option_turns_debug_on(make_chatd):
    """`chatd start --log-level debug` with level info in the file: connections are logged."""
    inst = make_chatd()
    configure(inst, "info")
    pid = inst.start("--log-level", "debug")
    peer, n = echo_exchange(inst)
    wait_message(inst, rf"closed {peer} \(client closed\): received {n} bytes, sent {n} bytes{OPEN}")
    assert f"accepted {peer} on 127.0.0.1:{inst.port}" in messages(inst)
    terminate(inst, pid)


# ------------------------------------------------------------------ level info

def test_info_logs_none_of_the_debug_lines(loop_chatd):
    """The echo actions of the tests above at level info: a client's exchange, a client that
    stops reading and then reads, a restart that changes a key, a graceful stop. Result: no
    debug line at all, and the info lines that were there before."""
    inst = loop_chatd
    configure(inst, "info", extra="[limits]\noutput_buffer = 16384\n")
    inst.start()
    peer, _ = echo_exchange(inst)
    stuck = stop_reading_then_read(inst)
    configure(inst, "info", extra="[limits]\noutput_buffer = 16384\nmax_line = 100\n")
    inst.cmd("restart", check=0)
    inst.cmd("restart", check=0)
    inst.cmd("stop", check=0)
    log = inst.log_text()
    assert " DEBUG: " not in log
    for line in log.splitlines():
        assert not line.split(": ", 1)[-1].startswith(DEBUG_STARTS), line
    info = messages(inst, "INFO")
    assert f"connect {peer} (1 clients)" in info
    assert f"disconnect {peer}: client closed (0 clients)" in info
    assert f"connect {stuck} (1 clients)" in info
    assert "restart applied: changed limits.max_line 4096 -> 100" in info
    assert "restart applied: config re-read; nothing changed" in info
    assert "graceful stop (SIGUSR1), 0 clients" in info


def test_info_logs_no_chat_drops(loop_chatd):
    """The chat actions of the tests above at level info: a line over the rate, an over-long
    line, a flooder. Result: no debug line; the flooder's disconnect is there as before."""
    inst = loop_chatd
    configure(inst, "info", mode="chat", extra="[limits]\nrate = 2.0\nburst = 3\nmax_line = 32\n")
    inst.start()
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    a.send(b"1\n2\n3\n4\n")
    expect(b, said(na, "1"), said(na, "2"), said(na, "3"))
    expect(a, SLOW_DOWN)
    a.send(b"L" * 40 + b"\n")
    expect(a, b"*** error: line too long (max 32 bytes), dropped\r\n")
    f, nf = join(inst.port)
    pf = peer_of(f)
    f.send(b"".join(b"f%d\n" % i for i in range(50)))
    wait_message(inst, rf"disconnect {pf}: flooding \(2 clients\)", "INFO")
    for c in (a, b, f):
        c.close()
    log = inst.log_text()
    assert " DEBUG: " not in log
    for line in log.splitlines():
        assert not line.split(": ", 1)[-1].startswith(DEBUG_STARTS), line


def test_debug_lines_about_one_clients_drops_stay_a_few_per_window(loop_chatd):
    """1. level debug, chat mode, no rate, max_line 32, 2. a client sends 200 over-long lines at
    once, then closes. Result: 3 "dropped a line from PEER (too long)" lines, then "dropped 197
    debug lines about PEER (over 3 in 10 s)" before its "closed" line. Before, one debug line
    for each of the 200 (a client could fill the log at its link's speed)."""
    inst = loop_chatd
    configure(inst, "debug", mode="chat", extra="[limits]\nrate = 0\nmax_line = 32\n")
    inst.start()
    a, _ = join(inst.port)
    pa = peer_of(a)
    a.send(b"L" * 40 + b"\n" + b"".join(b"%03d" % i + b"L" * 40 + b"\n" for i in range(199)))
    for _ in range(200):
        assert a.recv_line() == b"*** error: line too long (max 32 bytes), dropped\r\n"
    a.close()
    wait_message(inst, rf"closed {pa} .*")
    mine = [m for m in messages(inst) if pa in m]
    too_long = f"dropped a line from {pa} (too long): max_line 32"
    assert mine.count(too_long) == 3, mine
    summary = f"dropped 197 debug lines about {pa} (over 3 in 10 s)"
    assert mine.index(summary) == len(mine) - 2, mine
