"""Live upgrade of a node of a bus (README "Live upgrade"): the new process is the same node,
on the same lease, with the same users; the other nodes see nothing happen."""

from __future__ import annotations

import threading
import time

from bus_support import NODE_TIMEOUT, connect, quiet, read_until
from support import figures


def test_a_node_upgraded_in_place_keeps_its_users_nicks_and_lease(redis_server, make_node):
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3)
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    time.sleep(0.3)
    for c in (alice, bob):
        quiet(c, 0.2)
        c.buf = b""
    old = n2.pid()
    done = n2.cmd("upgrade", check=0)
    assert b"1 clients carried over" in done.stdout
    assert n2.pid() != old
    assert quiet(bob, 0.5) == b"", "the other node saw the upgraded node's user leave or join"
    alice.send(b"after\n")
    assert read_until(bob, b"<alice>").endswith(b"<alice> after\r\n")
    bob.send(b"back\n")
    assert read_until(alice, b"<bob>").endswith(b"<bob> back\r\n")
    time.sleep(NODE_TIMEOUT * 2.5)   # past the old process's last heartbeat: the lease held on
    assert quiet(bob, 0.1) == b""
    bob.send(b"/who\n")
    assert read_until(bob, b"*** #lobby: ").splitlines()[-1] == b"*** #lobby: alice, bob"
    carol = connect(n3)
    carol.send(b"/nick alice\n")
    assert b"nick taken" in read_until(carol, b"nick taken")
    connect(n2)   # a guest number from the carried block, not one in use
    alice.send(b"/who\n")
    listed = read_until(alice, b"*** #lobby: ").splitlines()[-1]
    assert listed.startswith(b"*** #lobby: alice, bob, guest"), listed


def test_lines_said_on_another_node_during_upgrades_come_once_in_order_none_lost(redis_server,
                                                                                make_node):
    """A line every 5 ms from another node while this one upgrades three times: each reaches
    this node's user exactly once and in order. The new process listens to the node's
    channels before the old one freezes (bus.EarlyListener), and the carried sequence
    numbers drop what the old one had already shown."""
    server = redis_server()
    n2, n3 = make_node(server.url, 2), make_node(server.url, 3, start=False)
    n3.extra_config += "[limits]\nrate = 0.0\n"
    n3.write_config(host=n3.host, mode="chat")
    n3.start()
    alice, bob = connect(n2, "alice"), connect(n3, "bob")
    time.sleep(0.3)
    quiet(alice, 0.2)
    alice.buf = b""
    stop = threading.Event()

    def talk() -> None:
        for i in range(2000):
            if stop.is_set():
                return
            bob.send(b"%d\n" % i)
            time.sleep(0.005)
    talker = threading.Thread(target=talk)
    talker.start()
    time.sleep(0.6)
    for _ in range(3):
        n2.cmd("upgrade", check=0)
    time.sleep(0.6)
    stop.set()
    talker.join(10)
    bob.send(b"end\n")
    got = read_until(alice, b"<bob> end")
    numbers = [int(line[6:]) for line in got.splitlines() if line.startswith(b"<bob> ") and line[6:].isdigit()]
    told = got.count(b"*** Some lines from another server were lost on the way here.")
    gaps = sum(1 for a, b in zip(numbers, numbers[1:]) if b != a + 1)
    lost = sum(b - a - 1 for a, b in zip(numbers, numbers[1:]))
    figures("cluster upgrade", lines=len(numbers), lost=lost, gaps=gaps, told=told)
    assert numbers == list(range(len(numbers))) and len(numbers) > 100, "lost, repeated or reordered"
    assert [line for line in got.splitlines() if line.startswith(b"***")] == []
