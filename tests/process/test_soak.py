"""Soak (README): minutes of mixed echo and chat traffic, churn and restarts.

Two daemons, one in echo mode and one in chat mode (rate = 0), serve for CHATD_SOAK_SECONDS
(default 300) while:

- a steady population is connected the whole time: 50 echo clients, each sending numbered
  lines (some CRLF, some split across two segments, some invalid UTF-8) and checking every
  echoed byte; and a chat room of 20 members where 4 senders send numbered lines and every
  member checks that it gets every line of every other sender, in order and byte for byte;
- churn on both daemons: 20 slots per daemon, each connecting, exchanging a few lines and
  leaving, again and again (about 5 connects a second per daemon); the leaving rotates between
  half-close, half-close with an unterminated tail (echo) or `/quit` (chat), an abrupt close,
  and an abrupt close with RST. Every connect attempt counts; none is retried;
- every 30 s `chatd restart` on both, after touching the config: alternately with a changed
  `[limits] max_line`/`output_buffer` and with the config unchanged.

RSS (VmRSS) and descriptor count of each daemon are sampled every 5 s. Warm-up is the first
restart cycle at the peak population: just before the second restart, and again just before
the last one, the churn slots are all held connected (so the population is exactly the same,
checked against the state file's client count) and a checkpoint sample is taken. The end
checkpoint must be within 10 % of the warm one, for RSS and for descriptors.

All clients run in one selectors-based engine in one thread; it is stopped and joined in a
`finally`. Every wait has a deadline. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import json
import os
import random
import re
import resource
import selectors
import socket
import struct
import threading
import time
import traceback

import pytest

from support import alive, proc_stat

HOST = "127.0.0.1"
SOAK_SECONDS = float(os.environ.get("CHATD_SOAK_SECONDS", "300"))
RESTART_EVERY = 30.0
SAMPLE_EVERY = 5.0
TOLERANCE = 0.10

ECHO_STEADY = 50          # echo clients connected throughout
ECHO_PERIOD = 0.5         # seconds between one echo client's sends (1 to 3 lines each)
CHAT_MEMBERS = 20         # chat clients connected throughout, in #lobby
CHAT_SENDERS = 4          # of which these send numbered lines
CHAT_PERIOD = 0.4         # seconds between one sender's sends (1 or 2 lines each)
CHURN_SLOTS = 20          # per daemon: each one connect, exchange, leave, again and again
CHURN_LINES = 4           # lines a churn client exchanges before it leaves
CHURN_GAP = 1.0           # seconds between them
STALL_S = 10.0            # an answer that takes this long is an error

LIMITS = {  # the two [limits] variants a restart alternates between
    "A": {"max_line": 4096, "output_buffer": 262144},
    "B": {"max_line": 2048, "output_buffer": 131072},
}

# Printable ASCII, a TAB, and some multi-byte UTF-8: text chat's sanitizer leaves as it is.
ALPHABET = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;!?-_=+()[]{}<>'\"@#$%^&*~`|"
            "\t\u00e9\u00fc\u00df\u2713\u20ac\u4e16\U0001f600")
# For echo: slices of this at any offset, so some lines hold cut (invalid) UTF-8; never 0xFF.
ECHO_PATTERN = "".join(ALPHABET[(i * 7919) % len(ALPHABET)] for i in range(4000)).encode()

WELCOME = re.compile(rb"\*\*\* Welcome to chatd, (guest\d+)\. Type /help for commands\.")
SAID = re.compile(rb"<([A-Za-z0-9_.-]{1,16})> (.*)", re.S)
STEADY_LINE = re.compile(rb"S(\d+) (\d+) (.*)", re.S)
CHURN_CHAT_LINE = re.compile(rb"C(\d+) (\d+) hello (\d+)")
NOTICE_OK = re.compile(rb'\*\*\* (?:#lobby: .*|guest\d+ joined #lobby|guest\d+ left #lobby \((?:connection closed|quit: "bye \d+")\))')


def chat_text(sidx: int, seq: int) -> bytes:
    """The numbered line sender `sidx` sends as number `seq` (without terminator)."""
    n = (seq * 37 + sidx * 11) % 140
    body = "".join(ALPHABET[(seq * 3 + sidx + i * 7) % len(ALPHABET)] for i in range(n))
    return f"S{sidx} {seq} {body}|".encode()


# ------------------------------------------------------------------ the client engine

class Engine:
    """Every client of the soak, in one thread: a selector and a timer heap."""

    def __init__(self, echo_port: int, chat_port: int, seed: int = 7) -> None:
        self.ports = {"echo": echo_port, "chat": chat_port}
        self.sel = selectors.DefaultSelector()
        self.timers: list = []
        self.seq = itertools.count()
        self.rng = random.Random(seed)
        self.stopping = False     # the thread must end now
        self.draining = False     # no new lines, no new churn sessions: let everything settle
        self.hold = False         # churn sessions stay connected once they have exchanged
        self.stats: dict[str, int] = {}
        self.errors: list[str] = []
        self.crash: str | None = None
        self.conns: set[Conn] = set()
        self.echo_steady: list[EchoSteady] = []
        self.members: list[ChatMember] = []
        self.senders: list[ChatMember] = []
        self.slots: list[ChurnSlot] = []
        self.snapshot: dict = {}
        self.churn_started = False

    # -- bookkeeping
    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def error(self, msg: str) -> None:
        self.count("errors")
        if len(self.errors) < 40:
            self.errors.append(f"{time.strftime('%H:%M:%S')} {msg}")

    def call_later(self, delay: float, fn) -> None:
        heapq.heappush(self.timers, (time.monotonic() + delay, next(self.seq), fn))

    # -- the thread
    def run(self) -> None:
        try:
            self.setup()
            next_snapshot = 0.0
            while not self.stopping:
                now = time.monotonic()
                while self.timers and self.timers[0][0] <= now:
                    _, _, fn = heapq.heappop(self.timers)
                    fn()
                timeout = 0.05
                if self.timers:
                    timeout = max(0.0, min(timeout, self.timers[0][0] - time.monotonic()))
                for key, mask in self.sel.select(timeout):
                    key.data.ready(mask)
                if now >= next_snapshot:
                    self.take_snapshot(now)
                    next_snapshot = now + 0.2
        except BaseException:
            self.crash = traceback.format_exc()
        finally:
            for conn in list(self.conns):
                conn.close()
            self.sel.close()

    def setup(self) -> None:
        for i in range(ECHO_STEADY):
            self.echo_steady.append(EchoSteady(self, i))
        for i in range(CHAT_MEMBERS):
            member = ChatMember(self, i, sender=i < CHAT_SENDERS)
            self.members.append(member)
            if member.sender is not None:
                self.senders.append(member)

    def member_welcomed(self) -> None:
        """Senders start once every member is in the room, so each member can expect every line."""
        if all(m.nick for m in self.members) and not self.churn_started:
            self.churn_started = True
            for s in self.senders:
                self.call_later(self.rng.uniform(0, CHAT_PERIOD), s.tick)
            for daemon in ("echo", "chat"):
                for i in range(CHURN_SLOTS):
                    slot = ChurnSlot(self, daemon, i)
                    self.slots.append(slot)
                    self.call_later(4.0 * i / CHURN_SLOTS, slot.start_session)

    def take_snapshot(self, now: float) -> None:
        echo_pending = sum(len(c.expected) for c in self.echo_steady)
        oldest = min((c.pending_since for c in self.echo_steady if c.pending_since), default=None)
        if oldest is not None and now - oldest > STALL_S:
            for c in self.echo_steady:
                if c.pending_since and now - c.pending_since > STALL_S and not c.stall_reported:
                    c.stall_reported = True
                    self.error(f"echo client {c.cid}: no echo for {now - c.pending_since:.1f} s, "
                               f"{len(c.expected)} bytes outstanding")
        chat_missing = 0
        for m in self.members:
            for s in self.senders:
                if s is not m:
                    chat_missing += s.sender_seq - m.next_seq[s.sender]
        self.snapshot = {
            "steady_ready": sum(c.connected for c in self.echo_steady) == ECHO_STEADY
            and self.churn_started,
            "echo_pending": echo_pending,
            "chat_missing": chat_missing,
            "held": sum(1 for s in self.slots if s.session is not None and s.session.held),
            "slots": len(self.slots),
            "churn_active": sum(1 for s in self.slots if s.session is not None),
            "stats": dict(self.stats),
        }

    def lost(self) -> dict:
        """Lines sent by steady clients and never answered (called once the thread has ended)."""
        echo_lost = sum(c.expected.count(b"\n") for c in self.echo_steady)
        chat_lost = 0
        for m in self.members:
            for s in self.senders:
                if s is not m:
                    chat_lost += s.sender_seq - m.next_seq[s.sender]
        return {"echo": echo_lost, "chat": chat_lost}


class Conn:
    """One non-blocking client socket in the engine."""

    daemon = "echo"

    def __init__(self, eng: Engine, tag: str) -> None:
        self.eng = eng
        self.tag = tag
        self.out = b""
        self.connected = False
        self.closed = False
        self.mask = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        eng.conns.add(self)
        eng.count(f"{tag}.attempts")
        err = self.sock.connect_ex((HOST, eng.ports[self.daemon]))
        if err not in (0, errno.EINPROGRESS):
            self.failed("refused" if err == errno.ECONNREFUSED else f"connect error {errno.errorcode.get(err, err)}")
            return
        self.interest(selectors.EVENT_WRITE)
        eng.call_later(10.0, self.connect_deadline)

    def interest(self, mask: int) -> None:
        if self.closed or mask == self.mask:
            return
        if self.mask == 0:
            self.eng.sel.register(self.sock, mask, self)
        elif mask == 0:
            self.eng.sel.unregister(self.sock)
        else:
            self.eng.sel.modify(self.sock, mask, self)
        self.mask = mask

    def connect_deadline(self) -> None:
        if not self.connected and not self.closed:
            self.failed("connect timed out")

    def failed(self, why: str) -> None:
        """A connection that should have worked did not: refused, reset, or closed on us."""
        kind = "refused" if why == "refused" else "reset"
        self.eng.count(f"{self.tag}.{kind}")
        self.eng.error(f"{self.tag} {getattr(self, 'name', '')}: {why}")
        self.close()
        self.finished(ok=False)

    def finished(self, ok: bool) -> None:
        """The connection's life is over (subclasses: what comes next)."""

    def close(self, rst: bool = False) -> None:
        if self.closed:
            return
        if rst:
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
        self.interest(0)
        self.closed = True
        self.sock.close()
        self.eng.conns.discard(self)

    def ready(self, mask: int) -> None:
        if self.closed:
            return
        if not self.connected:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.failed("refused" if err == errno.ECONNREFUSED else f"connect error {errno.errorcode.get(err, err)}")
                return
            self.connected = True
            self.eng.count(f"{self.tag}.connected")
            self.interest(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))
            self.on_connect()
            return
        if mask & selectors.EVENT_READ:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                data = None
            except OSError as e:
                self.on_reset(e)
                return
            if data:
                self.on_data(data)
            elif data == b"":
                self.on_eof()
        if not self.closed and mask & selectors.EVENT_WRITE:
            self.flush()

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        self.out += data
        if self.connected:
            self.flush()

    def flush(self) -> None:
        while self.out and not self.closed:
            try:
                n = self.sock.send(self.out)
            except BlockingIOError:
                break
            except OSError as e:
                self.on_reset(e)
                return
            self.out = self.out[n:]
        if not self.closed:
            self.interest(selectors.EVENT_READ | (selectors.EVENT_WRITE if self.out else 0))

    def on_connect(self) -> None:
        pass

    def on_data(self, data: bytes) -> None:
        pass

    def on_eof(self) -> None:
        self.failed("closed by the server")

    def on_reset(self, exc: OSError) -> None:
        self.failed(f"reset ({exc!r})")


class EchoSteady(Conn):
    """Sends numbered lines at a modest rate for the whole soak; checks every echoed byte."""

    daemon = "echo"

    def __init__(self, eng: Engine, cid: int) -> None:
        self.cid = cid
        self.name = f"echo{cid}"
        self.expected = b""
        self.pending_since = 0.0
        self.stall_reported = False
        self.line_no = 0
        self.rng = random.Random(1000 + cid)
        super().__init__(eng, "echo.steady")

    def on_connect(self) -> None:
        self.eng.call_later(self.rng.uniform(0, ECHO_PERIOD), self.tick)

    def make_line(self) -> bytes:
        self.line_no += 1
        n = self.rng.randrange(0, 300)
        start = self.rng.randrange(0, len(ECHO_PATTERN) - n)
        end = b"\r\n" if self.line_no % 3 == 0 else b"\n"
        return b"e%02d %07d " % (self.cid, self.line_no) + ECHO_PATTERN[start:start + n] + end

    def tick(self) -> None:
        if self.closed or self.eng.draining:
            return
        data = b"".join(self.make_line() for _ in range(self.rng.choice((1, 1, 2, 3))))
        if not self.expected:
            self.pending_since = time.monotonic()
        self.expected += data
        self.eng.count("echo.steady.sent", data.count(b"\n"))
        if self.line_no % 10 == 0 and len(data) > 4:
            cut = self.rng.randrange(1, len(data) - 1)   # one line split across two segments
            self.send(data[:cut])
            self.eng.call_later(0.03, lambda rest=data[cut:]: self.send(rest))
        else:
            self.send(data)
        self.eng.call_later(ECHO_PERIOD * self.rng.uniform(0.6, 1.4), self.tick)

    def on_data(self, data: bytes) -> None:
        if data != self.expected[:len(data)]:
            self.eng.count("echo.steady.garbled")
            self.eng.error(f"echo{self.cid}: got {data[:120]!r}, expected {self.expected[:120]!r}")
            self.expected = b""   # resynchronising is hopeless; stop checking this client
            self.close()
            return
        self.expected = self.expected[len(data):]
        self.eng.count("echo.steady.lines", data.count(b"\n"))
        self.pending_since = time.monotonic() if self.expected else 0.0


class ChatMember(Conn):
    """A member of #lobby for the whole soak; some send numbered lines.

    Every member checks each line it receives: CRLF-terminated, one of the notices a room
    produces, a churn client's line, or a sender's numbered line, which must be the next one
    of that sender and byte-exact."""

    daemon = "chat"

    def __init__(self, eng: Engine, cid: int, sender: bool) -> None:
        self.cid = cid
        self.name = f"member{cid}"
        self.nick = ""
        self.buf = b""
        self.sender = cid if sender else None
        self.sender_seq = 0            # lines sent, when a sender
        self.next_seq = {s: 0 for s in range(CHAT_SENDERS)}   # next expected line of each sender
        self.rng = random.Random(2000 + cid)
        super().__init__(eng, "chat.steady")

    def tick(self) -> None:
        if self.closed or self.eng.draining:
            return
        lines = []
        for _ in range(self.rng.choice((1, 1, 2))):
            lines.append(chat_text(self.sender, self.sender_seq) + b"\n")
            self.sender_seq += 1
        self.eng.count("chat.steady.sent", len(lines))
        self.send(b"".join(lines))
        self.eng.call_later(CHAT_PERIOD * self.rng.uniform(0.6, 1.4), self.tick)

    def on_data(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            if self.closed:
                return
            if not raw.endswith(b"\r"):
                self.garbled(f"a line without CRLF: {raw[:120]!r}")
                continue
            self.line(raw[:-1])

    def garbled(self, what: str) -> None:
        self.eng.count("chat.steady.garbled")
        self.eng.error(f"member{self.cid} ({self.nick}): {what}")

    def line(self, text: bytes) -> None:
        if not self.nick:
            m = WELCOME.fullmatch(text)
            if not m:
                return self.garbled(f"expected the welcome, got {text[:120]!r}")
            self.nick = m.group(1).decode()
            self.eng.member_welcomed()
            return
        m = SAID.fullmatch(text)
        if m:
            nick, said = m.group(1).decode(), m.group(2)
            sender = next((s for s in self.eng.senders if s.nick == nick), None)
            if sender is None:
                if not (nick.startswith("guest") and CHURN_CHAT_LINE.fullmatch(said)):
                    self.garbled(f"an unexpected line: {text[:120]!r}")
                return
            sm = STEADY_LINE.fullmatch(said)
            if not sm or int(sm.group(1)) != sender.sender:
                return self.garbled(f"a garbled line from {nick}: {text[:120]!r}")
            sidx, seq = sender.sender, int(sm.group(2))
            want = self.next_seq[sidx]
            if seq != want:
                return self.garbled(f"line {seq} of sender {sidx} where {want} was due")
            if said != chat_text(sidx, seq):
                return self.garbled(f"line {seq} of sender {sidx} differs: {said[:120]!r}")
            self.next_seq[sidx] = seq + 1
            self.eng.count("chat.steady.lines")
            return
        if not NOTICE_OK.fullmatch(text):
            self.garbled(f"an unexpected line: {text[:120]!r}")


class ChurnSlot:
    """One churn client after another on one daemon: connect, exchange, leave, pause, again."""

    def __init__(self, eng: Engine, daemon: str, index: int) -> None:
        self.eng = eng
        self.daemon = daemon
        self.index = index
        self.sessions = 0
        self.session: EchoChurn | ChatChurn | None = None
        self.rng = random.Random(f"{daemon}{index}")

    def start_session(self) -> None:
        if self.eng.draining or self.eng.stopping:
            return
        self.sessions += 1
        cls = EchoChurn if self.daemon == "echo" else ChatChurn
        session = cls(self.eng, self, self.sessions)
        if not session.done:   # a connect that failed at once has already called session_over
            self.session = session

    def session_over(self) -> None:
        self.session = None
        self.eng.call_later(self.rng.uniform(0.2, 0.8), self.start_session)


class ChurnBase(Conn):
    """What both kinds of churn client share: the exchange, the hold, the four ways to leave."""

    LEAVES = ("halfclose", "tail", "abrupt", "rst")

    def __init__(self, eng: Engine, slot: ChurnSlot, k: int) -> None:
        self.slot = slot
        self.k = k
        self.name = f"{slot.daemon}-churn{slot.index}.{k}"
        self.leave = self.LEAVES[(k + slot.index) % 4]
        self.held = False
        self.leaving = False
        self.done = False
        self.deadline_token = object()
        super().__init__(eng, f"{slot.daemon}.churn")

    def exchanged(self) -> None:
        """All lines exchanged: hold (a checkpoint is being taken) or leave."""
        if self.eng.hold and not self.eng.draining:
            self.held = True
            self.eng.call_later(0.1, self.check_hold)
        else:
            self.start_leaving()

    def check_hold(self) -> None:
        if self.closed:
            return
        if self.eng.hold and not self.eng.draining:
            self.eng.call_later(0.1, self.check_hold)
        else:
            self.held = False
            self.start_leaving()

    def start_leaving(self) -> None:
        self.leaving = True
        if self.leave == "abrupt":
            self.close()
            self.finished(ok=True)
        elif self.leave == "rst":
            self.send(self.last_words())   # perhaps unanswered: the RST discards the answer
            self.close(rst=True)
            self.finished(ok=True)
        else:
            self.say_goodbye()
            self.eng.call_later(STALL_S, self.leave_deadline)

    def leave_deadline(self) -> None:
        if not self.closed:
            self.failed("no EOF after leaving")

    def on_eof(self) -> None:
        if not self.leaving:
            return self.failed("closed by the server before leaving")
        self.check_last()
        if not self.closed:
            self.close()
            self.finished(ok=True)

    def on_reset(self, exc: OSError) -> None:
        self.failed(f"reset ({exc!r})" + (" while leaving" if self.leaving else ""))

    def finished(self, ok: bool) -> None:
        if self.done:
            return
        self.done = True
        if ok:
            self.eng.count(f"{self.slot.daemon}.churn.ok")
        self.slot.session_over()

    def say_goodbye(self) -> None:
        raise NotImplementedError

    def last_words(self) -> bytes:
        return b"C%d %d hello 9\n" % (self.slot.index, self.k)

    def check_last(self) -> None:
        pass


class EchoChurn(ChurnBase):
    daemon = "echo"

    def __init__(self, eng: Engine, slot: ChurnSlot, k: int) -> None:
        self.expected = b""
        self.sent = 0
        super().__init__(eng, slot, k)

    def on_connect(self) -> None:
        self.next_line()

    def next_line(self) -> None:
        if self.closed:
            return
        self.sent += 1
        line = b"c%d %d %d %s\n" % (self.slot.index, self.k, self.sent, ECHO_PATTERN[self.sent * 50:self.sent * 50 + 40])
        self.expected += line
        self.send(line)
        self.eng.count("echo.churn.sent")
        self.eng.call_later(STALL_S, lambda n=self.sent: self.line_deadline(n))

    def line_deadline(self, n: int) -> None:
        if not self.closed and not self.leaving and self.sent == n and self.expected:
            self.failed(f"no echo of line {n} after {STALL_S} s")

    def on_data(self, data: bytes) -> None:
        if data != self.expected[:len(data)]:
            self.eng.count("echo.churn.garbled")
            self.failed(f"got {data[:100]!r}, expected {self.expected[:100]!r}")
            return
        self.expected = self.expected[len(data):]
        self.eng.count("echo.churn.lines", data.count(b"\n"))
        if self.expected or self.leaving:
            return
        if self.sent < CHURN_LINES:
            self.eng.call_later(CHURN_GAP, self.next_line)
        else:
            self.exchanged()

    def say_goodbye(self) -> None:
        if self.leave == "tail":
            tail = b"tail %d %d" % (self.slot.index, self.k)
            self.expected += tail
            self.send(tail)
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self.on_reset(e)

    def check_last(self) -> None:
        if self.expected:
            self.eng.count("echo.churn.garbled")
            self.failed(f"EOF with {self.expected!r} not echoed")


class ChatChurn(ChurnBase):
    daemon = "chat"
    LEAVES = ("halfclose", "quit", "abrupt", "rst")

    def __init__(self, eng: Engine, slot: ChurnSlot, k: int) -> None:
        self.buf = b""
        self.nick = ""
        self.rosters = 0
        self.sent = 0
        self.asked = False
        super().__init__(eng, slot, k)

    def on_data(self, data: bytes) -> None:
        self.buf += data
        *lines, self.buf = self.buf.split(b"\n")
        for raw in lines:
            if self.closed:
                return
            if not raw.endswith(b"\r"):
                return self.garbled(f"a line without CRLF: {raw[:100]!r}")
            text = raw[:-1]
            if not self.nick:
                m = WELCOME.fullmatch(text)
                if not m:
                    return self.garbled(f"expected the welcome, got {text[:100]!r}")
                self.nick = m.group(1).decode()
                continue
            if text.startswith(b"*** #lobby: "):
                self.rosters += 1
                names = text[len(b"*** #lobby: "):].decode().split(", ")
                # on arrival the roster names the others; the answer to /who, everyone
                if (self.nick in names) != (self.rosters > 1) or len(names) < CHAT_MEMBERS:
                    return self.garbled(f"roster {self.rosters} of {self.nick}: {text[:100]!r}")
                if self.rosters == 1:
                    self.eng.call_later(0.05, self.say)
                elif self.asked and self.rosters == 2:
                    self.eng.count("chat.churn.lines")
                    self.exchanged()
                continue
            m = SAID.fullmatch(text)
            if m and (STEADY_LINE.fullmatch(m.group(2)) or CHURN_CHAT_LINE.fullmatch(m.group(2))):
                continue
            if not NOTICE_OK.fullmatch(text):
                return self.garbled(f"an unexpected line: {text[:100]!r}")

    def garbled(self, what: str) -> None:
        self.eng.count("chat.churn.garbled")
        self.failed(what)

    def say(self) -> None:
        if self.closed or self.leaving:
            return
        self.sent += 1
        if self.sent < CHURN_LINES:
            self.send(b"C%d %d hello %d\n" % (self.slot.index, self.k, self.sent))
            self.eng.count("chat.churn.sent")
            self.eng.call_later(CHURN_GAP, self.say)
        else:
            self.asked = True
            self.send(b"/who\n")
            self.eng.call_later(STALL_S, self.who_deadline)

    def who_deadline(self) -> None:
        if not self.closed and not self.leaving and self.rosters < 2:
            self.failed(f"no answer to /who after {STALL_S} s")

    def say_goodbye(self) -> None:
        if self.leave == "quit":
            self.send(b"/quit bye %d\n" % self.k)
        else:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as e:
                self.on_reset(e)


# ------------------------------------------------------------------ the daemons

def limits_text(mode: str, variant: str) -> str:
    text = "[limits]\nmax_clients_per_ip = 0\n"
    text += "".join(f"{k} = {v}\n" for k, v in LIMITS[variant].items())
    if mode == "chat":
        text += "rate = 0\n"
    return text


def measure(pid: int) -> tuple[int, int]:
    """(VmRSS in KiB, open descriptors)."""
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    raw = open(f"/proc/{pid}/stat", "rb").read().rsplit(b")", 1)[1].split()
    return (int(raw[11]) + int(raw[12])) / os.sysconf("SC_CLK_TCK")


def state_clients(inst) -> int | None:
    try:
        return json.loads((inst.dir / "chatd.state").read_text())["clients"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_mixed_traffic_churn_and_restarts(make_chatd):
    duration = SOAK_SECONDS
    cycles = max(2, int(round(duration / RESTART_EVERY)))
    echo = make_chatd(name="echo")
    chat = make_chatd(name="chat")
    daemons = {"echo": echo, "chat": chat}
    variant = {"echo": "A", "chat": "A"}
    for mode, inst in daemons.items():
        inst.write_config(mode=mode, extra=limits_text(mode, "A"))
        inst.start()
    pids = {mode: inst.pid() for mode, inst in daemons.items()}
    starttimes = {mode: proc_stat(pid)["starttime"] for mode, pid in pids.items()}
    cpu0 = {mode: cpu_seconds(pid) for mode, pid in pids.items()}
    expected_clients = {"echo": ECHO_STEADY + CHURN_SLOTS, "chat": CHAT_MEMBERS + CHURN_SLOTS}

    eng = Engine(echo.port, chat.port)
    thread = threading.Thread(target=eng.run, name="soak-clients", daemon=True)
    samples: list[dict] = []
    checkpoints: dict[str, dict] = {}
    restarts: list[str] = []
    self_cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def engine_ok() -> None:
        assert eng.crash is None, f"the client engine crashed:\n{eng.crash}"
        assert thread.is_alive(), "the client engine stopped"

    def check_pids() -> None:
        for mode, inst in daemons.items():
            pid = pids[mode]
            assert inst.pid() == pid, f"{mode}: the pid file now says {inst.pid()}, not {pid}"
            assert alive(pid) and proc_stat(pid)["starttime"] == starttimes[mode], f"{mode}: pid {pid} is gone"

    def sample(label: str, t0: float) -> dict:
        check_pids()
        s = {"t": time.monotonic() - t0, "label": label, "stats": dict(eng.snapshot.get("stats", {}))}
        for mode, inst in daemons.items():
            s[mode] = measure(pids[mode]) + (state_clients(inst),)
        samples.append(s)
        return s

    def wait_until(predicate, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            engine_ok()
            assert time.monotonic() < deadline, (
                f"timed out after {timeout} s waiting for {what}; clients: {eng.snapshot}; "
                f"state files: {[state_clients(inst) for inst in daemons.values()]}; errors: {eng.errors}")
            time.sleep(0.1)

    def checkpoint(label: str, t0: float) -> None:
        """Hold every churn slot connected, so the population is exactly the peak; sample."""
        eng.hold = True
        try:
            wait_until(lambda: eng.snapshot.get("held") == eng.snapshot.get("slots") == 2 * CHURN_SLOTS,
                       20, "every churn slot to be held connected")
            wait_until(lambda: all(state_clients(inst) == expected_clients[mode]
                                   for mode, inst in daemons.items()),
                       10, f"the state files to count {expected_clients}")
            time.sleep(0.5)
            checkpoints[label] = sample(label, t0)
        finally:
            eng.hold = False

    def restart(k: int) -> None:
        """Restart k (from 1): odd ones change [limits], even ones only touch the config."""
        for mode, inst in daemons.items():
            if k % 2 == 1:
                variant[mode] = "B" if variant[mode] == "A" else "A"
            inst.write_config(mode=mode, extra=limits_text(mode, variant[mode]))
            os.utime(inst.config)
            t = time.monotonic()
            proc = inst.cmd("restart", check=0, timeout=60)
            out = proc.stdout.decode(errors="replace").strip().replace("\n", " | ")
            restarts.append(f"#{k} {mode} {variant[mode]} {time.monotonic() - t:.2f}s: {out[:150]}")

    thread.start()
    try:
        wait_until(lambda: eng.snapshot.get("steady_ready"), 30, "the steady clients to connect")
        t0 = time.monotonic()
        next_sample = t0 + SAMPLE_EVERY
        for k in range(1, cycles + 1):
            restart_at = t0 + k * RESTART_EVERY
            hold_at = restart_at - 8.0 if k in (2, cycles) else None
            while time.monotonic() < restart_at:
                engine_ok()
                now = time.monotonic()
                if hold_at is not None and now >= hold_at:
                    checkpoint("warm" if k == 2 else "end", t0)
                    if k == 2 and cycles == 2:
                        checkpoints["end"] = checkpoints["warm"]
                    hold_at = None
                    continue
                if now >= next_sample:
                    sample("", t0)
                    next_sample += SAMPLE_EVERY
                    continue
                time.sleep(min(0.1, max(0.0, restart_at - now)))
            restart(k)
        # a short tail after the last restart, then drain: nothing new, everything answered
        tail_end = time.monotonic() + SAMPLE_EVERY
        while time.monotonic() < tail_end:
            engine_ok()
            time.sleep(0.1)
        sample("tail", t0)
        eng.draining = True
        wait_until(lambda: (eng.snapshot.get("echo_pending") == 0 and eng.snapshot.get("chat_missing") == 0
                            and eng.snapshot.get("churn_active") == 0), 30,
                   "every steady line to be answered and the churn to end")
        time.sleep(0.3)
        elapsed = time.monotonic() - t0
    finally:
        eng.stopping = True
        thread.join(timeout=30)
        assert not thread.is_alive(), "the client engine did not stop"
    assert eng.crash is None, eng.crash
    check_pids()

    stats = eng.stats
    lost = eng.lost()
    self_cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = {mode: cpu_seconds(pid) - cpu0[mode] for mode, pid in pids.items()}
    warm, end = checkpoints["warm"], checkpoints["end"]

    print("\nsoak samples (t s: echo rss MiB/fds/clients ; chat rss MiB/fds/clients) [* checkpoint]:")
    row = []
    for s in samples:
        e, c = s["echo"], s["chat"]
        mark = {"warm": "*W", "end": "*E", "tail": "~"}.get(s["label"], "")
        row.append(f"{s['t']:4.0f}{mark}: {e[0] / 1024:.1f}/{e[1]}/{e[2]} ; {c[0] / 1024:.1f}/{c[1]}/{c[2]}")
        if len(row) == 3:
            print("  " + "  |  ".join(row))
            row = []
    if row:
        print("  " + "  |  ".join(row))
    print("restarts:")
    for r in restarts:
        print("  " + r)
    print("engine counters: " + " ".join(f"{k}={v}" for k, v in sorted(stats.items())))
    print(f"cpu: echo={cpu['echo']:.1f}s chat={cpu['chat']:.1f}s test="
          f"{self_cpu1.ru_utime + self_cpu1.ru_stime - self_cpu0.ru_utime - self_cpu0.ru_stime:.1f}s "
          f"churn rate={(stats.get('echo.churn.attempts', 0) + stats.get('chat.churn.attempts', 0)) / elapsed:.1f}/s "
          f"(both daemons)")
    lines = sum(stats.get(k, 0) for k in ("echo.steady.lines", "chat.steady.lines", "echo.churn.lines",
                                           "chat.churn.lines"))
    refused = stats.get("echo.churn.refused", 0) + stats.get("chat.churn.refused", 0)
    resets = stats.get("echo.churn.reset", 0) + stats.get("chat.churn.reset", 0)
    print(f"FIGURES soak: duration={elapsed:.0f}s echo_rss_warm={warm['echo'][0]}kB echo_rss_end={end['echo'][0]}kB "
          f"echo_fds_warm={warm['echo'][1]} echo_fds_end={end['echo'][1]} "
          f"chat_rss_warm={warm['chat'][0]}kB chat_rss_end={end['chat'][0]}kB "
          f"chat_fds_warm={warm['chat'][1]} chat_fds_end={end['chat'][1]} "
          f"lines={lines} lost={lost['echo'] + lost['chat']} refused={refused} resets={resets} "
          f"errors={stats.get('errors', 0)} restarts={len(restarts)}")
    if eng.errors:
        print("first errors:\n  " + "\n  ".join(eng.errors))

    assert eng.errors == [], "\n".join(eng.errors)
    assert lost == {"echo": 0, "chat": 0}, lost
    assert refused == 0 and resets == 0
    assert stats.get("echo.steady.garbled", 0) == stats.get("chat.steady.garbled", 0) == 0
    assert stats.get("echo.steady.lines", 0) == stats.get("echo.steady.sent", 0)
    assert stats.get("echo.churn.ok", 0) > 0 and stats.get("chat.churn.ok", 0) > 0
    assert len(restarts) == 2 * cycles
    for mode in daemons:
        for i, what in ((0, "RSS"), (1, "descriptors")):
            before, after = warm[mode][i], end[mode][i]
            assert abs(after - before) <= TOLERANCE * before, (
                f"{mode} daemon: {what} {before} after warm-up, {after} at the end "
                f"({(after - before) / before:+.1%}, more than {TOLERANCE:.0%})")
        assert "Traceback" not in daemons[mode].log_text(), daemons[mode].log_text()[-3000:]
