"""Chat mode against abusive and careless clients (README "Configuration" and "Chat mode"), through the real daemon.

The reference to beat is `ncat --chat`, and each test here fails on one of its faults:
  1. one client that does not read stalls (or bloats) the whole server;
  2. it prefixes every read, not every line (`<user1> a\\nb\\n`, or one prefix per byte);
  3. user numbers are file descriptors, reused as soon as someone leaves;
  4. it relays whatever bytes come in: forged `*** ` lines, bare CRs that overwrite the
     prefix, escape sequences, C1 controls, bidi overrides, invalid UTF-8;
  5. it relays telnet IAC sequences and never answers DO TIMING-MARK;
  6. it has no rate, flood, idle or connection limits.

Every wait has a deadline; every daemon is stopped by pid by the fixtures.
"""

from __future__ import annotations

import re
import select
import socket
import threading
import time

import pytest

from support import LineClient, rss_kib

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

TIMEOUT = 5.0
WELCOME = re.compile(rb"\*\*\* Welcome to chatd, (guest[0-9]+)\. Type /help for commands\.\r\n")
SLOW_DOWN = b"*** error: slow down, line dropped\r\n"
UNREAD = b"*** error: others are not reading your lines fast enough, some were dropped\r\n"
FULL = b"*** server full\r\n"


# ------------------------------------------------------------------ helpers

def start_chat(inst, **limits) -> int:
    """Configure `inst` for chat mode with these [limits] keys, start it, return its pid."""
    extra = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    inst.write_config(mode="chat", extra=extra)
    return inst.start()


class SourceClient(LineClient):
    """A LineClient whose connection comes from a chosen local address (127.0.0.2, ...)."""

    def __init__(self, port: int, source: str, timeout: float = TIMEOUT) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((source, 0))
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.buf = b""


def join(port: int, client: LineClient | None = None, roster: bytes | None = None,
         **kw) -> tuple[LineClient, str]:
    """Connect (or use `client`), read the welcome and the roster line; return (client, nick)."""
    c = client or LineClient(port, timeout=TIMEOUT, **kw)
    first = c.recv_line()
    m = WELCOME.fullmatch(first)
    assert m, first
    got = c.recv_line()
    if roster is None:
        assert got.startswith(b"*** #lobby: "), got
    else:
        assert got == roster, got
    return c, m.group(1).decode()


def expect(c: LineClient, *lines: bytes, timeout: float = TIMEOUT) -> None:
    for want in lines:
        got = c.recv_line(timeout=timeout)
        assert got == want, (got, want)


def said(nick: str, text: bytes | str) -> bytes:
    if isinstance(text, str):
        text = text.encode()
    return b"<" + nick.encode() + b"> " + text + b"\r\n"


# Characters no client may ever receive from chatd (besides the CR LF ending each line).
def _removed(ch: str) -> bool:
    o = ord(ch)
    return ((o < 0x20 and ch != "\t") or o == 0x7F or 0x80 <= o <= 0x9F
            or 0x202A <= o <= 0x202E or 0x2066 <= o <= 0x2069)


def assert_safe(data: bytes) -> None:
    """Every line is valid UTF-8 ending in CRLF with no control, C1, bidi or ESC inside; no 0xFF."""
    assert b"\xff" not in data, data
    assert data.endswith(b"\r\n") or not data, data[-80:]
    for raw in data.split(b"\r\n")[:-1]:
        text = raw.decode("utf-8")          # strict: chatd only sends valid UTF-8
        bad = [hex(ord(ch)) for ch in text if _removed(ch)]
        assert not bad, (raw, bad)


# ------------------------------------------------------------------ 1. a reader that never reads

LINE_BYTES = 1024
PER_CHUNK = 64                                  # lines per send: 64 KiB
TOTAL_LINES = 16 * 1024 * 1024 // LINE_BYTES     # 16 MiB of chat
WINDOW = 2                                      # chunks the sender may run ahead of the reader


def slow_reader_flow(inst) -> dict:
    """guest1 connects with SO_RCVBUF 4096 and never reads, guest2 reads, guest3 sends 16 MiB of
    lines stamped with the time they were sent (never more than WINDOW chunks ahead of guest2).
    Returns the figures; checks what every run must show on the way."""
    pid = start_chat(inst, rate=0)
    slow = LineClient(inst.port, rcvbuf=4096, timeout=TIMEOUT)   # never read until the end
    third, n3 = join(inst.port, roster=b"*** #lobby: guest1\r\n")
    sender, n1 = join(inst.port, roster=b"*** #lobby: guest1, guest2\r\n")
    assert (n3, n1) == ("guest2", "guest3")
    expect(third, b"*** guest3 joined #lobby\r\n")
    time.sleep(0.1)
    baseline = rss_kib(pid)

    progress = threading.Condition()
    state = {"lines": 0, "max_delay": 0.0, "left": [], "rss_at_drop": None, "error": None,
             "peak": baseline, "done": False, "lines_before_drop": None, "baseline": baseline}
    left_line = b"*** guest1 left #lobby (too slow)\r\n"
    prefix = said(n1, b"")[:-2]

    def read_third() -> None:
        buf = b""
        deadline = time.monotonic() + 40
        sock = third.sock
        try:
            while state["lines"] < TOTAL_LINES:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"timed out after {state['lines']} lines")
                sock.settimeout(remaining)
                chunk = sock.recv(1 << 20)
                now = time.monotonic_ns()
                if not chunk:
                    raise AssertionError(f"EOF after {state['lines']} lines")
                buf += chunk
                *lines, buf = buf.split(b"\r\n")
                for line in lines:
                    if line.startswith(prefix):
                        seq, stamp, _ = line[len(prefix):].split(b" ", 2)
                        assert int(seq) == state["lines"], (int(seq), state["lines"])
                        delay = (now - int(stamp)) / 1e9
                        state["max_delay"] = max(state["max_delay"], delay)
                        with progress:
                            state["lines"] += 1
                            progress.notify_all()
                    else:
                        state["left"].append(line + b"\r\n")
                        state["rss_at_drop"] = rss_kib(pid)
                        state["lines_before_drop"] = state["lines"]
            third.buf = buf
        except BaseException as exc:   # reported by the main thread
            state["error"] = exc
            with progress:
                progress.notify_all()

    def watch_rss() -> None:
        while not state["done"]:
            try:
                state["peak"] = max(state["peak"], rss_kib(pid))
            except OSError:
                return
            time.sleep(0.005)

    reader = threading.Thread(target=read_third, daemon=True)
    watcher = threading.Thread(target=watch_rss, daemon=True)
    reader.start()
    watcher.start()
    started = time.monotonic()
    try:
        pad = b"x" * LINE_BYTES
        for first in range(0, TOTAL_LINES, PER_CHUNK):
            with progress:
                ok = progress.wait_for(lambda: state["error"] or
                                       state["lines"] >= first - WINDOW * PER_CHUNK, timeout=10)
            assert ok and not state["error"], state["error"] or "the third client stalled"
            stamp = b"%d" % time.monotonic_ns()
            chunk = b"".join((b"%08d %s " % (seq, stamp) + pad)[:LINE_BYTES - 1] + b"\n"
                             for seq in range(first, first + PER_CHUNK))
            sender.send(chunk)
        reader.join(timeout=20)
        assert not reader.is_alive(), "the third client did not get every line in time"
        assert state["error"] is None, state["error"]
        state["elapsed"] = time.monotonic() - started
        if not state["left"]:   # "too slow" is judged over a second or two: the flow may end first
            state["left"].append(third.recv_line(timeout=TIMEOUT))
            state["rss_at_drop"] = rss_kib(pid)
            state["lines_before_drop"] = state["lines"]
        state["dropped_after"] = time.monotonic() - started
    finally:
        state["done"] = True
        watcher.join(timeout=2)
    assert state["lines"] == TOTAL_LINES
    assert state["left"] == [left_line], state["left"]
    # The sender was told too, after the warnings that its lines no longer all reached the
    # non-reader (which held its budget of them), and both well-behaved clients are still there.
    state["warnings"] = 0
    while (got := sender.recv_line()) == UNREAD:
        state["warnings"] += 1
    assert got == left_line, got
    sender.send(b"/who\n")
    expect(sender, b"*** #lobby: guest2, guest3\r\n")
    third.send(b"still here\n")
    expect(sender, said(n3, "still here"))
    # The slow client's connection is gone: what the kernel still held, then EOF or a reset.
    slow.sock.settimeout(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    got = 0
    while True:
        assert time.monotonic() < deadline, "the slow client was never disconnected"
        try:
            chunk = slow.sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not chunk:
            break
        got += len(chunk)
    state["slow_read"] = got
    for c in (slow, third, sender):
        c.close()
    state["figures"] = (
        f"loop={inst.loop} baseline={baseline} KiB rss_at_drop={state['rss_at_drop']} KiB "
        f"peak={state['peak']} KiB growth={state['peak'] - baseline} KiB "
        f"max_delay={state['max_delay'] * 1000:.1f} ms elapsed={state['elapsed']:.2f} s "
        f"relayed_before_drop={state['lines_before_drop'] * LINE_BYTES} B "
        f"dropped_after={state['dropped_after']:.2f} s warnings={state['warnings']} "
        f"dropped_client_could_still_read={got} B")
    print(state["figures"])
    return state


def test_a_reader_that_never_reads_is_dropped_and_delays_nobody(loop_chatd, record_property):
    """Result: every line reaches guest2 in order within 1 s of being sent, guest1 is dropped as
    `too slow` (both others are told), and chatd's RSS grows by far less than 16 MiB."""
    state = slow_reader_flow(loop_chatd)
    record_property("figures", state["figures"])
    assert state["max_delay"] < 1.0, state["figures"]
    assert state["peak"] - state["baseline"] < 6 * 1024, state["figures"]


@pytest.mark.slow
def test_a_reader_that_never_reads_is_dropped_once_output_buffer_is_unread(loop_chatd):
    """README "Chat mode": a client whose unread output stays past `output_buffer` (262144 by
    default) while it takes less than a line in three seconds is dropped as `too slow`; what it is
    sent past that budget is charged to the sender, who may have one budget of it queued and
    is warned when its lines no longer all fit.
    So the sender was warned, the drop came within four seconds of the end of the flow (three
    ticks of judgement after the one in which the client's kernel took its fill), and what
    the dropped client can still read (its kernel's share) stays within output_buffer, with
    slack for its receive buffer and a line."""
    state = slow_reader_flow(loop_chatd)
    output_buffer, slack = 262144, 64 * 1024
    assert state["slow_read"] <= output_buffer + slack, state["figures"]
    assert state["warnings"] >= 1, state["figures"]
    assert state["dropped_after"] <= state["elapsed"] + 4 * 1.0 + 0.5, state["figures"]


# ------------------------------------------------------------------ 2. per line, never per read

def test_lines_are_framed_per_line_never_per_read(loop_chatd):
    inst = loop_chatd
    start_chat(inst)
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    a.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    # One byte per segment: joined into one line.
    for byte in b"hello, world\n":
        a.send(bytes((byte,)))
        time.sleep(0.003)
    expect(b, said(na, "hello, world"))
    # Several lines in one segment: each one prefixed.
    a.send(b"a\nb\n")
    expect(b, said(na, "a"), said(na, "b"))
    a.send(b"one\ntwo\r\nthree\r\0four\n")
    expect(b, said(na, "one"), said(na, "two"), said(na, "three"), said(na, "four"))
    # LF, CRLF and CR NUL each end a line, one segment each.
    for data, text in ((b"lf\n", "lf"), (b"crlf\r\n", "crlf"), (b"crnul\r\0", "crnul")):
        a.send(data)
        expect(b, said(na, text))
    # CR at the end of one segment, NUL at the start of the next.
    a.send(b"split\r")
    time.sleep(0.05)
    a.send(b"\0after\r")
    time.sleep(0.05)
    a.send(b"\0")
    expect(b, said(na, "split"), said(na, "after"))
    # CR LF split the same way.
    a.send(b"half\r")
    time.sleep(0.05)
    a.send(b"\nnext\n")
    expect(b, said(na, "half"), said(na, "next"))
    # A line split in the middle of a UTF-8 character.
    a.send("é€".encode()[:3])
    time.sleep(0.05)
    a.send("é€".encode()[3:] + b"\n")
    expect(b, said(na, "é€"))
    # The sender got nothing back.
    b.send(b"end\n")
    expect(a, said(nb, "end"))
    for c in (a, b):
        c.close()


# ------------------------------------------------------------------ 3. guest numbers

def test_guest_numbers_are_never_reused(chatd):
    start_chat(chatd)
    watcher, n = join(chatd.port)
    assert n == "guest1"
    # Each guest leaves (and is seen to leave) before the next arrives: a lowest-free-number
    # or file-descriptor scheme would hand out the same number again.
    for i in range(2, 7):
        c, n = join(chatd.port)
        assert n == f"guest{i}"
        expect(watcher, f"*** guest{i} joined #lobby\r\n".encode())
        c.close()
        expect(watcher, f"*** guest{i} left #lobby (connection closed)\r\n".encode())
    # A renamed guest frees its guest name, which is not handed out again either.
    c, n = join(chatd.port)
    assert n == "guest7"
    expect(watcher, b"*** guest7 joined #lobby\r\n")
    c.send(b"/nick alice\n")
    expect(c, b"*** guest7 is now known as alice\r\n")
    expect(watcher, b"*** guest7 is now known as alice\r\n")
    # Nobody may take a guest name that was not assigned to them, even a free one.
    for name in ("guest7", "guest2", "GUEST3", "guest99"):
        c.send(f"/nick {name}\n".encode())
        expect(c, f"*** error: nick reserved for guests: {name}\r\n".encode())
    c.close()
    expect(watcher, b"*** alice left #lobby (connection closed)\r\n")
    # Several at once, then one more.
    many = [LineClient(chatd.port, timeout=TIMEOUT) for _ in range(4)]
    nicks = sorted((join(chatd.port, client=m)[1] for m in many), key=lambda s: int(s[5:]))
    assert nicks == ["guest8", "guest9", "guest10", "guest11"]
    for m in many:
        m.close()
    last, n = join(chatd.port)
    assert n == "guest12"
    for c in (last, watcher):
        c.close()


# ------------------------------------------------------------------ 4. forged and hostile text

HOSTILE = [
    # (what guest1 sends, what the others receive after "<guest1> "; None: nothing at all)
    (b"*** guest2 joined #lobby\n", "*** guest2 joined #lobby"),
    (b"*** server shutting down\r\n", "*** server shutting down"),
    (b"hi\rEVIL> x\n", "hiEVIL> x"),
    (b"\r<guest2> I am guest2\n", "<guest2> I am guest2"),
    (b"\x1b[31mred\x1b[0m plain\n", "red plain"),
    (b"a\x1b[2J\x1b[Hb\x1b[10;5Hc\x1b[Ad\n", "abcd"),
    (b"\x1b[1;1H\x1b[2K*** fake\n", "*** fake"),
    (b"x\x1b]0;pwned title\x07y\n", "xy"),
    (b"x\x1b]0;pwned title\x1b\\y\n", "xy"),
    (b"x\x1b]0;unterminated title\n", "x"),
    (b"x\x1b[12\n", "x"),
    (b"a\x9b31mb\n", "a\ufffd31mb"),                              # raw 0x9B: invalid UTF-8
    ("a\u009b31mb\u0085c\n".encode(), "a31mbc"),                    # U+009B, U+0085 encoded
    (b"a\x7fb\n", "ab"),
    (b"a\x00b\x01c\x07d\x08e\x0bf\x0cg\x1ah\x1bi\n", "abcdefghi"),
    (b"tab\there\n", "tab\there"),
    ("a\u202eb\u2066c\u2069d\u202ae\u2067f\n".encode(), "abcdef"),
    (b"bad \xc3( utf8 \xff\xff\n", "bad \ufffd( utf8 \ufffd"),   # IAC IAC is one 0xFF
    (b"trunc \xe2\x82\n", "trunc \ufffd"),
    (b"\x1b[31m\x07\x1b]0;t\x07\x7f\r\n", None),                    # nothing left: not sent
    ("\u202e\u0085\x00".encode() + b"\n", None),
    (b"\n", None),
    (b"\r\n", None),
]


def test_no_user_can_forge_lines_or_send_terminal_controls(loop_chatd):
    inst = loop_chatd
    start_chat(inst, rate=0)
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    received = bytearray()

    def line_of(c):
        got = c.recv_line()
        received.extend(got)
        return got

    for n, (data, text) in enumerate(HOSTILE):
        a.send(data + b"marker %d\n" % n)
        if text is not None:
            got = line_of(b)
            assert got == said(na, text), (data, got)
        got = line_of(b)
        assert got == said(na, f"marker {n}"), (data, got)
    assert_safe(bytes(received))
    # Line by line too (each in its own segment), through /me and /msg.
    for data, text in HOSTILE:
        for cmd, shown in ((b"/me ", f"* {na} "), (b"/msg " + nb.encode() + b" ", f"*{na}* ")):
            a.send(cmd + data)
            if text is not None and text.strip():
                got = line_of(b)
                assert got == (shown + text).encode() + b"\r\n", (cmd, data, got)
                if cmd.startswith(b"/msg"):
                    assert a.recv_line() == f"-> *{nb}* {text}".encode() + b"\r\n"
            else:
                usage = b"/me ACTION" if cmd == b"/me " else b"/msg NICK TEXT"
                assert a.recv_line() == b"*** error: usage: " + usage + b"\r\n", (cmd, data)
    assert_safe(bytes(received))
    for c in (a, b):
        c.close()


def test_nicks_never_hold_escapes_or_controls(chatd):
    start_chat(chatd, rate=0)
    a, na = join(chatd.port)
    b, nb = join(chatd.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    seen_a, seen_b = bytearray(), bytearray()

    def both(line: bytes) -> None:
        for c, seen in ((a, seen_a), (b, seen_b)):
            got = c.recv_line()
            seen.extend(got)
            assert got == line, got

    def to_a(line: bytes) -> None:
        got = a.recv_line()
        seen_a.extend(got)
        assert got == line, got

    # Escapes and controls are removed before the command is read: what is left is the nick.
    a.send(b"/nick \x1b[31mre\x07d\x1b[0m\n")
    both(b"*** guest1 is now known as red\r\n")
    a.send("/nick \u202eevil\u2066\n".encode())
    both(b"*** red is now known as evil\r\n")
    a.send("/nick x\u0085y\x7f\r\n".encode())
    both(b"*** evil is now known as xy\r\n")
    a.send(b"/nick \x1b]0;title\x07\n")
    to_a(b"*** error: usage: /nick NAME\r\n")
    # What cannot be removed makes the nick invalid.
    a.send(b"/nick x\x9by\n")
    to_a('*** error: bad nick: "x\ufffdy" (1 to 16 letters, digits, _ - .)\r\n'.encode())
    a.send(b"/nick a\xff\xffb\n")
    to_a('*** error: bad nick: "a\ufffdb" (1 to 16 letters, digits, _ - .)\r\n'.encode())
    a.send("/nick caf\u00e9\n".encode())
    to_a('*** error: bad nick: "caf\u00e9" (1 to 16 letters, digits, _ - .)\r\n'.encode())
    a.send(b"/nick a\tb\n")
    to_a(b'*** error: bad nick: "a b" (1 to 16 letters, digits, _ - .)\r\n')
    a.send(b"/who\n")
    to_a(b"*** #lobby: guest2, xy\r\n")
    a.send(b"hi\n")
    got = b.recv_line()
    seen_b.extend(got)
    assert got == b"<xy> hi\r\n"
    assert_safe(bytes(seen_a))
    assert_safe(bytes(seen_b))
    for c in (a, b):
        c.close()


# ------------------------------------------------------------------ 5. telnet

def test_telnet_sequences_are_stripped_and_answered_only_to_the_sender(loop_chatd):
    inst = loop_chatd
    start_chat(inst, rate=0)
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    a.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    others = bytearray()

    def to_b(line: bytes) -> None:
        got = b.recv_line()
        others.extend(got)
        assert got == line, got

    # WILL ECHO inside the text: refused to the sender, gone from the text.
    a.send(b"he\xff\xfb\x01llo\n")
    assert a.recv_exact(3) == b"\xff\xfe\x01"
    to_b(said(na, "hello"))
    # DO TIMING-MARK: WILL TIMING-MARK to the sender, nothing to the others.
    a.send(b"\xff\xfd\x06")
    assert a.recv_exact(3) == b"\xff\xfb\x06"
    # ... also inside a line and split across segments.
    for part in (b"t\xff", b"\xfd", b"\x06m\n"):
        a.send(part)
        time.sleep(0.02)
    assert a.recv_exact(3) == b"\xff\xfb\x06"
    to_b(said(na, "tm"))
    # IAC IAC is a 0xFF byte: invalid UTF-8, so U+FFFD.
    a.send(b"a\xff\xffb\n")
    to_b(said(na, "a\ufffdb"))
    # Subnegotiations, NOP, IP, AYT, DONT, WONT: stripped, no answer.
    a.send(b"x\xff\xfa\x18\x00VT100\xff\xf0y\n")
    to_b(said(na, "xy"))
    a.send(b"p\xff\xf1q\xff\xf4r\xff\xf6s\xff\xfe\x01t\xff\xfc\x03u\n")
    to_b(said(na, "pqrstu"))
    # DO something else: WONT.
    a.send(b"\xff\xfd\x01")
    assert a.recv_exact(3) == b"\xff\xfc\x01"
    # Nothing else came to the sender: the next bytes are the answer to this DO TIMING-MARK.
    a.send(b"\xff\xfd\x06")
    assert a.recv_exact(3) == b"\xff\xfb\x06"
    # A lone IAC at the end of a line does not eat the newline's line.
    a.send(b"end\n")
    to_b(said(na, "end"))
    assert b"\xff" not in others and b"\xff" not in b.buf
    assert_safe(bytes(others))
    # The receiver's own telnet is answered to it alone.
    b.send(b"\xff\xfd\x06ok\n")
    assert b.recv_exact(3) == b"\xff\xfb\x06"
    expect(a, said(nb, "ok"))
    for c in (a, b):
        c.close()


# ------------------------------------------------------------------ 6. limits

def test_rate_limit_and_flooding_touch_only_the_offender(chatd):
    start_chat(chatd, rate=2.0, burst=3)
    a, na = join(chatd.port)
    b, nb = join(chatd.port)
    f, nf = join(chatd.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode(), f"*** {nf} joined #lobby\r\n".encode())
    expect(b, f"*** {nf} joined #lobby\r\n".encode())

    # Four quick lines: three pass, the fourth is dropped with a warning to the sender alone.
    a.send(b"1\n2\n3\n4\n")
    expect(b, said(na, "1"), said(na, "2"), said(na, "3"))
    expect(a, SLOW_DOWN)
    time.sleep(0.6)   # one token back (2 a second)
    a.send(b"5\n")
    expect(b, said(na, "5"))   # not 4: it was dropped, not delayed
    # A client within the rate is never warned.
    for text in (b"ok1", b"ok2", b"ok3", b"ok4"):
        b.send(text + b"\n")
        expect(a, said(nb, text))
        time.sleep(0.55)
    # A flooder: `burst` lines pass, then lines are dropped; `burst` drops and it is gone.
    f.send(b"".join(b"f%d\n" % i for i in range(50)))
    for c in (a, b):
        expect(c, said(nf, "f0"), said(nf, "f1"), said(nf, "f2"),
               f"*** {nf} left #lobby (flooding)\r\n".encode())
    rest = f.recv_until_eof(timeout=TIMEOUT)
    assert rest.endswith(SLOW_DOWN), rest
    assert 2 <= rest.count(SLOW_DOWN) <= 3, rest
    # The others carry on, unwarned, and none of the flood's later lines reached them.
    a.send(b"/who\n")
    expect(a, f"*** #lobby: {na}, {nb}\r\n".encode())
    b.send(b"after\n")
    expect(a, said(nb, "after"))
    a.send(b"bye\n")
    expect(b, said(na, "bye"))
    for c in (a, b, f):
        c.close()


def test_idle_timeout_closes_only_the_idle_client(chatd):
    start_chat(chatd, idle_timeout=0.5)
    idle, ni = join(chatd.port)
    busy, nb = join(chatd.port)
    expect(idle, f"*** {nb} joined #lobby\r\n".encode())
    started = time.monotonic()
    want = f"*** {ni} left #lobby (idle)\r\n".encode()
    lines = []
    deadline = started + 4
    # `busy` sends a byte (an empty line, which is ignored) every 0.1 s and so is never idle.
    while want not in lines:
        assert time.monotonic() < deadline, lines
        busy.send(b"\n")
        ready, _, _ = select.select([busy.sock], [], [], 0.1)
        if ready:
            lines.append(busy.recv_line())
    waited = time.monotonic() - started
    assert 0.4 < waited < 2.5, waited
    assert lines == [want], lines
    assert idle.recv_until_eof(timeout=TIMEOUT) == b""
    # `busy` stays well past the timeout, and newcomers are unaffected.
    until = time.monotonic() + 1.2
    while time.monotonic() < until:
        busy.send(b"\n")
        time.sleep(0.1)
    late, nl = join(chatd.port)
    busy.send(b"/who\n")
    expect(busy, f"*** {nl} joined #lobby\r\n".encode(), f"*** #lobby: {nb}, {nl}\r\n".encode())
    busy.send(b"still here\n")
    expect(late, said(nb, "still here"))
    for c in (idle, busy, late):
        c.close()


def test_max_clients_refuses_newcomers_with_server_full(chatd):
    start_chat(chatd, max_clients=2, max_clients_per_ip=0)
    a, na = join(chatd.port)
    b, nb = join(chatd.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    with LineClient(chatd.port, timeout=TIMEOUT) as third:
        assert third.recv_until_eof() == FULL
    # The two inside noticed nothing: no join, no leave, and they still talk.
    a.send(b"hi\n")
    expect(b, said(na, "hi"))
    b.send(b"/who\n")
    expect(b, f"*** #lobby: {na}, {nb}\r\n".encode())
    # Once someone leaves, there is room again.
    a.close()
    expect(b, f"*** {na} left #lobby (connection closed)\r\n".encode())
    c, nc = join(chatd.port)
    expect(b, f"*** {nc} joined #lobby\r\n".encode())
    for x in (b, c):
        x.close()


def test_max_clients_per_ip_refuses_only_that_address(chatd):
    start_chat(chatd, max_clients_per_ip=1)
    a, na = join(chatd.port)
    with LineClient(chatd.port, timeout=TIMEOUT) as same:
        assert same.recv_until_eof() == FULL
    other, no = join(chatd.port, client=SourceClient(chatd.port, "127.0.0.2"))
    expect(a, f"*** {no} joined #lobby\r\n".encode())
    with SourceClient(chatd.port, "127.0.0.2") as same2:
        assert same2.recv_until_eof() == FULL
    a.send(b"hi\n")
    expect(other, said(na, "hi"))
    other.send(b"hello\n")
    expect(a, said(no, "hello"))
    for c in (a, other):
        c.close()


def test_a_restart_applies_rate_and_burst_to_clients_already_connected(chatd):
    """The README's configuration table says a restart applies `rate` and `burst` to every
    connection, `max_line` only to new ones: a client connected under rate = 0 is limited
    as soon as the restart has applied a rate."""
    start_chat(chatd, rate=0)
    with LineClient(chatd.port) as old:
        assert b"#lobby" in old.recv_line() + old.recv_line()     # the welcome and the roster
        chatd.write_config(mode="chat", extra="[limits]\nrate = 0.1\nburst = 3\nmax_line = 16\n")
        assert chatd.cmd("restart", check=0).stdout.startswith(b"chatd restarted in place")
        old.send(b"one\ntwo\nthree\nfour\n")
        answer = old.recv_line()
        assert answer == b"*** error: slow down, line dropped\r\n", answer
        old.send(b"x" * 40 + b"\n")          # over the new max_line, but this client keeps 4096
        assert old.recv_line() == b"*** error: slow down, line dropped\r\n"
        new = LineClient(chatd.port)
        with new:
            new.recv_line()
            new.recv_line()
            new.send(b"y" * 40 + b"\n")
            assert new.recv_line() == b"*** error: line too long (max 16 bytes), dropped\r\n"
