"""Faults of chat over a bus, with real components: a real redis-server killed, restarted
(empty, or with its append-only file), stopped; subscriptions killed; nodes stopped or cut
off from the bus through a relay (tests/bus_relay.py). Every notice is checked byte for byte
against README "More than one process", and each event must be logged once, not per line.
Each test prints a FIGURES line: how long detection and recovery took."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

import pytest

from bus_relay import Relay
from bus_support import NODE_TIMEOUT, connect, quiet, read_until
from support import LineClient, figures

pytestmark = pytest.mark.timeout(120)

LOST = b"*** Lost contact with the other servers; only people on this server can hear you.\r\n"
RESTORED = b"*** Contact with the other servers restored; lines sent meanwhile did not reach them.\r\n"
NICK_CUT_OFF = b"*** error: cannot change nicks while cut off from the other servers\r\n"
THIS_NODE = b" (this server only: cut off from the others)\r\n"
GAP = b"*** Some lines from another server were lost on the way here.\r\n"


@pytest.fixture
def relays():
    """A factory: relays(target_port) -> a started Relay, closed at teardown."""
    made: list[Relay] = []

    def make(target: int) -> Relay:
        made.append(Relay(target))
        return made[-1]

    yield make
    for relay in made:
        relay.close()


def last(got: bytes) -> bytes:
    """The last line of what read_until returned, with its CRLF."""
    return got.splitlines(keepends=True)[-1]


def expect(client: LineClient, wanted: bytes, timeout: float = 10.0) -> float:
    """Read up to the exact line `wanted`; fail if it comes another way; return when it came."""
    got = read_until(client, wanted.rstrip(b"\r\n"), timeout=timeout)
    assert last(got) == wanted, got
    return time.monotonic()


def settle(*clients: LineClient, wait: float = 0.3) -> None:
    """Let what is on its way arrive, and forget it."""
    for c in clients:
        quiet(c, wait)
        c.buf = b""


def log_count(node, text: str) -> int:
    return node.log_text().count(text)


def guest_number(client: LineClient) -> int:
    return int(re.search(rb"Welcome to chatd, guest(\d+)\.", client.recv_line()).group(1))


# ---------------------------------------------------------------- the bus itself


def test_redis_killed_and_restarted_empty(redis_server, make_node):
    """Both nodes tell their users once, answer alone meanwhile (each refusal and partial
    answer exact), and after an empty restart put everything back: rosters, lines across,
    guest numbers never handed out before."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    seen = {guest_number(LineClient(n.port, host=n.host)) for n in (n2, n3) for _ in range(3)}
    settle(alice, bob)

    fault = time.monotonic()
    server.kill()
    detected = max(expect(alice, LOST), expect(bob, LOST)) - fault
    alice.send(b"/nick sam\n")
    assert last(read_until(alice, b"*** error: ")) == NICK_CUT_OFF
    alice.send(b"/who\n")
    assert last(read_until(alice, b"*** #lobby: ")) == b"*** #lobby: alice" + THIS_NODE
    alice.send(b"/rooms\n")
    assert last(read_until(alice, b"*** rooms: ")) == b"*** rooms: #lobby (1)" + THIS_NODE
    alice.send(b"/msg bob are you there\n")
    assert last(read_until(alice, b"*** error: ")) == b"*** error: bob cannot be reached right now\r\n"
    alice.send(b"said while cut off\n")
    newcomer = LineClient(n2.port, host=n2.host)   # arriving meanwhile: told after its welcome
    assert newcomer.recv_line().startswith(b"*** Welcome to chatd, guest")
    assert newcomer.recv_line() == LOST
    assert newcomer.recv_line() == b"*** #lobby: alice" + THIS_NODE

    back = time.monotonic()
    server.restart(empty=True)
    assert read_until(bob, RESTORED) == RESTORED   # and nothing else meanwhile
    assert read_until(newcomer, RESTORED) == RESTORED
    restored = max(expect(alice, RESTORED), time.monotonic()) - back
    figures("redis_killed_restarted_empty", detect_s=f"{detected:.3f}", recover_s=f"{restored:.3f}")
    assert b"said while cut off" not in quiet(bob, 0.3)   # no late replay
    alice.send(b"after\n")
    assert last(read_until(bob, b"after")) == b"<alice> after\r\n"
    for c in (alice, bob):
        c.send(b"/who\n")
        assert last(read_until(c, b"*** #lobby: ")).startswith(b"*** #lobby: alice, bob, guest")
    alice.send(b"/nick sam\n")
    assert last(read_until(bob, b"is now known as sam")) == b"*** alice is now known as sam\r\n"
    after = {guest_number(LineClient(n.port, host=n.host)) for n in (n2, n3, n2, n3)}
    assert len(after) == 4 and not after & (seen | {0}), (seen, after)
    for node in (n2, n3):
        assert log_count(node, ": lost (") == 1, node.log_text()
        assert log_count(node, ": back after ") == 1, node.log_text()
    for c in (alice, bob, newcomer):
        rest = quiet(c, 0.3)
        assert LOST not in rest and RESTORED not in rest and b"server lost" not in rest


def test_redis_killed_and_restarted_with_its_data(redis_server, make_node):
    """An append-only redis comes back with the rosters: users are told, and nobody is taken
    for gone (no "server lost") though every lease expired meanwhile."""
    server = redis_server(aof=True)
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    time.sleep(1.2)   # appendfsync everysec: what the bus holds is on disk
    settle(alice, bob)
    fault = time.monotonic()
    server.kill()
    detected = max(expect(alice, LOST), expect(bob, LOST)) - fault
    time.sleep(NODE_TIMEOUT * 1.5)   # every lease in the file has expired
    back = time.monotonic()
    server.restart()
    restored = max(expect(alice, RESTORED), expect(bob, RESTORED)) - back
    figures("redis_killed_restarted_with_data", detect_s=f"{detected:.3f}", recover_s=f"{restored:.3f}")
    bob.send(b"/who\n")
    assert last(read_until(bob, b"*** #lobby: ")) == b"*** #lobby: alice, bob\r\n"
    bob.send(b"still here\n")
    assert last(read_until(alice, b"still here")) == b"<bob> still here\r\n"
    time.sleep(NODE_TIMEOUT + 0.5)   # a janitor's round after the restore
    for c in (alice, bob):
        rest = quiet(c, 0.3)
        assert b"server lost" not in rest and LOST not in rest, rest
    for node in (n2, n3):
        assert log_count(node, ": lost (") == 1 and log_count(node, ": back after ") == 1
        assert "is gone (no heartbeat" not in node.log_text()


def test_redis_stopped_longer_than_node_timeout_then_continued(redis_server, make_node):
    """A frozen bus answers nothing: each node finds out by its command timeout, and when
    the bus thaws (every lease expired meanwhile) nodes come back without taking each other
    out."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    settle(alice, bob)
    fault = time.monotonic()
    server.signal(signal.SIGSTOP)
    try:
        alice.send(b"said as the bus froze\n")   # its publish waits in redis's socket
        detected = max(expect(alice, LOST), expect(bob, LOST)) - fault
        alice.send(b"/nick sam\n")
        assert last(read_until(alice, b"*** error: ")) == NICK_CUT_OFF
        time.sleep(NODE_TIMEOUT * 2)
    finally:
        back = time.monotonic()
        server.signal(signal.SIGCONT)
    assert read_until(bob, RESTORED) == RESTORED
    restored = max(expect(alice, RESTORED), time.monotonic()) - back
    figures("redis_stopped_continued", detect_s=f"{detected:.3f}", recover_s=f"{restored:.3f}")
    alice.send(b"thawed\n")
    # No late replay: what was said before the node knew it was cut off is not shown now.
    assert read_until(bob, b"thawed") == b"<alice> thawed\r\n"
    time.sleep(NODE_TIMEOUT + 0.5)
    for c in (alice, bob):
        rest = quiet(c, 0.3)
        assert b"server lost" not in rest and LOST not in rest, rest
    for node in (n2, n3):
        assert log_count(node, ": lost (no answer in time)") == 1, node.log_text()
        assert log_count(node, ": back after ") == 1


def test_subscriptions_killed(redis_server, make_node):
    """CLIENT KILL TYPE pubsub: the nodes notice at once, tell their users, subscribe again."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    settle(alice, bob)
    fault = time.monotonic()
    assert server.command("CLIENT", "KILL", "TYPE", "pubsub") == b":2\r\n"
    detected = max(expect(alice, LOST), expect(bob, LOST)) - fault
    restored = max(expect(alice, RESTORED), expect(bob, RESTORED)) - fault
    figures("subscription_killed", detect_s=f"{detected:.3f}", recover_s=f"{restored:.3f}")
    alice.send(b"resubscribed\n")
    assert last(read_until(bob, b"resubscribed")) == b"<alice> resubscribed\r\n"
    for node in (n2, n3):
        assert log_count(node, ": lost (") == 1 and log_count(node, ": back after ") == 1


# ---------------------------------------------------------------- one node


def test_a_stopped_node_finds_its_lease_lost_and_joins_again(redis_server, make_node):
    """SIGSTOP a node past node_timeout: the janitor takes its users out ("server lost");
    after SIGCONT it finds its lease gone, its users are told (lost, restored, and nothing
    said meanwhile), and the others see them join again."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    settle(alice, bob)
    pid = n3.pid()
    fault = time.monotonic()
    os.kill(pid, signal.SIGSTOP)
    try:
        expect(alice, b"*** bob left #lobby (server lost)\r\n")
        taken = time.monotonic() - fault
        assert taken <= NODE_TIMEOUT + 1.0, taken
        alice.send(b"while bob's server slept\n")
        time.sleep(0.3)
    finally:
        back = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    got = read_until(bob, RESTORED.rstrip(b"\r\n"))
    # Nothing else: no late replay of what was said meanwhile, no "bob left" to bob himself.
    assert got == LOST + RESTORED, got
    restored = time.monotonic() - back
    expect(alice, b"*** bob joined #lobby\r\n")
    rejoined = time.monotonic() - back
    figures("node_stopped_continued", taken_out_s=f"{taken:.3f}", restored_s=f"{restored:.3f}", rejoined_s=f"{rejoined:.3f}")
    bob.send(b"/who\n")
    assert last(read_until(bob, b"*** #lobby: ")) == b"*** #lobby: alice, bob\r\n"
    bob.send(b"awake\n")
    assert last(read_until(alice, b"awake")) == b"<bob> awake\r\n"
    assert log_count(n3, "lease expired") == 1 and log_count(n3, ": lost (lease lost)") == 1
    assert log_count(n2, "node n3 is gone (no heartbeat") == 1


@pytest.mark.parametrize("how", ["cut", "blackhole"])
def test_a_node_cut_off_from_the_bus(redis_server, make_node, relays, how):
    """One node loses the bus (its connections reset, or silently blackholed) while the
    others keep it: its users are told; /msg to them says they cannot be reached; the
    janitor takes them out; when the route is back they are told and join again."""
    server = redis_server()
    relay = relays(server.port)
    n2, n3 = make_node(server.url, 2), make_node(relay.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    settle(alice, bob)
    fault = time.monotonic()
    getattr(relay, how)()
    detected = expect(bob, LOST) - fault
    if how == "cut":   # redis saw the subscription go: nobody listens on n3's channel
        alice.send(b"/msg bob hello\n")
        assert last(read_until(alice, b"*** error: ")) == b"*** error: bob cannot be reached right now\r\n"
    expect(alice, b"*** bob left #lobby (server lost)\r\n")
    taken = time.monotonic() - fault
    alice.send(b"/msg bob hello\n")
    assert last(read_until(alice, b"*** error: ")) == b'*** error: no such nick: "bob"\r\n'
    bob.send(b"/msg alice hello\n")
    assert last(read_until(bob, b"*** error: ")) == b"*** error: alice cannot be reached right now\r\n"
    bob.send(b"/who\n")
    assert last(read_until(bob, b"*** #lobby: ")) == b"*** #lobby: bob" + THIS_NODE
    back = time.monotonic()
    relay.restore()
    assert read_until(bob, RESTORED) == RESTORED
    restored = time.monotonic() - back
    assert read_until(alice, b"bob joined") == b"*** bob joined #lobby\r\n"
    figures(f"node_{how}", detect_s=f"{detected:.3f}", taken_out_s=f"{taken:.3f}",
            recover_s=f"{restored:.3f}")
    bob.send(b"back\n")
    assert last(read_until(alice, b"back")) == b"<bob> back\r\n"
    assert log_count(n3, ": lost (") == 1 and log_count(n3, ": back after ") == 1
    assert log_count(n2, "node n3 is gone") == 1
    assert ": lost (" not in n2.log_text()


def test_a_nick_taken_elsewhere_while_cut_off(redis_server, make_node, relays):
    """The bus restarts empty while n3 is cut off; n2 comes back first and its user takes
    "sam": n3's sam becomes a guest, told with the exact notice, its room too."""
    server = redis_server()
    relay = relays(server.port)
    n2, n3 = make_node(server.url, 2), make_node(relay.url, 3)
    alice, sam, carol = connect(n2, "alice"), connect(n3, "sam"), connect(n3, "carol")
    settle(alice, sam, carol)
    relay.cut()
    expect(sam, LOST)
    server.restart(empty=True)
    expect(alice, RESTORED)
    alice.send(b"/nick sam\n")
    expect(alice, b"*** alice is now known as sam\r\n")
    relay.restore()
    got = read_until(sam, b"*** Your nick sam was taken")
    m = re.fullmatch(rb"\*\*\* Your nick sam was taken on another server while this one was cut "
                     rb"off; you are now (guest\d+)\.\r\n", last(got))
    assert m, got
    guest = m.group(1)
    assert last(read_until(carol, b"is now known as")) == b"*** sam is now known as " + guest + b"\r\n"
    expect(sam, RESTORED)
    expect(carol, RESTORED)
    # n2's room hears of it as n3's users do (the bus has the rename once n2 hears it).
    assert read_until(alice, b"is now known as") == b"*** sam is now known as " + guest + b"\r\n"
    for c in (alice, sam):
        c.send(b"/who\n")
        assert last(read_until(c, b"*** #lobby: ")) == b"*** #lobby: carol, " + guest + b", sam\r\n"
    sam.send(b"/nick sam\n")
    assert last(read_until(sam, b"*** error: ")) == b"*** error: nick taken: sam\r\n"
    assert log_count(n3, "bus: the nick sam was taken on another node while this one was cut "
                         "off; its holder here is now " + guest.decode()) == 1


def test_lines_lost_between_nodes_are_told_once_per_room(redis_server, make_node, relays):
    """n2 loses the bus for a moment while its users talk in two rooms: those lines never
    reach n3, whose members of each room are told once that lines were lost, then hear the
    rest in order."""
    server = redis_server()
    relay = relays(server.port)
    n2, n3 = make_node(relay.url, 2), make_node(server.url, 3)
    alice, dave, bob, erin = connect(n2, "alice"), connect(n2, "dave"), connect(n3, "bob"), connect(n3, "erin")
    for c in (erin, dave):
        c.send(b"/join #side\n")
        read_until(c, b"*** #side: ")
    read_until(erin, b"*** dave joined #side")   # n3 has heard from n2 in both rooms
    settle(alice, dave, bob, erin)
    relay.cut()
    expect(alice, LOST)
    for i in range(5):
        alice.send(b"lost %d\n" % i)
        dave.send(b"lost too %d\n" % i)
    time.sleep(0.1)
    relay.restore()
    expect(alice, RESTORED)
    for i in range(3):
        alice.send(b"found %d\n" % i)
        dave.send(b"found too %d\n" % i)
    assert read_until(bob, b"found 2") == GAP + b"<alice> found 0\r\n<alice> found 1\r\n<alice> found 2\r\n"
    assert read_until(erin, b"found too 2") == \
        GAP + b"<dave> found too 0\r\n<dave> found too 1\r\n<dave> found too 2\r\n"
    alice.send(b"more\n")
    assert read_until(bob, b"more") == b"<alice> more\r\n"
    assert log_count(n3, "were lost on the way") == 2


@pytest.mark.slow
def test_a_stalled_node_cut_off_by_redis_output_buffer_limit(redis_server, make_node):
    """A node frozen while its rooms are busy: redis kills its subscription at the pub/sub
    output-buffer limit. Once it runs again it must notice (the lease is still good, only the
    subscription is gone), tell its users, and subscribe again."""
    server = redis_server()
    assert server.command("CONFIG", "SET", "client-output-buffer-limit", "pubsub 64kb 32kb 1") == b"+OK\r\n"
    timing = {"heartbeat": 0.5, "node_timeout": 6.0}   # the lease outlives the stall
    n2 = make_node(server.url, 2, start=False, **timing)
    n2.extra_config += "[limits]\nrate = 0\n"   # alice may flood
    n2.write_config(host=n2.host, mode="chat")
    n2.start()
    n3 = make_node(server.url, 3, **timing)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    settle(alice, bob)
    pid = n3.pid()
    chunk = b"".join(b"%04d " % i + b"x" * 3000 + b"\n" for i in range(64))   # 190 KB
    os.kill(pid, signal.SIGSTOP)
    try:
        stalled = time.monotonic()
        sent = 0
        redis_log = server.dir / "redis.log"
        while time.monotonic() - stalled < 3.0 and "output buffer limits" not in redis_log.read_text():
            alice.send(chunk)
            sent += len(chunk)
            time.sleep(0.01)
        assert "output buffer limits" in redis_log.read_text(), f"sent {sent} bytes"
        time.sleep(0.2)
    finally:
        back = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    read_until(bob, LOST.rstrip(b"\r\n"), timeout=20)
    detected = time.monotonic() - back
    expect(bob, RESTORED, timeout=20)
    restored = time.monotonic() - back
    figures("node_stalled_output_buffer", sent_kb=sent // 1024, detect_s=f"{detected:.3f}",
            recover_s=f"{restored:.3f}")
    alice.send(b"after the stall\n")
    assert last(read_until(bob, b"after the stall")) == b"<alice> after the stall\r\n"
    assert log_count(n3, ": lost (") == 1 and log_count(n3, ": back after ") == 1
    assert "lease" not in n3.log_text()


def test_guest_numbers_are_not_reused_after_the_bus_restarts_empty(redis_server, make_node):
    """The bus forgets its guest counter: the nodes coming back raise it past their blocks, so
    neither they nor a node that joins afterwards hand out a number already given."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    keep = [LineClient(n.port, host=n.host) for n in (n2, n3, n2, n3)]
    seen = [guest_number(c) for c in keep]
    server.restart(empty=True)
    for c in keep[:2]:
        expect(c, RESTORED)
    n4 = make_node(server.url, 4)
    for node in (n2, n3, n4, n2, n3, n4):
        c = LineClient(node.port, host=node.host)
        seen.append(guest_number(c))
        c.close()
    assert len(set(seen)) == len(seen), str(seen)


def test_a_nick_taken_after_the_janitor_took_its_holder_out(redis_server, make_node, relays):
    """n3 is cut off past node_timeout: the others see its sam leave ("server lost") and
    alice takes the nick. When n3 is back its sam becomes a guest and joins again under that
    name; the others, who saw sam leave, are not told that their sam was renamed."""
    server = redis_server()
    relay = relays(server.port)
    n2, n3 = make_node(server.url, 2), make_node(relay.url, 3)
    alice, sam = connect(n2, "alice"), connect(n3, "sam")
    settle(alice, sam)
    relay.cut()
    expect(sam, LOST)
    assert read_until(alice, b"sam left") == b"*** sam left #lobby (server lost)\r\n"
    alice.send(b"/nick sam\n")
    assert read_until(alice, b"is now known as") == b"*** alice is now known as sam\r\n"
    relay.restore()
    got = read_until(sam, b"*** Your nick sam was taken")
    guest = re.search(rb"you are now (guest\d+)\.\r\n", got).group(1)
    assert got == (b"*** Your nick sam was taken on another server while this one was cut off; "
                   b"you are now " + guest + b".\r\n")
    assert read_until(sam, RESTORED) == b"*** sam is now known as " + guest + b"\r\n" + RESTORED
    assert read_until(alice, b"joined #lobby") == b"*** " + guest + b" joined #lobby\r\n"
    alice.send(b"/who\n")
    assert last(read_until(alice, b"*** #lobby: ")) == b"*** #lobby: " + guest + b", sam\r\n"


def test_guest_numbers_are_not_reused_in_a_burst_of_arrivals(redis_server, make_node):
    """More newcomers at once than half a guest block, on two nodes: every number once."""
    server = redis_server()
    nodes = [make_node(server.url, n, guest_block=20) for n in (2, 3)]
    pids = [node.pid() for node in nodes]
    for pid in pids:   # all of them wait in the backlog: each node takes them in a burst
        os.kill(pid, signal.SIGSTOP)
    try:
        socks = [socket.create_connection((node.host, node.port), timeout=5)
                 for node in nodes for _ in range(90)]   # under max_clients_per_ip
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    numbers = []
    for s in socks:
        with s:
            data = b""
            while b"\n" not in data and len(data) < 4096:
                chunk = s.recv(4096)
                assert chunk, data
                data += chunk
            numbers.append(int(re.search(rb"Welcome to chatd, guest(\d+)\.", data).group(1)))
    assert len(set(numbers)) == len(numbers), f"{len(numbers) - len(set(numbers))} handed out twice"


@pytest.mark.slow
def test_a_long_bus_outage_ends_within_reconnect_max(redis_server, make_node):
    """Down long enough for the retries to space out to reconnect_max: once redis answers
    again the node is back within reconnect_max (and a moment), logged once each way."""
    server = redis_server()
    node = make_node(server.url, 2, reconnect_max=1.5)
    alice = connect(node, "alice")
    settle(alice)
    server.kill()
    expect(alice, LOST)
    time.sleep(8)   # 0.05 + 0.1 + ... : the waits have reached reconnect_max
    server.start()
    answered = time.monotonic()
    assert read_until(alice, RESTORED) == RESTORED
    took = time.monotonic() - answered
    figures("redis_long_outage", recover_after_redis_answers_s=f"{took:.3f}")
    assert took <= 1.5 + 1.0, took
    assert log_count(node, ": lost (") == 1 and log_count(node, ": back after ") == 1
