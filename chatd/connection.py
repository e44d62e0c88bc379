"""One client connection: limits, flow control, idle check, and a clean close.

`Connection` is the part every mode shares; `echo.EchoConnection` adds what
is done with the bytes. Output goes straight to the transport while the kernel
takes it. Once the transport has to queue some (`pause_writing`, at a high-water
mark of 0), further output is gathered in the connection's own `outbox`, one
bytearray, until the transport has drained (`resume_writing`), and is then
handed over in one write. uvloop keeps ~800 bytes of bookkeeping per queued
write, so a client that does not read, sent many small lines, would otherwise
cost far more memory than `output_buffer` says. Past that budget, echo stops
reading the client and chat drops it (`over_budget`). The kernel's send and
receive buffers are capped too (`_bound_buffers`), and a connection that has had
SHARE_BYTES of input sits out one loop pass (`take_share`), so no sender can
hold the loop while others wait. Connect and disconnect lines past a rate per
source address (an IPv6 /64) and in all are counted and summarised (`ChurnLog`).

Tests: tests/process/test_echo.py, tests/process/test_fault_resources.py, tests/unit/test_debug_connection.py, tests/process/test_debug_log.py, tests/unit/test_churn_log.py, tests/process/test_log_abuse.py, tests/process/test_fair_share.py, tests/unit/test_upgrade_parts.py
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import time
from typing import TYPE_CHECKING, Any

from .listen import unmapped
from .metrics import Metrics
from .protocol import IAC, LineDecoder

if TYPE_CHECKING:
    from .rooms import ChatService

log = logging.getLogger("chatd")
LINGER_S = 1.0         # how long a graceful close reads and discards after its FIN
SHARE_BYTES = 65536    # input a connection handles before it sits out a loop pass
TELNET_SLICE = 4096    # telnet-laden input decoded at least, and at first, in one pass
TELNET_PASS_S = 0.002  # about how long one connection's telnet decoding may take of a pass
KERNEL_BUFFER = 65536  # the most asked of the kernel for a socket's send and receive buffers
CHURN_INTERVAL_S = 10.0   # README "Logging": per source and interval, the first `logged_per_ip`
CHURN_ALL = 10            # newcomers are logged one by one, CHURN_ALL times that from all sources;
CHURN_SOURCES = 64        # past CHURN_SOURCES sources an interval, the others share one count


def format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = unmapped(peer[0]), peer[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(peer)


KEEPALIVE_PROBES = 6


def set_keepalive(sock: Any, idle_s: int) -> None:
    """Find peers that vanished without a FIN within about `idle_s` + 6 probe intervals.

    Keepalive probes only go out on an idle connection. A peer that vanished
    while output was waiting for it is a retransmitting connection, which
    keepalive never probes and Linux gives up on only after ~15 minutes; the
    same deadline as TCP_USER_TIMEOUT (unacknowledged data) covers that case.
    """
    interval = max(1, min(idle_s, 10))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_PROBES)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT,
                        (idle_s + KEEPALIVE_PROBES * interval) * 1000)
    except (OSError, AttributeError):
        pass


def _queued(transport: asyncio.BaseTransport, request: int) -> int:
    """A socket queue's length by ioctl `request`; 0 when it cannot be known (closed, no socket)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (OSError, ValueError):
        return 0
    return struct.unpack("i", raw)[0]


def unread_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes waiting in the kernel's receive queue for this connection (FIONREAD)."""
    return _queued(transport, termios.FIONREAD)


def unsent_bytes(transport: asyncio.BaseTransport) -> int:
    """Bytes the kernel still holds to send on this connection (SIOCOUTQ, as TIOCOUTQ)."""
    return _queued(transport, termios.TIOCOUTQ)


def churn_source(ip: str) -> str:
    """Whom an address's churn is counted for: an IPv4 address (IPv4-mapped IPv6 too) as it
    is, an IPv6 address by its /64, of which one host may hold any number of addresses."""
    if ":" not in ip:
        return ip
    try:
        packed = socket.inet_pton(socket.AF_INET6, ip.partition("%")[0])
    except OSError:
        return ip
    if packed.startswith(bytes(10) + b"\xff\xff"):
        return socket.inet_ntop(socket.AF_INET, packed[12:])
    return socket.inet_ntop(socket.AF_INET6, packed[:8] + bytes(8)) + "/64"


class ChurnLog:
    """Connect, disconnect and refusal lines: one by one up to a rate per source, then counted.

    One client churning connections wrote 1.4 MB of log in 3 s, and a rate per exact address
    did not hold against many addresses (1000 of 127.0.2.0/22, one connection each: 2000
    lines, no summary). In each CHURN_INTERVAL_S, the first `limit` newcomers from a source
    (`churn_source`), and CHURN_ALL × `limit` from all of them together, admitted or refused,
    are logged as ever, each connection's disconnect with it whenever it comes; further
    newcomers are only counted, as are their disconnects, and `flush` (at the interval's end,
    and at a stop) logs one line per source with the counts. The table is bounded: past
    CHURN_SOURCES sources in one interval, newcomers from the others share one count, so at
    most CHURN_SOURCES + 1 summary lines an interval.
    """

    OTHERS = "other addresses"
    CONNECTS, DISCONNECTS, REFUSED = 1, 2, 3   # indexes in a source's counts; 0: lines logged

    def __init__(self) -> None:
        self.sources: dict[str, list[int]] = {}
        self.logged = 0   # newcomers logged one by one this interval, from all sources

    def _counts(self, ip: str) -> list[int]:
        source = churn_source(ip)
        counts = self.sources.get(source)
        if counts is None:
            key = source if len(self.sources) < CHURN_SOURCES else self.OTHERS
            counts = self.sources.setdefault(key, [0, 0, 0, 0])
        return counts

    def quiet(self, ip: str, limit: int) -> bool:
        """Is a newcomer from `ip` past the `limit` of its source, or CHURN_ALL × `limit` in
        all, this interval (counted, not logged)? A limit of 0 logs every one."""
        if not limit:
            return False
        counts = self._counts(ip)
        if counts[0] < limit and self.logged < CHURN_ALL * limit:
            counts[0] += 1
            self.logged += 1
            return False
        return True

    def count(self, ip: str, what: int) -> None:
        self._counts(ip)[what] += 1

    def flush(self) -> None:
        """Log what this interval counted, one line per source; a new interval begins."""
        for source, (_, connects, disconnects, refused) in self.sources.items():
            if connects or disconnects or refused:
                log.log(logging.WARNING if refused else logging.INFO,
                        "churn from %s in %g s: %d connects, %d disconnects, %d refused, not "
                        "logged one by one", source, CHURN_INTERVAL_S, connects, disconnects, refused)
        self.sources.clear()
        self.logged = 0


class ServerState:
    """What all connections share: current limits, the connection set, per-address counts."""

    def __init__(self, limits: Any, max_clients: int, loop: asyncio.AbstractEventLoop) -> None:
        self.limits = limits
        self.max_clients = max_clients
        self.loop = loop
        self.connections: set[Connection] = set()
        self.count = 0        # admitted clients, counting those not yet connected
        self.per_ip: dict[str, int] = {}
        self.all_closed = asyncio.Event()
        self.all_closed.set()
        self.stopping = False  # the server is stopping: leaving clients are not announced
        self.chat: ChatService | None = None  # chat connections share it (modes.ChatMode makes it)
        self.lease = ""       # a worker slot's bus lease (workers.py), passed on to the chat service
        self.churn = ChurnLog()
        self.metrics = Metrics()

    def readmit(self, ip: str) -> None:
        """Count in a client carried over by a live upgrade: it was admitted already."""
        self._count_in(churn_source(ip))

    def admit(self, ip: str) -> str:
        """Count a newcomer from `ip` in, or say why it is refused ("" when admitted).

        Admission happens at accept time, before the connection exists, so a
        batch of accepts cannot overshoot the limits. `max_clients_per_ip` counts an
        IPv6 address by its /64 (`churn_source`), of which one host may hold any number."""
        limits = self.limits
        if self.max_clients and self.count >= self.max_clients:
            return "server full"
        source = churn_source(ip)
        if limits.max_clients_per_ip and self.per_ip.get(source, 0) >= limits.max_clients_per_ip:
            return "server full (too many connections from one address)"
        self._count_in(source)
        return ""

    def _count_in(self, source: str) -> None:
        self.count += 1
        self.per_ip[source] = self.per_ip.get(source, 0) + 1

    def release(self, ip: str) -> None:
        """Give back what `admit(ip)` counted."""
        self.count -= 1
        source = churn_source(ip)
        left = self.per_ip[source] - 1
        if left:
            self.per_ip[source] = left
        else:
            del self.per_ip[source]

    def enter(self, conn: Connection) -> None:
        self.connections.add(conn)
        self.all_closed.clear()

    def forget(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        self.release(conn.ip)
        if not self.connections:
            self.all_closed.set()


class Connection(LineDecoder, asyncio.Protocol):
    """The lifecycle every client goes through, whatever the mode.

    A connection is its own LineDecoder rather than holding one: with a
    thousand clients, reaching through a second object on every read cost a
    quarter of the echo throughput (measured on uvloop, 64-byte lines).
    """

    __slots__ = ("state", "transport", "ip", "peer", "active", "idle_since", "reason", "closing",
                 "outbox", "budget", "quiet", "taken", "held", "backlog", "pace", "opened",
                 "in_bytes", "in_lines", "out_bytes", "tail")
    MODE = ""                            # the mode's name, for the metrics
    FULL_LINE = b"ERR server full\r\n"   # what accept.Gate tells a newcomer it refuses
    SLOW_DOWN_LINE = b"ERR too many connections, slow down\r\n"   # ... over [limits] connect_rate
    CR_NUL_ENDS_LINE = False

    def __init__(self, state: ServerState, ip: str = "?", peer: str = "?") -> None:
        """A client already admitted (`ServerState.admit(ip)`) by accept.Gate."""
        super().__init__(state.limits.max_line, self.CR_NUL_ENDS_LINE)
        self.state = state
        self.transport: Any = None
        self.ip = ip
        self.peer = peer
        self.active = True        # set on every read; the idle sweep clears it
        self.idle_since = 0.0     # when the idle sweep last found it inactive
        self.reason = ""
        self.closing = False      # nothing more may be written: closed, or half-closed by us
        self.outbox: bytearray | None = None   # output held while the transport has a queue
        self.budget = state.limits.output_buffer   # unsent output allowed: transport + outbox
        self.quiet = False        # counted by the ChurnLog, not logged (set by accept.Gate)
        self.taken = 0            # input handled since the connection last sat out a loop pass
        self.held = False         # reading paused by `over_budget` until `resume_writing`
        self.backlog = b""        # input read but left for a later pass (`decode`)
        self.pace = 0.0           # bytes per second the last slice of telnet input took
        self.opened = 0.0         # loop time of connection_made (`chatd who`, the debug log)
        self.in_bytes = 0         # counted by the mode's `consume`, for the metrics (metrics.py)
        self.in_lines = 0         # chat's only
        self.out_bytes = 0        # echo's only; chat's output is counted by its service
        self.tail = b""           # the write that paused the transport: it holds its end (`queued`)

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.opened = self.state.loop.time()
        self.state.enter(self)
        limits = self.state.limits
        # Paused on any queued output: a plain transport pauses past `high`, an SSL one
        # (asyncio's and uvloop's) at `high`, where 0 would keep it paused for good.
        transport.set_write_buffer_limits(high=1 if transport.get_extra_info("sslcontext") else 0, low=0)
        self._bound_buffers()
        if limits.keepalive:
            set_keepalive(transport.get_extra_info("socket"), limits.keepalive)
        if self.quiet:
            self.state.churn.count(self.ip, ChurnLog.CONNECTS)
        else:
            log.info("connect %s (%d clients)", self.peer, len(self.state.connections))

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.forget(self)
        self.state.metrics.closed(self, self.reason or ("reset" if exc else "closed"))
        if self.quiet:
            self.state.churn.count(self.ip, ChurnLog.DISCONNECTS)
        else:
            log.info("disconnect %s: %s (%d clients)", self.peer, self.end_reason(exc),
                     len(self.state.connections))

    def _bound_buffers(self, carried: bool = False) -> None:
        """Make `output_buffer` bound all the unread output, the kernel's share included, and
        cap what the kernel may hold of the input too.

        Linux grows a socket's buffers to megabytes for a peer that does not read (send) or
        while we do not read (receive), so the loop's budget alone would let every connection
        pin megabytes of kernel memory. The send buffer is capped at min(KERNEL_BUFFER,
        output_buffer / 4), taken from the budget; the receive buffer at KERNEL_BUFFER, which
        also bounds one read, so one pass's share holds. Not lower: below a loopback segment
        (64 KiB) the kernel holds back window updates, and a paused sender then waits on
        zero-window probes (a client of an output_buffer of 16 KiB took 105 s to be echoed
        48 KiB).
        """
        limit = self.state.limits.output_buffer
        kernel = max(1, min(KERNEL_BUFFER, limit // 4))
        if carried:   # a socket a live upgrade carried over has them (setting them: 13 us a client)
            self.budget = max(limit - kernel, self.max_line + 2)
            return
        try:
            # The kernel doubles this for its bookkeeping (socket(7)): the payload it holds
            # is about what was asked for, and that is the share taken from the limit.
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, kernel)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, KERNEL_BUFFER)
        except (OSError, AttributeError):
            kernel = 0
        self.budget = max(limit - kernel, self.max_line + 2)

    def take_share(self, n: int) -> None:
        """Count `n` bytes of input handled; past SHARE_BYTES the connection sits out one
        loop pass (reading paused, resumed by the next pass), so one fast sender cannot take
        a whole pass from everyone (uvloop reads a ready socket up to 32 times a pass)."""
        self.taken += n
        if self.taken >= SHARE_BYTES:
            self.sit_out()

    def decode(self, data: bytes) -> list:
        """`feed`, in slices for telnet-laden input: what is left waits in `backlog` for the
        next pass, so one connection's decoding takes about TELNET_PASS_S of each pass.

        Plain bytes cost little whatever they hold, but telnet commands mixed with data or
        with each other cost a regex or Python step per run: 64 KiB of them took 12 ms,
        and four such senders held every pass for 50 ms. The slice follows the pace the
        last one was decoded at, so a cheap flood (one command repeated) still goes whole.
        """
        if len(data) <= TELNET_SLICE or IAC not in data:
            return self.feed(data)
        n = max(TELNET_SLICE, int(self.pace * TELNET_PASS_S))
        if n < len(data):
            data, self.backlog = data[:n], data[n:]
            self.taken = SHARE_BYTES   # the caller's share count makes it sit out this pass
        began = time.perf_counter()
        out = self.feed(data)
        self.pace = len(data) / max(time.perf_counter() - began, 1e-6)
        return out

    def sit_out(self) -> None:
        """Pause reading until the loop's next pass (`take_share`)."""
        self.taken = 0
        if not self.closing:
            self.transport.pause_reading()
            self.state.loop.call_soon(self._next_pass)

    def _next_pass(self) -> None:
        """Decode the backlog, then read again; unless `over_budget` paused reading too:
        `resume_writing` goes on from here."""
        if self.closing or self.held:
            return
        if self.backlog:
            backlog, self.backlog = self.backlog, b""
            self.in_bytes -= len(backlog)   # counted when it was read; `consume` counts again
            self.in_lines -= backlog.count(b"\n")
            self.consume(backlog)
            if self.backlog or self.held or self.closing:
                return   # a further slice (it sits out again), or a full outbox
        self.transport.resume_reading()

    def consume(self, data: bytes) -> None:
        """Handle input (the mode's own `data_received`, without what a debug class counts)."""
        raise NotImplementedError

    def end_reason(self, exc: Exception | None) -> str:
        """Why the connection ended, as the disconnect line says it."""
        return self.reason or (f"reset ({exc})" if exc else "closed")

    def pause_writing(self) -> None:
        """The transport queued output: gather what follows in the outbox."""
        if self.outbox is None and not self.closing:
            self.outbox = bytearray()

    def resume_writing(self) -> None:
        """The transport's queue is empty: hand it the outbox, and read the client again."""
        self.held = False
        self.tail = b""
        self._hand_over()
        self._next_pass()

    def _hand_over(self) -> None:
        """The outbox to the transport in one write; output is gathered again only if the
        transport then has to queue some of it (`pause_writing`)."""
        outbox, self.outbox = self.outbox, None
        if outbox:
            self.transport.write(outbox)
            if self.outbox is not None:
                self.tail = outbox

    def write(self, data: bytes) -> None:
        """Send `data`, behind whatever is still queued (echo and chat inline this on their
        fast paths)."""
        if self.outbox is None:
            self.transport.write(data)
            if self.outbox is not None:   # this write paused the transport
                self.tail = data
        else:
            self.hold(data)

    def hold(self, data: bytes) -> None:
        """Queue `data` behind what the transport holds (call only while `outbox` is set)."""
        outbox = self.outbox
        outbox += data
        if len(outbox) + self.transport.get_write_buffer_size() > self.budget:
            self.over_budget()

    def unsent(self) -> int:
        """Output not yet handed to the kernel: the outbox and the transport's queue."""
        return len(self.outbox or b"") + self.transport.get_write_buffer_size()

    def over_budget(self) -> None:
        """More output is waiting than `budget`: stop reading until it has drained."""
        self.held = True
        self.transport.pause_reading()

    def flush(self) -> None:
        """Last words: no more output is gathered, and the outbox goes to the transport, which
        sends it before it closes or half-closes."""
        self.closing = True
        self._hand_over()

    def close(self, reason: str) -> None:
        """Close after flushing what is queued."""
        self.reason = self.reason or reason
        self.flush()
        self.transport.close()

    def abort(self, reason: str) -> None:
        """Close now, dropping what is queued."""
        self.reason = self.reason or reason
        self.closing = True
        self.outbox = None
        self.transport.abort()

    def notify(self, text: str) -> None:
        """A `*** ` notice from the operator (`chatd say`, moderation.py), behind what is queued."""
        self.write(b"*** " + text.encode() + b"\r\n")

    def dismiss(self, told: str, reason: str) -> None:
        """`chatd kick` or `ban`: the client is told `*** told`, then closed gracefully; `reason`
        is what the log (and in chat the room) says."""
        self.notify(told)
        self.close(reason)

    def drain(self) -> _Drainer:
        """Graceful stop, first step: from now on only what has already arrived is answered.

        The server calls `finish()` on the result once every client's input is read.
        """
        self.reason = self.reason or "server shutting down"
        drainer = self.new_drainer(unread_bytes(self.transport))
        self.transport.set_protocol(drainer)
        return drainer

    def new_drainer(self, budget: int) -> _Drainer:
        return _Drainer(self, budget)

    def farewell(self) -> None:
        """What a client is told just before a graceful stop half-closes it (nothing, in echo)."""

    # ------------------------------------------------------------ live upgrade (upgrade.py)

    def queued(self) -> bytes:
        """Output not yet handed to the kernel, in order: the end of the write that paused the
        transport (the transport holds exactly that much of it), then the outbox. Every write
        to the transport is made while nothing is queued, and the one that leaves some behind
        pauses it and is kept as `tail`, so the bytes are known without the loop's help."""
        held = self.transport.get_write_buffer_size()
        if held > len(self.tail):
            raise ValueError(f"{self.peer}: the transport holds {held} bytes, {len(self.tail)} known")
        return b"".join((memoryview(self.tail)[len(self.tail) - held:], self.outbox or b""))   # one copy

    def capture(self, now: float, index: dict[Connection, int]) -> dict[str, Any]:
        """What a live upgrade carries of this client (README "Live upgrade"): all but the
        socket, which goes beside it; times as ages, since the next process has its own
        loop clock. `index` numbers every carried client (chat's ledger names them)."""
        return {"mode": self.MODE, "debug": isinstance(self, DebugConnection), "ip": self.ip,
                "peer": self.peer, "quiet": self.quiet, "age": now - self.opened,
                "idle": 0.0 if self.active else now - self.idle_since, "held": self.held,
                "backlog": self.backlog, "output": self.queued(), "decoder": self.decoder_state(),
                "in_bytes": self.in_bytes, "in_lines": self.in_lines, "out_bytes": self.out_bytes}

    def restore(self, saved: dict[str, Any], now: float, clients: list[Connection]) -> None:
        """The client as `capture` saw it (its transport comes later, `adopt`); `clients` are
        all the carried ones, in the record's order."""
        self.quiet = bool(saved["quiet"])
        self.opened = now - float(saved["age"])
        self.active = not saved["idle"]
        self.idle_since = now - float(saved["idle"])
        self.held = bool(saved["held"])
        self.backlog = bytes(saved["backlog"])
        self.restore_decoder(saved["decoder"])
        self.in_bytes, self.in_lines, self.out_bytes = (int(saved[k]) for k in ("in_bytes", "in_lines", "out_bytes"))

    def adopt(self, transport: Any, saved: dict[str, Any]) -> None:
        """`connection_made` for a client carried over by a live upgrade (`saved` is what
        `capture` said): served again where it was, without a connect line or a welcome; its
        queued output goes out first."""
        output = saved["output"]
        self.transport = transport
        self.state.enter(self)
        transport.set_write_buffer_limits(high=0, low=0)
        self._bound_buffers(carried=True)   # the socket keeps its options, keepalive's too
        held, self.held = self.held, False
        if output:
            self.write(output)
        if held and self.outbox is not None and self.unsent() > self.budget:
            self.over_budget()
        elif self.backlog:
            self.sit_out()
        elif held:   # the takeover did not read it meanwhile (upgrade.Adopter)
            transport.resume_reading()


class _Drainer(asyncio.Protocol):
    """Stands in for a connection during a graceful stop (README "Signals", SIGUSR1).

    The bytes that had arrived when the stop began (`budget`) are still
    answered, and nothing after them. Then `finish()`: the farewell, our side
    half-closed (FIN) once the output is flushed, and what the client still
    sends read and dropped for LINGER_S, so closing does not reset the
    connection over unread data.
    """

    def __init__(self, conn: Connection, budget: int) -> None:
        self.conn = conn
        self.budget = budget
        self.timer: asyncio.TimerHandle | None = None

    @property
    def caught_up(self) -> bool:
        """Has everything that had arrived been read (or is the connection gone)?"""
        return self.budget <= 0 or self.conn.transport.is_closing()

    def data_received(self, data: bytes) -> None:
        if self.budget > 0:
            take = data[: self.budget]
            self.budget -= len(take)
            self.conn.data_received(take)

    def finish(self) -> None:
        conn = self.conn
        transport = conn.transport
        if transport.is_closing() or conn.closing:
            return
        conn.farewell()
        conn.flush()
        transport.resume_reading()
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:
                pass   # the peer is already gone: closing is all that is left
        self.timer = self.conn.state.loop.call_later(LINGER_S, transport.close)

    def eof_received(self) -> bool:
        return False   # the client is done too: close

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.conn.connection_lost(exc)


# ---------------------------------------------------------------- log level debug

# The slots of a debug connection. `DebugConnection` itself has none (a second base with slots
# of its own could not be combined with ChatConnection's), so each concrete debug class
# declares these.
DEBUG_SLOTS = ("bytes_in", "bytes_out", "discarded", "paused_since", "noted_at", "noted",
               "hushed")
DEBUG_LINES = 3          # debug lines a connection's drops and pauses may log in DEBUG_WINDOW_S
DEBUG_WINDOW_S = 10.0


class DebugConnection(Connection):
    """What a connection logs at level debug, mixed in before a mode's connection class.

    Only at level debug are new connections made from such a class (the server picks it,
    `modes.Mode.connection_class`), so at any other level the hot paths are the mode's own,
    untouched. It logs one line per event, never what the client sent: accepted (peer and
    local address), closed (reason, bytes received and sent, how long it was open), and
    reading paused and resumed; the mode's debug class adds what it drops. Bytes received
    are counted in `data_received` (which a BufferedProtocol's `buffer_updated` and the
    graceful stop's drainer call too), bytes sent by a `CountingTransport` standing in for
    the transport: what was handed to the transport, less what an abort then discarded.
    """

    __slots__ = ()
    bytes_in: int
    bytes_out: int
    discarded: int | None
    paused_since: float | None
    noted_at: float
    noted: int
    hushed: int

    def __init__(self, state: ServerState, ip: str = "?", peer: str = "?") -> None:
        super().__init__(state, ip, peer)
        self.bytes_in = 0
        self.bytes_out = 0
        self.discarded = None       # output handed over, then dropped by an abort
        self.paused_since = None    # when over_budget stopped reading the client
        self.noted_at = 0.0         # when the current window of `note` began
        self.noted = 0              # lines `note` logged in it
        self.hushed = 0             # lines `note` held back since the last count was logged

    def note(self, msg: str, *args: Any) -> bool:
        """Log a debug line about what the client made us drop or pause, if this connection
        has logged fewer than DEBUG_LINES in the current DEBUG_WINDOW_S; else count it, the
        count logged before the next line let through or at close. Whatever a client sends,
        its debug lines stay a few per window. True if it was logged."""
        now = self.state.loop.time()
        if now - self.noted_at >= DEBUG_WINDOW_S:
            self.noted_at, self.noted = now, 0
        if self.noted >= DEBUG_LINES:
            self.hushed += 1
            return False
        self.noted += 1
        self._unhush()
        log.debug(msg, *args)
        return True

    def _unhush(self) -> None:
        """Log how many lines `note` held back, if any."""
        if self.hushed:
            log.debug("dropped %d debug lines about %s (over %d in %g s)", self.hushed, self.peer,
                      DEBUG_LINES, DEBUG_WINDOW_S)
            self.hushed = 0

    def connection_made(self, transport: Any) -> None:
        if not self.quiet:
            log.debug("accepted %s on %s", self.peer, format_peer(transport.get_extra_info("sockname")))
        super().connection_made(CountingTransport(transport, self))

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        super().data_received(data)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.paused_since is not None and not self.closing:
            log.debug("resumed reading %s after %.3f s", self.peer,
                      self.state.loop.time() - self.paused_since)
            self.paused_since = None

    def abort(self, reason: str) -> None:
        if self.discarded is None:   # the first abort drops what the transport and kernel hold
            try:
                self.discarded = self.transport.get_write_buffer_size() + unsent_bytes(self.transport)
            except Exception:   # noqa: BLE001 - a count is not worth failing the abort
                self.discarded = 0
        super().abort(reason)

    def new_drainer(self, budget: int) -> _Drainer:
        return _CountingDrainer(self, budget)

    def capture(self, now: float, index: dict[Connection, int]) -> dict[str, Any]:
        return super().capture(now, index) | {"bytes": [self.bytes_in, self.bytes_out]}

    def restore(self, saved: dict[str, Any], now: float, clients: list[Connection]) -> None:
        super().restore(saved, now, clients)
        self.bytes_in, self.bytes_out = (int(n) for n in saved.get("bytes", (0, 0)))

    def adopt(self, transport: Any, saved: dict[str, Any]) -> None:
        super().adopt(CountingTransport(transport, self), saved)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.quiet:
            return
        self._unhush()
        discarded = min(self.discarded or 0, self.bytes_out)
        log.debug("closed %s (%s): received %d bytes, sent %d bytes%s, open %.3f s",
                  self.peer, self.end_reason(exc), self.bytes_in, self.bytes_out - discarded,
                  f" ({discarded} more discarded unsent)" if discarded else "",
                  self.state.loop.time() - self.opened)


class CountingTransport:
    """A transport that counts the bytes written to it into its connection's `bytes_out`.

    Everything else is the transport's own (`__getattr__`). It never raises where the
    transport itself would not: the write goes first, the count after.
    """

    __slots__ = ("transport", "conn")

    def __init__(self, transport: Any, conn: DebugConnection) -> None:
        self.transport = transport
        self.conn = conn

    def write(self, data: Any) -> None:
        self.transport.write(data)
        self.conn.bytes_out += _size(data)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:   # chat asks before every send
        return self.transport.is_closing()

    def __getattr__(self, name: str) -> Any:
        if name in CountingTransport.__slots__:   # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.transport, name)

    def __repr__(self) -> str:
        return f"<CountingTransport {self.transport!r}>"


def _size(data: Any) -> int:
    """The bytes in `data`, anything a transport's write accepts; never raises."""
    if data.__class__ is bytes or data.__class__ is bytearray:
        return len(data)
    try:
        with memoryview(data) as view:
            return view.nbytes
    except Exception:   # noqa: BLE001 - a count is not worth an exception
        return 0


class _CountingDrainer(_Drainer):
    """A debug connection's drainer: the bytes it drops count as received too."""

    def data_received(self, data: bytes) -> None:
        self.conn.bytes_in += len(data) - min(len(data), max(self.budget, 0))
        super().data_received(data)
