"""Fair shares through the real daemon (issue 12, items 5 and 7; README "Echo mode", "Chat mode").

1. Hostile input does not stall anyone: four connections send one class of input that chatd
   answers with nothing visible (IAC NOP runs, IAC DO runs, subnegotiations, bare LFs,
   control-only lines, bidi-only lines) as fast as they can, with no rate limit, while a
   well-behaved client sends a line every 20 ms; its echo (echo mode), or its line reaching
   another member of the room (chat mode), must come within HOSTILE_P99_S at the 99th
   percentile. (Before: IAC NOP runs delayed echoes by seconds on uvloop, whose loop reads a
   busy socket up to 32 times in one pass; the benchmark shows the speed targets.)
2. In chat, with the default rate limit, lines that clean to nothing and telnet commands take
   tokens like any line, so a stream of them ends as `flooding`. (Before: they were free.)
3. Kernel memory: `max_clients_per_ip` clients that send and never read pin at most that many
   times the per-connection bound the README states (`ss -tmn` for the kernel's share, the
   daemon's peak RSS for its own). (Before: echo let the kernel grow each socket's buffers to
   megabytes.)

Each test prints one `FIGURES` line. Traffic goes to 127.0.0.1 only; every wait and loop has
a deadline; the daemon is stopped by its pid (the fixtures).
"""

from __future__ import annotations

import re
import selectors
import socket
import statistics
import subprocess
import threading
import time

import pytest

from support import LineClient, figures, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

HOSTILE = {   # class -> the unit repeated as fast as the senders can
    "iac-nop": b"\xff\xf1",
    "iac-do": b"\xff\xfd\x01\xff\xfb\x18",
    "subnegotiation": b"\xff\xfa\x18\x00VT100\xff\xf0",
    "bare-lf": b"\n",
    "control-only": b"\x01\x02\x1b[0m\x07\r\n",
    "bidi-only": "\u202e\u2066\u202d".encode() + b"\n",
}
SENDERS = 4
ATTACK_S = 3.0
PROBE_EVERY_S = 0.02
HOSTILE_P99_S = 0.5    # a bound on stalling, not a speed target (the benchmark's is 50 ms)
KIB = 1024


class Hostiles:
    """SENDERS connections sending `unit` as fast as they can and reading whatever comes back,
    from one thread, until `stop`; each bounded by its deadline."""

    def __init__(self, port: int, unit: bytes, chat: bool) -> None:
        self.socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(SENDERS)]
        if chat:   # the welcome first, so the senders are in the room before the probe starts
            for s in self.socks:
                wait_for(lambda s=s: b"#lobby" in s.recv(65536), what="a hostile's welcome")
        self.chunk = unit * (65536 // len(unit))
        self.sent = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Hostiles:
        self.thread.start()
        return self

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        for s in self.socks:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE)
        deadline = time.monotonic() + ATTACK_S + 30
        while not self.done.is_set() and time.monotonic() < deadline:
            for key, events in sel.select(0.1):
                try:
                    if events & selectors.EVENT_READ and not key.fileobj.recv(1 << 20):
                        sel.unregister(key.fileobj)   # closed by chatd
                        continue
                    if events & selectors.EVENT_WRITE:
                        self.sent += key.fileobj.send(self.chunk)
                except (BlockingIOError, InterruptedError):
                    pass
                except OSError:
                    sel.unregister(key.fileobj)
            if not sel.get_map():
                break
        sel.close()

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join(timeout=10)
        for s in self.socks:
            s.close()


def probe(inst, mode: str) -> list[float]:
    """A well-behaved client's line every PROBE_EVERY_S for ATTACK_S: the delays of its echo,
    or of its arrival at another member of the room."""
    sender = LineClient(inst.port)
    receiver = LineClient(inst.port) if mode == "chat" else sender
    if mode == "chat":
        for c in (sender, receiver):
            while b"#lobby:" not in c.recv_line():
                pass
    delays = []
    end = time.monotonic() + ATTACK_S
    n = 0
    while time.monotonic() < end:
        n += 1
        line = b"probe %d\n" % n
        t0 = time.monotonic()
        sender.send(line)
        while True:
            got = receiver.recv_line(timeout=30)
            if got.endswith(line.rstrip(b"\n") + (b"\r\n" if mode == "chat" else b"\n")):
                break
        delays.append(time.monotonic() - t0)
        time.sleep(max(0.0, PROBE_EVERY_S - delays[-1]))
    sender.close()
    receiver.close()
    return delays


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 2 else values[0]


def attack(make_chatd, loop: str, mode: str, cls: str, extra: str = "") -> None:
    inst = make_chatd(loop=loop, extra_config="[limits]\nrate = 0\n" + extra)
    inst.write_config(mode=mode)
    inst.start()
    pid = inst.pid()
    with Hostiles(inst.port, HOSTILE[cls], chat=mode == "chat") as h:
        time.sleep(0.5)
        cpu0 = cpu_seconds(pid)
        sent0 = h.sent
        delays = probe(inst, mode)
        mb_per_cpu_s = (h.sent - sent0) / 1e6 / max(cpu_seconds(pid) - cpu0, 1e-3)
    worst = p99(delays)
    figures(f"hostile_{mode}_{loop}_{cls}", senders=SENDERS, probes=len(delays),
            p50_ms=f"{statistics.median(delays) * 1e3:.1f}", p99_ms=f"{worst * 1e3:.1f}",
            max_ms=f"{max(delays) * 1e3:.1f}", hostile_mb_per_cpu_s=f"{mb_per_cpu_s:.1f}")
    assert worst < HOSTILE_P99_S, f"p99 {worst * 1e3:.0f} ms under {cls} x {SENDERS}"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100


@pytest.mark.parametrize("loop,mode,cls", [   # two of the four in the default step
    ("asyncio", "echo", "iac-nop"), ("uvloop", "chat", "iac-do"),
    pytest.param("uvloop", "echo", "iac-nop", marks=pytest.mark.slow),
    pytest.param("asyncio", "chat", "iac-do", marks=pytest.mark.slow)])
def test_hostile_senders_do_not_stall_a_well_behaved_client(make_chatd, loop, mode, cls):
    attack(make_chatd, loop, mode, cls)


@pytest.mark.slow
@pytest.mark.parametrize("cls", list(HOSTILE))
@pytest.mark.parametrize("mode", ["echo", "chat"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_hostile_class_on_both_loops(make_chatd, loop, mode, cls):
    attack(make_chatd, loop, mode, cls)


@pytest.mark.parametrize("cls", ["bare-lf", "control-only", "iac-nop"])
def test_chat_input_that_shows_nothing_still_takes_tokens(make_chatd, cls):
    """Default rate (10 a second, burst 20): 200 units at once end the sender as `flooding`;
    a member of the room sees it leave so, and nothing else from it."""
    inst = make_chatd()
    inst.write_config(mode="chat")
    inst.start()
    witness = LineClient(inst.port)
    while b"#lobby:" not in witness.recv_line():
        pass
    flooder = LineClient(inst.port)
    nick = re.search(rb"Welcome to chatd, (\w+)\.", flooder.recv_line()).group(1)
    witness.recv_line()   # its joining
    flooder.send(HOSTILE[cls] * 200)
    rest = flooder.recv_until_eof(timeout=10)
    left = witness.recv_line(timeout=10)
    figures(f"chat_tokens_{cls}", units=200, left=left.decode().strip(),
            slow_down_lines=rest.count(b"slow down"))
    assert left == b"*** %s left #lobby (flooding)\r\n" % nick, left


# ------------------------------------------------------------------ 3. kernel memory

PER_IP = 20


def server_skmem(port: int) -> tuple[int, int]:
    """Bytes the kernel holds for chatd's side of its connections on `port`: (receive queues,
    send queues plus forward allocations), from `ss -tmn`'s skmem r, w and f."""
    out = subprocess.run(["ss", "-tmnH", "state", "established", f"sport = :{port}"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    r = w = 0
    for m in re.finditer(r"skmem:\(([^)]*)\)", out):
        kv = {k: int(v) for k, v in re.findall(r"([a-z]+)(\d+)", m.group(1))}
        r += kv["r"]
        w += kv["w"] + kv["f"]
    return r, w


def peak_rss_kib(pid: int) -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", open(f"/proc/{pid}/status").read()).group(1))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_one_address_pins_at_most_per_ip_times_the_stated_bound(make_chatd, loop):
    """Echo, `max_clients_per_ip` 20, output_buffer 256 KiB: 20 clients send 1 KB lines until
    nothing more goes and never read. The README's bound, with k = min(64 KiB, output_buffer
    / 4) and r = 64 KiB: per connection the kernel holds at most 2k + 2r (send and receive
    buffers, as Linux doubles what is asked) + 64 KiB (a segment past a full buffer), chatd at
    most output_buffer - k (its budget) + 4r (one read's output past it) + 2 max_line + 8 KiB.
    The 21st client is told the server is full."""
    inst = make_chatd(loop=loop, extra_config=f"[limits]\nmax_clients_per_ip = {PER_IP}\n")
    inst.start()
    pid = inst.pid()
    base = peak_rss_kib(pid)
    k, r, output_buffer, max_line = 64 * KIB, 64 * KIB, 256 * KIB, 4096
    kernel_bound = 2 * k + 2 * r + 64 * KIB
    chatd_bound = output_buffer - k + 4 * r + 2 * max_line + 8 * KIB
    clients = [LineClient(inst.port) for _ in range(PER_IP)]
    extra = LineClient(inst.port)
    assert extra.recv_line() == b"ERR server full\r\n"
    extra.close()
    line = b"z" * 1000 + b"\n"
    for c in clients:
        c.sock.setblocking(False)
    deadline = time.monotonic() + 10
    stalled = 0
    while time.monotonic() < deadline and stalled < 25:   # until every path is full
        moved = 0
        for c in clients:
            try:
                moved += c.sock.send(line * 64)
            except BlockingIOError:
                pass
        stalled = 0 if moved else stalled + 1
        time.sleep(0 if moved else 0.02)
    time.sleep(0.5)
    received, sent = server_skmem(inst.port)
    grown = (peak_rss_kib(pid) - base) * KIB
    for c in clients:
        c.close()
    figures(f"kernel_memory_{loop}", clients=PER_IP, kernel_recv_kib=received // KIB,
            kernel_send_kib=sent // KIB, kernel_per_conn_kib=(received + sent) // PER_IP // KIB,
            kernel_bound_per_conn_kib=kernel_bound // KIB, chatd_peak_growth_kib=grown // KIB,
            chatd_bound_per_conn_kib=chatd_bound // KIB)
    assert received + sent <= PER_IP * kernel_bound, (received, sent)
    assert grown <= PER_IP * chatd_bound + 4 * KIB * KIB, grown
