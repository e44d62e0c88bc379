"""ChatService with fake peers: commands, rooms, nick rules; a slow peer never blocks a sender."""

from __future__ import annotations

import pytest

from chatd.rooms import ChatService


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
    service.on_line(a, "hi there")
    assert a.take() == []
    assert b.take() == c.take() == [b"<guest1> hi there\r\n"]
    service.on_line(a, "/me waves")
    assert b.take() == [b"* guest1 waves\r\n"] and a.take() == []


def test_nick_rules(service):
    a, b = join(service, 2)
    service.on_line(a, "/nick alice")
    assert a.take() == b.take() == [b"*** guest1 is now known as alice\r\n"]
    for bad, why in (("ALICE", b"nick taken: ALICE"), ("guest9", b"nick reserved for guests: guest9"),
                     ("x" * 17, b"bad nick"), ("a b", b"bad nick"), ("caf\u00e9", b"bad nick")):
        service.on_line(b, f"/nick {bad}")
        got = b.take()
        assert len(got) == 1 and got[0].startswith(b"*** error: ") and why in got[0], (bad, got)
    service.on_line(a, "/nick Alice")           # a case change of your own nick is allowed
    assert b.take() == [b"*** alice is now known as Alice\r\n"]
    a.take()
    service.on_line(b, "/nick Guest2")          # and so is your own guest name in another case
    assert a.take() == [b"*** guest2 is now known as Guest2\r\n"]


def test_rooms_join_who_rooms_and_isolation(service):
    a, b, c = join(service, 3)
    service.on_line(c, "/join #Rust")
    assert c.take() == [b"*** #rust: nobody else here\r\n"]
    assert a.take() == b.take() == [b"*** guest3 left #lobby (joined #rust)\r\n"]
    service.on_line(b, "/join rust")
    assert b.take() == [b"*** #rust: guest3\r\n"] and c.take() == [b"*** guest2 joined #rust\r\n"]
    a.take()
    service.on_line(a, "lobby only")
    assert b.take() == c.take() == []
    service.on_line(c, "/who")
    assert c.take() == [b"*** #rust: guest2, guest3\r\n"]
    service.on_line(a, "/rooms")
    assert a.take() == [b"*** rooms: #lobby (1), #rust (2)\r\n"]
    service.on_line(b, "/join #rust")
    assert b.take() == [b"*** error: you are already in #rust\r\n"]
    service.on_line(b, "/join #bad!")
    assert b.take()[0].startswith(b"*** error: bad room name")


def test_private_messages_reach_any_room(service):
    a, b = join(service, 2)
    service.on_line(b, "/join #elsewhere")
    a.take(), b.take()
    service.on_line(a, "/msg GUEST2 psst")
    assert b.take() == [b"*guest1* psst\r\n"] and a.take() == [b"-> *guest2* psst\r\n"]
    service.on_line(a, "/msg nobody x")
    assert a.take() == [b"*** error: no such nick: nobody\r\n"]
    service.on_line(a, "/msg guest2")
    assert a.take() == [b"*** error: usage: /msg NICK TEXT\r\n"]


def test_quit_unknown_commands_escape_and_help(service):
    a, b = join(service, 2)
    service.on_line(a, "/bogus x")
    assert a.take() == [b"*** error: unknown command /bogus (try /help)\r\n"]
    service.on_line(a, "//not a command")
    assert b.take() == [b"<guest1> /not a command\r\n"]
    service.on_line(a, "/help")
    lines = a.take()
    assert len(lines) > 5 and all(l.startswith(b"*** ") for l in lines)
    service.on_line(a, "/quit gone fishing")
    assert b.take() == [b"*** guest1 left #lobby (gone fishing)\r\n"]
    assert "guest1" not in service.nicks


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
    service.on_line(a, "to everyone")
    expected = {b"<guest1> to everyone\r\n", b"*** guest2 left #lobby (too slow)\r\n"}
    assert set(c.take()) == set(d.take()) == expected
    assert b not in service.rooms["#lobby"]


def test_configure_applies_to_new_arrivals(service):
    (a,) = join(service, 1)
    service.configure("new motd", "#Games")
    b = FakePeer(service)
    service.arrive(b)
    assert b.take()[1:] == [b"*** new motd\r\n", b"*** #games: nobody else here\r\n"]
    assert a.room == "#lobby"


def test_lines_of_one_read_reach_each_member_in_one_write_and_in_order(service):
    """cork/uncork around one read: three lines are one send per member; a reply to the
    sender, or a private message, first sends what is held, so nobody sees events reordered."""
    a, b, c = join(service, 3)
    service.cork()
    for text in ("one", "two", "three"):
        service.on_line(a, text)
    assert b.got == [] and c.got == []              # held
    service.uncork()
    assert b.take() == c.take() == [b"<guest1> one\r\n<guest1> two\r\n<guest1> three\r\n"]
    assert a.take() == []
    service.cork()
    service.on_line(a, "before")
    service.on_line(a, "/msg guest2 private")
    service.on_line(a, "after")
    service.uncork()
    assert b.take() == [b"<guest1> before\r\n", b"*guest1* private\r\n", b"<guest1> after\r\n"]
    assert a.take() == [b"-> *guest2* private\r\n"]
    assert c.take() == [b"<guest1> before\r\n", b"<guest1> after\r\n"]


def test_a_joiner_never_gets_its_own_join_notice_even_when_held(service):
    a, b = join(service, 2)
    service.cork()
    service.on_line(b, "/join #x")
    service.on_line(a, "/join #x")
    service.uncork()
    assert a.take() == [b"*** guest2 left #lobby (joined #x)\r\n", b"*** #x: guest2\r\n"]
    assert b.take() == [b"*** #x: nobody else here\r\n", b"*** guest1 joined #x\r\n"]
