"""The sans-IO line decoder: framing, the length bound, telnet filtering (SPEC sections 3-4)."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatd.protocol import LINE_TOO_LONG, LineDecoder, TelnetReply, escape_iac

IAC, DONT, DO, WONT, WILL, SB, SE = 255, 254, 253, 252, 251, 250, 240
NOP, IP, AYT = 241, 244, 246
TM = 6            # TIMING-MARK (RFC 860)
ECHO, SGA, NAWS, TTYPE = 1, 3, 31, 24
TOO_LONG = object()   # what LINE_TOO_LONG becomes after normalising


def b(*items) -> bytes:
    """Build bytes from ints and bytes pieces."""
    out = bytearray()
    for item in items:
        out += bytes((item,)) if isinstance(item, int) else item
    return bytes(out)


def replies(items: list) -> bytes:
    """The telnet replies among `feed`'s items, joined."""
    return b"".join(item for item in items if isinstance(item, TelnetReply))


def check_items(items: list) -> None:
    """Every item is the marker, a telnet reply, or a non-empty bytes run of complete lines."""
    for item in items:
        if item is LINE_TOO_LONG:
            continue
        if isinstance(item, TelnetReply):   # one or more answers, 3 bytes each
            assert item and len(item) % 3 == 0 and item[::3] == b"\xff" * (len(item) // 3), item
            continue
        assert isinstance(item, bytes), f"item {item!r} is not bytes"
        assert item, "an empty bytes item"
        assert item.endswith(b"\n"), f"item {item!r} does not end with a complete line"


def lines_of(items: list) -> list:
    """Items as a flat list of single lines, LINE_TOO_LONG as the TOO_LONG token."""
    out: list = []
    for item in items:
        if item is LINE_TOO_LONG:
            out.append(TOO_LONG)
        elif not isinstance(item, TelnetReply):
            out.extend(re.findall(rb"[^\n]*\n", item))
    return out


def decode(segments, max_line: int = 16):
    """Feed `segments` one by one: (lines, replies, tail), after checking every feed's items.

    Empty segments are skipped (a transport never delivers one; feed(b"") has its own test).
    """
    dec = LineDecoder(max_line)
    items: list = []
    for seg in segments:
        if not seg:
            continue
        got = dec.feed(seg)
        check_items(got)
        items += got
        assert len(dec.buf) <= max_line + 1
        # the fast path's flag agrees with the state it summarises
        assert dec.clean == (not dec.buf and not dec.discarding and not dec._pending)
    return lines_of(items), replies(items), dec.finish()


def decode_items(data: bytes, max_line: int = 16) -> list:
    dec = LineDecoder(max_line)
    return dec.feed(data)


# ------------------------------------------------------------------ framing

def test_lf_line_comes_out_with_its_terminator():
    assert decode_items(b"hello\n") == [b"hello\n"]


def test_crlf_line_comes_out_byte_exact():
    assert decode_items(b"hello\r\n") == [b"hello\r\n"]


def test_several_lines_in_one_feed_in_order():
    data = b"one\ntwo\r\nthree\n"
    items = decode_items(data)
    check_items(items)
    assert b"".join(items) == data
    assert lines_of(items) == [b"one\n", b"two\r\n", b"three\n"]


def test_several_lines_with_a_tail():
    dec = LineDecoder(16)
    items = dec.feed(b"a\nb\nc")
    check_items(items)
    assert b"".join(items) == b"a\nb\n"
    assert dec.finish() == [b"c"]


def test_line_split_across_feeds_is_joined():
    dec = LineDecoder(16)
    assert dec.feed(b"hel") == []
    assert dec.feed(b"lo") == []
    assert dec.feed(b" world\nnext") == [b"hello world\n"]
    assert dec.feed(b"\n") == [b"next\n"]
    assert dec.finish() == []


def test_crlf_split_between_cr_and_lf():
    dec = LineDecoder(16)
    assert dec.feed(b"abc\r") == []
    assert dec.feed(b"\n") == [b"abc\r\n"]


def test_empty_lines_are_lines():
    assert lines_of(decode_items(b"\n\r\n\n")) == [b"\n", b"\r\n", b"\n"]


def test_empty_feed_yields_no_items():
    dec = LineDecoder(16)
    assert dec.feed(b"") == []
    dec.feed(b"abc")
    assert dec.feed(b"") == []
    assert dec.finish() == [b"abc"]


def test_output_items_in_arrival_order_with_marker():
    dec = LineDecoder(16)
    items = dec.feed(b"ok1\n" + b"x" * 40 + b"\nok2\n")
    check_items(items)
    assert lines_of(items) == [b"ok1\n", TOO_LONG, b"ok2\n"]
    assert items.index(LINE_TOO_LONG) > 0


def test_finish_returns_the_unterminated_tail_once():
    dec = LineDecoder(16)
    dec.feed(b"line\ntail")
    assert dec.finish() == [b"tail"]
    assert dec.finish() == []


def test_finish_empty_without_input():
    assert LineDecoder(16).finish() == []


def test_finish_after_over_long_line_being_discarded_is_empty():
    dec = LineDecoder(16)
    assert dec.feed(b"y" * 40) == [LINE_TOO_LONG]
    assert dec.finish() == []


def test_finish_after_over_long_line_then_more_unterminated_bytes_is_empty():
    dec = LineDecoder(16)
    dec.feed(b"y" * 20)
    dec.feed(b"still the same long line")
    assert dec.finish() == []


def test_bytes_and_bytearray_like_input():
    dec = LineDecoder(16)
    assert lines_of(dec.feed(bytes(bytearray(b"ab\ncd\n")))) == [b"ab\n", b"cd\n"]


# ------------------------------------------------------------------ the length bound

@pytest.mark.parametrize("max_line", [16, 17, 100, 4096])
def test_exactly_max_line_plus_lf_is_accepted(max_line):
    line = b"a" * max_line + b"\n"
    assert decode_items(line, max_line) == [line]


@pytest.mark.parametrize("max_line", [16, 100, 4096])
def test_exactly_max_line_plus_crlf_is_accepted(max_line):
    line = b"a" * max_line + b"\r\n"
    assert decode_items(line, max_line) == [line]


@pytest.mark.parametrize("max_line", [16, 100, 4096])
def test_max_line_plus_one_plus_lf_is_too_long(max_line):
    assert decode_items(b"a" * (max_line + 1) + b"\n", max_line) == [LINE_TOO_LONG]


@pytest.mark.parametrize("max_line", [16, 100])
def test_max_line_plus_one_plus_crlf_is_too_long(max_line):
    assert decode_items(b"a" * (max_line + 1) + b"\r\n", max_line) == [LINE_TOO_LONG]


def test_max_line_plus_cr_in_the_middle_is_too_long():
    # The CR counts as terminator only right before the LF.
    assert decode_items(b"\r" + b"a" * 16 + b"\n", 16) == [LINE_TOO_LONG]


@pytest.mark.parametrize("max_line", [16, 100])
def test_boundaries_hold_when_fed_one_byte_at_a_time(max_line):
    for line, ok in ((b"a" * max_line + b"\n", True), (b"a" * max_line + b"\r\n", True),
                     (b"a" * (max_line + 1) + b"\n", False), (b"a" * (max_line + 1) + b"\r\n", False)):
        lines, _, tail = decode([line[i:i + 1] for i in range(len(line))], max_line)
        assert lines == ([line] if ok else [TOO_LONG]), line
        assert tail == []


@pytest.mark.parametrize("max_line", [16, 100])
def test_boundaries_hold_when_the_line_arrives_in_two_parts(max_line):
    for line, ok in ((b"a" * max_line + b"\n", True), (b"a" * max_line + b"\r\n", True),
                     (b"a" * (max_line + 1) + b"\n", False)):
        for cut in range(1, len(line)):
            lines, _, tail = decode([line[:cut], line[cut:]], max_line)
            assert lines == ([line] if ok else [TOO_LONG]), (line, cut)
            assert tail == []


def test_over_long_line_yields_one_marker_and_discards_to_next_lf():
    dec = LineDecoder(16)
    items = dec.feed(b"z" * 17 + b"more and more and more\nafter\n")
    assert items == [LINE_TOO_LONG, b"after\n"]
    assert dec.finish() == []


def test_over_long_line_over_many_feeds_yields_one_marker():
    dec = LineDecoder(16)
    items = []
    for _ in range(50):
        items += dec.feed(b"q" * 7)
    items += dec.feed(b"end of the long line\nnext\n")
    assert items == [LINE_TOO_LONG, b"next\n"]


def test_over_long_line_one_byte_per_feed():
    dec = LineDecoder(16)
    items: list = []
    for byte in b"w" * 60 + b"\r\n" + b"ok\n":
        items += dec.feed(bytes((byte,)))
        assert len(dec.buf) <= 17
    check_items(items)
    assert lines_of(items) == [TOO_LONG, b"ok\n"]
    assert dec.finish() == []


def test_over_long_line_after_good_lines_in_same_feed():
    dec = LineDecoder(16)
    items = dec.feed(b"a\nb\n" + b"c" * 30)
    assert lines_of(items) == [b"a\n", b"b\n", TOO_LONG]
    assert dec.feed(b"c" * 30 + b"\nd\n") == [b"d\n"]


def test_two_over_long_lines_give_two_markers():
    lines, _, tail = decode([b"x" * 20 + b"\n" + b"y" * 20 + b"\n"])
    assert lines == [TOO_LONG, TOO_LONG]
    assert tail == []


def test_memory_stays_bounded_over_10_mib_without_newline():
    max_line = 4096
    dec = LineDecoder(max_line)
    chunk = b"m" * 65536
    markers = 0
    for _ in range(10 * 1024 * 1024 // len(chunk)):
        for item in dec.feed(chunk):
            assert item is LINE_TOO_LONG
            markers += 1
        assert len(dec.buf) <= max_line + 1
    assert markers == 1
    assert dec.feed(b"end\nfine\n") == [b"fine\n"]
    assert len(dec.buf) == 0


def test_memory_stays_bounded_with_small_chunks():
    max_line = 64
    dec = LineDecoder(max_line)
    for _ in range(2000):
        dec.feed(b"s" * 13)
        assert len(dec.buf) <= max_line + 1


# ------------------------------------------------------------------ telnet

def test_do_is_refused_with_wont():
    dec = LineDecoder(16)
    assert dec.feed(b(IAC, DO, ECHO)) == [b(IAC, WONT, ECHO)]


def test_do_timing_mark_is_answered_with_will_timing_mark():
    dec = LineDecoder(16)
    assert replies(dec.feed(b(IAC, DO, TM))) == b(IAC, WILL, TM)


def test_will_is_refused_with_dont():
    dec = LineDecoder(16)
    assert replies(dec.feed(b(IAC, WILL, SGA))) == b(IAC, DONT, SGA)


@pytest.mark.parametrize("verb", [DONT, WONT])
def test_dont_and_wont_get_no_answer(verb):
    dec = LineDecoder(16)
    assert dec.feed(b(b"a", IAC, verb, ECHO, b"b\n")) == [b"ab\n"]


def test_several_negotiations_answered_in_order():
    dec = LineDecoder(16)
    items = dec.feed(b(IAC, DO, ECHO, IAC, WILL, NAWS, IAC, DO, TM, IAC, WONT, 5, IAC, DO, 200))
    assert replies(items) == b(IAC, WONT, ECHO, IAC, DONT, NAWS, IAC, WILL, TM, IAC, WONT, 200)


def test_replies_keep_their_place_among_the_lines():
    """RFC 860: WILL TIMING-MARK marks the place of the DO; echoes after it must follow it."""
    dec = LineDecoder(16)
    items = dec.feed(b(b"before\n", IAC, IP, IAC, DO, TM, b"after\n"))
    assert items == [b"before\n", b(IAC, WILL, TM), b"after\n"]
    assert isinstance(items[1], TelnetReply)
    items = dec.feed(b(b"par", IAC, DO, ECHO, b"tial\n"))
    assert items == [b(IAC, WONT, ECHO), b"partial\n"]


def test_negotiation_inside_a_line_is_not_data():
    assert decode_items(b(b"he", IAC, DO, ECHO, b"llo\n")) == [b(IAC, WONT, ECHO), b"hello\n"]


def test_iac_iac_is_a_literal_ff():
    assert decode_items(b(b"a", IAC, IAC, b"b\n")) == [b"a\xffb\n"]


def test_iac_iac_twice_is_two_ff():
    assert decode_items(b(IAC, IAC, IAC, IAC, b"\n")) == [b"\xff\xff\n"]


def test_iac_iac_in_the_tail():
    dec = LineDecoder(16)
    assert dec.feed(b(b"x", IAC, IAC)) == []
    assert dec.finish() == [b"x\xff"]


def test_subnegotiation_consumed_whole():
    dec = LineDecoder(16)
    data = b(b"x", IAC, SB, TTYPE, 0, b"VT100", IAC, SE, b"y\n")
    assert dec.feed(data) == [b"xy\n"]


def test_subnegotiation_with_iac_iac_inside_consumed_whole():
    data = b(b"x", IAC, SB, NAWS, 0, 80, 0, IAC, IAC, IAC, SE, b"y\n")
    assert decode_items(data) == [b"xy\n"]


def test_subnegotiation_with_newline_inside_is_not_a_line():
    data = b(b"x", IAC, SB, 99, b"a\nb", IAC, SE, b"y\n")
    assert decode_items(data) == [b"xy\n"]


@pytest.mark.parametrize("cmd", [NOP, IP, AYT, 242, 243, 245, 247, 248, 249, SE, 0, 65, 200])
def test_iac_followed_by_a_command_or_unknown_byte_is_dropped(cmd):
    dec = LineDecoder(16)
    assert dec.feed(b(b"a", IAC, cmd, b"bc\n")) == [b"abc\n"]


TELNET_MIX = b(b"ab", IAC, DO, ECHO, b"c", IAC, IAC, b"d", IAC, SB, TTYPE, 1, IAC, IAC, b"zz",
               IAC, SE, b"e\r\n", IAC, WILL, SGA, IAC, NOP, b"f", IAC, DO, TM, IAC, DONT, 1,
               b"g\n", IAC, IP, b"h", IAC, IAC)


def test_telnet_mix_all_at_once():
    lines, replies, tail = decode([TELNET_MIX], 64)
    assert lines == [b"abc\xffde\r\n", b"fg\n"]
    assert replies == b(IAC, WONT, ECHO, IAC, DONT, SGA, IAC, WILL, TM)
    assert tail == [b"h\xff"]


def test_telnet_split_across_two_feeds_at_every_position():
    expected = decode([TELNET_MIX], 64)
    for cut in range(len(TELNET_MIX) + 1):
        assert decode([TELNET_MIX[:cut], TELNET_MIX[cut:]], 64) == expected, cut


def test_telnet_split_across_three_feeds_at_every_position():
    expected = decode([TELNET_MIX], 64)
    n = len(TELNET_MIX)
    for i in range(n + 1):
        for j in range(i, n + 1):
            got = decode([TELNET_MIX[:i], TELNET_MIX[i:j], TELNET_MIX[j:]], 64)
            assert got == expected, (i, j)


def test_telnet_one_byte_per_feed():
    data = TELNET_MIX
    assert decode([data[i:i + 1] for i in range(len(data))], 64) == decode([data], 64)


def test_runaway_subnegotiation_gives_up_and_returns_to_data():
    max_line = 16
    data = b(b"x", IAC, SB, TTYPE, b"p" * (3 * max_line), b"\nafter\n")
    lines, replies, tail = decode([data], max_line)
    assert lines[-1] == b"after\n"
    assert replies == b"" and tail == []


def test_runaway_subnegotiation_does_not_depend_on_segmentation():
    max_line = 16
    data = b(IAC, SB, TTYPE, b"p" * (3 * max_line), b"\nafter\nmore\n")
    whole = decode([data], max_line)
    assert decode([data[i:i + 1] for i in range(len(data))], max_line) == whole
    for cut in range(len(data) + 1):
        assert decode([data[:cut], data[cut:]], max_line) == whole, cut


def test_runaway_subnegotiation_bounds_memory():
    dec = LineDecoder(64)
    dec.feed(b(IAC, SB, TTYPE))
    for _ in range(1000):
        dec.feed(b"s" * 100)
        assert len(dec.buf) <= 65



def test_subnegotiation_of_exactly_max_line_is_consumed():
    max_line = 16
    data = b(IAC, SB, b"p" * (max_line - 1), IAC, SE, b"ok\n")
    assert decode([data], max_line)[0] == [b"ok\n"]


def test_no_iac_byte_reaches_output_unless_sent_as_iac_iac():
    data = b(IAC, DO, 1, IAC, SB, 1, IAC, SE, IAC, NOP, b"plain\n")
    items = decode_items(data)
    assert items == [b(IAC, WONT, 1), b"plain\n"]
    assert all(b"\xff" not in item for item in items
               if item is not LINE_TOO_LONG and not isinstance(item, TelnetReply))


# ------------------------------------------------------------------ escape_iac

def test_escape_iac():
    assert escape_iac(b"") == b""
    assert escape_iac(b"plain\n") == b"plain\n"
    assert escape_iac(b"\xff") == b"\xff\xff"
    assert escape_iac(b"a\xffb\xff\xff\n") == b"a\xff\xffb\xff\xff\xff\xff\n"


def test_escape_iac_round_trips_through_the_decoder():
    data = bytes(range(256)).replace(b"\n", b"") + b"\n"
    dec = LineDecoder(1024)
    assert b"".join(dec.feed(escape_iac(data))) == data


# ------------------------------------------------------------------ properties

TELNET_ATOMS = [b(IAC), b(IAC, IAC), b(IAC, DO), b(IAC, WILL), b(IAC, SB), b(IAC, SE), b(DO), b(WILL),
                b(DONT), b(WONT), b(SB), b(SE), b(TM), b(NOP), b"\n", b"\r", b"\r\n", b"a", b"bc",
                b"x" * 7, b"y" * 20]
SUB_ATOMS = [b(IAC, SB, TTYPE), b(IAC, SE), b(IAC, IAC), b(IAC), b"p" * 9, b"\n", b"q", b"\r\n"]
NEWLINE_ATOMS = [b"\n", b"\r\n", b"\r", b"a", b"ab", b"abc" * 3, b"z" * 15, b"z" * 16, b"z" * 17,
                 b"\xff", b"q" * 40]

inputs = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(TELNET_ATOMS), max_size=60).map(b"".join),
    st.lists(st.sampled_from(NEWLINE_ATOMS), max_size=40).map(b"".join),
    st.lists(st.sampled_from(SUB_ATOMS), max_size=30).map(b"".join),
    st.lists(st.one_of(st.sampled_from(TELNET_ATOMS), st.binary(max_size=5)), max_size=50).map(b"".join),
)
max_lines = st.sampled_from([16, 17, 20, 64])


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted(min(c, len(data)) for c in cuts)
    out, prev = [], 0
    for p in points:
        out.append(data[prev:p])
        prev = p
    out.append(data[prev:])
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs, cuts=st.lists(st.integers(0, 200), max_size=12), max_line=max_lines)
def test_property_segmentation_does_not_change_the_result(data, cuts, max_line):
    assert decode(split(data, cuts), max_line) == decode([data], max_line)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=inputs, max_line=max_lines)
def test_property_one_byte_per_feed_equals_all_at_once(data, max_line):
    assert decode([data[i:i + 1] for i in range(len(data))], max_line) == decode([data], max_line)


def _clean(raw: bytes) -> bytes:
    return raw.replace(b"\n", b"").replace(b"\xff", b"")


@settings(max_examples=300, deadline=None)
@given(max_line=max_lines, data=st.data())
def test_property_plain_input_comes_back_exactly(max_line, data):
    body = st.binary(max_size=max_line).map(_clean)
    lines = data.draw(st.lists(st.tuples(body, st.sampled_from([b"\n", b"\r\n"])), max_size=12))
    tail = data.draw(body)
    stream = b"".join(content + term for content, term in lines) + tail
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    dec = LineDecoder(max_line)
    out = bytearray()
    for seg in split(stream, cuts):
        if not seg:
            continue
        items = dec.feed(seg)
        check_items(items)
        assert LINE_TOO_LONG not in items
        for item in items:
            out += item
    assert bytes(out) + b"".join(dec.finish()) == stream


@settings(max_examples=300, deadline=None)
@given(payload=st.binary(max_size=60).map(lambda x: x.replace(b"\n", b"")), data=st.data())
def test_property_escaped_bytes_come_back_exactly(payload, data):
    stream = escape_iac(payload + b"\n")
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    dec = LineDecoder(64)
    out = b"".join(item for seg in split(stream, cuts) if seg for item in dec.feed(seg))
    assert out == payload + b"\n"


# Well-formed telnet commands of every kind, mixed with data: (what is sent, the answer it
# gets, the data it stands for). A reference model of the decoder's telnet filter.
COMMAND_TOKENS = st.one_of(
    st.sampled_from([NOP, 249, 242, 0, 0xf9]).map(lambda v: (b(IAC, v), b"", b"")),
    st.tuples(st.sampled_from([DONT, WONT]), st.integers(0, 255)).map(lambda t: (b(IAC, *t), b"", b"")),
    st.one_of(st.just(TM), st.integers(0, 255)).map(
        lambda o: (b(IAC, DO, o), b(IAC, WILL if o == TM else WONT, o), b"")),
    st.integers(0, 255).map(lambda o: (b(IAC, WILL, o), b(IAC, DONT, o), b"")),
    st.binary(max_size=6).map(lambda p: (b(IAC, SB, TTYPE) + p.replace(b"\xff", b"\xff\xff") + b(IAC, SE),
                                         b"", b"")),
    st.just((b(IAC, IAC), b"", b"\xff")),
    st.binary(min_size=1, max_size=4).map(lambda d: d.replace(b"\xff", b"").replace(b"\n", b"") or b"d")
    .map(lambda d: (d, b"", d)),
)


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(COMMAND_TOKENS, max_size=80), cuts=st.lists(st.integers(0, 400), max_size=6))
def test_property_mixed_commands_are_answered_and_dropped_as_a_reference_model_says(tokens, cuts):
    """Runs of commands mixed in any order (the decoder takes a run in one match) give the
    answers and the data a command-by-command model gives, however the stream is cut."""
    stream = b"".join(t[0] for t in tokens) + b"\n"
    want_answers = b"".join(t[1] for t in tokens)
    want_data = b"".join(t[2] for t in tokens) + b"\n"
    dec = LineDecoder(4096)
    items = [item for part in split(stream, cuts) for item in dec.feed(part)]
    assert b"".join(i for i in items if isinstance(i, TelnetReply)) == want_answers
    assert b"".join(i for i in items if not isinstance(i, TelnetReply)) == want_data
