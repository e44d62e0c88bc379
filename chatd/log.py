"""Logging: one target (syslog, stderr or a file), a fallback file, `reopen()` for logrotate.

Defaults (README "Signals"): `chatd run` logs to stderr; a detached daemon logs
to syslog when the syslog socket exists, else to X.log beside its pid file.
A target that fails (syslog gone, disk full) never stops the daemon: the
message goes to the fallback X.log, the failure is reported once, and the
target is tried again every RETRY_S seconds. No write waits for a reader: a
syslog or stderr that stops reading (a full queue, a pipe nobody reads) is a
failing target like any other. Logging's own errors never print a traceback.
`[log] format = "json"` writes each line as one JSON object (`JsonFormatter`), to every target.

Tests: tests/process/test_logging.py, tests/process/test_json_log.py, tests/process/test_rsyslog.py, tests/process/test_log_abuse.py, tests/process/test_fault_resources.py, tests/unit/test_json_formatter.py
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import logging.handlers
import math
import os
import re
import socket
import stat
import time
from typing import Callable, TextIO

from . import files
from .config import Config
from .errors import ChatdError, setting_error

LOGGER_NAME = "chatd"
RETRY_S = 10.0
FILE_MODE = 0o640
log = logging.getLogger(LOGGER_NAME)
# asyncio's own warnings go where chatd's lines go, never to a stderr that may be /dev/null
# or, under systemd, the journal without chatd's prefixes; its debug chatter does not.
loop_log = logging.getLogger("asyncio")
loop_log.setLevel(logging.WARNING)


def _raise(self: logging.Handler, record: logging.LogRecord) -> None:
    raise   # noqa: PLE0704 - re-raise the error the handler is handling, for FailoverHandler


class _StrictMixin:
    """Handlers that raise on failure, so FailoverHandler sees it."""

    handleError = _raise


class FileTarget(_StrictMixin, logging.StreamHandler):
    """Appends to a file opened with an explicit mode; `reopen()` follows logrotate."""

    def __init__(self, path: str, fd: int | None = None) -> None:
        """`fd`: the file already open (a live upgrade's, which a daemon that dropped its
        privileges may not be able to open again)."""
        self.path = path
        super().__init__(self._open(fd))

    def _open(self, fd: int | None = None) -> TextIO:
        # Through `files`: never a planted link, FIFO or another user's file (UnsafeFile is
        # an OSError, so a refused reopen keeps the old descriptor like any failed one).
        if fd is None:
            fd = files.open_file(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
        return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)

    def reopen(self) -> None:
        stream = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        old.close()

    def close(self) -> None:
        self.acquire()
        try:
            if self.stream:
                self.stream.close()
        finally:
            self.release()
        super().close()


def _send_whole(send: Callable[[bytes], int], data: bytes, what: str) -> None:
    """`data` whole, or a failure: a reader with no room for it (EAGAIN, or only part of it
    taken) fails as an unwritable file does, in words `status` can show."""
    try:
        sent = send(data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        raise BlockingIOError(errno.EAGAIN, f"{what} is not reading: no room for a line"
                              + (f" ({sent} of {len(data)} bytes taken)" if sent else ""))


@functools.cache
def _stderr_writer() -> tuple[Callable[[bytes], int], Callable[[], None]]:
    """A write to stderr that never waits for its reader, and how to let go of it.

    Under `chatd run`, stderr may be a pipe or a terminal nobody reads (or one stopped with
    Ctrl-S), or the journal's socket: one blocking write there would stop the event loop and
    every client with it. A socket is sent to with MSG_DONTWAIT; a pipe, FIFO or terminal is
    written through a description of chatd's own, opened non-blocking through /proc/self/fd/2
    (O_NONBLOCK on the inherited description would reach the shell and whoever else shares it);
    a regular file, which never makes a writer wait, as it is. Opened once, before privileges
    are dropped, and kept as long as fd 2 is the same file (`Logging.stderr_replaced`).
    """
    mode = os.fstat(2).st_mode
    if stat.S_ISSOCK(mode):
        sock = socket.socket(fileno=os.dup(2))
        return (lambda data: sock.send(data, socket.MSG_DONTWAIT)), sock.close
    if stat.S_ISREG(mode):
        return (lambda data: os.write(2, data)), lambda: None
    fd = os.open("/proc/self/fd/2", os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    return (lambda data: os.write(fd, data)), lambda: os.close(fd)


class StderrTarget(logging.Handler):
    """Lines to stderr, never waiting for its reader (`_stderr_writer`); a reader with no
    room for a line (EAGAIN) fails like any target, so FailoverHandler writes to X.log."""

    def __init__(self) -> None:
        super().__init__()
        self.write = _stderr_writer()[0]

    def emit(self, record: logging.LogRecord) -> None:
        data = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
        _send_whole(self.write, data, "stderr")


class SyslogTarget(logging.handlers.SysLogHandler):
    """RFC 3164 lines to the syslog socket, tagged chatd[PID], never waiting for syslog.

    A syslog that stops reading fills its socket's queue (net.unix.max_dgram_qlen datagrams,
    10 by default), and a blocking send then stopped the event loop: echo stopped answering
    at the sixth connection. Every send is MSG_DONTWAIT, so a full queue (EAGAIN) is a failure
    like any other: FailoverHandler writes to X.log and tries syslog again every RETRY_S.
    Connecting never waits either (`_connect_unixsocket`).
    """

    def __init__(self, address: str, facility: str) -> None:
        super().__init__(address=address, facility=facility)   # connects, or leaves socket None
        self.ident = f"chatd[{os.getpid()}]: "

    def _connect_unixsocket(self, address: str) -> None:
        """As SysLogHandler's (datagram, else stream), but non-blocking: a stream syslog that
        stops accepting fills its backlog, and a blocking connect() then froze the daemon for
        good, at start, restart or the retry. Its EAGAIN is a failure like any other."""
        self.socket = None
        kinds = (self.socktype,) if self.socktype else (socket.SOCK_DGRAM, socket.SOCK_STREAM)
        for kind in kinds:
            sock = socket.socket(socket.AF_UNIX, kind)
            sock.setblocking(False)
            try:
                sock.connect(address)
            except OSError:   # BlockingIOError too: EAGAIN (a full backlog), EINPROGRESS
                sock.close()
                if kind == kinds[-1]:
                    raise
                continue
            self.socket, self.socktype = sock, kind
            return

    def emit(self, record: logging.LogRecord) -> None:
        """As SysLogHandler's, but no send or connect waits, and every failure raises (for
        FailoverHandler)."""
        priority = self.encodePriority(self.facility, self.mapPriority(record.levelname))
        data = f"<{priority}>{self.ident}{self.format(record)}\0".encode("utf-8", "backslashreplace")
        if self.socket is not None:
            try:
                self._send(data)
                return
            except BlockingIOError:
                raise
            except OSError:   # syslog restarted (its socket is a new one)
                self.socket.close()
        self._connect_unixsocket(self.address)   # or none when we began, or a stream given up
        self._send(data)

    def _send(self, data: bytes) -> None:
        try:
            _send_whole(lambda d: self.socket.send(d, socket.MSG_DONTWAIT), data, "syslog")
        except BlockingIOError:
            if self.socktype == socket.SOCK_STREAM:   # part of a line may be in: start afresh
                self.socket.close()
                self.socket = None
            raise


class FailoverHandler(logging.Handler):
    """Sends to the target; while it fails, to the fallback file; retries the target."""

    def __init__(self, target: logging.Handler, fallback_path: str, fallback_format: logging.Formatter,
                 on_change: Callable[[str], None]) -> None:
        super().__init__()
        self.target = target
        self.fallback_path = fallback_path
        self.fallback_format = fallback_format
        self.fallback: FileTarget | None = None
        self.failed_at: float | None = None
        self.failure = ""
        self.on_change = on_change
        self.failures = 0         # writes to the target that failed (the metrics)
        self.fallback_lines = 0   # lines written to the fallback file instead

    def emit(self, record: logging.LogRecord) -> None:
        if self.failed_at is None or time.monotonic() - self.failed_at >= RETRY_S:
            try:
                self.target.handle(record)
            except Exception as e:   # noqa: BLE001 - any failure of the target falls over
                self._failed(e, record)
            else:
                if self.failed_at is not None:
                    self.failed_at = None
                    self.failure = ""
                    self.on_change("")
                return
        self._to_fallback(record)

    def _failed(self, error: Exception, record: logging.LogRecord) -> None:
        self.failures += 1
        first = self.failed_at is None
        self.failed_at = time.monotonic()
        self.failure = f"{type(error).__name__}: {error}"
        if first:
            self.on_change(self.failure)
            note = logging.LogRecord(LOGGER_NAME, logging.WARNING, __file__, 0,
                                     "log target failed (%s); writing to %s until it works again",
                                     (self.failure, self.fallback_path), None)
            self._to_fallback(note)

    def _to_fallback(self, record: logging.LogRecord) -> None:
        try:
            if self.fallback is None:
                self.fallback = FileTarget(self.fallback_path)
                self.fallback.setFormatter(self.fallback_format)
            self.fallback.handle(record)
            self.fallback_lines += 1
        except Exception:   # noqa: BLE001 - nowhere left to write; drop the line
            pass

    def reopen(self) -> list[str]:
        """Reopen file targets (logrotate moved them). A file we may no longer open
        (privileges dropped since) keeps its old descriptor, which still works.
        Returns what could not be reopened, for the restart's outcome."""
        failures = []
        for h in (self.target, self.fallback):
            if isinstance(h, FileTarget):
                try:
                    h.reopen()
                except OSError as e:
                    failure = f"cannot reopen log file {h.path} ({e.strerror}); still writing to the old one"
                    log.warning("%s", failure)
                    failures.append(failure)
        return failures

    def close(self) -> None:
        for h in (self.target, self.fallback):
            if h is not None:
                try:
                    h.close()
                except Exception:   # noqa: BLE001
                    pass
        super().close()


FILE_FORMAT = "%(asctime)s chatd[%(process)d] %(levelname)s: %(message)s"
STDERR_FORMAT = "chatd[%(process)d] %(levelname)s: %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


# The events of the lines that matter most to a log shipper, by the format string chatd logs
# them with, and a name for each of its arguments: those become the JSON object's fields, with
# no work at all for the text format (tests/unit/test_json_formatter.py checks each one is logged).
# An argument named "" is only words for the message.
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "chatd %s starting (pid %d, config %s)": ("starting", ("version", "pid", "config")),
    "ready: %s mode on %s, event loop %s": ("ready", ("mode", "address", "loop")),
    "ready: %s mode on %s, %d workers, event loop %s": ("ready", ("mode", "address", "workers", "loop")),
    "connect %s (%d clients)": ("connect", ("peer", "clients")),
    "disconnect %s: %s (%d clients)": ("disconnect", ("peer", "reason", "clients")),
    "refused %s: %s": ("refused", ("peer", "reason")),
    "connect %s failed: %s": ("connect_failed", ("peer", "reason")),
    "churn from %s in %g s: %d connects, %d disconnects, %d refused, not logged one by one":
        ("churn", ("source", "seconds", "connects", "disconnects", "refused")),
    "accepted %s on %s": ("accepted", ("peer", "local")),
    "closed %s (%s): received %d bytes, sent %d bytes%s, open %.3f s":
        ("closed", ("peer", "reason", "received", "sent", "", "seconds")),
    "signal %s: %s": ("signal", ("signal", "meaning")),
    "restart %s: %s": ("restart", ("outcome", "detail")),
    "restart: %s %r -> %r (from %s)": ("restart_change", ("key", "old", "new", "origin")),
    "%s (%s), %d clients": ("stop", ("how", "signal", "clients")),
    "%s (%s): stopping %d workers": ("stop", ("how", "signal", "workers")),
    "stopping %d workers: %s": ("stop", ("workers", "reason")),
    "log target failed (%s); writing to %s until it works again": ("log_failed", ("failure", "fallback")),
}
EVENT_WORD = re.compile(r"[a-z]+")
# The line breaks besides \r and \n that json.dumps leaves as they are (str.splitlines and some
# readers break lines there): escaped too, so a line is one line to any reader.
LINE_BREAKS = re.compile("[\x85\u2028\u2029]")
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _field(value: object) -> object:
    """A JSON value for a log call's argument: numbers and strings as they are, anything else
    (and NaN or infinity, which JSON has no words for) as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log shippers: `time` (RFC 3339, UTC, microseconds), `level`,
    `event`, `message` (the text format's words), `pid`, then the event's fields (`EVENTS`).

    A line not in EVENTS has the first word of its message as its event ("stopped", "bus",
    "worker"), else "log"; asyncio's own lines have "asyncio". json.dumps escapes quotes,
    backslashes and control characters (and LINE_BREAKS are escaped), so no value can end a
    line or the object early; a field never replaces one of the keys every line has.
    """

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        event, names = EVENTS.get(record.msg, ("", ())) if isinstance(record.msg, str) else ("", ())
        if record.name != LOGGER_NAME:
            event, names = record.name, ()
        elif not event:
            word = EVENT_WORD.match(message)
            event = word[0] if word else "log"
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
                    + f".{int(record.created % 1 * 1e6):06d}Z",
            "level": record.levelname.lower(), "event": event, "message": message, "pid": record.process,
        }
        if isinstance(record.args, tuple) and len(record.args) == len(names):
            for name, value in zip(names, record.args):
                if name:   # "": words for the message, not a field
                    line.setdefault(name, _field(value))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return LINE_BREAKS.sub(lambda m: f"\\u{ord(m[0]):04x}", _to_json(line))


def _journal_prefix() -> bool:
    """Does JOURNAL_STREAM say that our stderr is the journal? (systemd.exec(5))"""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return st.st_dev == dev and st.st_ino == ino


class _JournalFormatter(logging.Formatter):
    """`<N>` priority prefixes (sd-daemon(3)) that the journal turns into levels, before the
    message, or its JSON object (`json`)."""

    LEVELS = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def __init__(self, json: bool) -> None:
        super().__init__()
        self.line = JsonFormatter().format if json else logging.LogRecord.getMessage

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.LEVELS.get(record.levelno, 6)}>{self.line(record)}"


def _formatter(cfg: Config, text_format: str) -> logging.Formatter:
    """The format of `[log] format`: JSON, or `text_format`, the target's text lines."""
    if cfg.log.format == "json":
        return JsonFormatter()
    return logging.Formatter(text_format, DATE_FORMAT)


def resolve_target(cfg: Config, foreground: bool) -> str:
    """The effective target: "syslog", "stderr" or an absolute file path."""
    target = cfg.log.target
    if target == "stderr" and not foreground:
        raise setting_error(cfg.origin("log.target"),
                            "a detached daemon has no stderr; use 'chatd run' to log to stderr")
    if target:
        return target
    if foreground:
        return "stderr"
    return "syslog" if _is_socket(cfg.log.syslog_socket) else ""


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class Logging:
    """The daemon's logging: set up once, reopened on SIGHUP, reconfigured on restart."""

    def __init__(self, fallback_path: str, on_change: Callable[[str], None]) -> None:
        self.fallback_path = fallback_path
        self.on_change = on_change
        self.handler: FailoverHandler | None = None
        self.description = ""
        self.counted = (0, 0)   # failures and fallback lines of the handlers replaced so far
        logging.raiseExceptions = False

    def configure(self, cfg: Config, target: str, fd: int | None = None) -> None:
        """Point the chatd logger at `target` ("" means the fallback file); a file target
        already open at `fd` (`descriptor`) is written there."""
        try:
            if target == "syslog":
                handler: logging.Handler = SyslogTarget(cfg.log.syslog_socket, cfg.log.facility)
                handler.setFormatter(_formatter(cfg, "%(message)s"))
                description = f"syslog {cfg.log.syslog_socket} (facility {cfg.log.facility})"
            elif target == "stderr":
                handler = StderrTarget()
                journal = _journal_prefix()
                handler.setFormatter(_JournalFormatter(cfg.log.format == "json") if journal
                                     else _formatter(cfg, STDERR_FORMAT))
                description = "stderr (journal)" if journal else "stderr"
            else:
                path = target or self.fallback_path
                handler = FileTarget(path, fd)
                handler.setFormatter(_formatter(cfg, FILE_FORMAT))
                description = f"file {path}"
                if not target:
                    description += f" (no syslog socket at {cfg.log.syslog_socket})"
        except OSError as e:
            raise ChatdError(f"cannot open log target {target or self.fallback_path}: {e.strerror}") from None
        new = FailoverHandler(handler, self.fallback_path, _formatter(cfg, FILE_FORMAT), self._changed)
        old, self.handler = self.handler, new
        for logger in (log, loop_log):
            logger.addHandler(new)
            if old is not None:
                logger.removeHandler(old)
            logger.propagate = False
        if old is not None:
            self.counted = (self.counted[0] + old.failures, self.counted[1] + old.fallback_lines)
            old.close()
        log.setLevel(cfg.log.level.upper())
        self.description = description

    def descriptor(self) -> int | None:
        """The file target's descriptor, for a live upgrade to hand over (None: no file)."""
        target = self.handler.target if self.handler is not None else None
        return target.stream.fileno() if isinstance(target, FileTarget) else None

    def stderr_replaced(self, cfg: Config) -> None:
        """fd 2 is another file now (at a live upgrade's commit, the old process's stderr took
        the place of the pipe it read ours from): log there, and let go of the old writer."""
        _, release = _stderr_writer()
        _stderr_writer.cache_clear()
        self.configure(cfg, "stderr")
        release()

    def _changed(self, failure: str) -> None:
        self.on_change(self.status())

    def status(self) -> str:
        """The target, and its failure if it is failing (for the state file)."""
        if self.handler is not None and self.handler.failure:
            return f"{self.description} (failing: {self.handler.failure}; writing to {self.fallback_path})"
        return self.description

    def failures(self) -> tuple[int, int]:
        """Writes to the log target that failed, and lines written to the fallback file, since
        the start (for the metrics)."""
        h = self.handler
        now = (h.failures, h.fallback_lines) if h is not None else (0, 0)
        return self.counted[0] + now[0], self.counted[1] + now[1]

    def reopen(self) -> list[str]:
        return self.handler.reopen() if self.handler is not None else []

    def close(self) -> None:
        if self.handler is not None:
            for logger in (log, loop_log):
                logger.removeHandler(self.handler)
            self.handler.close()
            self.handler = None

