"""Chat mode through the real daemon (README "Chat mode"): what a user sees, byte for byte.

Every test drives a real `chatd start` in chat mode over real sockets on 127.0.0.1 and
spells out the exact bytes each client receives. "Nothing arrives" is checked by ordering:
the server handles one connection's lines in order, so after a client's own command has
been answered, anything another client caused earlier would already have been queued
ahead of that answer.

Every byte any client receives is kept, and checked at the end of each test: every line
ends with CRLF and no peer address ever shows up.
"""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from support import LineClient, alive, wait_for

TIMEOUT = 5.0
NO_RATE = "[limits]\nrate = 0\n"


# ------------------------------------------------------------------ helpers

class ChatClient(LineClient):
    """A LineClient that keeps every byte it receives, and reads CRLF lines."""

    def __init__(self, port: int, **kw) -> None:
        super().__init__(port, timeout=TIMEOUT, **kw)
        self.received = b""
        self.got_eof = False

    def _fill(self, deadline: float) -> bool:
        before = len(self.buf)
        more = super()._fill(deadline)
        self.received += self.buf[before:]
        if not more:
            self.got_eof = True
        return more

    def say(self, data: bytes) -> None:
        self.send(data + b"\n")

    def expect(self, *lines: bytes) -> None:
        for wanted in lines:
            assert self.recv_line() == wanted

    def sync(self) -> None:
        """Nothing else is pending for this client: the answer to /rooms comes next."""
        self.say(b"/rooms")
        got = self.recv_line()
        assert got.startswith(b"*** rooms: ") and got.endswith(b"\r\n"), got


CLIENTS: list[ChatClient] = []


@pytest.fixture(autouse=True)
def received_bytes_are_well_formed():
    """After each test: every line every client got ends with CRLF; no IP address leaked."""
    CLIENTS.clear()
    yield
    for c in CLIENTS:
        c.close()
        data = c.received
        assert b"127.0.0.1" not in data, data
        lines = data.split(b"\n")
        assert lines[-1] == b"", f"unterminated output: {data[-200:]!r}"
        bad = [ln for ln in lines[:-1] if not ln.endswith(b"\r")]
        assert not bad, f"lines without CRLF: {bad[:5]!r}"
    CLIENTS.clear()


def chat(make_chatd, loop: str = "auto", limits: str = "rate = 0\n", chat_keys: str = ""):
    """A started chat-mode instance; by default without the rate limit."""
    inst = make_chatd(loop=loop)
    extra = "[limits]\n" + limits + ("[chat]\n" + chat_keys if chat_keys else "")
    inst.write_config(mode="chat", extra=extra)
    inst.start()
    return inst


def connect(inst, nick: bytes, roster: bytes, room: bytes = b"#lobby", motd=()) -> ChatClient:
    """Connect and read the whole greeting: welcome, MOTD lines, roster."""
    c = ChatClient(inst.port)
    CLIENTS.append(c)
    c.expect(b"*** Welcome to chatd, " + nick + b". Type /help for commands.\r\n",
             *[b"*** " + m + b"\r\n" for m in motd],
             b"*** " + room + b": " + roster + b"\r\n")
    return c


def crowd(inst, *names: bytes) -> list[ChatClient]:
    """Fresh instance: connect guest1, guest2, ... in turn and rename each to `names`."""
    clients: list[ChatClient] = []
    for i, name in enumerate(names, 1):
        guest = b"guest%d" % i
        here = sorted(names[: i - 1], key=bytes.lower)
        c = connect(inst, guest, b", ".join(here) or b"nobody else here")
        for other in clients:
            other.expect(b"*** " + guest + b" joined #lobby\r\n")
        c.say(b"/nick " + name)
        for x in clients + [c]:
            x.expect(b"*** " + guest + b" is now known as " + name + b"\r\n")
        clients.append(c)
    return clients


def closes_cleanly(c: ChatClient) -> bytes:
    """What is left before EOF; a reset would raise here."""
    return c.recv_until_eof()


# ------------------------------------------------------------------ connecting

def test_connect_welcome_roster_and_join_notices(loop_chatd):
    """1. three clients connect in turn. Result: welcome, the roster of the others (sorted),
    and each arrival announced to those already there."""
    loop_chatd.write_config(mode="chat")
    loop_chatd.start()
    a = ChatClient(loop_chatd.port)
    CLIENTS.append(a)
    assert a.recv_exact(len(b"*** Welcome to chatd, guest1. Type /help for commands.\r\n"
                           b"*** #lobby: nobody else here\r\n")) == (
        b"*** Welcome to chatd, guest1. Type /help for commands.\r\n"
        b"*** #lobby: nobody else here\r\n")
    b = connect(loop_chatd, b"guest2", b"guest1")
    a.expect(b"*** guest2 joined #lobby\r\n")
    b.say(b"/nick bob")
    a.expect(b"*** guest2 is now known as bob\r\n")
    b.expect(b"*** guest2 is now known as bob\r\n")
    a.say(b"/nick Zed")
    a.expect(b"*** guest1 is now known as Zed\r\n")
    b.expect(b"*** guest1 is now known as Zed\r\n")
    # case-insensitive order: Zed after bob and after guest3 (plain byte order would put it first)
    c = connect(loop_chatd, b"guest3", b"bob, Zed")
    a.expect(b"*** guest3 joined #lobby\r\n")
    b.expect(b"*** guest3 joined #lobby\r\n")
    c.say(b"/who")
    c.expect(b"*** #lobby: bob, guest3, Zed\r\n")
    for x in (a, b, c):
        x.sync()


def test_multi_line_motd_comes_after_the_welcome(make_chatd):
    inst = chat(make_chatd, chat_keys='motd = "Hello there!\\nBe nice: no spam.\\n  indented"\n')
    connect(inst, b"guest1", b"nobody else here",
            motd=(b"Hello there!", b"Be nice: no spam.", b"  indented"))
    c = connect(inst, b"guest2", b"guest1", motd=(b"Hello there!", b"Be nice: no spam.", b"  indented"))
    c.sync()


def test_a_motd_ending_with_a_newline_has_no_extra_empty_line(make_chatd):
    """The natural TOML multi-line string ends with a newline: that ends the last line,
    it does not add an empty one."""
    inst = chat(make_chatd, chat_keys='motd = """\nline one\n\nline three\n"""\n')
    c = connect(inst, b"guest1", b"nobody else here", motd=(b"line one", b"", b"line three"))
    c.sync()


def test_default_room_from_the_config(make_chatd):
    inst = chat(make_chatd, chat_keys='default_room = "#Games"\n')
    a = connect(inst, b"guest1", b"nobody else here", room=b"#games")
    connect(inst, b"guest2", b"guest1", room=b"#games")
    a.expect(b"*** guest2 joined #games\r\n")
    a.say(b"/rooms")
    a.expect(b"*** rooms: #games (2)\r\n")


def test_guest_numbers_are_never_reused(make_chatd):
    """1. guest1..3 connect, 2. guest2 and guest3 leave, guest1 renames, 3. two more connect.
    Result: guest4 and guest5."""
    inst = chat(make_chatd)
    a = connect(inst, b"guest1", b"nobody else here")
    b = connect(inst, b"guest2", b"guest1")
    a.expect(b"*** guest2 joined #lobby\r\n")
    c = connect(inst, b"guest3", b"guest1, guest2")
    a.expect(b"*** guest3 joined #lobby\r\n")
    b.expect(b"*** guest3 joined #lobby\r\n")
    b.close()
    a.expect(b"*** guest2 left #lobby (connection closed)\r\n")
    c.expect(b"*** guest2 left #lobby (connection closed)\r\n")
    c.say(b"/quit")
    a.expect(b"*** guest3 left #lobby (quit)\r\n")
    a.say(b"/nick alice")
    a.expect(b"*** guest1 is now known as alice\r\n")
    connect(inst, b"guest4", b"alice")
    a.expect(b"*** guest4 joined #lobby\r\n")
    connect(inst, b"guest5", b"alice, guest4")


# ------------------------------------------------------------------ talking

def test_lines_reach_the_others_but_not_the_sender(loop_chatd):
    inst = loop_chatd
    inst.write_config(mode="chat", extra=NO_RATE)
    inst.start()
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    alice.say(b"hi")
    alice.send(b"crlf line\r\n  spaced  out \t\r\n")
    for other in (bob, carol):
        other.expect(b"<alice> hi\r\n", b"<alice> crlf line\r\n", b"<alice>   spaced  out \t\r\n")
    alice.sync()   # nothing of her own came back before the reply
    bob.say(b"caf\xc3\xa9 \xe2\x82\xac")
    alice.expect(b"<bob> caf\xc3\xa9 \xe2\x82\xac\r\n")
    carol.expect(b"<bob> caf\xc3\xa9 \xe2\x82\xac\r\n")
    bob.sync()


def test_me_action(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/me waves at everyone")
    bob.expect(b"* alice waves at everyone\r\n")
    alice.sync()
    alice.say(b"/me")
    alice.expect(b"*** error: usage: /me ACTION\r\n")
    bob.sync()


def test_double_slash_sends_a_literal_slash_line(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"//text")
    alice.say(b"//nick bob")
    bob.expect(b"<alice> /text\r\n", b"<alice> /nick bob\r\n")
    alice.sync()
    bob.say(b"/who")
    bob.expect(b"*** #lobby: alice, bob\r\n")


def test_unknown_command_and_commands_ignore_case(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/bogus")
    alice.expect(b'*** error: unknown command "/bogus" (try /help)\r\n')
    alice.say(b"/bogus with args")
    alice.expect(b'*** error: unknown command "/bogus" (try /help)\r\n')
    alice.say(b"/NICK Al")
    alice.expect(b"*** alice is now known as Al\r\n")
    bob.expect(b"*** alice is now known as Al\r\n")
    alice.say(b"/Who")
    alice.expect(b"*** #lobby: Al, bob\r\n")
    bob.sync()   # none of alice's commands or errors reached bob


def test_help_is_one_or_more_notice_lines(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/help")
    alice.say(b"/rooms")
    lines = []
    while True:
        got = alice.recv_line()
        if got == b"*** rooms: #lobby (2)\r\n":
            break
        lines.append(got)
    assert lines
    assert all(ln.startswith(b"*** ") and not ln.startswith(b"*** error") for ln in lines), lines
    text = b"".join(lines)
    for name in (b"/nick", b"/join", b"/who", b"/names", b"/rooms", b"/me", b"/msg", b"/quit", b"/help"):
        assert name in text, name
    bob.sync()


def test_empty_lines_are_ignored(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.send(b"\n\r\n\n\r\n")
    alice.sync()      # no reply, no error to her...
    bob.sync()        # ...and nothing to bob
    alice.say(b"after")
    bob.expect(b"<alice> after\r\n")


def test_no_user_line_can_pass_for_a_server_line(make_chatd):
    """A user cannot forge `*** ` or another nick; escapes and controls are removed first."""
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"*** bob left #lobby (quit)")
    bob.expect(b"<alice> *** bob left #lobby (quit)\r\n")
    alice.send(b"\x1b[31mred\x1b[0m\x07 line\rwith <bob> inside\r\n")
    bob.expect(b"<alice> red linewith <bob> inside\r\n")
    # CR NUL ends a line too (telnet), also when split between two segments
    alice.send(b"one\r\0two\r")
    time.sleep(0.02)
    alice.send(b"\0three\n")
    bob.expect(b"<alice> one\r\n", b"<alice> two\r\n", b"<alice> three\r\n")
    alice.sync()


# ------------------------------------------------------------------ nicks

def test_nick_change_is_seen_by_the_room_and_the_sender(make_chatd):
    inst = chat(make_chatd)
    a = connect(inst, b"guest1", b"nobody else here")
    b = connect(inst, b"guest2", b"guest1")
    a.expect(b"*** guest2 joined #lobby\r\n")
    c = connect(inst, b"guest3", b"guest1, guest2")
    a.expect(b"*** guest3 joined #lobby\r\n")
    b.expect(b"*** guest3 joined #lobby\r\n")
    c.say(b"/join #elsewhere")
    c.expect(b"*** #elsewhere: nobody else here\r\n")
    a.expect(b"*** guest3 left #lobby (joined #elsewhere)\r\n")
    b.expect(b"*** guest3 left #lobby (joined #elsewhere)\r\n")
    a.say(b"/nick alice")
    a.expect(b"*** guest1 is now known as alice\r\n")
    b.expect(b"*** guest1 is now known as alice\r\n")
    c.sync()    # not told: another room
    b.say(b"hi")
    a.expect(b"<guest2> hi\r\n")
    a.say(b"hello")
    b.expect(b"<alice> hello\r\n")


def test_changing_the_case_of_ones_own_nick_is_allowed(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/nick ALICE")
    alice.expect(b"*** alice is now known as ALICE\r\n")
    bob.expect(b"*** alice is now known as ALICE\r\n")
    c = connect(inst, b"guest3", b"ALICE, bob")
    alice.expect(b"*** guest3 joined #lobby\r\n")
    bob.expect(b"*** guest3 joined #lobby\r\n")
    c.say(b"/nick GUEST3")   # a guest may change the case of its own name too
    for x in (alice, bob, c):
        x.expect(b"*** guest3 is now known as GUEST3\r\n")


def test_a_taken_nick_is_refused_whatever_its_case(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/nick bob")
    alice.expect(b"*** error: nick taken: bob\r\n")
    alice.say(b"/nick BOB")
    alice.expect(b"*** error: nick taken: BOB\r\n")
    bob.sync()
    alice.say(b"/who")
    alice.expect(b"*** #lobby: alice, bob\r\n")
    # a nick freed by its owner's leaving can be taken
    bob.say(b"/quit")
    alice.expect(b"*** bob left #lobby (quit)\r\n")
    alice.say(b"/nick Bob")
    alice.expect(b"*** alice is now known as Bob\r\n")


BAD_NICKS = [
    b"abcdefghijklmnopq",   # 17 characters
    b"al!ce",
    b"al ce",
    b"\xc3\xa5lice",        # a letter outside A-Z
    b"a/b",
    b"#alice",
    b"guest99",             # guest + digits: only ever assigned
    b"Guest3",
    b"GUEST007",
]


def test_bad_and_reserved_nicks_are_refused(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    for bad in BAD_NICKS:
        alice.say(b"/nick " + bad)
        got = alice.recv_line()
        assert got.startswith(b"*** error: ") and got.endswith(b"\r\n"), (bad, got)
    bob.sync()     # no rename was announced
    alice.say(b"/who")
    alice.expect(b"*** #lobby: alice, bob\r\n")


def test_nick_edge_cases_that_are_allowed_or_answered(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/nick A-b_c.0123456789")      # 16 characters of every allowed kind
    alice.expect(b"*** alice is now known as A-b_c.0123456789\r\n")
    bob.expect(b"*** alice is now known as A-b_c.0123456789\r\n")
    alice.say(b"/nick guest")                # "guest" without digits is a plain nick
    alice.expect(b"*** A-b_c.0123456789 is now known as guest\r\n")
    bob.expect(b"*** A-b_c.0123456789 is now known as guest\r\n")
    alice.say(b"/nick")
    got = alice.recv_line()
    assert got.startswith(b"*** error: "), got
    alice.say(b"/nick guest")                # already so: a notice to her only
    got = alice.recv_line()
    assert got.startswith(b"*** ") and b"guest" in got, got
    bob.sync()


# ------------------------------------------------------------------ private messages

def test_msg_reaches_the_nick_in_any_room(make_chatd):
    inst = chat(make_chatd)
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    bob.say(b"/join #rust")
    bob.expect(b"*** #rust: nobody else here\r\n")
    for x in (alice, carol):
        x.expect(b"*** bob left #lobby (joined #rust)\r\n")
    alice.say(b"/msg bob hi there")
    bob.expect(b"*alice* hi there\r\n")
    alice.expect(b"-> *bob* hi there\r\n")
    alice.say(b"/msg BOB again")             # nicks are case-insensitive
    bob.expect(b"*alice* again\r\n")
    alice.expect(b"-> *bob* again\r\n")
    bob.say(b"/msg carol psst")               # same room as the sender or not
    carol.expect(b"*bob* psst\r\n")
    bob.expect(b"-> *carol* psst\r\n")
    carol.sync()                              # carol saw none of alice's messages


def test_msg_errors(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/msg nobody x")
    alice.expect(b'*** error: no such nick: "nobody"\r\n')
    alice.say(b"/msg bob")
    got = alice.recv_line()
    assert got.startswith(b"*** error: "), got
    alice.say(b"/msg")
    got = alice.recv_line()
    assert got.startswith(b"*** error: "), got
    bob.sync()
    bob.close()
    alice.expect(b"*** bob left #lobby (connection closed)\r\n")
    alice.say(b"/msg bob still there?")
    alice.expect(b'*** error: no such nick: "bob"\r\n')


# ------------------------------------------------------------------ who, names, rooms, join

def test_who_names_and_rooms(make_chatd):
    inst = chat(make_chatd)
    carol, alice, bob, dave, eve = crowd(inst, b"carol", b"alice", b"Bob", b"dave", b"eve")
    for cmd in (b"/who", b"/names", b"/WHO"):
        alice.say(cmd)
        alice.expect(b"*** #lobby: alice, Bob, carol, dave, eve\r\n")
    dave.say(b"/join #rust")
    dave.expect(b"*** #rust: nobody else here\r\n")
    for x in (carol, alice, bob, eve):
        x.expect(b"*** dave left #lobby (joined #rust)\r\n")
    eve.say(b"/join #ada")
    eve.expect(b"*** #ada: nobody else here\r\n")
    for x in (carol, alice, bob):
        x.expect(b"*** eve left #lobby (joined #ada)\r\n")
    alice.say(b"/rooms")
    alice.expect(b"*** rooms: #ada (1), #lobby (3), #rust (1)\r\n")
    dave.say(b"/names")
    dave.expect(b"*** #rust: dave\r\n")
    eve.say(b"/join #lobby")    # the last one out: the room is gone
    eve.expect(b"*** #lobby: alice, Bob, carol\r\n")
    for x in (carol, alice, bob):
        x.expect(b"*** eve joined #lobby\r\n")
    dave.say(b"/rooms")
    dave.expect(b"*** rooms: #lobby (4), #rust (1)\r\n")


def test_join_moves_between_rooms_and_rooms_are_isolated(loop_chatd):
    inst = loop_chatd
    inst.write_config(mode="chat", extra=NO_RATE)
    inst.start()
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    alice.say(b"/join #Rust")
    alice.expect(b"*** #rust: nobody else here\r\n")
    bob.expect(b"*** alice left #lobby (joined #rust)\r\n")
    carol.expect(b"*** alice left #lobby (joined #rust)\r\n")
    bob.say(b"/join #RUST")
    bob.expect(b"*** #rust: alice\r\n")          # the roster, as on connect
    alice.expect(b"*** bob joined #rust\r\n")
    carol.expect(b"*** bob left #lobby (joined #rust)\r\n")
    alice.say(b"in rust")
    bob.expect(b"<alice> in rust\r\n")
    alice.say(b"/me rusts")
    bob.expect(b"* alice rusts\r\n")
    carol.say(b"in lobby")
    carol.say(b"/me lobbies")
    carol.sync()
    alice.sync()       # nothing from the lobby reached #rust...
    bob.sync()
    carol.say(b"/who")
    carol.expect(b"*** #lobby: carol\r\n")   # ...and carol got nothing from #rust
    alice.say(b"/who")
    alice.expect(b"*** #rust: alice, bob\r\n")
    alice.say(b"/join #lobby")
    alice.expect(b"*** #lobby: carol\r\n")
    carol.expect(b"*** alice joined #lobby\r\n")
    bob.expect(b"*** alice left #rust (joined #lobby)\r\n")


def test_join_errors(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/join #rust")
    alice.expect(b"*** #rust: nobody else here\r\n")
    bob.expect(b"*** alice left #lobby (joined #rust)\r\n")
    for same in (b"/join #rust", b"/join #RuSt"):
        alice.say(same)
        got = alice.recv_line()
        assert got.startswith(b"*** error: ") and b"#rust" in got, got
    for bad in (b"#", b"#bad!name", b"#two words", b"#" + b"x" * 33, b"#caf\xc3\xa9", b"#a.b", b""):
        alice.say(b"/join " + bad if bad else b"/join")
        got = alice.recv_line()
        assert got.startswith(b"*** error: "), (bad, got)
    bob.sync()
    alice.say(b"/rooms")
    alice.expect(b"*** rooms: #lobby (1), #rust (1)\r\n")
    room = b"#" + b"A-_9" * 8                # 32 characters: the longest name
    alice.say(b"/join " + room)
    alice.expect(b"*** " + room.lower() + b": nobody else here\r\n")


# ------------------------------------------------------------------ leaving

def test_quit_with_a_reason_and_bare_quit(make_chatd):
    inst = chat(make_chatd)
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    alice.say(b"/quit going home, bye")
    assert closes_cleanly(alice) == b""
    bob.expect(b'*** alice left #lobby (quit: "going home, bye")\r\n')
    carol.expect(b'*** alice left #lobby (quit: "going home, bye")\r\n')
    bob.say(b"/QUIT")
    assert closes_cleanly(bob) == b""
    carol.expect(b"*** bob left #lobby (quit)\r\n")
    carol.say(b"/who")
    carol.expect(b"*** #lobby: carol\r\n")


def test_quit_flushes_replies_queued_before_it(make_chatd):
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.send(b"/who\n/msg bob bye\n/quit\nnever said\n")
    assert closes_cleanly(alice) == b"*** #lobby: alice, bob\r\n-> *bob* bye\r\n"
    bob.expect(b"*alice* bye\r\n", b"*** alice left #lobby (quit)\r\n")
    bob.sync()


def test_closing_the_connection_is_connection_closed(loop_chatd):
    inst = loop_chatd
    inst.write_config(mode="chat", extra=NO_RATE)
    inst.start()
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    alice.close()
    bob.expect(b"*** alice left #lobby (connection closed)\r\n")
    carol.expect(b"*** alice left #lobby (connection closed)\r\n")
    # an abortive close (RST) too
    bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    bob.close()
    carol.expect(b"*** bob left #lobby (connection closed)\r\n")
    carol.sync()


def test_half_close_last_line_counts_and_queued_output_is_flushed(loop_chatd):
    """1. alice sends /who, then an unterminated line, then half-closes.
    Result: bob gets her line, then her leaving; alice gets the /who reply, then EOF."""
    inst = loop_chatd
    inst.write_config(mode="chat", extra=NO_RATE)
    inst.start()
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    alice.send(b"/who\nlast words")
    alice.shutdown_write()
    assert closes_cleanly(alice) == b"*** #lobby: alice, bob, carol\r\n"
    for x in (bob, carol):
        x.expect(b"<alice> last words\r\n", b"*** alice left #lobby (connection closed)\r\n")
    # an unterminated command counts too, and its reply is flushed before EOF
    bob.send(b"/msg carol see you")
    bob.shutdown_write()
    assert closes_cleanly(bob) == b"-> *carol* see you\r\n"
    carol.expect(b"*bob* see you\r\n", b"*** bob left #lobby (connection closed)\r\n")
    carol.sync()


def test_half_close_flushes_what_others_sent_before(make_chatd):
    """1. bob says 2000 lines that alice does not read, 2. alice asks /rooms and half-closes.
    Result: alice gets all of bob's lines, then her answer, then EOF."""
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    bob.send(b"".join(b"line %d\n" % i for i in range(2000)))
    bob.sync()     # all of them handled, so queued for alice
    alice.send(b"/rooms")
    alice.shutdown_write()
    want = b"".join(b"<bob> line %d\r\n" % i for i in range(2000)) + b"*** rooms: #lobby (2)\r\n"
    assert closes_cleanly(alice) == want
    bob.expect(b"*** alice left #lobby (connection closed)\r\n")


# ------------------------------------------------------------------ limits

def test_an_over_long_line_is_dropped_with_an_error(make_chatd):
    inst = chat(make_chatd, limits="rate = 0\nmax_line = 32\noutput_buffer = 1024\n")
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"x" * 33)
    alice.expect(b"*** error: line too long (max 32 bytes), dropped\r\n")
    alice.say(b"y" * 32)                          # exactly max_line: fine
    alice.send(b"z" * 32 + b"\r\n")               # and with CRLF
    bob.expect(b"<alice> " + b"y" * 32 + b"\r\n", b"<alice> " + b"z" * 32 + b"\r\n")
    # the rest of an over-long line is dropped up to its newline, however it arrives
    alice.send(b"w" * 40)
    alice.expect(b"*** error: line too long (max 32 bytes), dropped\r\n")
    time.sleep(0.02)
    alice.send(b"still the same line")
    time.sleep(0.02)
    alice.send(b" /quit nope\nafter\n")
    bob.expect(b"<alice> after\r\n")
    alice.send(b"/nick " + b"q" * 40 + b"\n")   # a command too
    alice.expect(b"*** error: line too long (max 32 bytes), dropped\r\n")
    alice.sync()
    bob.sync()
    alice.say(b"/who")
    alice.expect(b"*** #lobby: alice, bob\r\n")


# ------------------------------------------------------------------ signals

def test_sigusr1_says_goodbye_and_closes_without_leave_notices(loop_chatd):
    inst = loop_chatd
    inst.write_config(mode="chat", extra=NO_RATE)
    pid = inst.start()
    alice, bob, carol = crowd(inst, b"alice", b"bob", b"carol")
    carol.say(b"/join #rust")
    carol.expect(b"*** #rust: nobody else here\r\n")
    alice.expect(b"*** carol left #lobby (joined #rust)\r\n")
    bob.expect(b"*** carol left #lobby (joined #rust)\r\n")
    os.kill(pid, signal.SIGUSR1)
    for c in (alice, bob, carol):
        assert closes_cleanly(c) == b"*** server shutting down\r\n"
        c.close()
    wait_for(lambda: not alive(pid), what="chatd to exit")


def test_sighup_applies_motd_room_and_max_line_to_new_clients_only(make_chatd):
    inst = chat(make_chatd, limits="rate = 0\nmax_line = 64\n", chat_keys='motd = "old news"\n')
    a = connect(inst, b"guest1", b"nobody else here", motd=(b"old news",))
    a.say(b"/nick alice")
    a.expect(b"*** guest1 is now known as alice\r\n")
    b = connect(inst, b"guest2", b"alice", motd=(b"old news",))
    a.expect(b"*** guest2 joined #lobby\r\n")
    inst.write_config(mode="chat", extra='[limits]\nrate = 0\nmax_line = 32\n'
                                          '[chat]\nmotd = "fresh news\\nsecond line"\ndefault_room = "Rust"\n')
    inst.cmd("restart", check=0)
    # connected clients stay, in their room, with the limits they came with
    a.say(b"still here " + b"." * 30)             # 40 bytes: over the new max_line, under the old
    b.expect(b"<alice> still here " + b"." * 30 + b"\r\n")
    c = connect(inst, b"guest3", b"nobody else here", room=b"#rust", motd=(b"fresh news", b"second line"))
    c.say(b"n" * 40)
    c.expect(b"*** error: line too long (max 32 bytes), dropped\r\n")
    c.say(b"n" * 32)
    d = connect(inst, b"guest4", b"guest3", room=b"#rust", motd=(b"fresh news", b"second line"))
    c.expect(b"*** guest4 joined #rust\r\n")
    a.say(b"/rooms")
    a.expect(b"*** rooms: #lobby (2), #rust (2)\r\n")
    b.sync()
    d.say(b"/join #lobby")
    d.expect(b"*** #lobby: alice, guest2\r\n")
    a.expect(b"*** guest4 joined #lobby\r\n")
    b.expect(b"*** guest4 joined #lobby\r\n")
    c.expect(b"*** guest4 left #rust (joined #lobby)\r\n")


def test_peer_addresses_never_reach_clients(make_chatd):
    """Every path that names a user: the welcome, rosters, joins, /msg, /rooms, leaving."""
    inst = chat(make_chatd)
    alice, bob = crowd(inst, b"alice", b"bob")
    alice.say(b"/who")
    alice.say(b"/names")
    alice.say(b"/rooms")
    alice.say(b"/msg bob hi")
    alice.say(b"/help")
    alice.say(b"/join #x")
    alice.say(b"/quit")
    everything = closes_cleanly(alice)
    bob.expect(b"*alice* hi\r\n", b"*** alice left #lobby (joined #x)\r\n")
    bob.close()
    for c in CLIENTS:
        assert b"127.0.0.1" not in c.received
    assert everything and b"127.0.0.1" not in everything
