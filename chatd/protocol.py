"""Sans-IO wire codec: bytes in, complete lines and telnet replies out. No asyncio here.

`LineDecoder.feed` frames lines (a line ends with LF; a CR before it is part of
the terminator), bounds their length, and filters telnet IAC sequences
(RFC 854/855): every option is refused, DO TIMING-MARK is answered with WILL
TIMING-MARK (RFC 860) so telnet's Ctrl-C does not freeze its screen, and
subnegotiations are consumed whole. Whole runs of telnet commands and of short lines are
taken by bytes methods and one compiled pattern, never a Python step per byte, per command
or per line, so hostile input costs about what plain lines do (README "Tests and speed").
Memory per decoder stays below 2 x `max_line` + 4 bytes whatever arrives (a line's tail and
an unfinished subnegotiation, kept as its length in zeros).

Tests: tests/unit/test_protocol.py, tests/unit/test_chat_text.py, tests/process/test_chat_hidden_text.py, tests/process/test_fair_share.py
"""

from __future__ import annotations

import functools
import re
import unicodedata

IAC = 255
DONT, DO, WONT, WILL, SB = 254, 253, 252, 251, 250
SE = 240
TIMING_MARK = 6

# Membership tests use the int: `b"\xff" in data` first tries the bytes as an integer and
# builds and drops a TypeError on every call, which costs more than the whole fast path.


class TelnetReply(bytes):
    """An item of `feed`'s output: telnet answer bytes, to be sent as they are.

    Replies keep their place among the lines: RFC 860 puts WILL TIMING-MARK at
    the point of the stream where the DO was read, and telnet discards the
    output before it, so an echo must not overtake its reply.
    """

    __slots__ = ()


class _TooLong:
    """The marker `feed` yields in place of a line longer than `max_line`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "LINE_TOO_LONG"


LINE_TOO_LONG = _TooLong()


def escape_iac(data: bytes) -> bytes:
    """Double every 0xFF so a literal byte 255 goes out as telnet's `IAC IAC`."""
    return data.replace(b"\xff", b"\xff\xff") if IAC in data else data


class LineDecoder:
    """Frames a byte stream into lines, with telnet filtering and a length bound.

    `feed(data)` returns a list, in stream order, whose items are `bytes`
    holding one or more complete lines (each ending in b"\\n"), the marker
    LINE_TOO_LONG standing for one discarded over-long line, or a TelnetReply.
    `connection.Connection` is a LineDecoder itself, so that the hot path
    touches one object per read; used alone it is the sans-IO codec.
    """

    __slots__ = ("max_line", "cr_nul", "buf", "discarding", "clean", "commands", "_pending", "_cr")

    def __init__(self, max_line: int, cr_nul: bool = False) -> None:
        self.max_line = max_line
        self.cr_nul = cr_nul         # CR NUL ends a line too (telnet's bare CR; chat mode)
        self.buf = bytearray()       # the unterminated tail of the current line
        self.discarding = False      # inside an over-long line: drop up to the next LF
        self.clean = True            # nothing pending: no tail, no discarding, no telnet sequence
        self.commands = 0            # telnet command bytes seen (IAC IAC excepted), for chat's rate
        self._pending = b""          # an incomplete telnet sequence at the end of the last read
        self._cr = False             # the last byte framed was a CR (for a CR NUL split in two)

    def decoder_state(self) -> dict:
        """What a live upgrade carries of the decoder (upgrade.py): the partial line, an
        over-long line being dropped, and a telnet sequence cut off by the end of a read."""
        return {"buf": bytes(self.buf), "discarding": self.discarding, "commands": self.commands,
                "pending": self._pending, "cr": self._cr}

    def restore_decoder(self, saved: dict) -> None:
        """The decoder as `decoder_state` found it in the process before the upgrade."""
        self.buf = bytearray(saved["buf"])
        self.discarding = bool(saved["discarding"])
        self.commands = int(saved["commands"])
        self._pending = bytes(saved["pending"])
        self._cr = bool(saved["cr"])
        self.clean = not self.buf and not self.discarding and not self._pending

    def plain(self, data: bytes) -> bytes | None:
        """The fast path: the whole lines of `data` as they came, keeping its tail; or None.

        It applies when nothing is pending (no partial line, no telnet sequence), `data`
        holds no IAC byte, and it is too short to hold an over-long line: then nothing
        needs decoding. None means `feed` must do the work.
        """
        if not self.clean or len(data) > self.max_line or IAC in data:
            return None
        end = data.rfind(b"\n") + 1
        if end == len(data):
            return data
        self.buf += memoryview(data)[end:]
        self.clean = False
        return data[:end]

    def feed(self, data: bytes) -> list:
        if not self.cr_nul:
            block = self.plain(data)
            if block is not None:
                return [block] if block else []
        elif not data:
            return []
        if not self._pending and IAC not in data:
            out = self._frame(data)
        else:
            out = []
            for part in self._filter_telnet(data):
                if part.__class__ is TelnetReply:
                    out.append(part)
                elif part:
                    out += self._frame(part)
        self.clean = not self.buf and not self.discarding and not self._pending
        return out

    def finish(self) -> list:
        """At end of input: the final unterminated bytes, as `feed` would give them.

        Empty if there are none or they belong to a line being discarded; the
        marker if they are over the limit (a last CR is no terminator here).
        """
        tail = bytes(self.buf)
        self.buf.clear()
        discarding, self.discarding = self.discarding, False
        self.clean = not self._pending
        if discarding or not tail:
            return []
        return [LINE_TOO_LONG] if len(tail) > self.max_line else [tail]

    # ------------------------------------------------------------ framing

    def _frame(self, data: bytes) -> list:
        if self.cr_nul:
            data = self._cr_nul_to_crlf(data)
        out: list = []
        n = len(data)
        pos = 0
        limit = self.max_line
        buf = self.buf
        if self.discarding:
            i = data.find(b"\n")
            if i < 0:
                return out
            self.discarding = False
            pos = i + 1
        run_start = pos          # start of a run of good complete lines in `data`
        while pos < n:
            if not buf:
                # Lines that cannot be over-long (an LF within every max_line + 1 bytes) join
                # the run a window at a time: no Python step per line, however short they are.
                j = data.rfind(b"\n", pos, pos + limit + 1)
                while j >= 0:
                    pos = j + 1
                    j = data.rfind(b"\n", pos, pos + limit + 1)
                if pos >= n:
                    break
            i = data.find(b"\n", pos)
            if i < 0:
                break
            length = len(buf) + i - pos
            if length > limit and not (length == limit + 1 and
                                       (data[i - 1] if i > pos else buf[-1]) == 13):
                if run_start < pos:
                    out.append(data[run_start:pos])
                out.append(LINE_TOO_LONG)
                buf.clear()
                pos = run_start = i + 1
                continue
            if buf:
                buf += memoryview(data)[pos:i + 1]
                out.append(bytes(buf))
                buf.clear()
                run_start = i + 1
            pos = i + 1
        if run_start < pos:
            out.append(data[run_start:pos])
        if pos < n:
            buf += memoryview(data)[pos:]
            if len(buf) > limit + 1 or (len(buf) == limit + 1 and buf[-1] != 13):
                buf.clear()
                self.discarding = True
                out.append(LINE_TOO_LONG)
        return out

    def _cr_nul_to_crlf(self, data: bytes) -> bytes:
        """Make CR NUL a CRLF, also when the CR came at the end of the previous read."""
        if self._cr and data[:1] == b"\0":
            data = b"\n" + data[1:]
        self._cr = data[-1:] == b"\r"
        return data.replace(b"\r\0", b"\r\n") if b"\r\0" in data else data

    # ------------------------------------------------------------ telnet

    def _filter_telnet(self, data: bytes) -> list:
        """Split `data` into plain data and TelnetReply parts, in order; `IAC IAC` is one 0xFF.

        One compiled pattern (`_telnet_patterns`) takes whole runs of commands at a time, so
        a stream of commands costs no Python step per command, and a flood that repeats one
        or two commands is taken by one comparison (`_flood`). An incomplete sequence at the
        end waits in `_pending` for the next read.
        """
        if self._pending:
            data = self._pending + data
            self._pending = b""
        split, one = _telnet_patterns(self.max_line)
        flood = _flood(data, one) if data[:1] == b"\xff" else None
        if flood is None:
            return self._split(data, split)
        start, unit, k = flood
        replies = [p for p in self._split(unit, split) if p.__class__ is TelnetReply]
        self.commands += unit.count(IAC) * (k - 1)
        repeated = [TelnetReply(b"".join(replies) * k)] if replies else []
        return (self._split(data[:start], split) + repeated
                + self._split(data[start + k * len(unit):], split))

    def _split(self, data: bytes, split: re.Pattern[bytes]) -> list:
        """`_filter_telnet` by the pattern: the parts of `data`, in order."""
        pieces = split.split(data)
        # Each match adds 3 groups and the data after it: a literal 0xFF, a run of complete
        # commands of any kind, an incomplete sequence (only at the end).
        literals = (len(pieces) >> 2) - pieces[1::4].count(None)
        self.commands += data.count(IAC) - 2 * literals
        if len(pieces) > 1 and pieces[-2] is not None:
            self._pending = _pending_of(pieces[-2])
            pieces[-2] = None
        runs = pieces[2::4]
        if DO not in data and WILL not in data or not any(runs):   # nothing to answer
            pieces[2::4] = [None] * len(runs)
            return [b"".join(filter(None, pieces))]
        parts: list = []
        start = 0
        for k in range(2, len(pieces), 4):
            run = pieces[k]
            if run is not None:
                answered = b"".join(_answered(self.max_line).findall(run))
                if answered:
                    parts.append(b"".join(filter(None, pieces[start:k])))
                    parts.append(_refusals(answered))
                    start = k + 1
                else:
                    pieces[k] = None
        parts.append(b"".join(filter(None, pieces[start:])))
        return parts


def _flood(data: bytes, one: re.Pattern[bytes]) -> tuple[int, bytes, int] | None:
    """Where `data` repeats a unit of one or two telnet commands, from its start or from its
    second command (the first may be a tail kept from the last read): (start, unit, count),
    at least two repeats; None if it does not."""
    first = one.match(data)
    if first is None:
        return None
    for start in (0, first.end()):
        a = one.match(data, start)
        b = a and one.match(data, a.end())
        for unit in (a and data[start:a.end()], b and data[start:b.end()]):
            if unit:
                k = (len(data) - start) // len(unit)
                if k >= 2 and data.startswith(unit * k, start):
                    return start, unit, k
    return None


_SUB_UNIT = rb"(?:[^\xff]|\xff\xff)"   # a byte of a subnegotiation's payload (IAC IAC: one 0xFF)
_REFUSE = bytes.maketrans(bytes((DO, WILL)), bytes((WONT, DONT)))


def _subnegotiation(max_line: int) -> bytes:
    """After IAC: a subnegotiation ended within `max_line` payload bytes (by IAC SE, or by IAC
    and any other byte, which is malformed), or the first `max_line` + 1 payload bytes of a
    longer one, given up there (what follows is data)."""
    return rb"\xfa(?:%s{0,%d}\xff[\x00-\xfe]|%s{%d})" % (_SUB_UNIT, max_line, _SUB_UNIT, max_line + 1)


@functools.lru_cache(maxsize=8)
def _telnet_patterns(max_line: int) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """The telnet sequences for `split`, and one whole command (for `_flood`; `IAC IAC` is
    data, not one): the two-byte ones (NOP, IP, AYT, ... and unknown bytes), DO, DONT, WILL
    and WONT with their option, and a subnegotiation.

    The first's groups: (1) the 0xFF of `IAC IAC`; (2) a run of complete commands of any
    kind, in one match however they are mixed (`_answered` finds what a run asks of us);
    (3) an incomplete sequence at the end of the data.
    """
    one = rb"\xff(?:[\x00-\xf9]|[\xfb-\xfe].|%s)" % _subnegotiation(max_line)
    split = re.compile(rb"\xff(\xff)|((?:%s)+)|(\xff(?:[\xfb-\xfe]|\xfa%s{0,%d}\xff?)?\Z)"
                       % (one, _SUB_UNIT, max_line), re.DOTALL)
    return split, re.compile(one, re.DOTALL)


@functools.lru_cache(maxsize=8)
def _answered(max_line: int) -> re.Pattern[bytes]:
    """A run's commands for `findall`, a stretch at a time: each stretch of DO and WILL as
    its bytes (to be answered), each stretch of other commands as b"" (dropped, as DONT and
    WONT ask for the state we are in)."""
    return re.compile(rb"((?:\xff[\xfb\xfd].)+)|(?:\xff(?:[\x00-\xf9]|[\xfc\xfe].|%s))+"
                      % _subnegotiation(max_line), re.DOTALL)


def _refusals(run: bytes) -> TelnetReply:
    """The answers to a run of `IAC DO x` and `IAC WILL x`: WONT x and DONT x, but WILL
    TIMING-MARK to DO TIMING-MARK (RFC 860), so telnet's Ctrl-C does not freeze its screen."""
    reply = bytearray(run)
    reply[1::3] = run[1::3].translate(_REFUSE)
    if b"\xfd\x06" in run:   # only a DO TIMING-MARK holds these two bytes in a row
        reply = reply.replace(b"\xff\xfc\x06", b"\xff\xfb\x06")
    return TelnetReply(reply)


def _pending_of(tail: bytes) -> bytes:
    """An incomplete sequence as it is kept for the next read: as it came (IAC, or IAC and
    a verb), or a subnegotiation's start with its payload as zeros (only its length counts)
    and the IAC that may start its end."""
    if tail[1:2] != b"\xfa":
        return tail
    payload = tail[2:]
    lone = (len(payload) - len(payload.rstrip(b"\xff"))) & 1   # an undoubled last IAC
    payload = payload[:len(payload) - lone]
    return b"\xff\xfa" + bytes(len(payload) - payload.count(b"\xff\xff")) + b"\xff" * lone


# ---------------------------------------------------------------- chat text

# ESC with the CSI sequence it starts (parameters, intermediates, final byte) or the OSC
# sequence (up to BEL or ST); an unterminated one ends at the end of the line.
_ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[\x30-\x3f]*[\x20-\x2f]*[\x40-\x7e]?"
                              r"|\](?:[^\x07\x1b]|\x1b(?!\\))*(?:\x07|\x1b\\)?)")
# Every C0 control but TAB, DEL, every C1 control: the rest of what is removed is in
# `_rules`. U+2800 (braille pattern blank) looks like a space and is made one, so a line
# of it is as blank as a line of spaces.
_CONTROLS = {**dict.fromkeys([*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f, *range(0x80, 0xa0)]),
             0x2800: 0x20}
MAX_MARKS = 4   # combining marks kept on one base character: Zalgo text stacks dozens
# Default_Ignorable_Code_Point (Unicode 15.1, DerivedCoreProperties.txt), written out since
# this Python's database may predate characters it names: what a terminal is meant to show
# as nothing (zero-width and format characters, variation selectors, Hangul fillers, tags
# and the unassigned rest of their block).
DEFAULT_IGNORABLE = ((0x00AD, 0x00AD), (0x034F, 0x034F), (0x061C, 0x061C), (0x115F, 0x1160),
                     (0x17B4, 0x17B5), (0x180B, 0x180F), (0x200B, 0x200F), (0x202A, 0x202E),
                     (0x2060, 0x206F), (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF),
                     (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
                     (0xE0000, 0xE0FFF))
# Where this Python's Unicode database assigns anything but private use: planes 0 to 3 and
# 14 (tests/unit/test_chat_text.py checks all planes). Planes 4 to 13 are unassigned, 15
# and 16 private use (with noncharacters): removed whole.
_PLANES = (range(0x40000), range(0xE0000, 0xF0000))


def _char_class(codes: list[int]) -> str:
    """A regex character class of the sorted code points `codes`, as runs."""
    runs: list[list[int]] = []
    for code in codes:
        if runs and runs[-1][1] == code - 1:
            runs[-1][1] = code
        else:
            runs.append([code, code])
    return "[" + "".join(f"{chr(a)}-{chr(b)}" for a, b in runs) + "]"


@functools.cache
def _rules() -> tuple[re.Pattern[str], re.Pattern[str]]:
    """The runs of non-ASCII characters removed, and the pattern of the marks past MAX_MARKS
    on one base. Removed: format characters, line and paragraph separators, default
    ignorables, private use and every code point this Python's database does not assign
    (noncharacters among them; a newer format character arrives as one, so must a newer
    emoji).

    Built once, from this Python's Unicode database (the scan takes ~0.2 s; the daemon
    makes it at start-up, when it sanitizes the MOTD, not at a client's first line). `re`
    tests the characters past U+FFFF of a class one range after another, and those of the
    BMP at once: the astral class is guarded by a range, so BMP text skips it."""
    ignorable = {c for a, b in DEFAULT_IGNORABLE for c in range(a, b + 1)}
    removed, marks = [], []
    for plane in _PLANES:
        for code in plane:
            category = unicodedata.category(chr(code))
            if code in ignorable or category in ("Cf", "Zl", "Zp", "Cn", "Co"):
                removed.append(code)
            elif category[0] == "M":
                marks.append(code)
    bmp = [code for code in removed if 0xA0 <= code <= 0xFFFF]
    astral = _char_class([code for code in removed if code > 0xFFFF])[:-1]
    astral += "\U00040000-\U000DFFFF\U000F0000-\U0010FFFF]"
    mark = _char_class(marks)
    return (re.compile(f"(?:{_char_class(bmp)}|(?=[\U00010000-\U0010FFFF]){astral})+"),
            re.compile(f"({mark}{{{MAX_MARKS}}}){mark}+"))


def clean_text(line: bytes) -> str:
    """A chat line as text that can fool no terminal: the README's "Chat mode" sanitizing.

    The terminator goes; invalid UTF-8 becomes U+FFFD; escape sequences, controls
    (bare CR included) and the characters of `_rules` (format and default-ignorable
    characters: zero-width and direction marks, joiners, variation selectors, Hangul
    fillers, tags; line and paragraph separators; private use and unassigned code points)
    are removed; U+2800 becomes a space; no base character keeps more than MAX_MARKS
    combining marks. (Removing the marks between stacks first means a removed character
    cannot split one stack into many.)
    """
    if line.endswith(b"\n"):
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
    text = line.decode("utf-8", "replace")
    if "\x1b" in text:
        text = _ESCAPE_SEQUENCE.sub("", text)
    text = text.translate(_CONTROLS)
    if text.isascii():
        return text
    removed, too_many_marks = _rules()
    return too_many_marks.sub(r"\1", removed.sub("", text))
