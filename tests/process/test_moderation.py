"""Moderation through the control socket (README "Moderation"): `chatd who`, `kick`, `ban`,
`unban`, `bans`, `say`, `stats`, through the real `chatd` command and real `nc` clients,
byte for byte.

Clients come from 127.0.0.2 and 127.0.0.3 (`nc -s`; all of 127/8 is local on Linux), so a
ban on one leaves the other, and the test's own 127.0.0.1, alone.
"""

from __future__ import annotations

import json
import os
import re
import socket
import stat
import time

import pytest

from conftest import require_real
from support import LineClient, wait_for
from test_chat_clients import NC, NcClient
from test_normal_user import (AS_NOBODY, CLEAN_ENV, SYSTEM_PYTHON,  # noqa: F401 - fixtures
                              nobody, nobody_can_run_chatd)

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

ALICE, BOB = "127.0.0.2", "127.0.0.3"


def welcome(n: int) -> bytes:
    return b"*** Welcome to chatd, guest%d. Type /help for commands.\r\n" % n


def need_nc() -> None:
    if not os.access(NC, os.X_OK):
        require_real("nc")


def start(inst, mode: str = "chat", host: str = "127.0.0.1") -> None:
    need_nc()
    inst.write_config(mode=mode, host=host)
    inst.start()


def out(proc) -> str:
    return proc.stdout.decode()


def refused_unread(port: int, source: str) -> bytes:
    """Connect from `source`, send a line and half-close, read to EOF: what the server said
    (nothing, if it closed the connection unread and untold)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as s:
        data = b""
        try:
            s.sendall(b"hello\n")
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                data += chunk
        except TimeoutError:
            raise
        except OSError:   # reset, or not connected any more: closed over the unread line
            pass
        return data


@pytest.fixture
def clients():
    made: list[NcClient] = []

    def make(port: int, source: str) -> NcClient:
        client = NcClient(port, "-s", source)
        made.append(client)
        return client

    yield make
    for client in made:
        client.stop()


def lobby(inst, clients) -> tuple[NcClient, NcClient]:
    """bob (guest1, from BOB), then alice (guest2, from ALICE), both in #lobby and named."""
    bob = clients(inst.port, BOB)
    assert bob.expect(welcome(1) + b"*** #lobby: nobody else here\r\n") == \
        welcome(1) + b"*** #lobby: nobody else here\r\n"
    alice = clients(inst.port, ALICE)
    assert alice.expect(b"*** #lobby: guest1\r\n") == welcome(2) + b"*** #lobby: guest1\r\n"
    assert bob.expect(b"*** guest2 joined #lobby\r\n") == b"*** guest2 joined #lobby\r\n"
    for c, nick in ((alice, b"alice"), (bob, b"bob")):
        c.send(b"/nick " + nick + b"\n")
        renamed = b"*** guest%d is now known as %s\r\n" % (1 if c is bob else 2, nick)
        assert alice.expect(b"\r\n") == renamed and bob.expect(b"\r\n") == renamed
    return alice, bob


def client_port(inst, nick: str) -> int:
    who = json.loads(inst.cmd("who", "--json", check=0).stdout)
    return int(next(c for c in who["clients"] if c["nick"] == nick)["address"].rsplit(":", 1)[1])


# ------------------------------------------------------------------ kick and say

def test_kick_is_seen_by_the_kicked_user_and_by_the_room(loop_chatd, clients):
    """1. bob and alice in #lobby; 2. `chatd kick ALICE spamming links` (nicks compare as in
    chat: case-insensitive). Result: exit 0, stdout names her; alice gets exactly `*** you
    were kicked: spamming links` and then EOF; bob gets `*** alice left #lobby (kicked:
    spamming links)`; a second kick exits 1 (no such nick), a kick without NICK exits 2."""
    chatd = loop_chatd   # on both loops
    start(chatd)
    alice, bob = lobby(chatd, clients)
    port = client_port(chatd, "alice")
    proc = chatd.cmd("kick", "ALICE", "spamming", "links", check=0)
    assert out(proc) == f"kicked alice ({ALICE}:{port})\n"
    assert alice.expect(b"\r\n") == b"*** you were kicked: spamming links\r\n"
    assert alice.close_and_wait() == 0
    assert alice.got[alice.seen:] == b""
    assert bob.expect(b"\r\n") == b"*** alice left #lobby (kicked: spamming links)\r\n"
    proc = chatd.cmd("kick", "alice", check=1)
    assert proc.stderr == b"chatd: no such nick on this server: alice\n"
    proc = chatd.cmd("kick", check=2)
    assert proc.stderr.startswith(b"chatd: kick: missing TARGET\n")
    bob.send(b"/who\n")
    assert bob.expect(b"\r\n") == b"*** #lobby: bob\r\n"


def test_say_reaches_every_client_sanitized(chatd, clients):
    """1. bob and alice in #lobby; 2. `chatd say` with an escape sequence and a tab in it.
    Result: both get exactly `*** server restarts at noon`; stdout says 2 clients."""
    start(chatd)
    alice, bob = lobby(chatd, clients)
    proc = chatd.cmd("say", "server\x1b[31m restarts\tat", "noon", check=0)
    assert out(proc) == "said to 2 clients\n"
    for c in (alice, bob):
        assert c.expect(b"\r\n") == b"*** server restarts at noon\r\n"
    assert chatd.cmd("say", check=2).stderr.startswith(b"chatd: say: missing TEXT\n")


def test_echo_mode_kick_by_address_and_say(chatd, clients):
    """Echo mode has no nicks: 1. two echo clients; 2. `chatd say hi`; 3. `chatd kick
    127.0.0.2 bye`; 4. `chatd kick somebody`. Result: both get `*** hi` between their
    echoed lines; the one from 127.0.0.2 gets `*** you were kicked: bye` and EOF, the other
    still echoes; a nick exits 1 (echo has none)."""
    start(chatd, mode="echo")
    a = clients(chatd.port, ALICE)
    b = clients(chatd.port, BOB)
    for c in (a, b):
        c.send(b"one\n")
        assert c.expect(b"one\n") == b"one\n"
    assert out(chatd.cmd("say", "hi", check=0)) == "said to 2 clients\n"
    for c in (a, b):
        assert c.expect(b"\r\n") == b"*** hi\r\n"
    proc = chatd.cmd("kick", ALICE, "bye", check=0)
    assert re.fullmatch(rf"kicked {re.escape(ALICE)}:\d+\n", out(proc))
    assert a.expect(b"\r\n") == b"*** you were kicked: bye\r\n"
    assert a.close_and_wait() == 0
    b.send(b"two\n")
    assert b.expect(b"two\n") == b"two\n"
    assert chatd.cmd("kick", "somebody", check=1).stderr == \
        b"chatd: no such nick on this server: somebody\n"


# ------------------------------------------------------------------ who and stats

def test_who_lists_nick_room_address_time_and_bytes(loop_chatd, clients):
    """1. bob and alice in #lobby, alice then in #dev; 2. `chatd who --json` and `chatd who`.
    Result: one entry each with nick, room, address, mode; bytes in as sent (the kernel's
    count: `/nick alice\\n/join #dev\\n` is 23 bytes), bytes out as received; the table has
    a header and one row each."""
    chatd = loop_chatd   # on both loops
    start(chatd)
    alice, bob = lobby(chatd, clients)
    alice.send(b"/join #dev\n")
    alice.expect(b"*** #dev: nobody else here\r\n")
    assert bob.expect(b"\r\n") == b"*** alice left #lobby (joined #dev)\r\n"

    def entries() -> dict:
        return {c["nick"]: c for c in json.loads(chatd.cmd("who", "--json", check=0).stdout)["clients"]}

    wait_for(lambda: entries()["alice"]["bytes_out"] == len(alice.got)
             and entries()["bob"]["bytes_out"] == len(bob.got), what="bytes out to match")
    who = entries()
    assert who["alice"] | {"connected_s": 0} == {
        "nick": "alice", "room": "#dev", "address": f"{ALICE}:{client_port(chatd, 'alice')}",
        "mode": "chat", "connected_s": 0, "bytes_in": 23, "bytes_out": len(alice.got)}
    assert who["bob"]["room"] == "#lobby" and who["bob"]["bytes_in"] == len(b"/nick bob\n")
    assert 0 <= who["bob"]["connected_s"] < 30
    lines = out(chatd.cmd("who", check=0)).splitlines()
    assert lines[0].split() == ["NICK", "ROOM", "ADDRESS", "CONNECTED", "BYTES", "IN", "BYTES", "OUT"]
    assert sorted(ln.split()[:3] for ln in lines[1:]) == [
        ["alice", "#dev", who["alice"]["address"]], ["bob", "#lobby", who["bob"]["address"]]]


def test_stats_text_and_json(chatd, clients):
    """`chatd stats` and `--json` after a restart in place, with one client and one ban."""
    start(chatd)
    c = clients(chatd.port, ALICE)
    c.expect(welcome(1))
    chatd.cmd("restart", check=0)
    chatd.cmd("ban", "192.0.2.0/24", check=0)
    stats = json.loads(chatd.cmd("stats", "--json", check=0).stdout)
    listener = f"127.0.0.1:{chatd.port}"
    assert stats["clients"] == [{"mode": "chat", "listener": listener, "value": 1}], stats
    assert (stats["generation"], stats["bans"], stats["connections_accepted_total"]) == (1, 1, 1), stats
    assert {"outcome": "applied", "value": 1} in stats["restarts_total"], stats
    text = out(chatd.cmd("stats", check=0))
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines()]
    for row in (["clients", "1"], [f"chat, {listener}", "1"], ["generation", "1"], ["bans", "1"],
                ["restarts", "1"], ["applied", "1"], ["connections accepted", "1"]):
        assert row in rows, text


# ------------------------------------------------------------------ bans

def test_ban_kicks_refuses_unread_lists_and_expires(loop_chatd, clients):
    """1. bob and alice in #lobby; 2. `chatd ban 127.0.0.3 2s`; 3. connect from 127.0.0.3
    three times; 4. wait for the expiry. Result: bob gets `*** you were banned` and EOF, the
    room sees him leave `(banned)`; each new connection from 127.0.0.3 is closed with not a
    byte sent; one log line says so (the others are counted); `chatd bans` lists the ban
    until it expires, then `no bans`; after it, 127.0.0.3 is welcome again."""
    chatd = loop_chatd   # on both loops
    start(chatd)
    alice, bob = lobby(chatd, clients)
    bob_port = client_port(chatd, "bob")
    proc = chatd.cmd("ban", BOB, "2s", check=0)
    assert out(proc) == f"banned {BOB}; kicked bob ({BOB}:{bob_port})\n"
    assert bob.expect(b"\r\n") == b"*** you were banned\r\n"
    assert bob.close_and_wait() == 0
    assert alice.expect(b"\r\n") == b"*** bob left #lobby (banned)\r\n"
    lines = out(chatd.cmd("bans", check=0)).splitlines()
    assert lines[0].split() == ["BAN", "EXPIRES", "IN"] and lines[1].split()[0] == BOB
    for _ in range(3):
        assert refused_unread(chatd.port, BOB) == b""
    assert len(re.findall(rf"refused {re.escape(BOB)}:\d+: banned", chatd.log_text())) == 1
    assert refused_unread(chatd.port, ALICE).startswith(welcome(3))
    wait_for(lambda: out(chatd.cmd("bans", check=0)) == "no bans\n", timeout=5, interval=0.2,
             what="the ban to expire")
    assert refused_unread(chatd.port, BOB).startswith(b"*** Welcome to chatd, guest")


def test_ban_cidr_survives_restart_until_unbanned(chatd):
    """1. `chatd ban 127.0.0.2/31` (no duration); 2. `chatd restart`; 3. `chatd unban`.
    Result: 127.0.0.2 and .3 refused before and after the restart, 127.0.0.1 served;
    `bans --json` says it never expires; after unban both are served; a second unban exits 1."""
    start(chatd, mode="echo")
    assert out(chatd.cmd("ban", "127.0.0.3/31", check=0)) == "banned 127.0.0.2/31; kicked nobody\n"
    for _ in range(2):
        assert refused_unread(chatd.port, ALICE) == b""
        assert refused_unread(chatd.port, BOB) == b""
        assert refused_unread(chatd.port, "127.0.0.1") == b"hello\n"
        chatd.cmd("restart", check=0)
    refused = json.loads(chatd.cmd("stats", "--json", check=0).stdout)["connections_refused_total"]
    assert {"reason": "banned", "value": 4} in refused, refused     # counted under their reason
    assert json.loads(chatd.cmd("bans", "--json", check=0).stdout) == {
        "bans": [{"ban": "127.0.0.2/31", "expires_in_s": None}]}
    assert out(chatd.cmd("unban", "127.0.0.2/31", check=0)) == "unbanned 127.0.0.2/31\n"
    assert refused_unread(chatd.port, ALICE) == b"hello\n"
    assert chatd.cmd("unban", "127.0.0.2/31", check=1).stderr == \
        b"chatd: no ban on 127.0.0.2/31 (see chatd bans)\n"


def test_ipv4_client_of_a_dual_stack_listener_matches_an_ipv4_ban(chatd, clients):
    """On `::` an IPv4 client arrives as ::ffff:127.0.0.2: 1. connect from 127.0.0.2;
    2. `chatd ban 127.0.0.2`. Result: `who` shows it as 127.0.0.2; the client is kicked, and
    refused after."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    start(chatd, mode="echo", host="::")
    c = clients(chatd.port, ALICE)
    c.send(b"x\n")
    c.expect(b"x\n")
    who = json.loads(chatd.cmd("who", "--json", check=0).stdout)["clients"]
    assert [w["address"].rsplit(":", 1)[0] for w in who] == [ALICE]
    chatd.cmd("ban", ALICE, check=0)
    assert c.expect(b"\r\n") == b"*** you were banned\r\n"
    assert refused_unread(chatd.port, ALICE) == b""


# ------------------------------------------------------------------ usage, not running

@pytest.mark.parametrize("args, message", [
    (["ban", "1.2.3.4/33"], "bad address '1.2.3.4/33'"),
    (["ban", "example.org"], "bad address 'example.org'"),
    (["ban", "10.0.0.1", "10x"], "bad duration '10x'"),
    (["ban", "10.0.0.1", "0"], "bad duration '0'"),
    (["ban", "10.0.0.1", "1m", "more"], "ban: unexpected 'more'"),
    (["ban"], "ban: missing TARGET"),
    (["unban"], "unban: missing TARGET"),
    (["who", "extra"], "who: unexpected 'extra'"),
    (["status", "extra"], "unrecognized arguments: extra"),
])
def test_bad_usage_exits_2(chatd, args, message):
    """Bad arguments exit 2 with one `chatd: ` line, before any daemon is looked for."""
    proc = chatd.cmd(*args, check=2)
    assert proc.stderr.decode().startswith(f"chatd: {message}"), proc.stderr
    assert proc.stdout == b""


@pytest.mark.parametrize("args", [["who"], ["kick", "x"], ["ban", "10.0.0.1"], ["unban", "10.0.0.1"],
                                  ["bans"], ["say", "hi"], ["stats"]])
def test_not_running_exits_7(chatd, args):
    """Like `reload` of a stopped chatd: exit 7, `chatd: chatd is not running`."""
    proc = chatd.cmd(*args, check=7)
    assert proc.stderr == b"chatd: chatd is not running\n"


# ------------------------------------------------------------------ the socket

def sock_path(inst):
    return inst.pidfile.with_suffix(".sock")


def test_socket_is_0600_ours_and_removed_at_stop(chatd):
    start(chatd, mode="echo")
    st = os.lstat(sock_path(chatd))
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    chatd.cmd("stop", check=0)
    assert not os.path.lexists(sock_path(chatd))


def test_planted_symlink_or_file_at_the_socket_is_replaced_not_followed(chatd, tmp_path):
    """1. X.sock is a symlink to a file, then (second round) a plain file; 2. start. Result:
    the file the link named is untouched and still a file; X.sock is the daemon's socket and
    `chatd who` works. A directory at X.sock is refused: start exits 4."""
    target = tmp_path / "target"
    target.write_bytes(b"secret\n")
    sock = sock_path(chatd)
    for plant in (lambda: sock.symlink_to(target), lambda: sock.write_bytes(b"planted\n")):
        plant()
        start(chatd, mode="echo")
        assert target.read_bytes() == b"secret\n" and stat.S_ISREG(os.lstat(target).st_mode)
        assert stat.S_ISSOCK(os.lstat(sock).st_mode)
        assert out(chatd.cmd("who", check=0)) == "no clients\n"
        chatd.cmd("stop", check=0)
    sock.mkdir()
    proc = chatd.cmd("start", check=4)
    assert proc.stderr.decode().startswith(f"chatd: cannot create control socket {sock}: "), proc.stderr


def test_another_user_gets_exit_4(nobody, make_chatd):
    """1. root starts chatd in a world-traversable directory; 2. nobody runs `chatd who`,
    `kick`, `say`; 3. root makes the socket 0666 and nobody tries again. Result: 4 with a
    clear message each time: first the socket's mode stops nobody, then the daemon itself
    (SO_PEERCRED) refuses uid 65534; nothing was said to the client."""
    inst = make_chatd(public=True)
    start(inst)
    with LineClient(inst.port) as client:
        assert client.recv_line() == welcome(1)
        for args in (["who"], ["kick", "guest1"], ["say", "hi"]):
            proc = nobody._run(AS_NOBODY + [SYSTEM_PYTHON, "-m", "chatd", *args, "-c", str(inst.config)],
                               CLEAN_ENV, 4, 60)
            assert b"chatd: not allowed to use chatd's control socket" in proc.stderr, proc.stderr
        os.chmod(sock_path(inst), 0o666)
        proc = nobody._run(AS_NOBODY + [SYSTEM_PYTHON, "-m", "chatd", "say", "hi", "-c", str(inst.config)],
                           CLEAN_ENV, 4, 60)
        assert proc.stderr == f"chatd: not allowed: only root and uid {os.geteuid()} may control chatd\n".encode()
        assert "control socket: refused pid" in inst.log_text()
        client.send(b"/rooms\n")
        assert client.recv_line().startswith(b"*** #lobby: nobody else here")


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_daemon_that_dropped_privileges_serves_root_and_its_user(make_chatd, clients):
    """1. root starts chatd with `user = "nobody"` in a root-owned 0755 directory; 2. root
    runs `chatd kick`; 3. stop, start again. Result: X.sock is nobody's, mode 0600; root is
    served; the socket nobody could not remove at exit is replaced by the next start."""
    inst = make_chatd(public=True)
    need_nc()
    inst.write_config(mode="chat", daemon={"user": "nobody"})
    for _ in range(2):
        inst.start()
        st = os.lstat(sock_path(inst))
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (65534, 0o600)
        c = clients(inst.port, ALICE)
        c.expect(b"*** #lobby: nobody else here\r\n")
        assert out(inst.cmd("kick", ALICE, check=0)).startswith(f"kicked guest")
        assert c.expect(b"\r\n") == b"*** you were kicked\r\n"
        inst.cmd("stop", check=0)
        assert os.path.lexists(sock_path(inst))   # nobody may not unlink in root's directory


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_a_stuck_or_oversized_control_client_holds_nothing(loop_chatd):
    """1. connect to X.sock and send nothing; 2. another sends 100 KiB with no newline;
    3. meanwhile `chatd who` and an echo client. Result: both are answered at once; the
    oversized request is answered `bad request`; the stuck one is closed after 5 s."""
    chatd = loop_chatd   # on both loops
    start(chatd, mode="echo")
    with socket.socket(socket.AF_UNIX) as stuck, socket.socket(socket.AF_UNIX) as big:
        stuck.connect(str(sock_path(chatd)))
        big.connect(str(sock_path(chatd)))
        big.settimeout(5)
        try:
            big.sendall(b"x" * 100_000)
        except OSError:
            pass   # the daemon may close it before it has taken all of it
        began = time.monotonic()
        assert out(chatd.cmd("who", check=0)) == "no clients\n"
        with LineClient(chatd.port) as c:
            c.send(b"ping\n")
            assert c.recv_line() == b"ping\n"
        assert time.monotonic() - began < 3
        big.shutdown(socket.SHUT_WR)
        assert big.recv(1000) == b'{"ok": false, "error": "bad request", "status": 2}\n'
        stuck.settimeout(10)
        assert stuck.recv(100) == b""
        assert 4 < time.monotonic() - began < 9
