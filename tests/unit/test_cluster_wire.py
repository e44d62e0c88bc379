"""What comes off the bus (cluster.py): whatever a message holds, what reaches a client is a
`<nick> ` line, an action, or one of chatd's own notices with checked fields; never an escape,
a control character, or a notice of the sender's making. Each sender's lines at most once, in
order. No Redis here: the backend is built but never started."""

from __future__ import annotations

import asyncio
import json
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("redis")

from chatd.cluster import NOTICES, ClusterBackend   # noqa: E402

SAFE_LINE = re.compile(
    rb"<[A-Za-z0-9_.-]{1,16}> [^\r\n]*|\* [A-Za-z0-9_.-]{1,16} [^\r\n]*"
    rb"|\*\*\* [A-Za-z0-9_.-]{1,16} (joined #[a-z0-9_-]+|left #[a-z0-9_-]+ \([^\r\n]*\)"
    rb"|is now known as [A-Za-z0-9_.-]{1,16})"
    rb"|\*\*\* " + re.escape(NOTICES["gap"].encode()))


class Recorder:
    """Stands in for the ChatService: what the backend would send."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    def broadcast(self, room: str, data: bytes, by: object = None, skip: object = None) -> None:
        self.sent.append(data)

    def tell(self, peer: object, data: bytes, by: object = None) -> None:
        self.sent.append(data)


class Member:
    nick = "alice"
    room = "#lobby"


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def backend(loop) -> tuple[ClusterBackend, Recorder]:
    async def make() -> ClusterBackend:
        return ClusterBackend(Recorder(), "redis://127.0.0.1:1", "here", "chatd", 1.0, 3.0, 1.0, 10)  # type: ignore[arg-type]
    made = loop.run_until_complete(make())
    made.link.up = True                   # as if joined, with a lease that holds
    made._lease_until = float("inf")
    member = Member()
    made._rooms["#lobby"] = {member: None}   # type: ignore[dict-item]
    made._nicks["alice"] = member   # type: ignore[assignment]
    return made, made.service   # type: ignore[return-value]


def safe(sent: list[bytes]) -> None:
    for data in sent:
        assert data.endswith(b"\r\n")
        for one in data[:-2].split(b"\r\n"):
            assert SAFE_LINE.fullmatch(one), one
            assert b"\x1b" not in one and not re.search(rb"[\x00-\x1f\x7f]", one), one


texts = st.text(alphabet=st.sampled_from(
    ["a", " ", "\r", "\n", "\x1b", "[", "]", "2", "J", "\x07", "\u202e", "\u200b", "*", "<", ">",
     "\x00", "\x85", "\u2028", "\ufeff", "é", '"', "\\"]), max_size=40)
values = st.one_of(texts, st.integers(), st.none(), st.lists(st.integers(), max_size=2),
                   st.sampled_from(["mallory", "bob> <eve", "x" * 17, "", "#lobby"]))
kinds = st.sampled_from(["say", "me", "join", "leave", "nick", "msg", "shutdown", ""])


@settings(max_examples=300, deadline=None)
@given(kind=kinds, nick=values, text=values, seq=st.one_of(st.integers(1, 5), values))
def test_any_room_message_reaches_clients_only_in_chatd_s_own_shapes(loop, kind, nick, text, seq):
    made, service = backend(loop)
    payload = json.dumps({"o": "there", "e": "0123456789abcdef", "i": 1, "s": seq, "k": kind, "n": nick, "t": text})
    made._on_message(b"chatd:room:#lobby", payload.encode())
    safe(service.sent)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=80))
def test_any_bytes_at_all_are_dropped_or_shaped(loop, raw):
    made, service = backend(loop)
    made._on_message(b"chatd:room:#lobby", raw)
    made._on_message(b"chatd:to:here", raw)
    safe(service.sent)


@settings(max_examples=200, deadline=None)
@given(nick=values, text=values)
def test_private_messages_are_one_clean_line(loop, nick, text):
    made, service = backend(loop)
    made._on_message(b"chatd:to:here", json.dumps(
        {"o": "there", "e": "0123456789abcdef", "i": 1, "k": "msg", "n": nick, "to": "alice", "t": text}).encode())
    for data in service.sent:
        assert re.fullmatch(rb"\*[A-Za-z0-9_.-]{1,16}\* [^\x00-\x1f\x7f]*\r\n", data), data


def test_a_sender_s_lines_come_once_each_in_order_and_a_gap_is_told_once(loop):
    made, service = backend(loop)

    def say(seq: int, text: str, origin: str = "there") -> None:
        made._on_message(b"chatd:room:#lobby", json.dumps(
            {"o": origin, "e": "0123456789abcdef", "i": 1, "s": seq, "k": "say", "n": "bob", "t": text}).encode())

    say(1, "one")
    say(1, "one again")     # a repeat
    say(3, "three")         # 2 was lost
    say(2, "two, late")     # late: after 3, so dropped
    say(5, "five")          # 4 lost too: the same episode, not told again
    say(1, "other sender", origin="elsewhere")
    assert service.sent == [b"<bob> one\r\n", f"*** {NOTICES['gap']}\r\n".encode(),
                            b"<bob> three\r\n", b"<bob> five\r\n", b"<bob> other sender\r\n"]


def test_our_own_publishes_coming_back_are_skipped(loop):
    made, service = backend(loop)
    made._on_message(b"chatd:room:#lobby", made._encode({"s": 1, "k": "say", "n": "alice", "t": "hi"}))
    assert service.sent == []


def test_forged_origins_by_the_thousand_cannot_grow_memory_without_bound(loop):
    from chatd.cluster import SEEN_MAX
    made, _ = backend(loop)
    for i in range(SEEN_MAX + 500):
        made._on_message(b"chatd:room:#lobby", json.dumps(
            {"o": f"f{i}", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "join", "n": "bob", "t": ""}).encode())
    assert len(made._seen) <= SEEN_MAX


def say(made: ClusterBackend, seq: int, text: str, origin: str = "there", **extra: object) -> None:
    made._on_message(b"chatd:room:#lobby", json.dumps(
        {"o": origin, "e": "0123456789abcdef", "i": 1, "s": seq, "k": "say", "n": "bob",
         "t": text} | extra).encode())


def test_json_nested_too_deep_is_dropped_and_what_follows_still_comes(loop):
    made, service = backend(loop)
    made._on_message(b"chatd:room:#lobby", b"[" * 100000)
    say(made, 1, "still here")
    assert service.sent == [b"<bob> still here\r\n"]


def test_a_malformed_message_cannot_silence_a_real_sender(loop):
    made, service = backend(loop)
    say(made, 1, "one")
    say(made, 10**15, "x", k="bogus")          # dropped, and its number does not count
    say(made, 10**9, "far ahead")              # past the window: dropped
    say(made, 2, "two")
    assert service.sent == [b"<bob> one\r\n", b"<bob> two\r\n"]


def test_leaving_a_room_forgets_its_senders_so_coming_back_shows_no_false_gap(loop):
    made, service = backend(loop)
    (member,) = made._rooms["#lobby"]
    say(made, 1, "one")
    made.link.up = False                       # what leave and join ask of the bus: answered DOWN
    made.leave("#lobby", member, "joined #other")
    say(made, 2, "while away")                 # not ours any more
    made.join("#lobby", member)
    made.link.up = True
    say(made, 3, "three")
    assert service.sent == [b"<bob> one\r\n", b"<bob> three\r\n"]
    assert made._seq.keys() <= {"#lobby"}
