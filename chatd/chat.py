"""Chat mode's connection (README "Chat mode"): lines in, limits, and a bounded output queue.

The path of a line: `data_received` -> `LineDecoder.feed` (LF, CRLF or CR NUL;
telnet; the length bound) -> `clean_text` -> the token bucket -> `said`, the one
way into the `ChatService` of rooms.py, which holds what a pass of the loop
produces and then sends each recipient its share with `send`, or `send_batch`
(one write). Every line takes a token, empty and control-only ones too, and so does every telnet command
byte: input that shows nothing still costs its sender. Three fast paths give the
same bytes: a read whose lines are all printable ASCII and no command is prefixed
as one block, such a single line skips `clean_text`, and lines that clean to
nothing are charged and dropped a run at a time (`VOID_LINES`).
`send` never waits: what the kernel does not take queues in the transport and
the connection's outbox (connection.py). Up to the client's budget, that queue
is the client's own affair. Past it, only what someone said is queued, at the
sayer's charge: a client may have at most its own budget (its ledger entries
included) queued past others' budgets, and a recipient at most its own budget
queued past it, whoever the sayers (a sayer that left, or reconnected with a
clean slate, still counts there until that output drains); what would take more
is not queued there, and the sayer is warned, at most once a second. The
server's notices and replies are never queued past a budget. So twenty clients bursting at one reader
cannot get it dropped, and chatd holds at most two budgets per client. "Too slow"
is judged over time: a client whose output went past its budget and that takes
less than a line in SLOW_TICKS ticks of SLOW_S seconds is dropped (`too_slow`), and nobody
waits. Several ticks, because the server sees a reader's progress only when the kernel
reopens its receive window, in steps of up to an MSS (64 KiB on loopback): a reader taking
16 KiB every 0.1 s shows no progress for 0.7 s at a time, one at half that pace for 1.4 s.

Tests: tests/process/test_chat.py, tests/process/test_chat_abuse.py, tests/process/test_chat_targeted.py, tests/unit/test_chat_paths.py, tests/unit/test_debug_connection.py, tests/process/test_fair_share.py, tests/unit/test_upgrade_parts.py
"""

from __future__ import annotations

import collections
import logging
import re
import socket
import struct
from typing import Any

from .connection import DEBUG_SLOTS, Connection, DebugConnection, unsent_bytes
from .protocol import LINE_TOO_LONG, TelnetReply, clean_text
from .rooms import error, notice
from .tls import certificate_nick

log = logging.getLogger("chatd")
FLOOD_WINDOW_S = 10.0      # `burst` dropped lines within this window disconnect a client
SLOW_S = 1.0               # past its budget, a client is judged this often...
SLOW_TICKS = 3             # ...and must have taken a line's worth in the last this many
WARN_S = 1.0               # at most one warning a second to a sender whose lines were dropped
LEDGER_ENTRY = 128         # what one entry of a recipient's `charges` costs, charged as bytes
UNREAD = error("others are not reading your lines fast enough, some were dropped")
_fanned = b""   # what `fanout` is writing: a member whose transport it pauses keeps it as `tail`
PLAIN_LINE = re.compile(rb"[\x20-\x7e\t]*")   # printable ASCII and TAB: nothing to sanitize
PLAIN_BLOCK = re.compile(rb"(?:[\x20\t]*[\x21-\x7e][\x20-\x7e\t]*\n)+")   # such lines, none blank
# Lines that clean to nothing (README "Chat mode"), a run at a time: blanks, C0 and C1
# controls, DEL, bidi controls, CSI and OSC sequences (an OSC ends at the line's end, as
# clean_text's does). Each element is atomic, so it is taken as clean_text's scan takes it.
VOID_LINES = re.compile(rb"^(?:(?>\x1b\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
                        rb"|\x1b\](?:[^\x07\x1b\n]|\x1b(?!\\))*(?:\x07|\x1b\\)?"
                        rb"|[\x00-\x09\x0b-\x20\x7f]|\xc2[\x80-\x9f]"
                        rb"|\xe2\x80[\xaa-\xae]|\xe2\x81[\xa6-\xa9])*\n)+",
                        re.MULTILINE)
# The bytes that are void alone (ESC is not: what follows it may be visible), LF included.
VOID_BYTES = bytes([*range(0x00, 0x1b), *range(0x1c, 0x21), 0x7f])


class ChatConnection(Connection):
    """A client of chat mode."""

    __slots__ = ("nick", "room", "tokens", "refilled", "dropped", "owed", "warned", "charges",
                 "billed", "watch", "mark", "handed", "takes")
    FULL_LINE = b"*** server full\r\n"
    SLOW_DOWN_LINE = b"*** too many connections, slow down\r\n"
    CR_NUL_ENDS_LINE = True
    MODE = "chat"

    def __init__(self, state: Any, ip: str = "?", peer: str = "?") -> None:
        super().__init__(state, ip, peer)
        self.nick = ""
        self.room = ""
        self.tokens = float(state.limits.burst)   # the bucket is full at connect
        self.refilled = 0.0
        self.dropped: collections.deque[float] = collections.deque()
        self.owed = 0             # bytes of ours queued past others' budgets (see `send`)
        self.warned = -WARN_S     # when we were last told that some of our lines were dropped
        self.charges: dict[ChatConnection, int] | None = None   # whose lines pass our budget
        self.billed = 0           # their total, ledger entries included: at most our budget
        self.watch: Any = None    # the timer judging "too slow" while we are past our budget
        self.mark = 0             # unsent bytes (transport and kernel) when `watch` was set
        self.handed = 0           # bytes handed to the transport since then (outbox and writes)
        self.takes: list[int] = []   # what it took in each of the last SLOW_TICKS ticks

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.refilled = self.state.loop.time()
        self.state.chat.arrive(self)
        nick = certificate_nick(transport)   # [tls] client_ca: the certificate names the client
        if nick:
            self.state.chat.said(self, "/nick " + nick)

    # ------------------------------------------------------------ input

    def consume(self, data: bytes) -> None:
        self.active = True
        self.in_bytes += len(data)
        self.in_lines += data.count(b"\n")
        items = self.decode(data)
        if self.commands:   # telnet commands take tokens as lines do
            self._charge(self.commands)
            self.commands = 0
        self._lines(items)
        self.take_share(len(data))

    data_received = consume

    def eof_received(self) -> bool:
        """The client half-closed: it has left. Its last line counts; what is queued is flushed."""
        self._lines(self.finish())
        self._leave("connection closed")
        self.reason = self.reason or "client closed"
        self.flush()
        return False

    def _lines(self, items: list) -> None:
        for item in items:
            if self.closing:
                return
            if item.__class__ is TelnetReply:
                self.state.chat.tell(self, item)
            elif item is LINE_TOO_LONG:
                self.state.chat.tell(self, error(f"line too long (max {self.max_line} bytes), dropped"))
            elif not self._say_block(item):
                n = item.count(b"\n")
                if self._has_tokens(n):
                    # Lines that clean to nothing take a token each, like any line; with a
                    # token for every line here, the order they are taken in changes nothing.
                    if not item.translate(None, VOID_BYTES) or self._void_flood(item):
                        self._charge(n)
                        continue
                    item = VOID_LINES.sub(b"", item)
                    self._charge(n - item.count(b"\n"))
                    if not item:
                        continue
                chat = self.state.chat
                lines = item.split(b"\n")
                if not lines[-1]:
                    lines.pop()   # what follows the last LF: nothing
                for raw in lines:
                    if self.closing:
                        return
                    if raw[-1:] == b"\r":
                        raw = raw[:-1]
                    if PLAIN_LINE.fullmatch(raw) and raw[:1] != b"/":
                        # Printable ASCII that is no command: clean_text would change nothing,
                        # so the bytes go out as they came, prefixed (the common case, fast).
                        if self._take_token() and raw.strip() and not self.closing:
                            chat.said(self, raw + b"\n")
                        continue
                    text = clean_text(raw)
                    if self._take_token() and text.strip() and not self.closing:
                        chat.said(self, text)

    @staticmethod
    def _void_flood(block: bytes) -> bool:
        """Is `block` one line that cleans to nothing, repeated (what a flood sends)? One
        comparison tells, where VOID_LINES would take its lines one by one."""
        first = block[:block.find(b"\n") + 1]
        return (VOID_LINES.fullmatch(first) is not None
                and block == first * (len(block) // len(first)))

    def _say_block(self, block: bytes) -> bool:
        """All the lines of one read at once, when each is printable ASCII with a visible
        character and none is a command, and the bucket has a token for each: one block,
        which the service prefixes with one replace. False: take the lines one by one."""
        if b"\r" in block:
            block = block.replace(b"\r\n", b"\n")   # a bare CR left over fails the match
        if block[:1] == b"/" or b"\n/" in block or not PLAIN_BLOCK.fullmatch(block):
            return False
        if self.state.limits.rate and not self._take_tokens(block.count(b"\n")):
            return False
        self.state.chat.said(self, block)
        return True

    def _refill(self) -> float:
        """The token bucket holds `burst` tokens (full at connect) and refills at `rate` a
        second: bring it up to now, which it returns."""
        limits = self.state.limits
        now = self.state.loop.time()
        self.tokens = min(float(limits.burst), self.tokens + (now - self.refilled) * limits.rate)
        self.refilled = now
        return now

    def _has_tokens(self, n: int) -> bool:
        """Does the bucket hold `n` tokens (or is there no rate limit)?"""
        if not self.state.limits.rate:
            return True
        self._refill()
        return self.tokens >= n

    def _take_tokens(self, n: int) -> bool:
        """Take `n` tokens at once if the bucket holds them."""
        self._refill()
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def _take_token(self) -> bool:
        """One line's token, or the line is dropped (`_charge`)."""
        return self._charge(1) == 1

    def _charge(self, n: int) -> int:
        """A token for each of `n` inputs (lines, telnet command bytes); how many got one.

        Those without are dropped lines: the client is told (once for all `n`), and `burst`
        dropped lines within FLOOD_WINDOW_S disconnect it (`flooding`).
        """
        limits = self.state.limits
        if not limits.rate:
            return n
        now = self._refill()
        took = min(n, int(self.tokens))
        self.tokens -= took
        if took == n:
            return n
        dropped = self.dropped
        dropped.extend([now] * min(n - took, limits.burst))
        while dropped[0] < now - FLOOD_WINDOW_S:
            dropped.popleft()
        if len(dropped) >= limits.burst:
            self._leave("flooding")
            self.close("flooding")
        else:
            self.state.chat.tell(self, error("slow down, line dropped"))
        return took

    # ------------------------------------------------------------ output

    def send(self, data: bytes, by: ChatConnection | None = None) -> None:
        """Queue `data` (said by `by`, or a notice) for this client; never waits (module
        docstring)."""
        outbox = self.outbox
        if outbox is not None:
            over = len(outbox) + len(data) + self.transport.get_write_buffer_size() - self.budget
            if over > 0:
                if self.watch is None:
                    self.takes = []
                    self._watch()
                if by is None or not self._bill(by, min(over, len(data))):
                    return
            outbox += data
        elif not self.closing and not self.transport.is_closing():
            # Nothing is queued (the client took everything): the write goes whole, as the
            # kernel takes much of it at once. is_closing: the loop may have found the peer
            # gone (reset) and not yet told us; asyncio logs every write after the fifth.
            # Counted as handed: written while `watch` runs, it is what the client takes.
            self.handed += len(data)
            self.transport.write(data)
            if self.outbox is not None:   # this write paused the transport (connection.queued)
                self.tail = data

    @staticmethod
    def fanout(members: dict[ChatConnection, None], data: bytes, skip: ChatConnection | None,
               by: ChatConnection | None) -> None:
        """One room's `data` to its members but `skip` (rooms.py's `fanout`): `send`, inlined
        for members with nothing queued, the common case. With a hundred members this loop
        is most of what chat costs in Python: inlined, it takes about 110 ns a member rather
        than 170 (Python 3.11, the write itself not counted)."""
        global _fanned
        _fanned = data   # once a call, not a check a member: `pause_writing` takes it
        n = len(data)
        for member in tuple(members):   # a send may drop a member
            if member is skip:
                continue
            if member.outbox is None:
                transport = member.transport
                if not member.closing and not transport.is_closing():
                    member.handed += n
                    transport.write(data)
            else:
                member.send(data, by)

    def send_batch(self, data: bytes, parts: list[tuple[bytes, ChatConnection | None]]) -> None:
        """What one pass of the loop holds for this client (rooms.py): `data`, the `parts`
        joined, in one write when nothing is queued and it fits the budget; else part by
        part, as `send` takes them (so each sayer is charged for its own)."""
        if (self.outbox is None and len(data) <= self.budget and not self.closing
                and not self.transport.is_closing()):
            self.handed += len(data)
            self.transport.write(data)
            if self.outbox is not None:
                self.tail = data
        else:
            for part, by in parts:
                self.send(part, by)

    def flush(self) -> None:
        """Last words: what this pass holds (our replies among it) goes out first."""
        self.state.chat.flush()
        super().flush()

    def _bill(self, by: ChatConnection, n: int) -> bool:
        """Charge `by` for `n` bytes queued past our budget (and LEDGER_ENTRY for a new
        entry), if both its budget and ours allow; else the data is not queued here, and
        `by` is warned (at most once in WARN_S). Our own bound is what holds when senders
        come and go: a new connection owes nothing, but what its predecessors queued here
        still counts against us."""
        charges = self.charges
        if charges is None:
            charges = self.charges = {}
        held = charges.get(by, 0)
        cost = n if held else n + LEDGER_ENTRY
        if by.owed + cost > by.budget or self.billed + cost > self.budget:
            now = self.state.loop.time()
            if now - by.warned >= WARN_S:
                by.warned = now
                self._refused(by)
            return False
        by.owed += cost
        self.billed += cost
        charges[by] = held + n
        return True

    def _refused(self, by: ChatConnection) -> None:
        """`by`'s lines are not all queued here: tell it, even past its own budget (a line
        a second at most), since that is where a sender busy bursting may well be."""
        if by.outbox is not None:
            by.outbox += UNREAD
        else:
            by.send(UNREAD)

    def _settle(self) -> None:
        """Give back to the senders what no longer waits past our budget, oldest charge first."""
        charges = self.charges
        if not charges:
            return
        surplus = sum(charges.values()) - max(0, self.unsent() - self.budget)
        for sender in list(charges):
            if surplus <= 0:
                break
            n = charges[sender]
            take = min(n, surplus)
            surplus -= take
            if take == n:
                del charges[sender]
                take += LEDGER_ENTRY
            else:
                charges[sender] = n - take
            sender.owed -= take
            self.billed -= take

    def pause_writing(self) -> None:
        """As any connection's; a write of `fanout` that pauses the transport is its tail
        (connection.queued). Every other write names its own tail after it, which wins."""
        super().pause_writing()
        self.tail = _fanned

    def resume_writing(self) -> None:
        """The transport drained: the outbox follows, and what drained is given back."""
        self.handed += len(self.outbox or b"")
        super().resume_writing()
        self._settle()

    def _watch(self) -> None:
        """Judge in SLOW_S how much the client took (`_judge`): its output went past its
        budget (whether the excess was queued or refused)."""
        self.mark = self.transport.get_write_buffer_size() + unsent_bytes(self.transport)
        self.handed = 0
        self.watch = self.state.loop.call_later(SLOW_S, self._judge)

    def _judge(self) -> None:
        """A tick since output went past the budget: if the client took less than a line in
        the last SLOW_TICKS ticks and output still waits for it, it is too slow. It is judged
        again in SLOW_S for as long as output waits, past the budget or not: what went past
        it may have been refused, and a client that took its kernel's fill and then nothing
        must not go free because little of its output is left. (What it took in a tick: what
        was unsent at its start in the transport and the kernel, plus what was handed to the
        transport since, less what is unsent now.)"""
        self.watch = None
        if self.closing:
            return
        self._settle()
        left = self.transport.get_write_buffer_size() + unsent_bytes(self.transport)
        takes = self.takes
        takes.append(self.mark + self.handed - left)
        del takes[:-SLOW_TICKS]
        if not left + len(self.outbox or b""):
            return   # it took everything: the watch ends
        taken = sum(takes)
        if len(takes) == SLOW_TICKS and taken < self.max_line:
            self.too_slow(taken)
        else:
            self._watch()

    def too_slow(self, taken: int) -> None:
        """Past its budget for SLOW_TICKS ticks and took only `taken` bytes: drop the client.

        The room is told when the loop delivers `connection_lost`.
        """
        if not self.closing:
            try:   # reset rather than FIN: the kernel drops what it still holds for the client
                self.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except (OSError, AttributeError):
                pass
            self.abort("too slow")

    def quit(self, reason: str) -> None:
        """/quit: leave with `reason`, flush what is queued, close."""
        self._leave(reason)
        self.close("quit")

    def farewell(self) -> None:
        self.send(notice("server shutting down"))

    # ------------------------------------------------------------ live upgrade (upgrade.py)

    def capture(self, now: float, index: dict[Connection, int]) -> dict[str, Any]:
        """Chat's part: nick and room, the token bucket, the drops that count towards
        `flooding`, and the ledger of output queued past budgets (who pays, by index)."""
        self._refill()
        return super().capture(now, index) | {"chat": {
            "nick": self.nick, "room": self.room, "tokens": self.tokens,
            "dropped": [now - t for t in self.dropped], "warned": now - self.warned,
            "owed": self.owed, "billed": self.billed,
            "charges": [[index[c], n] for c, n in (self.charges or {}).items() if c in index],
            "watched": self.watch is not None, "takes": self.takes}}

    def restore(self, saved: dict[str, Any], now: float, clients: list[Connection]) -> None:
        super().restore(saved, now, clients)
        chat = saved["chat"]
        self.nick, self.room = str(chat["nick"]), str(chat["room"])
        self.tokens = float(chat["tokens"])
        self.refilled = now
        self.dropped = collections.deque(now - float(age) for age in chat["dropped"])
        self.warned = now - float(chat["warned"])
        self.owed, self.billed = int(chat["owed"]), int(chat["billed"])
        charges = {clients[i]: int(n) for i, n in chat["charges"]}
        self.charges = charges or None   # type: ignore[assignment]
        self.takes = [int(n) for n in chat["takes"]]

    def adopt(self, transport: Any, saved: dict[str, Any]) -> None:
        super().adopt(transport, saved)
        if saved["chat"]["watched"] and not self.closing:   # judged again, with its last ticks
            self._watch()

    def notify(self, text: str) -> None:
        """An operator's notice, in order with what this pass holds for the client."""
        self.state.chat.tell(self, notice(text))

    def dismiss(self, told: str, reason: str) -> None:
        """Told, then gone: the room sees it leave with `reason` (`close`)."""
        self.notify(told)
        self.state.chat.flush()   # before the close, even for a client with no nick yet
        self.close(reason)

    # ------------------------------------------------------------ leaving

    def _leave(self, reason: str) -> None:
        self.state.chat.depart(self, reason, tell_others=not self.state.stopping)

    def close(self, reason: str) -> None:
        self._leave(reason)
        super().close(reason)

    def connection_lost(self, exc: Exception | None) -> None:
        self._leave(self.reason if self.reason in ("idle", "too slow", "flooding")
                    else "connection closed")
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        for sender, n in (self.charges or {}).items():   # what we held for them is gone
            sender.owed -= n + LEDGER_ENTRY
        self.charges = None
        self.billed = 0
        super().connection_lost(exc)


class DebugChatConnection(DebugConnection, ChatConnection):
    """ChatConnection at log level debug (connection.DebugConnection), which also says what
    it drops: a line over max_line or over the rate (a few per window, `note`), a client too
    slow or flooding (once: it is gone)."""

    __slots__ = DEBUG_SLOTS

    def _lines(self, items: list) -> None:
        for item in items:
            if item is LINE_TOO_LONG:
                self.note("dropped a line from %s (too long): max_line %d", self.peer, self.max_line)
        super()._lines(items)

    def _charge(self, n: int) -> int:
        if self.closing:
            return super()._charge(n)
        took = super()._charge(n)
        if took == n:
            return took
        limits = self.state.limits
        if self.closing:   # those drops made `burst` within FLOOD_WINDOW_S
            log.debug("dropped %s (flooding): %d lines over the rate within %g s",
                      self.peer, len(self.dropped), FLOOD_WINDOW_S)
        else:
            self.note("dropped %s from %s (rate limit): rate %g, burst %d",
                      "a line" if n - took == 1 else f"{n - took} lines", self.peer, limits.rate,
                      limits.burst)
        return took

    def _refused(self, by: ChatConnection) -> None:
        log.debug("dropped lines from %s to %s (sender's budget): %d bytes queued past "
                  "others' budgets, budget %d", by.peer, self.peer, by.owed, by.budget)
        super()._refused(by)

    def too_slow(self, taken: int) -> None:
        if not self.closing:
            log.debug("dropped %s (too slow): took %d bytes in %g s, %d bytes unsent, budget %d",
                      self.peer, taken, SLOW_S * SLOW_TICKS,
                      self.unsent() + unsent_bytes(self.transport), self.budget)
        super().too_slow(taken)
