#!/usr/bin/env python3
"""Deliberately broken line server used only by test_loadgen.py to prove that
loadgen detects faults.  --mode echo|chat, --fault one of
  none     behave correctly
  corrupt  flip one byte in every Nth line
  drop     silently drop every Nth line
  dup      send every Nth line twice
  close    close the connection after N lines
  stall    stop answering after N lines (connection stays open)
(--every N, default 1000).  --crlf (chat mode): end every line sent with CRLF,
as chatd does."""
import asyncio
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _pycommon import parse_args, run  # noqa: E402

clients = []


def main():
    def extra(p):
        p.add_argument("--mode", choices=("echo", "chat"), default="echo")
        p.add_argument("--fault", default="none",
                       choices=("none", "corrupt", "drop", "dup", "close", "stall"))
        p.add_argument("--every", type=int, default=1000)
        p.add_argument("--crlf", action="store_true", help="chat mode: end lines with CRLF")
    args = parse_args(__doc__, uvloop_flag=False, extra=extra)
    count = [0]

    def mangle(line):
        """returns the list of lines to send for one input line"""
        count[0] += 1
        hit = count[0] % args.every == 0
        f = args.fault
        if f == "corrupt" and hit:
            b = bytearray(line)
            i = len(b) // 2
            b[i] = ord("#") if b[i] != ord("#") else ord("%")
            return [bytes(b)]
        if f == "drop" and hit:
            return []
        if f == "dup" and hit:
            return [line, line]
        return [line]

    class P(asyncio.Protocol):
        def connection_made(self, t):
            self.t, self.buf, self.n = t, b"", 0
            clients.append(self)

        def data_received(self, data):
            data = self.buf + data
            lines = data.split(b"\n")
            self.buf = lines.pop()
            out = []
            for line in lines:
                if args.fault == "stall" and count[0] >= args.every:
                    return
                self.n += 1
                if args.fault == "close" and self.n > args.every:
                    self.t.close()
                    return
                out.extend(mangle(line + b"\n"))
            if not out:
                return
            payload = b"".join(out)
            if args.mode == "echo":
                self.t.write(payload)
            else:
                if args.crlf:
                    payload = payload.replace(b"\n", b"\r\n")
                for c in clients:
                    if c is not self:
                        c.t.write(b"<x> " + payload.replace(b"\n", b"\n<x> ")[:-4])

        def connection_lost(self, exc):
            if self in clients:
                clients.remove(self)

    async def serve(stop):
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(P, args.host, args.port, backlog=args.backlog,
                                       reuse_address=True)
        async with srv:
            await stop

    run(serve, args)


if __name__ == "__main__":
    main()
