"""Metrics (README "Metrics"): what chatd counts, a snapshot of it, its two renderings, and
`[metrics] listen`'s HTTP endpoint.

Counting must cost the hot path next to nothing (tests/perf/README.md, "Metrics"): each
connection counts its bytes received (and echo its bytes sent) in slots, one add a read or a
write, which `Metrics.closed` folds into the totals when it closes, and a snapshot adds those
of the connections still open. Lines are counted in chat only: there each line costs a Python
step and a fan-out anyway, while in echo counting them (`bytes.count`, about 0.3 ns a byte)
would cost about 6 % of echo's speed at 16 lines a read, past the 3 % budget; echo's lines come
back as they came, and its bytes say as much. Chat's output is counted once per loop pass by
rooms.ChatService, not once per recipient. Everything else (accepts, refusals, disconnects,
restarts) happens off the hot path and is counted where it happens. The counters are plain
ints: prometheus_client's `Counter.inc` takes a lock and cost about 15 times an int slot's add
(tests/perf/counter_cost.py), so the text format is written here (`render_prometheus`), and
the tests check it with prometheus_client's own parser and `promtool check metrics`.

A snapshot is a plain dict (`Server.metrics_snapshot`), rendered for people by `render_text`
(`chatd stats`) and for Prometheus by `render_prometheus` (text exposition format 0.0.4). The
endpoint answers `GET /metrics` and nothing else, one request per connection, within
REQUEST_BYTES, READ_TIMEOUT_S and MAX_SCRAPERS, so a scraper cannot cost chatd more than a
client can.

Tests: tests/process/test_metrics.py, tests/unit/test_metrics_render.py
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from typing import Any, Callable

from . import listen
from .errors import ChatdError

log = logging.getLogger("chatd")

REQUEST_BYTES = 8192     # a request's head may be this long at most (431 past it)
READ_TIMEOUT_S = 5.0     # a scraper must have sent its request within this (then cut off)
MAX_SCRAPERS = 8         # scrapes served at once; the ones past it are told 503
LINGER_S = 1.0           # after the answer, how long the client's further input is dropped
RETRY_S = 1.0            # after a failed accept (no descriptors), accept again after this
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LISTEN_RE = re.compile(r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9.-]+)):(?P<port>\d{1,5})")

# Refusals and disconnects known at start, so their series exist (at 0) before the first one;
# other helpers' reasons ("denied", "banned", ...) appear when first counted.
REFUSALS = ("server full", "per-address limit", "out of descriptors", "denied", "not allowed",
            "connect rate", "banned", "proxy")
DISCONNECTS = ("client closed", "closed", "reset", "handshake failed", "idle", "too slow", "flooding",
               "quit", "kicked", "banned", "server stopping", "server shutting down")
RESTARTS = ("applied", "rejected", "failed")

# The families, in the order both renderings list them: (snapshot key, Prometheus name,
# type, labels, help). A labelled family's snapshot value is {label values: number}.
FAMILIES: tuple[tuple[str, str, str, tuple[str, ...], str], ...] = (
    ("build", "chatd_build_info", "gauge", ("version", "loop", "mode"),
     "Always 1: the version, event loop and mode of this chatd."),
    ("start_time", "chatd_start_time_seconds", "gauge", (), "When chatd started, Unix time."),
    ("uptime", "chatd_uptime_seconds", "gauge", (), "Seconds since chatd started."),
    ("generation", "chatd_generation", "gauge", (), "Restarts in place (SIGHUP) handled."),
    ("clients", "chatd_clients", "gauge", ("mode", "listener"), "Connected clients."),
    ("accepted", "chatd_connections_accepted_total", "counter", (), "Connections admitted."),
    ("refused", "chatd_connections_refused_total", "counter", ("reason",),
     "Connections refused, by reason."),
    ("disconnects", "chatd_disconnects_total", "counter", ("reason",),
     "Connections ended, by reason (idle, too slow and flooding are drops by chatd)."),
    ("lines_in", "chatd_lines_received_total", "counter", (),
     "Lines received (LF-terminated), in chat mode."),
    ("lines_out", "chatd_lines_sent_total", "counter", (),
     "Lines and notices handed to chat clients, once per recipient."),
    ("bytes_in", "chatd_received_bytes_total", "counter", (), "Bytes received from clients."),
    ("bytes_out", "chatd_sent_bytes_total", "counter", (), "Bytes sent to clients."),
    ("restarts", "chatd_restarts_total", "counter", ("outcome",), "Restarts in place, by outcome."),
    ("log_failures", "chatd_log_failures_total", "counter", (),
     "Writes to the log target that failed (the line went to the fallback file)."),
    ("log_fallback", "chatd_log_fallback_lines_total", "counter", (),
     "Log lines written to the fallback file while the log target failed."),
    ("bans", "chatd_bans", "gauge", (), "Bans in force (chatd ban)."),
)


class Metrics:
    """The counters of one server: bumped where things happen, read by `snapshot`."""

    def __init__(self) -> None:
        self.accepted = 0
        self.refusals = dict.fromkeys(REFUSALS, 0)
        self.disconnects = dict.fromkeys(DISCONNECTS, 0)
        self.restarts = dict.fromkeys(RESTARTS, 0)
        self.gone = [0, 0, 0]   # bytes in, lines in, bytes out of the connections closed

    def refused(self, reason: str) -> None:
        """A newcomer turned away for `reason`, a short fixed label ("server full", "banned",
        ...), never text a client chose: each new one is a series of its own."""
        self.refusals[reason] = self.refusals.get(reason, 0) + 1

    def closed(self, conn: Any, reason: str) -> None:
        """Fold a closing connection's counts into the totals, and count why it ended (a fixed
        label, as for `refused`): a kick's "kicked: REASON" counts as "kicked", since the
        operator's text after the colon would make a series of each reason ever given."""
        gone = self.gone
        gone[0] += conn.in_bytes
        gone[1] += conn.in_lines
        gone[2] += conn.out_bytes
        label = reason.partition(":")[0]
        self.disconnects[label] = self.disconnects.get(label, 0) + 1

    def restarted(self, outcome: str) -> None:
        self.restarts[outcome] = self.restarts.get(outcome, 0) + 1

    def snapshot(self, connections: Any, listener_of: Callable[[Any], str], sent: tuple[int, int],
                 extra: dict[str, Any]) -> dict[str, Any]:
        """Every family's value now: the totals, plus the counts of the open `connections`
        (grouped by mode and `listener_of`), plus `sent` = (bytes, lines) counted elsewhere
        (chat's output), plus `extra` (process and log families, from the server)."""
        b_in, l_in, b_out = self.gone
        clients: dict[tuple[str, ...], int] = {}
        for conn in connections:
            b_in += conn.in_bytes
            l_in += conn.in_lines
            b_out += conn.out_bytes
            key = (conn.MODE, listener_of(conn))
            clients[key] = clients.get(key, 0) + 1
        return {"clients": clients, "accepted": self.accepted,
                "refused": {(k,): v for k, v in self.refusals.items()},
                "disconnects": {(k,): v for k, v in self.disconnects.items()},
                "lines_in": l_in, "lines_out": sent[1],
                "bytes_in": b_in, "bytes_out": b_out + sent[0],
                "restarts": {(k,): v for k, v in self.restarts.items()}, **extra}


# ---------------------------------------------------------------- renderings

def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def render_text(snapshot: dict[str, Any]) -> str:
    """What `chatd stats` prints: one aligned line per family, named as in Prometheus less
    `chatd_` and `_total`; a labelled family's total, then each of its series indented below
    it (label values escaped as in Prometheus: no line breaks)."""
    rows: list[tuple[str, str]] = []
    for key, name, _, labels, _ in FAMILIES:
        value = snapshot.get(key)
        if value is None:
            continue
        title = name.removeprefix("chatd_").removesuffix("_total").replace("_", " ")
        if not labels:
            rows.append((title, _number(value)))
        elif key == "build":
            rows.append((title, "; ".join(f"{label} {v}" for values in value
                                          for label, v in zip(labels, values))))
        else:
            rows.append((title, _number(sum(value.values()))))
            rows.extend(("  " + ", ".join(_escape_label(str(v)) for v in values), _number(n))
                        for values, n in sorted(value.items()))
    width = max(len(title) for title, _ in rows)
    return "\n".join(f"{title:<{width}}  {value}" for title, value in rows) + "\n"


def render_json(snapshot: dict[str, Any]) -> dict[str, Any]:
    """What `chatd stats --json` prints: each family by its Prometheus name less `chatd_`, a
    number, or for a labelled family its series as objects of their labels and `value`."""
    out: dict[str, Any] = {}
    for key, name, _, labels, _ in FAMILIES:
        value = snapshot.get(key)
        if value is None:
            continue
        out[name.removeprefix("chatd_")] = value if not labels else [
            dict(zip(labels, values), value=n) for values, n in sorted(value.items())]
    return out


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render_prometheus(snapshot: dict[str, Any]) -> str:
    """The Prometheus text exposition format 0.0.4: HELP and TYPE, then the samples."""
    out: list[str] = []
    for key, name, kind, labels, help_text in FAMILIES:
        value = snapshot.get(key)
        if value is None:
            continue
        out.append(f"# HELP {name} {help_text.replace(chr(92), chr(92) * 2)}")
        out.append(f"# TYPE {name} {kind}")
        if not labels:
            out.append(f"{name} {_number(value)}")
            continue
        for values, n in sorted(value.items()):
            pairs = ",".join(f'{label}="{_escape_label(str(v))}"' for label, v in zip(labels, values))
            out.append(f"{name}{{{pairs}}} {_number(n)}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- [metrics] listen

def parse_listen(value: str) -> tuple[str, int]:
    """"HOST:PORT" or "[V6]:PORT" as (host, port); ValueError with what was expected."""
    m = LISTEN_RE.fullmatch(value.strip())
    if m is None:
        raise ValueError(f'expected "", "HOST:PORT" or "[IPV6]:PORT", got {value!r}')
    port = int(m["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}")
    return m["v6"] or m["host"], port


def bind(value: str) -> socket.socket | None:
    """The endpoint's listening socket for `[metrics] listen` (None when it is ""), bound at
    start with the listeners, so a port in use fails the start with its reason."""
    if not value:
        return None
    host, port = parse_listen(value)
    address = listen.resolve(host, port)[0]
    try:
        return listen.bind(address, 16)
    except ChatdError as e:
        raise e.__class__(f"[metrics] listen: {e}", e.status) from None


class Endpoint:
    """Serves `render()` at GET /metrics on a bound socket, one request per connection. The
    listening socket stays the daemon's (lifetime.Held closes it): the endpoint only reads it,
    as accept.Acceptor reads the listeners."""

    def __init__(self, sock: socket.socket, render: Callable[[], str]) -> None:
        self.sock = sock
        self.render = render
        self.scrapers = 0      # connections holding a scrape slot
        self.open = 0          # connections in all, answered ones lingering included
        self.loop = asyncio.get_running_loop()
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(MAX_SCRAPERS):
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:   # out of descriptors: scrapers wait in the backlog a while
                log.warning("[metrics] listen: accept: %s", e.strerror or e)
                self.close()
                self.loop.call_later(RETRY_S, self.loop.add_reader, self.sock.fileno(), self._accept)
                return
            conn.setblocking(False)
            task = self.loop.create_task(self.loop.connect_accepted_socket(lambda: _Scrape(self), conn))
            task.add_done_callback(_ignore_failure)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        """Accept again after `close` (a live upgrade that did not happen)."""
        self.loop.add_reader(self.sock.fileno(), self._accept)


def _ignore_failure(task: asyncio.Task[Any]) -> None:
    """A scraper gone before its connection was made: nothing to do (no traceback)."""
    if not task.cancelled():
        task.exception()


class _Scrape(asyncio.Protocol):
    """One HTTP/1.x request: its head read within REQUEST_BYTES and READ_TIMEOUT_S, then one
    answer, `Connection: close` and a FIN; what the client still sends is dropped until it
    closes too, for LINGER_S at most (closing over unread input would reset the connection,
    and the client could lose the answer). Past MAX_SCRAPERS, a newcomer is told 503 at once;
    past twice that many connections in all, it is closed unanswered."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.head = bytearray()
        self.transport: Any = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        self.scraping = False   # holds one of the MAX_SCRAPERS slots

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        endpoint = self.endpoint
        endpoint.open += 1
        if endpoint.open > 2 * MAX_SCRAPERS:
            transport.abort()
        elif endpoint.scrapers >= MAX_SCRAPERS:
            self._answer(503, "Service Unavailable", "too many scrapes at once\n")
        else:
            endpoint.scrapers += 1
            self.scraping = True
            self.timer = endpoint.loop.call_later(READ_TIMEOUT_S, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return
        self.head += data
        end = self.head.find(b"\r\n\r\n")
        if end < 0:
            end = self.head.find(b"\n\n")
        if end < 0 and len(self.head) <= REQUEST_BYTES:
            return
        if end < 0 or end > REQUEST_BYTES:
            self._answer(431, "Request Header Fields Too Large", "request too long\n")
            return
        self._respond(bytes(self.head[:end]).split(b"\n", 1)[0].rstrip(b"\r"))

    def _respond(self, request_line: bytes) -> None:
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._answer(400, "Bad Request", "bad request\n")
        elif parts[0] != b"GET":
            self._answer(405, "Method Not Allowed", "only GET\n", ("Allow: GET",))
        elif parts[1].split(b"?", 1)[0] != b"/metrics":
            self._answer(404, "Not Found", "not found; the metrics are at /metrics\n")
        else:
            self._answer(200, "OK", self.endpoint.render(), (f"Content-Type: {CONTENT_TYPE}",))

    def _answer(self, code: int, reason: str, body: str, headers: tuple[str, ...] = ()) -> None:
        self.answered = True
        self.head = bytearray()
        payload = body.encode()
        if code != 200:
            headers = ("Content-Type: text/plain; charset=utf-8", *headers)
        head = [f"HTTP/1.1 {code} {reason}", *headers, f"Content-Length: {len(payload)}",
                "Connection: close", "", ""]
        transport = self.transport
        transport.write("\r\n".join(head).encode() + payload)
        if self.timer is not None:
            self.timer.cancel()
        try:
            transport.write_eof()
        except OSError:
            transport.close()
            return
        self.timer = self.endpoint.loop.call_later(LINGER_S, transport.close)

    def eof_received(self) -> bool:
        return False   # the client is done: close

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.endpoint.open -= 1
        if self.scraping:
            self.endpoint.scrapers -= 1
