"""Faults around the control protocol and the signals, under load (README "Signals").

1. a restart storm (SIGHUPs and `chatd restart`) while echo and chat clients talk and a
   client connects in a tight loop: nothing refused, nothing lost, same pid, no fd leak;
2. 200 concurrent start/stop/restart/status calls: never two daemons, `status` tells the truth;
3. SIGKILL at random moments (and during start-up): the next `chatd start` always works;
4. signal storms: while serving, during a restart storm, during a graceful stop.

Every test prints one line of figures: `FIGURES <test>: key=value ...`.
"""

from __future__ import annotations

import json
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import threading
import time
from collections import Counter

import pytest

from support import (LineClient, alive, chatd_command, fault_env, fd_count, figures, kill_and_wait,
                     proc_stat, processes_mentioning, stuck_client, wait_for)

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop


# ------------------------------------------------------------------ helpers

def read_state(inst) -> dict:
    try:
        return json.loads((inst.dir / "chatd.state").read_text())
    except (OSError, ValueError):
        return {}


def generation(inst) -> int:
    gen = read_state(inst).get("generation")
    return gen if isinstance(gen, int) else -1


def outcome(inst) -> str | None:
    last = read_state(inst).get("last_restart")
    return last.get("outcome") if isinstance(last, dict) else None


def configure(inst, limits: dict, **server: object) -> None:
    """Write the instance's config atomically (temp file, rename), so a SIGHUP never reads
    half a file; `limits` become the [limits] section."""
    extra = "[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    real = inst.config
    tmp = real.with_name(real.name + ".new")
    inst.config = tmp
    try:
        inst.write_config(extra=extra, **server)
    finally:
        inst.config = real
    os.replace(tmp, real)


class Signaller:
    """Signals one process through a pidfd, so a storm can never hit a recycled pid."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def send(self, sig: int) -> bool:
        """False once the process is gone."""
        try:
            signal.pidfd_send_signal(self.fd, sig)
            return True
        except ProcessLookupError:
            return False

    def close(self) -> None:
        os.close(self.fd)


def pid_in_file(inst) -> int | None:
    try:
        text = inst.pidfile.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def flock_holders(path) -> set[int]:
    """Pids holding an exclusive flock on `path`, from /proc/locks."""
    try:
        st = os.stat(path)
    except OSError:
        return set()
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    holders = set()
    with open("/proc/locks") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and parts[5] == dev:
                holders.add(int(parts[4]))
    return holders


def is_daemon(pid: int, my_session: int) -> bool:
    """A detached chatd, as opposed to a control command or the middle child of a start:
    it is in a session of its own (setsid), and not that session's leader (second fork)."""
    try:
        session = proc_stat(pid)["session"]
    except (OSError, IndexError, ValueError):
        return False
    return session not in (my_session, pid)


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def echo_once(port: int, text: bytes = b"ping") -> None:
    with LineClient(port, timeout=5) as c:
        c.send(text + b"\n")
        assert c.recv_line() == text + b"\n"


# ------------------------------------------------------------------ load generators

class EchoLoad(threading.Thread):
    """N echo clients in one selector loop: each has one numbered line in flight and checks
    that exactly that line comes back before sending the next."""

    def __init__(self, port: int, n: int) -> None:
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.stop_event = threading.Event()
        self.ok = self.garbled = self.lost = self.closed = 0
        self.errors: list[str] = []

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        socks = []
        try:
            for i in range(self.n):
                s = socket.create_connection(("127.0.0.1", self.port), timeout=5)
                s.setblocking(False)
                rec = {"i": i, "seq": 0, "buf": b"", "want": b"", "done": False}
                sel.register(s, selectors.EVENT_READ, rec)
                socks.append((s, rec))
            for s, rec in socks:
                self._send_next(s, rec)
            drain_deadline = None
            while True:
                if self.stop_event.is_set() and drain_deadline is None:
                    drain_deadline = time.monotonic() + 10
                if drain_deadline is not None:
                    if all(rec["done"] or not rec["want"] for _, rec in socks):
                        break
                    if time.monotonic() > drain_deadline:
                        break
                for key, _ in sel.select(0.2):
                    self._read(key.fileobj, key.data, sel)
            self.lost += sum(1 for _, rec in socks if rec["want"] and not rec["done"])
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            for s, _ in socks:
                s.close()
            sel.close()

    def _send_next(self, s: socket.socket, rec: dict) -> None:
        if self.stop_event.is_set():
            rec["want"] = b""
            return
        rec["seq"] += 1
        rec["want"] = b"c%d n%d\n" % (rec["i"], rec["seq"])
        s.sendall(rec["want"])   # tiny; the socket buffer always has room for it

    def _read(self, s: socket.socket, rec: dict, sel) -> None:
        try:
            data = s.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            data = b""
            self.errors.append(f"client {rec['i']}: {e!r}")
        if not data:
            self.closed += 1
            rec["done"] = True
            sel.unregister(s)
            return
        rec["buf"] += data
        while b"\n" in rec["buf"]:
            line, _, rec["buf"] = rec["buf"].partition(b"\n")
            if line + b"\n" == rec["want"]:
                self.ok += 1
                self._send_next(s, rec)
            else:
                self.garbled += 1
                self.errors.append(f"client {rec['i']}: got {line[:60]!r}, wanted {rec['want']!r}")


class ChatLoad(threading.Thread):
    """One sender and `n - 1` receivers in one room: every receiver must get every numbered
    line, in order, as `<sender's nick> N`; `*** ` notices (others joining) are skipped."""

    WINDOW = 64

    def __init__(self, port: int, n: int) -> None:
        super().__init__(daemon=True)
        self.port, self.n = port, n
        self.stop_event = threading.Event()
        self.ready = threading.Event()
        self.sent = 0
        self.garbled = self.closed = 0
        self.received: list[int] = []
        self.errors: list[str] = []

    @staticmethod
    def _join(port: int) -> tuple[socket.socket, bytes]:
        c = LineClient(port, timeout=5)
        first = c.recv_line()
        while True:
            line = c.recv_line()
            if line.startswith(b"*** #lobby: "):
                break
        c.sock.setblocking(False)
        return c.sock, first

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        socks: list[socket.socket] = []
        try:
            sender, welcome = self._join(self.port)
            socks.append(sender)
            m = re.match(rb"\*\*\* Welcome to chatd, (guest\d+)\.", welcome)
            if not m:
                raise AssertionError(f"no nick in the sender's welcome: {welcome!r}")
            said = b"<" + m.group(1) + b"> %d\r"
            sel.register(sender, selectors.EVENT_READ, -1)
            for r in range(self.n - 1):
                s, _ = self._join(self.port)
                socks.append(s)
                sel.register(s, selectors.EVENT_READ, r)
            self.received = [0] * (self.n - 1)
            bufs = {i: b"" for i in range(-1, self.n - 1)}
            alive_receivers = set(range(self.n - 1))
            self.ready.set()
            drain_deadline = None
            while True:
                if self.stop_event.is_set():
                    if drain_deadline is None:
                        drain_deadline = time.monotonic() + 10
                    if all(self.received[r] == self.sent for r in alive_receivers):
                        break
                    if time.monotonic() > drain_deadline:
                        break
                elif not alive_receivers or min(self.received[r] for r in alive_receivers) >= self.sent - self.WINDOW:
                    self.sent += 1
                    sender.sendall(b"%d\n" % self.sent)
                for key, _ in sel.select(0 if not self.stop_event.is_set() and self._can_send(alive_receivers) else 0.1):
                    who = key.data
                    try:
                        data = key.fileobj.recv(65536)
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as e:
                        data = b""
                        self.errors.append(f"member {who}: {e!r}")
                    if not data:
                        self.closed += 1
                        sel.unregister(key.fileobj)
                        alive_receivers.discard(who)
                        self.errors.append(f"member {who}: connection closed by the server")
                        continue
                    bufs[who] += data
                    while b"\n" in bufs[who]:
                        line, _, bufs[who] = bufs[who].partition(b"\n")
                        if line.startswith(b"*** ") and line.endswith(b"\r"):
                            continue   # someone joined or left
                        if who >= 0 and line == said % (self.received[who] + 1):
                            self.received[who] += 1
                            continue
                        self.garbled += 1
                        self.errors.append(f"member {who}: got {line[:60]!r}")
                        if who >= 0:
                            try:   # resynchronise on the number, so one fault counts once
                                self.received[who] = int(line.split(b"> ", 1)[1])
                            except (IndexError, ValueError):
                                pass
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))
        finally:
            self.ready.set()
            for s in socks:
                s.close()
            sel.close()

    def _can_send(self, alive_receivers) -> bool:
        return not alive_receivers or min(self.received[r] for r in alive_receivers) >= self.sent - self.WINDOW

    @property
    def lost(self) -> int:
        return sum(self.sent - got for got in self.received) if self.received else 0


class Hammer(threading.Thread):
    """Connects in a tight loop, one attempt at a time, never retrying: every attempt counts.

    Echo: send a line, half-close, expect exactly that line and EOF. Chat: read the welcome
    up to the roster, half-close, read to EOF."""

    def __init__(self, port: int, chat: bool) -> None:
        super().__init__(daemon=True)
        self.port, self.chat = port, chat
        self.stop_event = threading.Event()
        self.attempts = self.ok = self.refused = self.reset = 0
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop_event.is_set():
            n += 1
            self.attempts += 1
            try:
                with LineClient(self.port, timeout=5) as c:
                    if self.chat:
                        while not c.recv_line().startswith(b"*** #lobby: "):
                            pass
                        c.shutdown_write()
                        c.recv_until_eof()
                    else:
                        c.send(b"h%d\n" % n)
                        c.shutdown_write()
                        got = c.recv_until_eof()
                        assert got == b"h%d\n" % n, got
                self.ok += 1
            except ConnectionRefusedError:
                self.refused += 1
            except ConnectionResetError:
                self.reset += 1
            except (OSError, AssertionError) as e:
                self.errors.append(repr(e))


# ------------------------------------------------------------------ 1. restart storm under load

ECHO_LIMITS = {"max_clients_per_ip": 0}
CHAT_LIMITS = {"max_clients_per_ip": 0, "rate": 0}
BROKEN = {"max_line": 3}       # below the minimum of 16: rejected


def wait_gen(inst, above: int, want: str | None = None, timeout: float = 20.0) -> int:
    return wait_for(lambda: (g := generation(inst)) > above and (want is None or outcome(inst) == want) and g,
                    timeout=timeout, what=f"generation > {above} with outcome {want}")


class Controller(threading.Thread):
    """50 SIGHUPs (changed max_line, no change, or a broken config that is then restored)
    and 20 `chatd restart` commands, in a seeded random order."""

    def __init__(self, inst, limits: dict, server: dict, seed: int, hups: int = 50, restarts: int = 20) -> None:
        super().__init__(daemon=True)
        self.inst, self.limits, self.server = inst, dict(limits), server
        self.rng = random.Random(seed)
        self.hups, self.restarts = hups, restarts
        self.sent = Counter()
        self.restart_codes: list[int] = []
        self.broken_rounds = 0
        self.errors: list[str] = []

    def run(self) -> None:
        try:
            inst, rng = self.inst, self.rng
            signaller = Signaller(inst.pid())
            steps = ["restart"] * self.restarts
            hups_left = self.hups
            while hups_left > 0:
                kind = rng.choice(["change", "same", "broken"])
                if kind == "broken" and hups_left < 2:
                    kind = "same"
                steps.append(kind)
                hups_left -= 2 if kind == "broken" else 1
            rng.shuffle(steps)
            for kind in steps:
                if kind == "restart":
                    proc = inst.cmd("restart", timeout=60)
                    self.restart_codes.append(proc.returncode)
                    if proc.returncode != 0:
                        self.errors.append(f"restart -> {proc.returncode}: {proc.stderr[-300:]!r}")
                elif kind == "change":
                    self.limits["max_line"] = rng.choice([64, 128, 1000, 4096])
                    configure(inst, self.limits, **self.server)
                    signaller.send(signal.SIGHUP)
                    self.sent["hup-change"] += 1
                elif kind == "same":
                    signaller.send(signal.SIGHUP)
                    self.sent["hup-same"] += 1
                else:
                    # Broken: wait until some restart read it, then restore a valid config
                    # and wait until a restart read that, so no later command meets it.
                    configure(inst, self.limits | BROKEN, **self.server)
                    g0 = generation(inst)
                    signaller.send(signal.SIGHUP)
                    wait_gen(inst, g0, "rejected")
                    configure(inst, self.limits, **self.server)
                    g1 = generation(inst)
                    signaller.send(signal.SIGHUP)
                    wait_gen(inst, g1, "applied")
                    self.sent["hup-broken"] += 2
                    self.broken_rounds += 1
                time.sleep(rng.uniform(0.0, 0.05))
            signaller.close()
        except Exception as e:   # noqa: BLE001 - reported by the test
            self.errors.append(repr(e))


def settle_fds(pid: int, want: int, timeout: float = 10.0) -> int:
    """The daemon's fd count once it is back to `want`, or whatever it is at the deadline."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n != want and time.monotonic() < deadline:
        time.sleep(0.05)
        n = fd_count(pid)
    return n


@pytest.mark.slow
def test_restart_storm_under_load(make_chatd):
    echo = make_chatd(name="echo")
    chat = make_chatd(name="chat")
    configure(echo, ECHO_LIMITS)
    configure(chat, CHAT_LIMITS, mode="chat")
    echo_pid, chat_pid = echo.start(), chat.start()
    # One connection first, so whatever the loop creates lazily exists in the baseline.
    echo_once(echo.port)
    with LineClient(chat.port) as c:
        c.recv_line()
    time.sleep(0.3)
    fds_before = {"echo": fd_count(echo_pid), "chat": fd_count(chat_pid)}
    gen_before = {"echo": generation(echo), "chat": generation(chat)}

    echo_load = EchoLoad(echo.port, 100)
    chat_load = ChatLoad(chat.port, 10)
    echo_load.start()
    chat_load.start()
    assert chat_load.ready.wait(30)
    hammers = [Hammer(echo.port, chat=False), Hammer(chat.port, chat=True)]
    for h in hammers:
        h.start()
    controllers = [Controller(echo, ECHO_LIMITS, {}, seed=1),
                   Controller(chat, CHAT_LIMITS, {"mode": "chat"}, seed=2)]
    t0 = time.monotonic()
    for c in controllers:
        c.start()
    for c in controllers:
        c.join(240)
    storm_s = time.monotonic() - t0
    time.sleep(0.5)   # a little more traffic after the last restart
    for t in [*hammers, echo_load, chat_load]:
        t.stop_event.set()
    for t in [*hammers, echo_load, chat_load]:
        t.join(30)
    assert not any(t.is_alive() for t in [*controllers, *hammers, echo_load, chat_load])

    fds_after = {"echo": settle_fds(echo_pid, fds_before["echo"]),
                 "chat": settle_fds(chat_pid, fds_before["chat"])}
    gens = {"echo": generation(echo), "chat": generation(chat)}
    outcomes = {"echo": outcome(echo), "chat": outcome(chat)}
    attempts = sum(h.attempts for h in hammers)
    refused = sum(h.refused for h in hammers)
    reset = sum(h.reset for h in hammers)
    hups = {k: sum(c.sent.values()) for k, c in zip(("echo", "chat"), controllers)}
    figures("test_restart_storm_under_load", storm_s=f"{storm_s:.1f}",
            attempts=attempts, refused=refused, reset=reset,
            hammer_errors=sum(len(h.errors) for h in hammers),
            echo_lines=echo_load.ok, echo_lost=echo_load.lost, echo_garbled=echo_load.garbled,
            chat_sent=chat_load.sent, chat_lost=chat_load.lost, chat_garbled=chat_load.garbled,
            hups_echo=hups["echo"], hups_chat=hups["chat"],
            restarts=sum(len(c.restart_codes) for c in controllers),
            restart_codes=dict(Counter(code for c in controllers for code in c.restart_codes)),
            fds_before=f"{fds_before['echo']}/{fds_before['chat']}",
            fds_after=f"{fds_after['echo']}/{fds_after['chat']}",
            generation=f"{gens['echo']}/{gens['chat']}", last=f"{outcomes['echo']}/{outcomes['chat']}")

    for c in controllers:
        assert c.errors == [], c.errors
        assert c.restart_codes == [0] * c.restarts
    assert [h.errors for h in hammers] == [[], []]
    assert refused == 0 and reset == 0
    assert attempts > 100
    assert echo_load.errors == [] and chat_load.errors == []
    assert echo_load.lost == 0 and echo_load.garbled == 0 and echo_load.closed == 0
    assert chat_load.lost == 0 and chat_load.garbled == 0 and chat_load.closed == 0
    assert echo_load.ok > 1000 and chat_load.sent > 100
    assert echo.pid() == echo_pid and alive(echo_pid)
    assert chat.pid() == chat_pid and alive(chat_pid)
    assert read_state(echo)["pid"] == echo_pid and read_state(chat)["pid"] == chat_pid
    assert fds_after == fds_before
    for name, inst, ctl in (("echo", echo, controllers[0]), ("chat", chat, controllers[1])):
        # Every restart command and every broken round waited for a new generation of its own;
        # SIGHUPs sent without waiting may have merged.
        grew = gens[name] - gen_before[name]
        assert ctl.restarts + 2 * ctl.broken_rounds <= grew <= ctl.restarts + hups[name]
        assert outcomes[name] == "applied"
    # Still serving, with the last config.
    echo_once(echo.port, b"after the storm")
    for inst in (echo, chat):
        inst.cmd("stop", check=0)


# ------------------------------------------------------------------ 2. control races

def daemons_of(inst, my_session: int) -> list[int]:
    return [p for p in processes_mentioning(str(inst.dir)) if is_daemon(p, my_session)]


@pytest.mark.slow
def test_control_races_never_leave_two_daemons_or_a_lie(chatd):
    inst = chatd
    rng = random.Random(20261122)
    commands = [rng.choice(["start", "stop", "restart", "status"]) for _ in range(200)]
    my_session = os.getsid(0)
    results: list[tuple[str, int]] = []
    failures: list[str] = []
    lock = threading.Lock()
    done = threading.Event()
    samples = Counter()
    max_daemons = [0]
    seen_daemons: set[int] = set()

    def sampler():
        while not done.is_set():
            daemons = daemons_of(inst, my_session)
            samples[len(daemons)] += 1
            seen_daemons.update(daemons)
            max_daemons[0] = max(max_daemons[0], len(daemons))
            time.sleep(0.002)

    def worker(mine: list[str]):
        for command in mine:
            try:
                proc = inst.cmd(command, timeout=90)
                code = proc.returncode
                if b"Traceback" in proc.stderr:
                    failures.append(f"{command}: {proc.stderr[-500:]!r}")
            except subprocess.TimeoutExpired:
                code = -999
            with lock:
                results.append((command, code))

    watcher = threading.Thread(target=sampler, daemon=True)
    watcher.start()
    workers = [threading.Thread(target=worker, args=(commands[i::8],), daemon=True) for i in range(8)]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    elapsed = time.monotonic() - t0
    done.set()
    watcher.join(10)
    assert not any(w.is_alive() for w in workers) and not watcher.is_alive()

    calls = Counter(c for c, _ in results)
    codes = {c: dict(Counter(code for cmd, code in results if cmd == c)) for c in sorted(calls)}
    status = inst.cmd("status")
    figures("test_control_races", calls=sum(calls.values()), seconds=f"{elapsed:.1f}",
            per_command=dict(calls), exit_codes=codes, samples=sum(samples.values()),
            max_daemons=max_daemons[0], daemons_seen=len(seen_daemons),
            final_status=status.returncode)

    assert failures == []
    assert len(results) == 200
    allowed = {"start": {0}, "stop": {0}, "restart": {0}, "status": {0, 3}}
    for command, code in results:
        assert code in allowed[command], (command, code, codes)
    assert max_daemons[0] == 1
    # `status` against reality.
    if status.returncode == 0:
        pid = pid_in_file(inst)
        assert pid is not None and alive(pid)
        assert status.stdout.startswith(f"chatd is running (pid {pid})".encode())
        assert flock_holders(inst.pidfile) == {pid}
        assert str(inst.config) in cmdline(pid)
        assert processes_mentioning(str(inst.dir)) == [pid]
        assert daemons_of(inst, my_session) == [pid]
        echo_once(inst.port)
    else:
        assert status.returncode == 3, status
        assert processes_mentioning(str(inst.dir)) == []
        assert not inst.pidfile.exists() or inst.pidfile.read_text() == ""
    inst.cmd("stop", check=0)
    assert processes_mentioning(str(inst.dir)) == []
    assert inst.cmd("status").returncode == 3


# ------------------------------------------------------------------ 3. crash and recovery

@pytest.mark.slow
def test_sigkill_at_random_moments_never_blocks_the_next_start(chatd):
    inst = chatd
    rng = random.Random(7)
    scenarios = Counter()
    failed_starts = 0
    statuses = Counter()
    t0 = time.monotonic()
    inst.start()
    for round_no in range(20):
        pid = inst.pid()
        sig = Signaller(pid)
        scenario = rng.choice(["after-start", "mid-restart", "clients", "random"])
        scenarios[scenario] += 1
        clients: list[LineClient] = []
        if scenario == "mid-restart":
            configure(inst, {"max_line": rng.choice([100, 200, 4096])})
            sig.send(signal.SIGHUP)
            time.sleep(rng.uniform(0, 0.01))
        elif scenario == "clients":
            for i in range(5):
                c = LineClient(inst.port, timeout=5)
                c.send(b"hello %d\n" % i)
                assert c.recv_line() == b"hello %d\n" % i
                clients.append(c)
            c.send(b"x" * 50000 + b"\n")   # in flight when it dies
        elif scenario == "random":
            time.sleep(rng.uniform(0, 0.3))
        sig.send(signal.SIGKILL)
        sig.close()
        wait_for(lambda: not alive(pid), what="the daemon to die")
        statuses[inst.cmd("status").returncode] += 1
        for c in clients:
            c.close()
        how = rng.choice(["start", "restart"])
        proc = inst.cmd(how, timeout=60)
        if proc.returncode != 0:
            failed_starts += 1
            continue
        assert inst.pid() != pid
        echo_once(inst.port, b"round %d" % round_no)
        assert inst.cmd("status").returncode == 0

    # SIGKILL during start-up, before ready: the invoker says so, and the next start works.
    configure(inst, {})
    pid = inst.pid()
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not alive(pid), what="the daemon to die")
    starter = subprocess.Popen(chatd_command() + ["start", "-c", str(inst.config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | fault_env("slow-start", CHATD_TEST_DELAY="1"))
    try:
        early = int(wait_for(lambda: (p := pid_in_file(inst)) and p != pid and p, what="the new pid file"))
        os.kill(early, signal.SIGKILL)
        out, err = starter.communicate(timeout=30)
    finally:
        kill_and_wait(starter.pid)
    early_code = starter.returncode
    assert processes_mentioning(str(inst.dir)) == []
    assert not inst.pidfile.exists() or inst.pidfile.read_text() == ""
    after = inst.cmd("start", timeout=60)
    if after.returncode != 0:
        failed_starts += 1
    else:
        echo_once(inst.port, b"after the early kill")
    figures("test_sigkill_at_random_moments", rounds=20, scenarios=dict(scenarios),
            status_after_kill=dict(statuses), failed_starts=failed_starts,
            early_kill_exit=early_code, seconds=f"{time.monotonic() - t0:.1f}")
    assert failed_starts == 0
    assert statuses == Counter({1: 20})   # dead, and the pid file still names it
    assert early_code == 1 and b"exited during start-up without saying why" in err, err
    assert inst.cmd("status").returncode == 0


# ------------------------------------------------------------------ 4. signal storms

def test_signal_storm_while_serving(chatd):
    inst = chatd
    pid = inst.start()
    clients = [LineClient(inst.port, timeout=10) for _ in range(5)]
    rng = random.Random(1000)
    sigs = [rng.choice([signal.SIGHUP, signal.SIGUSR2, signal.SIGCONT]) for _ in range(1000)]
    stop = threading.Event()
    served = [0]
    slowest = [0.0]
    errors: list[str] = []

    def talk():
        n = 0
        while not stop.is_set():
            for c in clients:
                n += 1
                t = time.monotonic()
                try:
                    c.send(b"during %d\n" % n)
                    got = c.recv_line()
                except (OSError, AssertionError) as e:
                    errors.append(repr(e))
                    return
                slowest[0] = max(slowest[0], time.monotonic() - t)
                if got != b"during %d\n" % n:
                    errors.append(f"got {got!r}")
                    return
                served[0] += 1

    talker = threading.Thread(target=talk, daemon=True)
    talker.start()
    signaller = Signaller(pid)
    t0 = time.monotonic()
    for i, s in enumerate(sigs):
        assert signaller.send(s), f"chatd died after {i} signals"
        if i % 10 == 9:
            time.sleep(0.01)
    storm_s = time.monotonic() - t0
    signaller.close()
    # Let it work through what it received: the generation stops growing.
    last = [generation(inst), time.monotonic()]

    def settled():
        g = generation(inst)
        if g != last[0]:
            last[:] = [g, time.monotonic()]
        return time.monotonic() - last[1] > 0.5

    t1 = time.monotonic()
    wait_for(settled, timeout=60, what="the restarts to settle")
    settle_s = time.monotonic() - t1 - 0.5
    stop.set()
    talker.join(20)
    assert not talker.is_alive()
    for c in clients:
        c.send(b"still there\n")
        assert c.recv_line() == b"still there\n"
    gen = generation(inst)
    t2 = time.monotonic()
    stop_proc = inst.cmd("stop", timeout=60)
    stop_s = time.monotonic() - t2
    for c in clients:
        c.close()
    counts = Counter(signal.Signals(s).name for s in sigs)
    figures("test_signal_storm_while_serving", signals=len(sigs), storm_s=f"{storm_s:.2f}",
            **{k.lower(): v for k, v in sorted(counts.items())}, generation=gen,
            settle_s=f"{settle_s:.2f}", lines_served=served[0], slowest_echo_s=f"{slowest[0]:.3f}",
            stop_exit=stop_proc.returncode, stop_s=f"{stop_s:.2f}")
    assert errors == []
    assert served[0] > 0
    assert 1 <= gen <= counts["SIGHUP"]
    assert stop_proc.returncode == 0 and b"chatd stopped" in stop_proc.stdout, stop_proc
    assert not alive(pid) and not inst.pidfile.exists()
    assert "Traceback" not in inst.log_text()


def test_signal_storm_during_start_up_is_one_restart_after_ready(chatd):
    """1,000 mixed SIGHUP/SIGUSR2/SIGCONT while a slow start (1.5 s) waits for ready.
    Result: `start` exits 0; the SIGHUPs, recorded before ready, become one restart after it
    (as the kernel keeps one pending instance of a signal); USR2 and CONT change nothing."""
    inst = chatd
    starter = subprocess.Popen(chatd_command() + ["start", "-c", str(inst.config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=os.environ | fault_env("slow-start", CHATD_TEST_DELAY="1.5"))
    counts: Counter = Counter()
    try:
        pid = int(wait_for(lambda: inst.pidfile.exists() and inst.pidfile.read_text().strip(),
                           what="the pid file"))
        signaller = Signaller(pid)
        rng = random.Random(11)
        t0 = time.monotonic()
        for _ in range(1000):
            s = rng.choice([signal.SIGHUP, signal.SIGUSR2, signal.SIGCONT])
            if signaller.send(s):
                counts[signal.Signals(s).name] += 1
        storm_s = time.monotonic() - t0
        signaller.close()
        out, err = starter.communicate(timeout=30)
    finally:
        kill_and_wait(starter.pid)
    wait_for(lambda: generation(inst) >= 1, what="the recorded SIGHUPs to be applied")
    time.sleep(0.5)
    gen = generation(inst)
    figures("test_signal_storm_during_start_up", storm_s=f"{storm_s:.2f}",
            **{k.lower(): v for k, v in sorted(counts.items())}, start_exit=starter.returncode,
            generation=gen, last=outcome(inst))
    assert starter.returncode == 0, err
    assert sum(counts.values()) == 1000 and alive(pid)
    assert gen == 1, f"{counts['SIGHUP']} SIGHUPs before ready became {gen} restarts"
    assert outcome(inst) == "applied"
    echo_once(inst.port, b"after the start-up storm")
    assert "Traceback" not in inst.log_text()


def test_sigterm_during_a_restart_storm_is_prompt(chatd):
    inst = chatd
    pid = inst.start()
    signaller = Signaller(pid)
    stop = threading.Event()
    sent = [0]

    def storm():
        while not stop.is_set() and signaller.send(signal.SIGHUP):
            sent[0] += 1

    stormer = threading.Thread(target=storm, daemon=True)
    stormer.start()
    try:
        time.sleep(1.0)
        gen_at_term = generation(inst)
        hups_at_term = sent[0]
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        exited = True
        try:
            wait_for(lambda: not alive(pid), timeout=30, what="chatd to exit")
        except AssertionError:
            exited = False
        exit_s = time.monotonic() - t0
    finally:
        stop.set()
        stormer.join(10)
        signaller.close()
    figures("test_sigterm_during_a_restart_storm", hups_sent=sent[0], hups_before_term=hups_at_term,
            generation_at_term=gen_at_term, exited=exited, exit_s=f"{exit_s:.2f}",
            pidfile_left=inst.pidfile.exists())
    assert exited
    assert exit_s < 1.5, f"SIGTERM took {exit_s:.2f} s behind a backlog of SIGHUPs"
    assert not inst.pidfile.exists()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_signals_during_a_graceful_stop_change_nothing(make_chatd, loop):
    """SIGHUP, SIGUSR1 and SIGUSR2 keep arriving while a client holds a graceful stop open
    (drain_timeout 2): it still exits 0, within drain_timeout + 1 s, pid file removed."""
    inst = make_chatd(loop=loop)
    inst.write_config(daemon={"drain_timeout": 2.0})
    proc = inst.run_foreground()
    assert proc.poll() is None, inst.foreground_stderr()
    pid = proc.pid
    holder = stuck_client(inst.port)
    try:
        signaller = Signaller(pid)
        rng = random.Random(3)
        counts = Counter()
        t0 = time.monotonic()
        os.kill(pid, signal.SIGUSR1)
        # Until it has exited: a storm for the whole stop, the exit included.
        while proc.poll() is None and time.monotonic() - t0 < 10:
            s = rng.choice([signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2])
            if signaller.send(s):
                counts[signal.Signals(s).name] += 1
            time.sleep(0.0002 if counts.total() % 50 else 0.005)
        code = proc.wait(timeout=10)
        exit_s = time.monotonic() - t0
        signaller.close()
    finally:
        holder.close()
    figures(f"test_signals_during_a_graceful_stop[{loop}]", **{k.lower(): v for k, v in sorted(counts.items())},
            exit_code=code, exit_s=f"{exit_s:.2f}", pidfile_left=inst.pidfile.exists())
    assert code == 0, (code, inst.foreground_stderr()[-1000:])
    assert exit_s < 2.0 + 1.0
    assert not inst.pidfile.exists()
    assert "restart" not in inst.log_text().split("graceful stop")[-1]


def test_sigterm_during_a_graceful_stop_is_prompt(chatd):
    inst = chatd
    inst.write_config(daemon={"drain_timeout": 10.0})
    proc = inst.run_foreground()
    pid = proc.pid
    holder = stuck_client(inst.port)
    try:
        os.kill(pid, signal.SIGUSR1)
        wait_for(lambda: "graceful stop" in inst.log_text(), what="the graceful stop to begin")
        time.sleep(0.3)
        assert proc.poll() is None   # held open by the client
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        code = proc.wait(timeout=15)
        exit_s = time.monotonic() - t0
    finally:
        holder.close()
    figures("test_sigterm_during_a_graceful_stop", exit_code=code, exit_s=f"{exit_s:.2f}",
            pidfile_left=inst.pidfile.exists())
    assert code == 0
    assert exit_s < 1.5
    assert not inst.pidfile.exists()
    assert "SIGTERM during the graceful stop" in inst.log_text()
