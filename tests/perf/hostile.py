#!/usr/bin/env python3
"""Hostile input for bench.py: what a server spends on each class of it, and what it costs others.

    hostile.py --port P --mode echo|chat --class CLASS [-S SENDERS] [--probe] [-d S] [-w S]
               [--server-pid PID]

SENDERS connections (1 by default) send CLASS as fast as the server takes it and read whatever
comes back. The server's CPU time (/proc/PID/stat) over the `-d` seconds after `-w` seconds of
warm-up gives its MB of that input per CPU-second. With --probe, a well-behaved client sends a
line every 10 ms and times its echo (echo mode) or its arrival at another member of the room
(chat mode, with a second well-behaved client): p50 and p99 over the measured seconds.

It checks what it can, and counts as errors: a probe line that does not come back exact (echo)
or as `<nick> line` (chat) within 5 s; in echo, replies to the senders other than what CLASS
must give (nothing, its own lines, or the refusals of its DO and WILL); in chat, any line from a
sender reaching the room (every class here shows nothing); a connection the server closed, but
a chat sender dropped (`dropped=`): chat drops a client whose unread output passes its budget,
which the answers to a flood of DO and WILL can do.
Last line: `RESULT mode=hostile class=... key=value ...`. Loopback only; every phase has a
deadline.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import socket
import statistics
import sys
import time

CLASSES = {   # class -> (the unit sent, in echo what comes back for it)
    "plain": (b"x" * 63 + b"\n", b"x" * 63 + b"\n"),
    "iac-nop": (b"\xff\xf1", b""),
    "iac-do": (b"\xff\xfd\x01\xff\xfb\x18", b"\xff\xfc\x01\xff\xfe\x18"),
    "subneg": (b"\xff\xfa\x18\x00VT100\xff\xf0", b""),
    # The classes above repeat one unit, which chatd takes in one comparison; these vary it
    # (three commands, four different void lines), so the general path is what is measured.
    "iac-mixed": (b"\xff\xf1\xff\xf9\xff\xfd\x01\xff\xfb\x18\xff\xfd\x03",
                  b"\xff\xfc\x01\xff\xfe\x18\xff\xfc\x03"),
    "bare-lf": (b"\n", b"\n"),
    "control": (b"\x01\x02\x1b[0m\x07\r\n", b"\x01\x02\x1b[0m\x07\r\n"),
    "control-mixed": (b"\x01\n\x02\x03\r\n\x1b[1m\n\x07\x07\t\n", b"\x01\n\x02\x03\r\n\x1b[1m\n\x07\x07\t\n"),
    "bidi": ("\u202e\u2066\u202d".encode() + b"\n", "\u202e\u2066\u202d".encode() + b"\n"),
}
PROBE_EVERY_S = 0.01
STALL_S = 5.0
CHUNK = 65536


def cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def connect(port: int, chat: bool, deadline: float) -> tuple[socket.socket, bytes]:
    """A connection, and in chat its nick once the welcome and roster have come."""
    s = socket.create_connection(("127.0.0.1", port), timeout=20)
    nick = b""
    if chat:
        got = b""
        while b"#lobby:" not in got and time.monotonic() < deadline:
            got += s.recv(65536)
        nick = re.search(rb"Welcome to chatd, (\S+)\.", got).group(1)
    s.setblocking(False)
    return s, nick


class Sender:
    """One hostile connection: what it sent, and in echo whether what came back is right."""

    def __init__(self, sock: socket.socket, unit: bytes, reply: bytes) -> None:
        self.sock = sock
        self.chunk = unit * (CHUNK // len(unit))
        self.sent = 0
        self.reply = reply * (1 + 2 * CHUNK // max(len(reply), 1))  # a window of the reply stream
        self.period = len(reply)
        self.offset = 0          # where in the reply stream the next byte received belongs
        self.bad = 0

    def check(self, data: bytes) -> None:
        """Echo mode: the replies are CLASS's own stream, from where the last read ended."""
        if not self.period:
            self.bad += bool(data)
            return
        for i in range(0, len(data), CHUNK):
            part = data[i:i + CHUNK]
            if part != self.reply[self.offset:self.offset + len(part)]:
                self.bad += 1
            self.offset = (self.offset + len(part)) % self.period


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-p", "--port", type=int, required=True)
    ap.add_argument("--mode", choices=("echo", "chat"), required=True)
    ap.add_argument("--class", dest="cls", choices=list(CLASSES), required=True)
    ap.add_argument("-S", "--senders", type=int, default=1)
    ap.add_argument("--probe", action="store_true", help="time a well-behaved client's lines")
    ap.add_argument("-d", "--duration", type=float, default=5.0)
    ap.add_argument("-w", "--warmup", type=float, default=1.0)
    ap.add_argument("--server-pid", type=int, required=True)
    ap.add_argument("--label", default="")
    args = ap.parse_args()
    chat = args.mode == "chat"
    unit, reply = CLASSES[args.cls]
    deadline = time.monotonic() + 20
    senders = [Sender(connect(args.port, chat, deadline)[0], unit, reply) for _ in range(args.senders)]
    probe = receiver = None
    nick = b""
    if args.probe:
        probe, nick = connect(args.port, chat, deadline)
        receiver = connect(args.port, chat, deadline)[0] if chat else probe
    sel = selectors.DefaultSelector()
    for s in senders:
        sel.register(s.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, s)
    if receiver is not None:
        sel.register(receiver, selectors.EVENT_READ, None)
    errors = dropped = 0
    delays: list[float] = []
    pending: dict[bytes, float] = {}    # probe line -> when it was sent
    inbox = b""
    n = 0
    next_probe = time.monotonic()
    start = time.monotonic() + args.warmup
    end = start + args.duration
    cpu0 = sent0 = None
    while time.monotonic() < end + (STALL_S if pending else 0):
        now = time.monotonic()
        if cpu0 is None and now >= start:
            cpu0, sent0 = cpu_s(args.server_pid), sum(s.sent for s in senders)
        if probe is not None and now >= next_probe and now < end:
            n += 1
            line = b"probe %08d well-behaved\n" % n
            probe.send(line)      # a few bytes into an empty buffer: never blocks
            pending[line] = now
            next_probe = now + PROBE_EVERY_S
        for key, events in sel.select(PROBE_EVERY_S / 4):
            s = key.data
            try:
                if events & selectors.EVENT_READ:
                    data = key.fileobj.recv(1 << 20)
                    if not data:
                        if chat and s is not None:
                            dropped += 1     # chat's "too slow" (see the docstring)
                        else:
                            errors += 1      # closed by the server
                        sel.unregister(key.fileobj)
                        continue
                    if s is None or key.fileobj is probe:
                        inbox += data
                    elif not chat:
                        s.check(data)
                if s is not None and events & selectors.EVENT_WRITE:
                    s.sent += s.sock.send(s.chunk)
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                if chat and s is not None:
                    dropped += 1             # reset by chat's "too slow"
                else:
                    errors += 1
                sel.unregister(key.fileobj)
        while b"\n" in inbox:
            line, _, inbox = inbox.partition(b"\n")
            got = time.monotonic()
            if chat:
                if line.startswith(b"*** "):
                    continue                 # joins of the others
                m = re.fullmatch(rb"<(\S+)> (.*)\r", line)
                if not m or m.group(1) != nick:
                    errors += 1              # a hostile line reached the room, or garbage
                    continue
                line = m.group(2)
            t0 = pending.pop(line + b"\n", None)
            if t0 is None:
                errors += 1
            elif t0 >= start:
                delays.append(got - t0)
        if pending and min(pending.values()) < time.monotonic() - STALL_S:
            errors += len(pending)
            break
    cpu = cpu_s(args.server_pid) - (cpu0 or 0)
    sent = sum(s.sent for s in senders) - (sent0 or 0)
    errors += sum(s.bad for s in senders)
    sel.close()
    for s in senders:
        s.sock.close()
    for sock in {probe, receiver} - {None}:
        sock.close()
    result = {"mode": "hostile", "class": args.cls, "senders": args.senders, "errors": errors,
              "dropped": dropped,
              "sent_mb": f"{sent / 1e6:.1f}", "srv_cpu_s": f"{cpu:.2f}",
              "mb_per_cpu_s": f"{sent / 1e6 / cpu:.2f}" if cpu > 0 else "0"}
    if delays:
        q = statistics.quantiles(delays, n=100) if len(delays) > 1 else delays * 99
        result |= {"probes": len(delays), "p50_us": f"{statistics.median(delays) * 1e6:.1f}",
                   "p99_us": f"{q[98] * 1e6:.1f}"}
    elif args.probe:
        result["errors"] = errors + 1        # no probe came back
    print(f"{args.label}: {args.senders} x {args.cls}: {sent / 1e6:.1f} MB, server {cpu:.2f} CPU s")
    print("RESULT " + " ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
