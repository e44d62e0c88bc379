"""Live upgrade (README "Live upgrade"): `chatd upgrade` between installed versions, with real
clients connected through it, and broken new versions that must leave the old one serving.

Each test installs the checkout's chatd twice under other version strings (tests/installs.py)
and starts the daemon through the `current` link, which the test then points at the other
install, as a package upgrade replaces /usr/bin/chatd's code under a running daemon.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import threading
import time

import pytest

from installs import EXITS_EARLY, HANGS, IMPORT_FAILS, NEW_FORMAT, Installs, stopped_mid_upgrade, upgrading
from support import LineClient, alive, fd_count, flock_held, free_port, rss_kib, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

A, B = "1.0.0+a", "1.0.0+b"


@pytest.fixture
def installs(tmp_path) -> Installs:
    made = Installs(tmp_path / "installs")
    made.make("a", A)
    made.make("b", B)
    made.use("a")
    return made


@pytest.fixture
def make_daemon(make_chatd, installs):
    """A chatd instance whose daemon starts through `current` (version A to begin with); the
    control commands are the checkout's chatd (a broken install's own could not even run)."""
    def make(loop: str = "auto", extra: str = "", **server: object):
        inst = make_chatd(loop=loop)
        inst.write_config(extra=extra, **server)
        return inst
    return make


def start(inst, installs: Installs) -> int:
    inst.command = installs.command
    try:
        return inst.start()
    finally:
        inst.command = None


def status(inst) -> dict:
    return json.loads(inst.cmd("status", "--json", check=0).stdout)


def upgrade(inst, installs: Installs, to: str, *args: str, check: int | None = 0):
    """Point `current` at `to`, then `chatd upgrade`."""
    installs.use(to)
    return inst.cmd("upgrade", *args, check=check, timeout=60)


def echoes(client: LineClient, line: bytes) -> None:
    client.send(line)
    assert client.recv_exact(len(line)) == line


# ------------------------------------------------------------------ what is carried over

@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_echo_clients_keep_their_connection_partial_line_and_telnet_state(make_daemon, installs, loop):
    inst = make_daemon(loop=loop)
    old = start(inst, installs)
    clients = [LineClient(inst.port) for _ in range(5)]
    for i, c in enumerate(clients):
        echoes(c, b"before %d\n" % i)
    clients[0].send(b"half a li")             # a partial line, completed after the upgrade
    clients[1].send(b"\xff")                   # telnet: IAC now, DO TIMING-MARK after
    time.sleep(0.2)
    fds_before = fd_count(old)
    watch = LockWatch(inst.pidfile)
    done = upgrade(inst, installs, "b")
    probes, free = watch.done()
    assert probes > 20 and free == 0, f"the pid file's lock was free in {free} of {probes} probes"
    assert f"chatd upgraded from {A} (pid {old}) to {B}".encode() in done.stdout, done.stdout
    assert b"5 clients carried over" in done.stdout
    new = inst.pid()
    assert new != old
    wait_for(lambda: not alive(old), what="the old process to exit")
    clients[0].send(b"ne\n")
    assert clients[0].recv_line() == b"half a line\n"
    clients[1].send(b"\xfd\x06x\n")
    assert clients[1].recv_exact(5) == b"\xff\xfb\x06x\n"   # WILL TIMING-MARK, then the echo
    for i, c in enumerate(clients):
        echoes(c, b"after %d\n" % i)
    report = status(inst)
    assert report["version"] == B and report["pid"] == new
    assert report["last_upgrade"]["from"] == A and report["last_upgrade"]["clients"] == 5
    assert report["clients"] == 5
    text = inst.cmd("status", check=0).stdout.decode()
    assert f"last upgrade: " in text and f"from {A} (pid {old}), 5 clients carried over" in text
    assert abs(fd_count(new) - fds_before) <= 3, (fd_count(new), fds_before)
    newcomer = LineClient(inst.port)
    echoes(newcomer, b"new\n")
    assert "upgrade: handed over to chatd" in inst.log_text()
    assert f"upgraded from chatd {A} (pid {old}): 5 clients carried over" in inst.log_text()


def test_chat_keeps_nicks_rooms_partial_lines_and_the_control_socket(make_daemon, installs):
    inst = make_daemon(mode="chat")
    old = start(inst, installs)
    alice, bob, carol = (LineClient(inst.port) for _ in range(3))
    for c in (alice, bob, carol):
        c.recv_line()   # welcome
    alice.send(b"/nick alice\n/join #tea\n")
    bob.send(b"/nick bob\n/join #tea\n")
    wait_for(lambda: b"bob joined #tea" in alice.buf or _pull(alice, b"bob joined #tea"),
             what="bob in #tea")
    for c in (alice, bob, carol):
        _drain(c)
    bob.send(b"a partial ")
    time.sleep(0.2)
    upgrade(inst, installs, "b")
    bob.send(b"line\n")
    assert _pull(alice, b"<bob> a partial line\r\n")
    carol.send(b"/nick bob\n")   # bob's nick is still taken after the upgrade
    assert _pull(carol, b"nick taken")
    alice.send(b"/who\n")
    assert _pull(alice, b"*** #tea: alice, bob\r\n")
    guest = LineClient(inst.port)
    assert b"guest4" in guest.recv_line()   # guest numbers go on, none reused
    who = inst.cmd("who", "--json", check=0)   # the control socket answers, from the new pid
    nicks = {c["nick"]: c["room"] for c in json.loads(who.stdout)["clients"]}
    assert nicks["alice"] == "#tea" and nicks["bob"] == "#tea"
    assert status(inst)["pid"] != old


class LockWatch(threading.Thread):
    """Probes the pid file's lock from a fresh open file, every millisecond, until `done`:
    `free` counts the probes that found it free, `probes` all of them."""

    def __init__(self, pidfile) -> None:
        super().__init__(daemon=True)
        self.pidfile, self.stop, self.free, self.probes = pidfile, threading.Event(), 0, 0
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + 60
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.probes += 1
            self.free += not flock_held(self.pidfile)
            time.sleep(0.001)

    def done(self) -> tuple[int, int]:
        self.stop.set()
        self.join(5)
        return self.probes, self.free


def _pull(client: LineClient, wanted: bytes, timeout: float = 5.0) -> bool:
    """Read until `wanted` has arrived; True, or fail with what came."""
    deadline = time.monotonic() + timeout
    while wanted not in client.buf:
        if time.monotonic() > deadline:
            raise AssertionError(f"{wanted!r} not in {client.buf[-300:]!r}")
        try:
            client._fill(deadline)
        except (socket.timeout, TimeoutError):
            pass
    return True


def _drain(client: LineClient) -> None:
    client.buf = b""
    client.sock.settimeout(0.3)
    try:
        while client.sock.recv(65536):
            pass
    except (socket.timeout, TimeoutError, BlockingIOError):
        pass
    client.sock.settimeout(10)


def test_output_queued_for_a_reader_that_does_not_read_arrives_whole_and_in_order(make_daemon, installs):
    """Echo output the kernel would not take waits in the daemon (the transport's unsent end
    and the outbox): the upgrade carries it, and the client gets every byte, in order."""
    inst = make_daemon(extra="[limits]\noutput_buffer = 4194304\n")
    start(inst, installs)
    slow = LineClient(inst.port, rcvbuf=4096)
    lines = b"".join(b"%07d %s\n" % (i, b"y" * 100) for i in range(20000))   # ~2.2 MB
    slow.sock.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 10
    while sent < len(lines) and time.monotonic() < deadline:
        try:
            sent += slow.sock.send(lines[sent:sent + 65536])
        except BlockingIOError:
            time.sleep(0.01)
    assert sent == len(lines), "the daemon stopped reading before it held 2 MB"
    time.sleep(0.5)
    upgrade(inst, installs, "b")
    slow.sock.setblocking(True)
    assert slow.recv_exact(len(lines), timeout=20) == lines


def test_bans_metrics_and_the_restart_count_are_carried(make_daemon, installs):
    inst = make_daemon()
    start(inst, installs)
    inst.cmd("ban", "127.0.0.9", check=0)
    inst.cmd("restart", check=0)
    c = LineClient(inst.port)
    echoes(c, b"x\n")
    before = json.loads(inst.cmd("stats", "--json", check=0).stdout)
    upgrade(inst, installs, "b")
    after = json.loads(inst.cmd("stats", "--json", check=0).stdout)
    for family in ("connections_accepted_total", "received_bytes_total", "sent_bytes_total", "generation"):
        assert after[family] == before[family], family
    assert after["generation"] == 1
    assert after["restarts_total"] == before["restarts_total"]
    bans = json.loads(inst.cmd("bans", "--json", check=0).stdout)["bans"]
    assert [b["ban"] for b in bans] == ["127.0.0.9"]
    assert status(inst)["last_restart"]["outcome"] == "applied"


def test_a_proxy_header_half_read_is_read_on_by_the_new_process(make_daemon, installs):
    """A PROXY header cut in two by the upgrade: the new process reads the rest and serves the
    client it names (its connect line names that client, not the proxy)."""
    inst = make_daemon(listen=[f"proxy://127.0.0.1:{0}"])
    inst.write_config(listen=[f"proxy://127.0.0.1:{inst.port}"],
                      extra='[access]\nproxy_from = ["127.0.0.1"]\n')
    start(inst, installs)
    proxied = LineClient(inst.port)
    proxied.send(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 7777")
    time.sleep(0.3)
    upgrade(inst, installs, "b")
    proxied.send(b"\r\nthrough\n")
    assert proxied.recv_line() == b"through\n"
    assert "connect 192.0.2.7:5555" in inst.log_text().split("upgraded from chatd")[-1]


# ------------------------------------------------------------------ what may go wrong

@pytest.mark.parametrize("broken, reason", [
    (IMPORT_FAILS, "No module named 'chatd_no_such_module'"),
    (EXITS_EARLY, "exited with status 1 before taking over: chatd: this build refuses to start"),
    (HANGS, "within 2 s"),
    (NEW_FORMAT, "does not read state records of format 1"),
], ids=["import-fails", "exits-before-ready", "hangs", "another-record-format"])
def test_a_broken_new_version_leaves_the_old_one_serving(make_daemon, installs, broken, reason):
    installs.make("broken", "9.9.9", broken)
    inst = make_daemon(mode="chat")
    old = start(inst, installs)
    a, b = LineClient(inst.port), LineClient(inst.port)
    a.recv_line(), b.recv_line()
    failed = upgrade(inst, installs, "broken", "--timeout", "2", check=1)
    err = failed.stderr.decode()
    assert err.startswith(f"chatd: upgrade failed; chatd {A} (pid {old}) still serving: "), err
    assert reason in err, err
    assert "Traceback" not in err
    assert inst.pid() == old and status(inst)["version"] == A
    assert "failed" in status(inst)["last_upgrade"]
    a.send(b"still here\n")
    assert _pull(b, b"still here")
    echo_newcomer = LineClient(inst.port)
    assert b"Welcome" in echo_newcomer.recv_line()
    if broken is HANGS:   # the old one takes back, then a good version takes over
        upgrade(inst, installs, "b")
        a.send(b"and now\n")
        assert _pull(b, b"and now")


def test_not_running_is_exit_7_and_a_foreground_daemon_is_refused(make_daemon, installs):
    inst = make_daemon()
    gone = inst.cmd("upgrade", check=7)
    assert gone.stderr == b"chatd: chatd is not running\n"
    inst.run_foreground()
    refused = inst.cmd("upgrade", check=1)
    assert b"runs in the foreground" in refused.stderr


def test_under_a_notify_socket_the_old_main_pid_names_the_new_one_and_stderr_goes_on(make_daemon,
                                                                                  installs):
    """`chatd run` under systemd's protocol, logging to stderr (the journal's stream): the old
    main pid sends MAINPID= the new pid and READY=1 at the commit, the new one then speaks
    for itself, and its log lines go on to the same stderr."""
    from test_init_systems import NotifySocket
    notify = NotifySocket()
    inst = make_daemon()
    inst.config.write_text(inst.config.read_text().replace(f'target = "{inst.logfile}"', 'target = "stderr"'))
    inst.command = installs.command
    proc = inst.run_foreground(env=notify.env())
    inst.command = None
    old = proc.pid
    notify.wait_line("READY=1")
    upgrade(inst, installs, "b")
    handed = notify.wait(lambda d: d.get("MAINPID") is not None, what="MAINPID=")
    new = inst.pid()
    assert handed.pid == old and handed.get("MAINPID") == str(new) and handed.has("READY=1")
    wait_for(lambda: f"upgraded from chatd {A} (pid {old})".encode() in inst.foreground_stderr(),
             what="the new process's log line on the same stderr")
    c = LineClient(inst.port)
    echoes(c, b"x\n")
    assert notify.wait(lambda d: d.pid == new and d.get("STATUS") is not None).get("STATUS")
    wait_for(lambda: b"connect 127.0.0.1" in inst.foreground_stderr().split(b"upgraded from")[-1],
             what="the new process logging a connect")
    assert proc.wait(5) == 0   # the old main process left of its own accord
    os.kill(new, signal.SIGTERM)
    wait_for(lambda: not alive(new), what="the new process to stop")


def test_a_stop_signal_calls_the_upgrade_off_and_a_sighup_waits_for_it(make_daemon, installs):
    installs.make("hangs", "9.9.9", HANGS)
    inst = make_daemon()
    old = start(inst, installs)
    installs.use("hangs")
    up = upgrading(inst, "--timeout", "3")
    wait_for(lambda: "upgrade: started" in inst.log_text(), what="the upgrade to begin")
    os.kill(old, signal.SIGHUP)
    time.sleep(0.3)
    assert "restart applied" not in inst.log_text()   # it waits for the upgrade's end
    out, err = up.communicate(timeout=30)
    assert up.returncode == 1 and b"within 3 s" in err, err
    wait_for(lambda: "restart applied" in inst.log_text(), what="the restart after the upgrade")
    stopped_mid_upgrade(inst, installs, old, 1)


def test_two_upgrades_at_once_take_turns(make_daemon, installs):
    inst = make_daemon()
    old = start(inst, installs)
    c = LineClient(inst.port)
    installs.use("b")
    argv = installs.command + ["upgrade", "-c", str(inst.config)]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL) for _ in range(2)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    pids = {int(o.split(b"(pid ")[2].split(b")")[0]) for o, _ in outs}
    assert len(pids) == 2 and inst.pid() in pids and old not in pids
    echoes(c, b"both\n")


def test_tls_clients_are_told_to_reconnect(make_daemon, installs, tmp_path):
    """A TLS session's keys live in the old process's OpenSSL and cannot be carried: its
    client is told, then closed; a plaintext client beside it stays."""
    from test_tls import client_context, self_signed, tls_config
    inst = make_daemon()
    plain_port = free_port()
    tls_config(inst, self_signed(tmp_path / "certs"), inst.port, plain_port, mode="chat")
    start(inst, installs)
    tls = client_context().wrap_socket(socket.create_connection(("127.0.0.1", inst.port), timeout=5),
                                       server_hostname="localhost")
    plain = LineClient(plain_port)
    plain.recv_line()
    assert b"Welcome" in tls.recv(4096)
    upgrade(inst, installs, "b")
    told = b""
    for _ in range(20):
        try:
            chunk = tls.recv(4096)
        except (ssl.SSLError, OSError):
            break
        if not chunk:
            break
        told += chunk
    assert b"*** server upgrading; please reconnect\r\n" in told, told
    assert _pull(plain, b"*** guest1 left #lobby (upgrade)\r\n")
    plain.send(b"/who\n")
    assert _pull(plain, b"*** #lobby: guest2\r\n")


# ------------------------------------------------------------------ under load

@pytest.mark.slow
def test_ten_upgrades_under_load_lose_nothing(make_daemon, installs):
    """100 echo clients and a 10-member chat room busy, a client connecting in a tight loop,
    10 upgrades between A and B: no disconnect, no refused connect, no lost, repeated or
    garbled line; descriptors and memory back to their level."""
    echo = make_daemon(extra="[limits]\nmax_clients_per_ip = 0\n")
    chat = make_daemon(mode="chat", extra="[limits]\nrate = 0\nmax_clients_per_ip = 0\n")
    start(echo, installs), start(chat, installs)
    stop = threading.Event()
    problems: list[str] = []
    counts = {"echo": 0, "chat": 0, "connects": 0}
    threads = [threading.Thread(target=_echo_load, args=(echo.port, 100, stop, problems, counts)),
               threading.Thread(target=_chat_load, args=(chat.port, 10, stop, problems, counts)),
               threading.Thread(target=_connector, args=(echo.port, stop, problems, counts))]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        levels = {inst.port: (fd_count(inst.pid()), rss_kib(inst.pid())) for inst in (echo, chat)}
        for i in range(10):
            version = "b" if i % 2 == 0 else "a"
            for inst in (echo, chat):
                upgrade(inst, installs, version)
            time.sleep(0.5)
            assert not problems, problems[:5]
        time.sleep(1)
        for inst in (echo, chat):   # while the load goes on: the same clients, one connector
            assert status(inst)["version"] == A
            fds, rss = levels[inst.port]
            assert abs(fd_count(inst.pid()) - fds) <= 3, (fd_count(inst.pid()), fds)
            assert rss_kib(inst.pid()) < rss * 1.5 + 20000, (rss_kib(inst.pid()), rss)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not problems, problems[:10]
    assert counts["echo"] > 1000 and counts["chat"] > 100 and counts["connects"] > 50, counts


def _echo_load(port: int, n: int, stop: threading.Event, problems: list, counts: dict) -> None:
    """`n` clients, each with one numbered line in flight, checking every echo."""
    import selectors
    sel = selectors.DefaultSelector()
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, [i, 0, b""])
        s.send(b"e%d %d\n" % (i, 0))
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline and not problems:
        for key, _ in sel.select(0.5):
            state = key.data
            try:
                data = key.fileobj.recv(65536)
            except OSError as e:
                problems.append(f"echo client {state[0]}: {e}")
                return
            if not data:
                problems.append(f"echo client {state[0]} disconnected")
                return
            state[2] += data
            while b"\n" in state[2]:
                line, _, state[2] = state[2].partition(b"\n")
                if line != b"e%d %d" % (state[0], state[1]):
                    problems.append(f"echo client {state[0]}: got {line!r}, sent seq {state[1]}")
                    return
                state[1] += 1
                counts["echo"] += 1
                key.fileobj.send(b"e%d %d\n" % (state[0], state[1]))
    for s in socks:
        s.close()


def _chat_load(port: int, n: int, stop: threading.Event, problems: list, counts: dict) -> None:
    """`n` members of one room, each saying numbered lines; everyone must hear everyone's,
    in order, none missing or repeated."""
    members = []
    for i in range(n):
        c = LineClient(port)
        c.send(b"/nick m%d\n" % i)
        members.append(c)
    time.sleep(1)
    for c in members:
        c.sock.setblocking(False)
        try:
            while c.sock.recv(65536):
                pass
        except BlockingIOError:
            pass
    heard = [[-1] * n for _ in range(n)]
    bufs = [b""] * n
    seq = 0
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline and not problems:
        for i, c in enumerate(members):
            c.sock.send(b"s%d\n" % seq)
        seq += 1
        time.sleep(0.05)
        for j, c in enumerate(members):
            try:
                while True:
                    data = c.sock.recv(65536)
                    if not data:
                        problems.append(f"chat member {j} disconnected")
                        return
                    bufs[j] += data
            except BlockingIOError:
                pass
            while b"\n" in bufs[j]:
                line, _, bufs[j] = bufs[j].partition(b"\n")
                if line.startswith(b"*** "):
                    continue
                try:
                    nick, text = line.rstrip(b"\r").split(b" ", 1)
                    who, got = int(nick[2:-1]), int(text[1:])
                except ValueError:
                    problems.append(f"chat member {j}: garbled {line!r}")
                    return
                if got != heard[j][who] + 1:
                    problems.append(f"chat member {j}: from m{who} got {got} after {heard[j][who]}")
                    return
                heard[j][who] = got
                counts["chat"] += 1
    for c in members:
        c.close()


def _connector(port: int, stop: threading.Event, problems: list, counts: dict) -> None:
    """Connect, one line, its echo, close: in a tight loop; every connect must be served."""
    deadline = time.monotonic() + 300
    while not stop.is_set() and time.monotonic() < deadline and not problems:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"hi\n")
                got = b""
                while len(got) < 3:
                    chunk = s.recv(16)
                    if not chunk:
                        break
                    got += chunk
                if got != b"hi\n":
                    problems.append(f"connector: got {got!r}")
                    return
        except OSError as e:
            problems.append(f"connector: {e}")
            return
        counts["connects"] += 1
