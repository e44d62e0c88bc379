"""Text that hides or pretends (README "Chat mode", issue 12 item 8), through the real daemon.

Invisible and direction-changing characters, line separators, tags, noncharacters and stacks of
combining marks sent by one client; nicks that look like a taken one; a `/quit` reason built to
look like a second notice. Before the fix each passed through as sent.

Every wait has a deadline; every daemon is stopped by pid by the fixtures.
"""

from __future__ import annotations

from test_chat_abuse import assert_safe, expect, join, said, start_chat

HIDDEN = [
    # (what guest1 sends, what the others receive after "<guest1> ")
    ("pay\u200bpal\u200c\u200d\u200e\u200f!".encode(), "paypal!"),      # zero-width, LRM, RLM
    ("a\u061cb\u2060c\ufeffd\u00ade".encode(), "abcde"),                  # ALM, WJ, BOM, SHY
    ("one\u2028*** server shutting down\n".encode(), "one*** server shutting down"),
    ("two\u2029three".encode(), "twothree"),
    ("x\U000e0001\U000e0068\U000e0069\U000e007fy".encode(), "xy"),        # tag characters
    ("a\ufff9b\ufffac\ufffbd".encode(), "abcd"),                          # interlinear annotation
    ("n\ufdd0o\ufffen\U0010ffffc".encode(), "nonc"),                      # noncharacters
    (("Z" + "\u0336\u0337\u0338\u0301\u0300" * 20 + "!").encode(), "Z\u0336\u0337\u0338\u0301!"),
    # default ignorables unassigned in Python 14.0's database, private use, variation
    # selectors, Hangul fillers, U+2800 made a space; a filler splitting a stack of marks
    ("a\u2065b\ufff0c\U000e0002d\U000e01f0e\ue000f\U000f0000g".encode(), "abcdefg"),
    ("h\u034fi\u180bj\ufe0fk\U000e0100l\u115fm\u3164n\uffa0o\u2800p".encode(), "hijklmno p"),
    (("a" + ("\u0301" * 4 + "\u1160") * 10).encode(), "a\u0301\u0301\u0301\u0301"),
]
# Lines that clean to nothing (before, each showed as a blank message).
BLANK = ["\u3164", "\u3164\u1160\uffa0", "\u2800\u2800", "\ue000\U000e0080", "\u2065\ufe0f"]


def two(inst) -> tuple:
    """Start `inst` in chat mode without a rate; connect two clients: (a, its nick, b, its nick)."""
    start_chat(inst, rate=0)
    a, na = join(inst.port)
    b, nb = join(inst.port)
    expect(a, f"*** {nb} joined #lobby\r\n".encode())
    return a, na, b, nb


def test_hidden_and_stacked_characters_never_reach_anyone(loop_chatd):
    a, na, b, nb = two(loop_chatd)
    received = bytearray()
    for data, text in HIDDEN:
        a.send(data + b"\n")
        got = b.recv_line()
        received += got
        assert got == said(na, text), (data, got)
        a.send(b"/me " + data + b"\n")
        got = b.recv_line()
        received += got
        assert got == f"* {na} {text}\r\n".encode(), (data, got)
    assert_safe(bytes(received))
    for blank in BLANK:     # not sent: the next line b gets is the one after it
        a.send(blank.encode() + b"\n" + b"after\n")
        assert b.recv_line() == said(na, "after"), blank
    for c in (a, b):
        c.close()


def test_a_nick_that_looks_like_a_taken_one_is_refused(chatd):
    a, na, b, nb = two(chatd)
    for c, old, new in ((a, na, "alice"), (b, nb, "bob")):
        c.send(f"/nick {new}\n".encode())
        for x in (a, b):
            expect(x, f"*** {old} is now known as {new}\r\n".encode())
    for name in (b"aIice", b"a1ice", b"ALICE"):
        b.send(b"/nick " + name + b"\n")
        expect(b, b"*** error: nick taken: " + name + b"\r\n")
    for name in (b"b0b", b"BOB"):     # a look-alike of one's own nick is one's own
        b.send(b"/nick " + name + b"\n")
        expect(b, b"*** bob is now known as " + name + b"\r\n")
        expect(a, b"*** bob is now known as " + name + b"\r\n")
        b.send(b"/nick bob\n")
        expect(b, b"*** " + name + b" is now known as bob\r\n")
        expect(a, b"*** " + name + b" is now known as bob\r\n")
    a.send(b"/nick b0b\n")
    expect(a, b"*** error: nick taken: b0b\r\n")
    a.send(b"/who\n")
    expect(a, b"*** #lobby: alice, bob\r\n")
    for c in (a, b):
        c.close()


def test_a_quit_reason_is_short_has_no_tab_and_is_quoted(chatd):
    a, na, b, _ = two(chatd)
    fake = b"\t" * 40 + b"*** server shutting down" + b"\t" * 200 + b"y" * 3800
    a.send(b"/quit bye" + fake + b"\n")
    got = b.recv_line()
    assert got == f'*** {na} left #lobby (quit: "bye *** server shutting down...")\r\n'.encode(), got
    assert b"\t" not in got and len(got) < 80
    assert a.recv_until_eof() == b""
    b.close()


def test_a_quote_in_a_quit_reason_cannot_close_the_quotes(chatd):
    """Before: `*** guestN left #lobby (quit: "bye") *** alice left (")`, a second notice."""
    a, na, b, _ = two(chatd)
    a.send(b'/quit bye") *** alice left (\n')
    got = b.recv_line()
    assert got == f'*** {na} left #lobby (quit: "bye\\") *** alice left (")\r\n'.encode(), got
    assert a.recv_until_eof() == b""
    b.close()
