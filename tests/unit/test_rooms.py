"""ChatService with fake peers: commands, rooms, nick rules; a slow peer never blocks a sender."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatd.rooms import QUOTE_MAX, ChatService, quoted, skeleton


class FakePeer:
    """A peer that records what it is sent; `full` makes it behave like a peer being dropped."""

    def __init__(self, service: ChatService) -> None:
        self.nick = ""
        self.room = ""
        self.got: list[bytes] = []
        self.quit_reason = ""
        self.service = service

    def send(self, data: bytes, by: "FakePeer | None" = None) -> None:
        assert by is None or isinstance(by, FakePeer)
        assert data.endswith(b"\r\n") and all(x.endswith(b"\r") for x in data.split(b"\n")[:-1])
        self.got.append(data)

    def quit(self, reason: str) -> None:
        self.quit_reason = reason
        self.service.depart(self, reason)

    def take(self) -> list[bytes]:
        got, self.got = self.got, []
        return got


@pytest.fixture
def service():
    return ChatService(motd="line one\nline two", default_room="Lobby")


def join(service, n: int) -> list[FakePeer]:
    peers = []
    for _ in range(n):
        p = FakePeer(service)
        service.arrive(p)
        peers.append(p)
    for p in peers:
        p.take()
    return peers


def test_arrival_welcome_motd_roster_and_join_notice(service):
    a = FakePeer(service)
    service.arrive(a)
    assert a.take() == [b"*** Welcome to chatd, guest1. Type /help for commands.\r\n",
                        b"*** line one\r\n", b"*** line two\r\n", b"*** #lobby: nobody else here\r\n"]
    b = FakePeer(service)
    service.arrive(b)
    assert b.take()[-1] == b"*** #lobby: guest1\r\n"
    assert a.take() == [b"*** guest2 joined #lobby\r\n"]


def test_messages_go_to_the_others_only(service):
    a, b, c = join(service, 3)
    service.said(a, "hi there")
    assert a.take() == []
    assert b.take() == c.take() == [b"<guest1> hi there\r\n"]
    service.said(a, "/me waves")
    assert b.take() == [b"* guest1 waves\r\n"] and a.take() == []


def test_plain_talk_comes_in_as_bytes_and_is_prefixed_line_by_line(service):
    """The fast paths' form: printable lines, each ending in LF, said as one block."""
    a, b = join(service, 2)
    service.said(a, b"one\n\ttwo  \n")
    assert b.take() == [b"<guest1> one\r\n<guest1> \ttwo  \r\n"] and a.take() == []


def test_nick_rules(service):
    a, b = join(service, 2)
    service.said(a, "/nick alice")
    assert a.take() == b.take() == [b"*** guest1 is now known as alice\r\n"]
    for bad, why in (("ALICE", b"nick taken: ALICE"), ("guest9", b"nick reserved for guests: guest9"),
                     ("x" * 17, b"bad nick"), ("a b", b"bad nick"), ("caf\u00e9", b"bad nick")):
        service.said(b, f"/nick {bad}")
        got = b.take()
        assert len(got) == 1 and got[0].startswith(b"*** error: ") and why in got[0], (bad, got)
    service.said(a, "/nick Alice")           # a case change of your own nick is allowed
    assert b.take() == [b"*** alice is now known as Alice\r\n"]
    a.take()
    service.said(b, "/nick Guest2")          # and so is your own guest name in another case
    assert a.take() == [b"*** guest2 is now known as Guest2\r\n"]


def test_rooms_join_who_rooms_and_isolation(service):
    a, b, c = join(service, 3)
    service.said(c, "/join #Rust")
    assert c.take() == [b"*** #rust: nobody else here\r\n"]
    assert a.take() == b.take() == [b"*** guest3 left #lobby (joined #rust)\r\n"]
    service.said(b, "/join rust")
    assert b.take() == [b"*** #rust: guest3\r\n"] and c.take() == [b"*** guest2 joined #rust\r\n"]
    a.take()
    service.said(a, "lobby only")
    assert b.take() == c.take() == []
    service.said(c, "/who")
    assert c.take() == [b"*** #rust: guest2, guest3\r\n"]
    service.said(a, "/rooms")
    assert a.take() == [b"*** rooms: #lobby (1), #rust (2)\r\n"]
    service.said(b, "/join #rust")
    assert b.take() == [b"*** error: you are already in #rust\r\n"]
    service.said(b, "/join #bad!")
    assert b.take()[0].startswith(b"*** error: bad room name")


def test_private_messages_reach_any_room(service):
    a, b = join(service, 2)
    service.said(b, "/join #elsewhere")
    a.take(), b.take()
    service.said(a, "/msg GUEST2 psst")
    assert b.take() == [b"*guest1* psst\r\n"] and a.take() == [b"-> *guest2* psst\r\n"]
    service.said(a, "/msg nobody x")
    assert a.take() == [b'*** error: no such nick: "nobody"\r\n']
    service.said(a, "/msg guest2")
    assert a.take() == [b"*** error: usage: /msg NICK TEXT\r\n"]


def test_quit_unknown_commands_escape_and_help(service):
    a, b = join(service, 2)
    service.said(a, "/bogus x")
    assert a.take() == [b'*** error: unknown command "/bogus" (try /help)\r\n']
    service.said(a, "//not a command")
    assert b.take() == [b"<guest1> /not a command\r\n"]
    service.said(a, "/help")
    lines = a.take()
    assert len(lines) > 5 and all(l.startswith(b"*** ") for l in lines)
    service.said(a, "/quit gone fishing")
    assert b.take() == [b'*** guest1 left #lobby (quit: "gone fishing")\r\n']
    assert service.backend.holder("guest1") is None


def test_guest_numbers_are_never_reused(service):
    peers = join(service, 3)
    for p in peers[:2]:
        service.depart(p, "connection closed")
    new = FakePeer(service)
    service.arrive(new)
    assert new.take()[0] == b"*** Welcome to chatd, guest4. Type /help for commands.\r\n"


def test_a_peer_dropped_during_a_broadcast_does_not_stop_it(service):
    """A peer that leaves while a broadcast is sending to it: everyone else still gets the
    line (and the notice), and the room no longer holds it. (The real connection defers the
    departure of a too-slow peer, so the others see the line first.)"""
    a, b, c, d = join(service, 4)

    def drop_b(data: bytes, by: FakePeer | None = None) -> None:
        service.depart(b, "too slow")
    b.send = drop_b
    service.said(a, "to everyone")
    expected = {b"<guest1> to everyone\r\n", b"*** guest2 left #lobby (too slow)\r\n"}
    assert set(c.take()) == set(d.take()) == expected
    assert b not in service.backend.members("#lobby")


def test_configure_applies_to_new_arrivals(service):
    (a,) = join(service, 1)
    service.configure("new motd", "#Games")
    b = FakePeer(service)
    service.arrive(b)
    assert b.take()[1:] == [b"*** new motd\r\n", b"*** #games: nobody else here\r\n"]
    assert a.room == "#lobby"


class Pass:
    """A loop that the test drives: `defer` holds the callback that ends a pass, `end` runs it."""

    def __init__(self) -> None:
        self.pending: list = []

    def defer(self, fn) -> None:
        self.pending.append(fn)

    def end(self) -> None:
        pending, self.pending = self.pending, []
        for fn in pending:
            fn()


class BatchPeer(FakePeer):
    """A peer that records batches as one write, as a connection makes them."""

    def send_batch(self, data: bytes, parts: list) -> None:
        assert data == b"".join(d for d, _ in parts)
        self.got.append(data)


@pytest.fixture
def deferred():
    loop = Pass()
    return loop, ChatService(defer=loop.defer)


def joined(service: ChatService, loop: Pass, n: int) -> list[BatchPeer]:
    peers = []
    for _ in range(n):
        p = BatchPeer(service)
        service.arrive(p)
        peers.append(p)
    loop.end()
    for p in peers:
        p.take()
    return peers


def test_what_one_pass_holds_reaches_each_member_in_one_write_and_in_order(deferred):
    """Everything a pass produces, from several senders, leaves when the pass ends, one write
    per member, each sender's lines in order; nobody gets its own lines."""
    loop, service = deferred
    a, b, c = joined(service, loop, 3)
    service.said(a, "one")
    service.said(b, "two")
    service.said(a, "three")
    assert a.got == b.got == c.got == []          # held until the pass ends
    assert len(loop.pending) == 1                 # one deferred end of pass, however many lines
    loop.end()
    assert c.take() == [b"<guest1> one\r\n<guest2> two\r\n<guest1> three\r\n"]
    assert a.take() == [b"<guest2> two\r\n"]
    assert b.take() == [b"<guest1> one\r\n<guest1> three\r\n"]
    loop.end()
    assert a.got == b.got == c.got == []


def test_replies_and_private_messages_keep_their_place_in_the_pass(deferred):
    """A reply or a /msg is held with the room's lines, so nobody sees events reordered."""
    loop, service = deferred
    a, b, c = joined(service, loop, 3)
    service.said(a, "before")
    service.said(a, "/msg guest2 private")
    service.said(a, "after")
    loop.end()
    assert b.take() == [b"<guest1> before\r\n*guest1* private\r\n<guest1> after\r\n"]
    assert a.take() == [b"-> *guest2* private\r\n"]
    assert c.take() == [b"<guest1> before\r\n<guest1> after\r\n"]


def test_a_line_reaches_the_members_of_its_room_when_it_was_said(deferred):
    """Members change mid-pass: what was held goes first, to the members of then."""
    loop, service = deferred
    a, b = joined(service, loop, 2)
    service.said(b, "/join #x")
    service.said(a, "to the lobby, b is gone")
    service.said(a, "/join #x")
    service.said(b, "in #x")
    loop.end()
    assert a.take() == [b"*** guest2 left #lobby (joined #x)\r\n",
                        b"*** #x: guest2\r\n<guest2> in #x\r\n"]
    assert b.take() == [b"*** #x: nobody else here\r\n", b"*** guest1 joined #x\r\n"]


def test_without_a_loop_everything_is_sent_at_once(service):
    a, b = join(service, 2)
    service.said(a, "now")
    assert b.take() == [b"<guest1> now\r\n"]


# ------------------------------------------------------------------ look-alike nicks

@pytest.mark.parametrize("taken, other", [
    ("alice", "aIice"), ("alice", "a1ice"), ("alice", "ALICE"), ("aIice", "alice"),
    ("bob", "b0b"), ("bob", "BOB"), ("b0b", "bOb"), ("Oli", "0l1"), ("bill", "BiII"),
])
def test_a_nick_that_looks_like_a_taken_one_is_taken(service, taken, other):
    a, b = join(service, 2)
    service.said(a, f"/nick {taken}")
    a.take(), b.take()
    service.said(b, f"/nick {other}")
    assert b.take() == [f"*** error: nick taken: {other}\r\n".encode()]
    service.said(b, f"/msg {other} hi")     # a look-alike reaches the nick it looks like
    assert a.take() == [b"*guest2* hi\r\n"]


def test_look_alike_rules():
    """I, l, 1 (and i, I's lower case) are one; O and 0 are one; rn and m are not (two cells
    in a fixed-width font); case never matters."""
    assert skeleton("aIice") == skeleton("alice") == skeleton("ALICE") == skeleton("a1ice")
    assert skeleton("b0b") == skeleton("BOB")
    assert skeleton("rnoo") != skeleton("moo")
    assert skeleton("a_b") != skeleton("a-b") != skeleton("a.b")


def test_ones_own_look_alike_and_guest_look_alikes(service):
    a, b = join(service, 2)
    service.said(a, "/nick alice")
    a.take(), b.take()
    service.said(a, "/nick aIice")          # one's own nick in another look: allowed
    assert b.take() == [b"*** alice is now known as aIice\r\n"]
    for name in ("guestI", "guestl0", "GUESTO"):   # looks like a guest name: reserved
        service.said(b, f"/nick {name}")
        assert b.take() == [f"*** error: nick reserved for guests: {name}\r\n".encode()]


nicks = st.text(st.sampled_from("aAbBiIlLoO01mnr_-.x"), min_size=1, max_size=16)


@settings(max_examples=300, deadline=None)
@given(first=nicks, second=nicks)
def test_two_nicks_can_be_held_at_once_exactly_when_their_skeletons_differ(first, second):
    service = ChatService()
    a, b = join(service, 2)
    service.said(a, f"/nick {first}")
    service.said(b, f"/nick {second}")
    got = b.take()[-1]   # after guest1's rename
    if skeleton(first) == skeleton(second):
        assert got == f"*** error: nick taken: {second}\r\n".encode(), got
    else:
        assert got == f"*** guest2 is now known as {second}\r\n".encode(), got


# ------------------------------------------------------------------ user text in notices

def test_a_quit_reason_is_short_one_line_of_blanks_and_quoted(service):
    a, b = join(service, 2)
    reason = "\t*** server shutting down\t" + "x" * 4000
    service.said(a, "/quit " + reason)
    (got,) = b.take()
    assert got == b'*** guest1 left #lobby (quit: "*** server shutting down xxxx...")\r\n', got


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_quoted_text_is_short_has_no_tab_or_blank_run_and_is_in_quotes(text):
    q = quoted(text)
    assert q[0] == q[-1] == '"' and len(q) <= QUOTE_MAX + 2
    inner = q[1:-1]
    assert "\t" not in inner and "  " not in inner and inner == inner.strip()
    # No quote the user typed is left bare, and no escape is cut in two: unescaped, the
    # inner text is the text with its blanks collapsed (or a prefix of it, then "...").
    units = re.findall(r'\\.|[^\\"]', inner.removesuffix("..."), re.DOTALL)
    assert "".join(units) == inner.removesuffix("...")
    plain = "".join(u[-1] for u in units)
    collapsed = " ".join(text.split())
    assert plain == collapsed or (inner.endswith("...") and collapsed.startswith(plain))


def test_a_quote_in_a_quit_reason_cannot_close_the_quotes():
    """Before, `/quit bye") *** alice left (` showed `(quit: "bye") *** alice left (")`."""
    assert quoted('bye") *** alice left (') == r'"bye\") *** alice left ("'
    assert quoted("a\\") == r'"a\\"'
    assert quoted("x" * 27 + '"yyyy') == '"' + "x" * 27 + r'\"..."'     # 32 characters at most
    assert quoted("x" * 28 + '"yyyy') == '"' + "x" * 28 + '..."'        # never half an escape
    assert quoted("x" * 27 + "\\yyyy") == '"' + "x" * 27 + r'\\..."'
