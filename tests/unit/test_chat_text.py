"""Chat text (README "Chat mode"): `clean_text`'s sanitizing, and chat framing with `cr_nul=True`.

`ncat --chat` relays whatever bytes arrive, per read: these are the rules it breaks.
"""

from __future__ import annotations

import re
import unicodedata

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatd.protocol import (DEFAULT_IGNORABLE, MAX_MARKS, LINE_TOO_LONG, LineDecoder, TelnetReply,
                            clean_text)

REPLACEMENT = "\ufffd"


def removed(ch: str) -> bool:
    """The characters clean_text must never leave: C0 but TAB (ESC, CR and LF among them),
    DEL, C1, format characters (the bidi controls, zero-width and direction marks, tags),
    default ignorables (variation selectors, Hangul fillers), line and paragraph separators,
    private use, and unassigned code points (noncharacters among them); and U+2800, which
    becomes a space."""
    o = ord(ch)
    return ((o < 0x20 and ch != "\t") or o == 0x7F or 0x80 <= o <= 0x9F or o == 0x2800
            or unicodedata.category(ch) in ("Cf", "Zl", "Zp", "Cn", "Co")
            or any(a <= o <= b for a, b in DEFAULT_IGNORABLE))


def is_mark(ch: str) -> bool:
    return unicodedata.category(ch)[0] == "M"


def longest_mark_run(text: str) -> int:
    longest = run = 0
    for ch in text:
        run = run + 1 if is_mark(ch) else 0
        longest = max(longest, run)
    return longest


# ------------------------------------------------------------------ clean_text, rule by rule

CASES = [
    # terminators go
    (b"hello\n", "hello"),
    (b"hello\r\n", "hello"),
    (b"hello", "hello"),
    (b"hello\r", "hello"),                       # a final CR (an unterminated tail) is bare CR
    # forged system lines stay text (the prefix is the server's job)
    (b"*** guest2 joined #lobby\n", "*** guest2 joined #lobby"),
    # bare CR removed: no overwriting the prefix
    (b"hi\rEVIL> x\n", "hiEVIL> x"),
    (b"\r\r\rx\r\n", "x"),
    # CSI: colour, cursor moves, erase, private modes
    (b"\x1b[31mred\x1b[0m\n", "red"),
    (b"\x1b[1;31;4mx\x1b[m\n", "x"),
    (b"a\x1b[2J\x1b[Hb\n", "ab"),
    (b"a\x1b[10;5Hb\x1b[Ac\x1b[3Dd\n", "abcd"),
    (b"a\x1b[?25lb\x1b[?1049hc\n", "abc"),
    (b"a\x1b[ qb\n", "ab"),                      # an intermediate byte (space) before the final
    # OSC: window title, ended by BEL or by ST (ESC \)
    (b"x\x1b]0;pwned\x07y\n", "xy"),
    (b"x\x1b]2;pwned\x1b\\y\n", "xy"),
    (b"x\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\y\n", "xlinky"),   # hyperlinks
    (b"x\x1b]0;a\x1bb\x07y\n", "xy"),            # an ESC that is not ST does not end it
    # unterminated: to the end of the line
    (b"x\x1b]0;unterminated title\n", "x"),
    (b"x\x1b]0;unterminated\x1b\n", "x"),
    (b"x\x1b[12\n", "x"),
    (b"x\x1b[\n", "x"),
    (b"x\x1b\n", "x"),
    (b"x\x1b", "x"),
    # other ESC sequences: the ESC goes (what follows is harmless text)
    (b"a\x1b7b\x1b8c\n", "a7b8c"),
    (b"a\x1b(0b\n", "a(0b"),
    (b"a\x1b\x1b[31mb\n", "ab"),
    # C1: raw bytes are invalid UTF-8 (U+FFFD); encoded C1 characters are removed
    (b"a\x9b31mb\n", "a\ufffd31mb"),
    (b"a\x9d0;t\x9cb\n", "a\ufffd0;t\ufffdb"),
    ("a\u009b31mb\n".encode(), "a31mb"),
    ("a\u009d0;t\u009cb\n".encode(), "a0;tb"),
    ("".join(chr(c) for c in range(0x80, 0xA0)).encode() + b"x", "x"),
    # DEL and the other C0 controls; TAB stays
    (b"a\x7fb\n", "ab"),
    (bytes(range(0x00, 0x09)) + b"a" + bytes(range(0x0B, 0x20)) + b"\n", "a"),
    (b"a\x0ab", "ab"),                           # an LF inside (not the terminator)
    (b"tab\there\t\n", "tab\there\t"),
    # bidi overrides and isolates; neighbours that are not controls stay
    ("a\u202ab\u202bc\u202cd\u202de\u202ef\n".encode(), "abcdef"),
    ("a\u2066b\u2067c\u2068d\u2069e\n".encode(), "abcde"),
    ("a\u2029b\u202fc\u2065d\u206ae\u200fz\n".encode(), "ab\u202fcdez"),
    # zero-width and direction marks, soft hyphen, BOM, word joiner: format characters
    ("a\u200bb\u200cc\u200dd\u200ee\u200ff\u061cg\u2060h\ufeffi\u00adj\n".encode(), "abcdefghij"),
    # line and paragraph separators, interlinear annotation, tags, noncharacters
    ("a\u2028b\u2029c\ufff9d\ufffae\ufffbf\n".encode(), "abcdef"),
    ("x\U000e0001\U000e0041\U000e007fy\n".encode(), "xy"),
    ("a\ufdd0b\ufdefc\ufffed\uffffe\U0001fffef\U0010ffffg\n".encode(), "abcdefg"),
    # default ignorables, unassigned in this Python's database or not; private use; Hangul
    # fillers; U+2800 (a blank) becomes a space. (Before, each of these passed.)
    ("a\u2065b\ufff0c\ufff8d\U000e0000e\U000e0002f\U000e001fg\U000e0080h\U000e00ffi\n".encode(),
     "abcdefghi"),
    ("a\U000e01f0b\U000e0fffc\ue000d\uf8ffe\U000f0000f\U0010fffdg\U00050000h\n".encode(),
     "abcdefgh"),
    ("a\u115fb\u1160c\u3164d\uffa0e\u034ff\u180bg\u180dh\ufe00i\U000e0100j\n".encode(),
     "abcdefghij"),
    ("\u3164\u3164\n".encode(), ""),
    ("\u2800a\u2800\u2800b\n".encode(), " a  b"),
    # a removed character between stacks of marks does not make them many
    (("a" + ("\u0301" * 4 + "\u1160") * 10 + "\n").encode(), "a" + "\u0301" * MAX_MARKS),
    # combining marks: at most MAX_MARKS on one base; a family emoji loses its joiners, an
    # emoji its variation selector (a terminal's default presentation)
    (("e" + "\u0301" * 40 + "x\n").encode(), "e" + "\u0301" * MAX_MARKS + "x"),
    ("vie\u0323\u0302t\n".encode(), "vie\u0323\u0302t"),
    ("\U0001f468\u200d\U0001f469\u200d\U0001f467\n".encode(), "\U0001f468\U0001f469\U0001f467"),
    ("\u2764\ufe0f\n".encode(), "\u2764"),
    # invalid UTF-8 becomes U+FFFD; valid text passes
    (b"a\xffb\n", "a\ufffdb"),
    (b"a\xc3(b\n", "a\ufffd(b"),
    (b"a\xe2\x82\n", "a\ufffd"),
    (b"\xc0\xaf\n", "\ufffd\ufffd"),              # overlong encoding
    ("caf\u00e9 \u20ac \U0001f600 \u65e5\u672c\n".encode(), "caf\u00e9 \u20ac \U0001f600 \u65e5\u672c"),
    # nothing left
    (b"\n", ""),
    (b"\r\n", ""),
    (b"\x1b[31m\x07\x1b]0;t\x07\x7f\r\n", ""),
    ("\u202e\u0085\x00\n".encode(), ""),
]


@pytest.mark.parametrize("raw, text", CASES)
def test_clean_text(raw, text):
    got = clean_text(raw)
    assert got == text
    assert not [ch for ch in got if removed(ch)]


def test_ufffd_is_three_bytes_on_the_wire():
    assert clean_text(b"\x9b").encode() == b"\xef\xbf\xbd"


def test_nick_command_cannot_smuggle_a_control():
    # The command is read after sanitizing, so what is left is all a nick can hold.
    assert clean_text(b"/nick \x1b[31mre\x07d\x1b[0m\n") == "/nick red"
    assert clean_text("/nick \u202eevil\u2066\n".encode()) == "/nick evil"
    assert clean_text(b"/nick x\x9by\n") == "/nick x\ufffdy"


# ------------------------------------------------------------------ clean_text, properties

# Text and bytes rich in what clean_text must handle.
NASTY_CHARS = ["\x1b", "[", "]", "\x07", "\\", ";", "0", "3", "m", "H", "?", " ", "\t", "\r", "\n",
               "\x00", "\x7f", "\x85", "\x9b", "\x9c", "\x9d", "\u202e", "\u2066", "\u2069",
               "\u202a", "a", "\u00e9", "\ufffd", "\U0001f600", "\u200b", "\u200f", "\u2028",
               "\u2029", "\ufeff", "\u00ad", "\U000e0041", "\ufdd0", "\uffff", "\u0301",
               "\u0489", "\u0903"]
nasty_text = st.lists(st.sampled_from(NASTY_CHARS) | st.characters(), max_size=40).map("".join)
nasty_bytes = (st.binary(max_size=60)
               | nasty_text.map(lambda s: s.encode("utf-8", "surrogatepass"))
               | st.lists(st.sampled_from([b"\x1b[", b"\x1b]", b"\x07", b"\x1b\\", b"\x9b", b"\xc2",
                                          b"\xc2\x9b", b"\xe2\x80\xae", b"\xff", b"\r", b"\n",
                                          b"a", b"1;2", b"m"]), max_size=30).map(b"".join))


@settings(max_examples=500, deadline=None)
@given(raw=nasty_bytes)
@example(raw=b"\x1b\x1b]\x07")
@example(raw=b"\xe2\x80")
def test_clean_text_never_leaves_a_removed_character(raw):
    text = clean_text(raw)
    bad = [hex(ord(ch)) for ch in text if removed(ch)]
    assert not bad, (raw, text, bad)
    assert "\x1b" not in text and "\r" not in text and "\n" not in text
    # What it returns is plain UTF-8 text, and cleaning it again changes nothing.
    assert clean_text(text.encode("utf-8")) == text


safe_text = st.text(st.characters(blacklist_categories=("Cs", "Mn", "Mc", "Me", "Cn", "Co"))
                    .filter(lambda ch: not removed(ch)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(text=safe_text)
def test_clean_text_keeps_everything_else(text):
    assert clean_text(text.encode("utf-8") + b"\r\n") == text
    assert clean_text(text.encode("utf-8")) == text


JUNK = ["\x1b[31m", "\x1b[0m", "\x1b[2J", "\x1b[10;5H", "\x1b[?25l", "\x1b]0;title\x07",
        "\x1b]0;t\x1b\\", "\x07", "\x7f", "\x00", "\r", "\x0b", "\u009b", "\u0085", "\u202e",
        "\u2066", "\u2069", "\u200b", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u061c", "\u2028",
        "\u2029", "\ufff9", "\U000e0020", "\ufdd5", "\U0002fffe", "\u2065", "\ufff0", "\u3164",
        "\u1160", "\u034f", "\ufe0f", "\ue000", "\U000e0080", "\U000e01f0", "\U00050000"]


@settings(max_examples=300, deadline=None)
@given(text=safe_text, junk=st.lists(st.tuples(st.integers(0, 40), st.sampled_from(JUNK)),
                                     max_size=8))
def test_inserted_controls_and_complete_sequences_vanish_without_a_trace(text, junk):
    # Complete sequences and controls put between the characters of safe text: removed,
    # and not one character of the text with them.
    s, last = "", 0
    for at, piece in sorted((min(at, len(text)), piece) for at, piece in junk):
        s += text[last:at] + piece
        last = at
    s += text[last:]
    assert clean_text(s.encode("utf-8") + b"\r\n") == text, s


marks = st.sampled_from(["\u0301", "\u0300", "\u0323", "\u0489", "\u0903", "\u20dd", "\u0332",
                         "\u1ab0", "\U0001d167"])


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.tuples(st.sampled_from(["a", "e", " ", "\u65e5", "\U0001f600", ""]),
                                st.lists(marks, max_size=12)), max_size=10))
def test_no_base_keeps_more_than_max_marks_and_fewer_are_kept(parts):
    text = "".join(base + "".join(ms) for base, ms in parts)
    got = clean_text(text.encode())
    assert longest_mark_run(got) <= MAX_MARKS
    if longest_mark_run(text) <= MAX_MARKS:
        assert got == text
    assert [ch for ch in got if not is_mark(ch)] == [ch for ch in text if not is_mark(ch)]


def test_every_assigned_character_is_in_the_planes_scanned():
    """protocol._rules scans planes 0 to 3 and 14 only (faster at start-up) and removes the
    others whole: this Python's Unicode database assigns nothing there but private use."""
    elsewhere = [hex(c) for c in range(0x110000) if not (c < 0x40000 or 0xE0000 <= c < 0xF0000)
                 and unicodedata.category(chr(c)) not in ("Cn", "Co")]
    assert not elsewhere


# ------------------------------------------------------------------ chat framing: cr_nul=True

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
TM = 6
TOO_LONG = "TOO_LONG"

TOKENS = [b"a", b"b", b"xyz", b"\r", b"\0", b"\n", b"\r\0", b"\r\n", b"\xff", b"\xff\xff",
          b"\xff\xfd\x06", b"\xff\xfd\x01", b"\xff\xfb\x01", b"\xff\xfe\x03", b"\xff\xfc\x03",
          b"\xff\xfa\x18\x00vt\xff\xf0", b"\xff\xf1", b"\xff\xf4", b"\xfd", b"\x06", b"\xfa",
          b"\xf0", b"\x1b[31m", b"\x9b", b"\xe2\x80\xae", b"x" * 20]
stream = (st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)
          | st.binary(max_size=120))
max_lines = st.sampled_from([16, 17, 24, 64])


def events(dec: LineDecoder, segments) -> list:
    """What the decoder yields, one event per line / marker / reply, in order, then the tail."""
    out: list = []
    for seg in segments:
        if not seg:
            continue
        for item in dec.feed(seg):
            if item is LINE_TOO_LONG:
                out.append(TOO_LONG)
            elif isinstance(item, TelnetReply):   # one or more answers, 3 bytes each
                assert item and len(item) % 3 == 0, item
                for k in range(0, len(item), 3):
                    reply = item[k:k + 3]
                    assert reply[0] == IAC and reply[1] in (WILL, WONT, DONT), item
                    assert reply[1] != WILL or reply[2] == TM, item
                    out.append(("reply", bytes(reply)))
            else:
                assert isinstance(item, bytes) and item.endswith(b"\n"), item
                out += [("line", line) for line in re.findall(rb"[^\n]*\n", item)]
        assert len(dec.buf) <= dec.max_line + 1
    out += [("tail", t) if t is not LINE_TOO_LONG else TOO_LONG for t in dec.finish()]
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


def chat_view(evts: list) -> list:
    """What chat makes of the events: sanitized non-empty lines, errors, replies."""
    out = []
    for e in evts:
        if e == TOO_LONG:
            out.append(e)
        elif e[0] == "reply":
            out.append(e)
        else:
            for raw in e[1].split(b"\n"):
                text = clean_text(raw)
                if text.strip():
                    out.append(text)
    return out


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=stream, cuts=st.lists(st.integers(0, 240), max_size=15), max_line=max_lines)
@example(data=b"abc\r\0def\r\0", cuts=[4], max_line=16)
@example(data=b"a\r\xff\xfd\x06\0b\n", cuts=[2, 5], max_line=16)
@example(data=b"x" * 16 + b"\r\0y\n", cuts=[17], max_line=16)
@example(data=b"x" * 16 + b"\r\r\0", cuts=[17], max_line=16)
def test_any_split_gives_the_same_lines_and_replies(data, cuts, max_line):
    whole = events(LineDecoder(max_line, cr_nul=True), [data])
    pieces = events(LineDecoder(max_line, cr_nul=True), split(data, cuts))
    assert pieces == whole
    bytewise = events(LineDecoder(max_line, cr_nul=True), [data[i:i + 1] for i in range(len(data))])
    assert bytewise == whole
    view = chat_view(whole)
    for e in view:
        if isinstance(e, str):
            assert not [ch for ch in e if removed(ch)], e


@settings(max_examples=400, deadline=None)
@given(data=st.lists(st.sampled_from([b"a", b"bc", b"\r", b"\0", b"\n", b"\t", b"\x1b[1m"]),
                     max_size=40).map(b"".join),
       cuts=st.lists(st.integers(0, 100), max_size=10))
@example(data=b"a\r\0b\r\0", cuts=[2, 5])
@example(data=b"a\r\r\0b\r", cuts=[2, 3])
def test_lf_crlf_and_cr_nul_end_lines_as_a_reference_model_says(data, cuts):
    # Without telnet bytes and with every line short: the lines are exactly these.
    normal = data.replace(b"\r\0", b"\r\n")
    lines = re.findall(rb"[^\n]*\n", normal)
    tail = normal[sum(map(len, lines)):]
    max_line = 256   # above the longest data drawn (40 pieces of at most 4 bytes)
    got = events(LineDecoder(max_line, cr_nul=True), split(data, cuts))
    want = [("line", line) for line in lines] + ([("tail", tail)] if tail else [])
    assert got == want


def test_cr_nul_split_between_segments():
    dec = LineDecoder(16, cr_nul=True)
    assert dec.feed(b"one\r") == []
    assert dec.feed(b"\0two\r") == [b"one\r\n"]
    assert dec.feed(b"\0") == [b"two\r\n"]
    assert dec.finish() == []


def test_cr_then_other_byte_is_not_a_terminator():
    dec = LineDecoder(16, cr_nul=True)
    assert dec.feed(b"a\r") == []
    assert dec.feed(b"b\n") == [b"a\rb\n"]
    assert clean_text(b"a\rb\n") == "ab"


def test_timing_mark_between_cr_and_nul():
    dec = LineDecoder(16, cr_nul=True)
    items = dec.feed(b"hi\r\xff\xfd\x06")
    assert items == [b"\xff\xfb\x06"] and isinstance(items[0], TelnetReply)
    assert dec.feed(b"\0") == [b"hi\r\n"]


def test_iac_iac_is_one_ff_byte_which_becomes_ufffd():
    dec = LineDecoder(16, cr_nul=True)
    (line,) = dec.feed(b"a\xff\xffb\r\0")
    assert line == b"a\xffb\r\n"
    assert clean_text(line) == "a\ufffdb"
