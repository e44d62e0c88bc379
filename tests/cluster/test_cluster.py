"""Chat over a bus between real chatd nodes and a real redis-server: rooms, nicks, rosters,
/msg, guest numbers, forged bus messages, nodes that stop or die (README "More than one
process")."""

from __future__ import annotations

import json
import re
import signal
import time

import pytest

from bus_support import NODE_TIMEOUT, connect, quiet, read_until
from support import LineClient, wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def trio(redis_server, make_node):
    """A redis-server and three nodes on it (127.0.0.2, .3, .4)."""
    server = redis_server()
    return server, [make_node(server.url, n) for n in (2, 3, 4)]


def test_a_room_spans_nodes_each_line_once_in_order(trio):
    _, (n2, n3, n4) = trio
    alice, bob, carol = connect(n2, "alice"), connect(n3, "bob"), connect(n4, "carol")
    time.sleep(0.3)   # the joins are seen everywhere
    for c in (alice, bob, carol):
        quiet(c, 0.2)
        c.buf = b""
    alice.send(b"one\ntwo\r\nthree \x1b[31mred\x1b[0m\n")
    alice.send(b"/me waves\n")
    want = b"<alice> one\r\n<alice> two\r\n<alice> three red\r\n* alice waves\r\n"
    for c in (bob, carol):
        assert c.recv_exact(len(want)) == want
        assert quiet(c, 0.3) == b""
    assert quiet(alice, 0.3) == b""


def test_who_and_rooms_answer_the_same_on_every_node(trio):
    _, (n2, n3, n4) = trio
    clients = [connect(n2, "alice"), connect(n3, "Bob"), connect(n4, "carol")]
    clients[2].send(b"/join #side\n")
    read_until(clients[2], b"*** #side: nobody else here\r\n")
    time.sleep(0.2)
    answers = set()
    for c in clients:
        c.send(b"/rooms\n")
        answers.add(read_until(c, b"*** rooms: ").splitlines()[-1])
    assert answers == {b"*** rooms: #lobby (2), #side (1)"}
    for c in clients[:2]:
        c.send(b"/who\n")
        assert read_until(c, b"*** #lobby: ").splitlines()[-1] == b"*** #lobby: alice, Bob"
    clients[0].send(b"/join #side\n")
    assert read_until(clients[0], b"*** #side: ").splitlines()[-1] == b"*** #side: carol"
    assert read_until(clients[2], b"joined #side").splitlines()[-1] == b"*** alice joined #side"
    assert read_until(clients[1], b"left #lobby").splitlines()[-1] == \
        b"*** alice left #lobby (joined #side)"


def test_thirty_clients_on_three_nodes_race_for_one_nick_and_one_wins(trio):
    _, nodes = trio
    clients = [connect(nodes[i % 3]) for i in range(30)]
    spellings = ["sam", "Sam", "SAM", "sAm", "saM"]
    for i, c in enumerate(clients):
        c.send(f"/nick {spellings[i % 5]}\n".encode())
    time.sleep(1.0)
    refused = sum(b"*** error: nick taken: " in quiet(c, 0.1) for c in clients)
    assert refused == 29
    answers = []
    for c in clients:
        c.buf = b""
        c.send(b"/who\n")
        answers.append(read_until(c, b"*** #lobby: "))
    owners = {line for a in answers for line in a.splitlines() if line.startswith(b"*** #lobby: ")}
    names = owners.pop().removeprefix(b"*** #lobby: ").split(b", ")
    assert not owners, "every node gives the same roster"
    assert len([n for n in names if n.lower() == b"sam"]) == 1, names
    assert len(names) == 30


def test_private_messages_cross_nodes_and_say_so_when_they_cannot(trio):
    _, (n2, n3, _) = trio
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    alice.send(b"/msg BOB psst\n")
    assert read_until(bob, b"psst").splitlines()[-1] == b"*alice* psst"
    assert read_until(alice, b"psst").splitlines()[-1] == b"-> *BOB* psst"
    alice.send(b"/msg nobody hello\n")
    assert read_until(alice, b"nobody").splitlines()[-1] == b'*** error: no such nick: "nobody"'


def test_guest_numbers_are_never_handed_out_twice_across_nodes(trio):
    _, nodes = trio
    seen = []
    for i in range(12):
        c = LineClient(nodes[i % 3].port, host=nodes[i % 3].host)
        seen.append(re.search(rb"Welcome to chatd, (guest\d+)\.", c.recv_line()).group(1))
        c.close()
    assert len(set(seen)) == len(seen), seen


def test_a_node_stopping_gracefully_takes_its_users_out_at_once(trio):
    _, (n2, n3, _) = trio
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    time.sleep(0.2)
    started = time.monotonic()
    n3.cmd("stop", check=0)
    assert read_until(alice, b"bob left").splitlines()[-1] == b"*** bob left #lobby (server shutting down)"
    assert time.monotonic() - started < 5
    alice.send(b"/who\n")
    assert read_until(alice, b"*** #lobby: ").splitlines()[-1] == b"*** #lobby: alice"
    del bob


def test_a_killed_node_s_users_leave_within_node_timeout_and_a_second(trio):
    _, (n2, n3, n4) = trio
    alice, bob, carol = connect(n2, "alice"), connect(n3, "bob"), connect(n4, "carol")
    bob.send(b"/join #b\n")
    read_until(bob, b"*** #b: ")
    carol.send(b"/join #b\n")
    read_until(carol, b"*** #b: bob")
    time.sleep(0.3)
    killed = time.monotonic()
    n3.cmd("status", check=0)
    import os
    os.kill(n3.pid(), signal.SIGKILL)
    assert read_until(carol, b"bob left").splitlines()[-1] == b"*** bob left #b (server lost)"
    took = time.monotonic() - killed
    assert took <= NODE_TIMEOUT + 1.0, took
    alice.send(b"/rooms\n")
    assert read_until(alice, b"*** rooms:").splitlines()[-1] == b"*** rooms: #b (1), #lobby (1)"
    assert "node n3 is gone" in n2.log_text() + n4.log_text()


def test_a_node_id_in_use_is_refused_at_start(redis_server, make_node):
    server = redis_server()
    make_node(server.url, 2)
    twin = make_node(server.url, 3, start=False, node_id="n2")
    proc = twin.cmd("start")
    assert proc.returncode == 1
    assert b"node_id 'n2' is in use by another chatd" in proc.stderr


def test_a_bus_that_cannot_be_reached_stops_the_start(redis_server, make_node):
    server = redis_server()
    server.stop()
    node = make_node(server.url, 2, start=False)
    proc = node.cmd("start")
    assert proc.returncode == 1
    assert f"[cluster] bus {server.url}: cannot reach it".encode() in proc.stderr
    assert b"Traceback" not in proc.stderr


# Each from its own origin ("f1", "f2", ...), so that none looks like a gap in another's lines.
FORGED = [
    b"not json at all",
    b"\x80\x03cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",   # a pickle
    json.dumps({"o": "f1", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "say", "n": "mallory",
                "t": "hi\r\n*** server: you are banned"}).encode(),
    json.dumps({"o": "f2", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "say", "n": "bob> <alice",
                "t": "forged"}).encode(),
    json.dumps({"o": "f3", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "say", "n": "mallory",
                "t": "\x1b]0;owned\x07\x1b[2J"}).encode(),
    json.dumps({"o": "f4", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "leave", "n": "mallory",
                "t": "quit\r\n*** fake"}).encode(),
    json.dumps({"o": "f5", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "me", "n": "mallory", "t": "a\nb"}).encode(),
    json.dumps({"o": "x", "e": "0123456789abcdef", "i": 1, "s": "6", "k": "say", "n": "mallory", "t": "x"}).encode(),
    json.dumps({"o": "f6", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "shutdown", "n": "mallory", "t": ""}).encode(),
    json.dumps([1, 2, 3]).encode(),
]


def test_forged_bus_messages_never_reach_a_client_as_notices_nicks_or_escapes(redis_server, make_node):
    server = redis_server()
    node = make_node(server.url, 2)
    alice = connect(node, "alice")
    for payload in FORGED:
        assert server.command("PUBLISH", "chatd:room:#lobby", payload.decode("latin-1")).startswith(b":")
    server.command("PUBLISH", "chatd:to:n2", json.dumps(
        {"o": "x", "e": "0123456789abcdef", "i": 1, "k": "msg", "n": "mallory", "to": "alice", "t": "\x1b[2Jhi\r\n*** x"}))
    ok = json.dumps({"o": "f7", "e": "0123456789abcdef", "i": 1, "s": 1, "k": "say", "n": "mallory", "t": "after"})
    server.command("PUBLISH", "chatd:room:#lobby", ok)
    got = read_until(alice, b"<mallory> after")
    # What got through is what a client typing it would have made: each line prefixed with
    # its (well-formed) nick, sanitized; never a notice, a false nick or an escape.
    assert got == (b"<mallory> hi\r\n<mallory> *** server: you are banned\r\n"
                   b"<mallory> after\r\n"), got
    log = node.log_text()
    assert "bus: dropped a message on chatd:room:#lobby that chatd would not send" in log
    assert log.count("that chatd would not send") == 1   # once per 10 s, with a count


def test_a_restart_rejects_a_new_bus_by_name_and_applies_new_timings(redis_server, make_node):
    server = redis_server()
    node = make_node(server.url, 2)
    other = redis_server()
    node.config.write_text(node.config.read_text().replace(server.url, other.url))
    proc = node.cmd("restart")
    assert proc.returncode == 6
    assert b"cluster.bus changed from" in proc.stdout + proc.stderr
    node.config.write_text(node.config.read_text().replace(other.url, server.url)
                           .replace("node_timeout = 1.0", "node_timeout = 2.0"))
    proc = node.cmd("restart", check=0)
    assert b"cluster.node_timeout 1.0 -> 2.0" in proc.stdout
    # The lease is renewed with the new timeout from the next heartbeat on.
    wait_for(lambda: int(server.command("PTTL", "chatd:node:n2")[1:]) > 1200,
             what="a lease of 2 s")
