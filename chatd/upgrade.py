"""Live upgrade (README "Live upgrade"): the running daemon hands every socket and its state to
the chatd now installed, which takes over without a client noticing.

`chatd upgrade` asks the daemon over its control socket. The daemon (`Handover`) starts its
own command line again (`own_command`: the chatd script it was started as, which now holds
the new code) with one end of a socketpair (CHATD_TAKEOVER names its descriptor) and keeps
serving while the new process starts. The new process (`Takeover`, lifetime.take_over) says
hello once its code is imported. Then the old one stops accepting (newcomers wait in the
listeners' backlogs), settles what is half done, and freezes: from here it runs no event
loop pass, so it can neither read, write nor close a client behind the new process's back.
It sends the state record and every descriptor (SCM_RIGHTS) and waits for the new process
to have rebuilt everything (still touching no socket) and said "prepared". Only then is it
committed: systemd learns the new main pid (MAINPID=, READY=1), the new process hears
"commit" and serves, and the old one answers `chatd upgrade` and exits without a loop pass
more. Anything that fails before the commit (the new code does not start, exits, hangs past
the timeout, refuses the record) leaves the old one as it was: it kills the new process,
accepts again and answers exit 1 with the reason (the new code's own message where it said
one). The pid file's lock belongs to the open file, which both hold across the commit, so
it is never released.

The record (FORMAT) is one JSON object, its bytes values sent raw after it (`encode`). Its fields: `format`;
`version`, `pid` and `command` of the old process; `config`, `origins`, `overrides` and
`settings` (the config it serves with, rebuilt by `config.from_settings`: an upgrade changes
the code, not the settings); `target`, `foreground`, `detached`, `paths`, `notify`; the
descriptors by slot (`fds`: listeners with their scheme and systemd name, the metrics and
control sockets, the pid, state and log files, stdin, stdout, stderr); `server` (generation,
start time, last restart, bans with what is left of them, metrics, the chat rooms and next
guest number, signals that arrived during the upgrade, and with a bus the node's identity
on it: cluster.ClusterBackend.capture); and `clients`, each as its
connection's `capture` says (connection.py, chat.py) with its socket in `fds`; and
`headers`, the PROXY headers being read (accept.Gate.resume_header). A record of
another format is refused by the new code, and the old one keeps serving.

Tests: tests/process/test_upgrade.py, tests/process/test_upgrade_attacks.py, tests/unit/test_upgrade_parts.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

from . import __version__, daemon
from .errors import EXIT_FAILED, EXIT_NOT_RUNNING_RELOAD, ChatdError

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("chatd")

FORMAT = 1                  # the state record's format; a new one gets a new number
ENV = "CHATD_TAKEOVER"      # the descriptor of the new process's end of the channel
DEFAULT_TIMEOUT_S = 30.0    # for the new code to start and take over (`chatd upgrade --timeout`)
MAX_TIMEOUT_S = 3600.0
SETTLE_S = 1.0              # for half-made connections and closing clients before the freeze
CHUNK = 60000               # bytes of the record per message (a SEQPACKET message is bounded)
FDS_PER_MESSAGE = 200       # descriptors per message (the kernel takes at most 253)
OUTPUT_KEPT = 8192          # bytes of the new process's own output kept for a failure's reason
WATCHDOG_TICK_S = 1.0       # how often the frozen old process still tells systemd it lives
OUTPUT_TICK_S = 0.05        # how often the frozen old process reads what the new one writes
EXIT_WAIT_S = 1.0           # for a new process that closed the channel to exit (its status is the reason)
SERVING_S = 10.0            # after the commit, for the new process to say it serves (`_commit`)


class UpgradeFailed(ChatdError):
    """The upgrade did not happen; the old daemon serves on. The message says why."""


# ---------------------------------------------------------------------- the record

def encode(record: dict[str, Any]) -> tuple[bytes, list[Any]]:
    """The record as JSON, each bytes value as {"$r": its length}, and the values themselves
    in the order the JSON names them, to go raw beside it: queued output can be megabytes a
    client, which as base64 inside JSON cost about four times its size in each process and
    seconds of the freeze (200 readers at their output budget: 3.0 s, 195 MB more)."""
    raw: list[Any] = []

    def default(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw.append(value)
            return {"$r": len(value)}
        raise TypeError(f"cannot carry {type(value).__name__}")
    return json.dumps(record, default=default, separators=(",", ":")).encode(), raw


def decode(data: bytes, raw: bytes | bytearray = b"") -> dict[str, Any]:
    """`encode`'s inverse, `raw` its values joined; ValueError for anything that is not a
    record, or whose values do not add up to `raw`."""
    at = 0
    view = memoryview(raw)

    def hook(obj: dict[str, Any]) -> Any:   # called in the order the text names them
        nonlocal at
        if len(obj) == 1 and "$r" in obj:
            n = obj["$r"]
            if type(n) is not int or n < 0 or at + n > len(view):
                raise ValueError("the record's bytes do not add up")
            at += n
            return bytes(view[at - n:at])
        return obj
    try:
        record = json.loads(data, object_hook=hook)
    finally:
        view.release()
    if at != len(raw):
        raise ValueError("the record's bytes do not add up")
    if not isinstance(record, dict):
        raise ValueError("the state record is not an object")
    return record


def own_command(cwd: str) -> list[str]:
    """How this process was started, to start the chatd installed now the same way: the
    script's path as given (not resolved: an upgrade that replaced what it points to, or a
    symlink switched to another version, is what runs), made absolute against `cwd`."""
    script = sys.argv[0] if sys.argv else ""
    if not script or script == "-c" or os.path.basename(script) == "__main__.py":
        return [sys.executable, "-m", "chatd", *sys.argv[1:]]
    return [os.path.abspath(os.path.join(cwd, script)), *sys.argv[1:]]


# ---------------------------------------------------------------------- the channel

class Channel:
    """One end of the socketpair between the old and the new process: messages of a kind and
    a JSON body, the record in chunks, descriptors in batches (SOCK_SEQPACKET keeps each
    message whole)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(ours), theirs

    def send(self, kind: str, body: Any = None, fds: list[int] | None = None) -> None:
        data = kind.encode() + b" " + json.dumps(body).encode()
        if fds:
            socket.send_fds(self.sock, [data], fds)
        else:
            self.sock.sendall(data)

    def send_record(self, record: bytes, raw: list[Any], fds: list[int]) -> None:
        """The descriptors, then the record, then its bytes values (`encode`) joined; the
        receiver knows all three counts from the first message."""
        self.send("record", {"bytes": len(record), "raw": sum(len(v) for v in raw), "fds": len(fds)})
        for i in range(0, len(fds), FDS_PER_MESSAGE):
            self.send("fds", None, fds[i:i + FDS_PER_MESSAGE])
        for i in range(0, len(record), CHUNK):
            self.sock.sendall(b"part " + record[i:i + CHUNK])
        message = bytearray(b"part ")
        for value in raw:
            view = memoryview(value)
            while view:
                take = CHUNK + 5 - len(message)
                message += view[:take]
                view = view[take:]
                if len(message) == CHUNK + 5:
                    self.sock.sendall(message)
                    del message[5:]
        if len(message) > 5:
            self.sock.sendall(message)

    def readable(self, timeout: float) -> bool:
        """Whether a message (or the end) is there within `timeout` seconds. poll, not select:
        past about 1,010 clients the channel's descriptor is past select's 1,023."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(timeout * 1000))

    def receive(self, deadline: float) -> tuple[str, Any, list[int]]:
        """The next message (blocking until `deadline`): its kind, body and descriptors."""
        data, fds = self._recv(deadline)
        kind, _, body = data.partition(b" ")
        if kind == b"part":
            return "part", body, fds
        try:
            return kind.decode(), json.loads(body) if body else None, fds
        except ValueError:
            raise UpgradeFailed(f"a garbled message on the upgrade channel: {data[:40]!r}") from None

    def _recv(self, deadline: float) -> tuple[bytes, list[int]]:
        left = deadline - time.monotonic()
        if left <= 0 or not self.readable(left):
            raise TimeoutError
        data, fds, flags, _ = socket.recv_fds(self.sock, CHUNK + 16, FDS_PER_MESSAGE)
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise UpgradeFailed("a message on the upgrade channel was cut short")
        if not data and not fds:
            raise EOFError
        return data, fds

    def receive_record(self, deadline: float, kind: str, head: Any) -> tuple[dict[str, Any], list[int]]:
        """The record whose first message (`kind`, `head`) has come."""
        if kind != "record" or not isinstance(head, dict):
            raise UpgradeFailed(f"expected the state record, got {kind!r}")
        fds: list[int] = []
        while len(fds) < head["fds"]:
            kind, _, got = self.receive(deadline)
            fds += got
        data, raw = self._parts(head["bytes"], deadline), self._parts(head["raw"], deadline)
        try:
            return decode(bytes(data), raw), fds
        except ValueError as e:
            raise UpgradeFailed(f"the state record cannot be read: {e}") from None

    def _parts(self, n: int, deadline: float) -> bytearray:
        """`n` bytes in "part" messages, into one buffer of that size (grown, it would leave
        the heap fragmented)."""
        data = bytearray(n)
        at = 0
        while at < n:
            kind, part, _ = self.receive(deadline)
            if kind != "part" or at + len(part) > n:
                raise UpgradeFailed(f"expected the rest of the state record, got {kind!r}")
            data[at:at + len(part)] = part
            at += len(part)
        return data

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------- the old process

class Handover:
    """The running daemon's side of `chatd upgrade` (module docstring): start the new code,
    wait for its hello, freeze, send everything, and commit or take it all back."""

    def __init__(self, server: Server, timeout: float, answer: Any) -> None:
        self.server = server
        self.answer = answer         # writes the control client's answer at once
        self.timeout = timeout
        self.began = time.monotonic()
        self.deadline = self.began + timeout
        self.channel: Channel | None = None
        self.child: subprocess.Popen[bytes] | None = None
        self.output = bytearray()    # the new process's stdout and stderr, until it takes over
        self.aborted = ""            # why the upgrade was called off (a stop signal)
        self.answered = False
        self.failure = ""            # why it did not happen
        self.killed = False
        self.finished = asyncio.Event()   # run() is over (a stop waits for it)

    async def run(self) -> None:
        """Upgrade, or say why not, through `answer` (the control client's socket). On success
        this never returns: after the commit the old process answers and exits."""
        server = self.server
        server.runtime.notifier.reloading()
        paused = False
        try:
            self._spawn()
            hello = await self._hello()
            await self._listening()
            paused = True
            await self._settle()
            record, fds = self._capture()
            self._hand(record, fds)                      # frozen from here on: no await
            ready = self._prepared()
            self._commit(hello, ready, record)   # never returns
        except Exception as e:   # noqa: BLE001 - whatever went wrong, the old one serves on
            self.give_up(str(e) if isinstance(e, UpgradeFailed) else f"internal error: {type(e).__name__}: {e}")
            if paused and server.stop_signal is None:
                server.resume_accepting()
            server.runtime.notifier.ready(server.status_text())
        finally:
            if self.channel is not None:
                self.channel.close()
            self.finished.set()

    def abort(self, why: str) -> None:
        """A stop signal during the upgrade: give it up at once (the server then stops, and
        its loop may not run again to see this task through)."""
        self.aborted = why
        self.give_up(f"upgrade called off: {why}")

    def give_up(self, why: str) -> None:
        """Kill the new process (it touched no socket) and answer, once."""
        self._kill()
        if not self.answered:
            self.answered = True
            self.failure = why
            self.answer({"ok": False, "error": why, "status": EXIT_FAILED})

    # ------------------------------------------------------------------ steps

    def _spawn(self) -> None:
        """Start the installed chatd with our command line and the channel's other end."""
        self.channel, theirs = Channel.pair()
        env = dict(os.environ, **{ENV: str(theirs.fileno())})
        command = self.server.runtime.command
        try:
            self.child = daemon.spawn(command, theirs.fileno(), env)
        except OSError as e:
            raise UpgradeFailed(f"cannot start {command[0]}: {e.strerror or e}") from None
        finally:
            theirs.close()
        assert self.child.stdout is not None
        os.set_blocking(self.child.stdout.fileno(), False)
        log.info("upgrade: started %s (pid %d)", command[0], self.child.pid)

    def _read_output(self) -> None:
        """Keep the end of what the new process wrote (its own error message, if it fails)."""
        if self.child is None or self.child.stdout is None or self.child.stdout.closed:
            return
        try:
            while chunk := os.read(self.child.stdout.fileno(), 65536):
                self.output += chunk
                del self.output[:-OUTPUT_KEPT]
        except (BlockingIOError, OSError):
            pass

    def _said(self) -> str:
        """The new process's last words: a traceback's last line, or what it printed."""
        self._read_output()
        lines = [ln.strip() for ln in self.output.decode(errors="replace").splitlines() if ln.strip()]
        if not lines:
            return ""
        if any(ln.startswith("Traceback") for ln in lines):
            lines = lines[-1:]
        return ": " + "; ".join(lines)[-1000:]

    def _exited(self, when: str = "before taking over") -> str:
        """Why the new process is gone ("" while it lives)."""
        assert self.child is not None
        code = self.child.poll()
        if code is None:
            return ""
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        return f"the new chatd (pid {self.child.pid}) {how} {when}{self._said()}"

    async def _hello(self) -> dict[str, Any]:
        """Serve on until the new code says hello (its code imported), or fail."""
        body = await self._word("hello")
        if FORMAT not in body.get("formats", ()):
            raise UpgradeFailed(f"chatd {body.get('version')} does not read state records of "
                                f"format {FORMAT} (it reads {body.get('formats')})")
        return body

    async def _listening(self) -> None:
        """With a bus: serve on until the new process listens to this node's channels too,
        so that nothing said on the bus while we are frozen is lost (bus.EarlyListener)."""
        chat = self.server.state.chat
        if chat is None or not chat.backend.shared:
            return
        assert self.channel is not None
        self.channel.send("listen", chat.backend.channels())   # type: ignore[attr-defined]
        await self._word("listening")

    async def _word(self, expected: str) -> dict[str, Any]:
        """Serve on until the new process says `expected` (its body), or fail."""
        assert self.channel is not None and self.child is not None
        channel = self.channel
        while True:
            self._read_output()
            if self.aborted:
                raise UpgradeFailed(f"upgrade called off: {self.aborted}")
            if channel.readable(0):
                try:
                    kind, body, _ = channel.receive(self.deadline)
                except (EOFError, OSError):
                    exit_by = time.monotonic() + EXIT_WAIT_S   # it closed the channel: its exit follows
                    while self.child.poll() is None and time.monotonic() < exit_by:
                        await asyncio.sleep(0.02)
                    raise UpgradeFailed(self._exited() or f"the new chatd (pid {self.child.pid}) "
                                        f"closed the upgrade channel{self._said()}") from None
                if kind == "fail":
                    raise UpgradeFailed(self._refused(body))
                if kind != expected:
                    raise UpgradeFailed(f"the new chatd said {kind!r}, not {expected}")
                return body if isinstance(body, dict) else {}
            gone = self._exited()
            if gone:
                raise UpgradeFailed(gone)
            if time.monotonic() >= self.deadline:
                raise UpgradeFailed(f"no word from the new chatd (pid {self.child.pid}) within "
                                    f"{self.timeout:g} s{self._said()}; killed it")
            await asyncio.sleep(0.02)

    def _refused(self, body: Any) -> str:
        error = body.get("error") if isinstance(body, dict) else None
        return f"the new chatd refused to take over: {error or 'no reason given'}"

    async def _settle(self) -> None:
        """Stop accepting (newcomers wait in the backlogs), let half-made connections become
        clients, and close what cannot be carried: TLS clients (the TLS state lives in this
        process's OpenSSL) are told and closed, handshakes in progress given up. Clients
        already closing get SETTLE_S to finish."""
        server = self.server
        server.pause_accepting()
        gate = server.gate
        for task in gate.handshakes:
            task.cancel()
        pending = gate.connecting | gate.handshakes
        if pending:
            await asyncio.wait(list(pending), timeout=SETTLE_S)
        for conn in list(server.state.connections):
            if conn.transport.get_extra_info("sslcontext") is not None:
                conn.dismiss("server upgrading; please reconnect", "upgrade")
        deadline = time.monotonic() + SETTLE_S
        while time.monotonic() < deadline and any(c.closing or c.transport.is_closing()
                                                  for c in server.state.connections):
            if self.aborted:
                raise UpgradeFailed(f"upgrade called off: {self.aborted}")
            await asyncio.sleep(0.01)

    def _capture(self) -> tuple[dict[str, Any], list[int]]:
        """The record and its descriptors, as they are now (the loop runs no more)."""
        try:
            return self.server.capture(self.began)
        except (ValueError, OSError) as e:
            raise UpgradeFailed(f"cannot capture the daemon's state: {e}") from None

    def _hand(self, record: dict[str, Any], fds: list[int]) -> None:
        assert self.channel is not None
        self.channel.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
        try:
            self.channel.send_record(*encode(record), fds)
        except (OSError, TimeoutError) as e:
            raise UpgradeFailed(self._exited() or f"cannot send the state record: {e}") from None

    def _prepared(self) -> dict[str, Any]:
        """Wait (frozen) for the new process to have rebuilt everything."""
        assert self.channel is not None and self.child is not None
        notifier = self.server.runtime.notifier
        pinged = time.monotonic()
        while True:
            self._read_output()   # what it writes meanwhile: a pipe it filled would stop it
            try:
                kind, body, _ = self.channel.receive(min(self.deadline, time.monotonic() + OUTPUT_TICK_S))
            except TimeoutError:
                if time.monotonic() - pinged >= WATCHDOG_TICK_S:
                    notifier.watchdog()
                    pinged = time.monotonic()
                if time.monotonic() >= self.deadline:
                    raise UpgradeFailed(f"the new chatd (pid {self.child.pid}) did not take over "
                                        f"within {self.timeout:g} s{self._said()}; killed it") from None
                continue
            except (EOFError, OSError):
                try:
                    self.child.wait(EXIT_WAIT_S)
                except subprocess.TimeoutExpired:
                    pass
                raise UpgradeFailed(self._exited() or f"the new chatd (pid {self.child.pid}) closed "
                                    f"the upgrade channel{self._said()}") from None
            if kind == "fail":
                raise UpgradeFailed(self._refused(body))
            if kind == "prepared" and isinstance(body, dict):
                return body
            raise UpgradeFailed(f"the new chatd said {kind!r}, not prepared")

    def _commit(self, hello: dict[str, Any], ready: dict[str, Any], record: dict[str, Any]) -> None:
        """No way back: systemd learns the new main pid, the new process serves, we answer
        and leave without a loop pass (which would read, write or close clients). We answer
        once the new process says it serves (`Takeover.serving`), so that a command run next
        finds it in the pid file, the control socket and the state file, not us gone."""
        assert self.channel is not None and self.child is not None
        server = self.server
        pid = self.child.pid
        took = time.monotonic() - self.began
        notifier = server.runtime.notifier
        notifier.send(f"MAINPID={pid}", "READY=1",
                      f"STATUS=upgraded to chatd {hello.get('version')} (pid {pid})")
        try:   # the signals not yet acted on are the new process's to act on (README)
            self.channel.send("commit", {"signals": server.signals.waiting() + server.deferred})
        except OSError as e:
            notifier.send(f"MAINPID={os.getpid()}")
            raise UpgradeFailed(self._exited() or f"cannot commit: {e}") from None
        self.answered = True
        try:   # whatever happens now, never back to the loop (`run` would take it all back)
            clients = len(record["clients"])
            gone = self._serving()
            if gone and server.runtime.slot:   # a worker: its supervisor serves on, and starts it again
                log.error("upgrade: %s", gone)
                self.answer({"ok": False, "error": f"{gone}; its clients are cut, and it is started again",
                             "status": EXIT_FAILED})
            elif gone:
                log.error("upgrade: %s; chatd is not running", gone)
                self.answer({"ok": False, "error": f"{gone}; chatd is not running",
                             "status": EXIT_NOT_RUNNING_RELOAD})
            else:
                log.info("upgrade: handed over to chatd %s (pid %d) in %.3f s, %d clients; exiting",
                         hello.get("version"), pid, took, clients)
                self.answer({"ok": True, "old": {"version": __version__, "pid": os.getpid()},
                             "new": {"version": hello.get("version"), "pid": pid},
                             "took_s": round(took, 3), "clients": clients})
            server.runtime.handed_over()
        finally:
            daemon.end(0)

    def _serving(self) -> str:
        """Wait for the new process to say it serves (the pid file, control socket and state
        file its own, so a command run next finds it); if it died instead, how."""
        assert self.channel is not None and self.child is not None
        try:
            kind, _, _ = self.channel.receive(time.monotonic() + SERVING_S)
        except TimeoutError:
            return ""   # slow, not gone: it serves on, and says so in its own time
        except (EOFError, OSError, UpgradeFailed):
            kind = ""
        if kind == "serving":
            return ""
        try:
            self.child.wait(EXIT_WAIT_S)
        except subprocess.TimeoutExpired:
            return ""
        return self._exited("after taking over")

    def _kill(self) -> None:
        """The new process, if it lives, is killed and reaped; it touched no socket."""
        if self.child is None or self.killed:
            return
        self.killed = True
        if self.child.poll() is None:
            self.child.kill()
        try:
            self.child.wait(5)
        except subprocess.TimeoutExpired:
            pass
        self._read_output()
        if self.child.stdout is not None:
            self.child.stdout.close()


# ---------------------------------------------------------------------- the new process

RECORD_TIMEOUT_S = 60.0     # for the old process to send its record after our hello
COMMIT_TIMEOUT_S = 60.0     # for its commit after our "prepared" (it kills us first if it gives up)


class Takeover:
    """The new process's side (lifetime.take_over, Server.take_over): hello, the record, and,
    once everything is rebuilt, "prepared"; then the commit, after which it serves."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.record: dict[str, Any] = {}
        self.fds: list[int] = []
        self.on_commit: Any = lambda: None   # lifetime: write our pid into the pid file
        self.early: Any = None               # bus.EarlyListener, with a bus

    @classmethod
    def from_environment(cls) -> Takeover | None:
        """The channel CHATD_TAKEOVER names, if this process was started by `chatd upgrade`."""
        value = os.environ.pop(ENV, None)
        if value is None:
            return None
        try:
            sock = socket.socket(fileno=int(value))
        except (ValueError, OSError):
            raise ChatdError(f"{ENV}={value!r} names no upgrade channel") from None
        sock.set_inheritable(False)
        return cls(Channel(sock))

    def hello(self) -> None:
        self.channel.send("hello", {"version": __version__, "pid": os.getpid(), "formats": [FORMAT]})

    def receive(self) -> None:
        """The record and its descriptors; a format this code does not read is refused. With a
        bus, the old process first asks us to listen to its node's channels (`listen`)."""
        deadline = time.monotonic() + RECORD_TIMEOUT_S
        try:
            kind, head, _ = self.channel.receive(deadline)
            if kind == "listen":
                self.listen(head)
                kind, head, _ = self.channel.receive(deadline)
            self.record, self.fds = self.channel.receive_record(deadline, kind, head)
        except (EOFError, TimeoutError, OSError) as e:
            self.fail(f"no state record from the old process: {type(e).__name__}")
        except UpgradeFailed as e:
            self.fail(e.message)
        found = self.record.get("format")
        if found != FORMAT:
            self.fail(f"chatd {__version__} reads state records of format {FORMAT}, not {found!r}")

    def listen(self, where: Any) -> None:
        """Listen to the node's channels on the bus (bus.EarlyListener), then say so."""
        try:
            from .modes import ChatMode   # the mode that knows the bus (redis: only with one)
            self.early = ChatMode.listen_early(where)
        except Exception as e:   # noqa: BLE001 - whatever it is, the old one serves on
            self.fail(f"cannot listen to the bus: {type(e).__name__}: {e}")
        self.channel.send("listening")

    def sock(self, slot: int) -> socket.socket:
        """The socket handed over in `slot`."""
        return socket.socket(fileno=self.fds[slot])

    def fail(self, message: str) -> Any:
        """Tell the old process why we cannot take over, and leave at once: nothing may be
        cleaned up (its pid file, state file and control socket are still the old one's)."""
        try:
            self.channel.sock.settimeout(5)
            self.channel.send("fail", {"error": message})
        except OSError:
            pass
        daemon.end(1)
        raise AssertionError("unreachable")

    async def prepared(self, info: dict[str, Any]) -> dict[str, Any]:
        """Say we are ready to serve, and wait for the old process's commit."""
        loop = asyncio.get_running_loop()
        self.channel.send("prepared", info)
        readable = loop.create_future()
        fd = self.channel.sock.fileno()
        loop.add_reader(fd, lambda: readable.done() or readable.set_result(None))
        try:
            await asyncio.wait_for(readable, COMMIT_TIMEOUT_S)
        finally:
            loop.remove_reader(fd)
        kind, body, _ = self.channel.receive(time.monotonic() + 1)
        if kind != "commit":
            raise UpgradeFailed(f"the old process said {kind!r}, not commit")
        return body if isinstance(body, dict) else {}

    def committed(self) -> None:
        """Ours now: the old process's stdin, stdout and stderr become ours (until now they
        were the pipe it read our output from), and the pid file names us."""
        for target, slot in enumerate(self.record["fds"]["stdio"]):
            os.dup2(self.fds[slot], target)
            os.close(self.fds[slot])
        self.on_commit()

    def serving(self) -> None:
        """Everything is ours and up to date (pid file, control socket, state file): the old
        process, told so, answers `chatd upgrade` and exits."""
        try:
            self.channel.send("serving")
        except OSError:
            pass
        self.channel.close()

    async def adopt(self, clients: list[tuple[Any, dict[str, Any]]]) -> None:
        """Serve every carried client on its socket: first every transport (what arrives
        meanwhile is kept), then each is handed its connection, then the ones lost meanwhile
        leave, and only then is an end of input that came meanwhile handled: what that
        sends (a chat client's last line, its leaving) reaches room members that all have
        their transport."""
        loop = asyncio.get_running_loop()
        adopters = [Adopter(conn, saved) for conn, saved in clients]

        async def connect(adopter: Adopter, slot: int) -> None:
            sock = None
            try:
                sock = self.sock(slot)
                sock.setblocking(False)
                await loop.connect_accepted_socket(lambda: adopter, sock)
            except (OSError, RuntimeError) as e:
                if sock is not None:
                    sock.close()
                adopter.lost = (e,)

        await asyncio.gather(*(connect(a, saved["fd"]) for a, (_, saved) in zip(adopters, clients)))
        for adopter in adopters:
            adopter.hand_over()
        for adopter in adopters:
            adopter.leave_if_lost()
        for adopter in adopters:
            adopter.end_input()
        self.record["clients"] = []   # their output and input are the connections' now: the
        # record, kept for the process's life, would hold every byte of it (megabytes a reader)


class Adopter(asyncio.Protocol):
    """Stands in for a carried client until every transport exists. uvloop starts reading a
    socket as soon as its transport is made, whatever the protocol asks, so what arrives
    first is kept here and put behind the input the old process had not yet handled."""

    def __init__(self, conn: Any, saved: dict[str, Any]) -> None:
        self.conn = conn
        self.saved = saved
        self.transport: Any = None
        self.early: list[bytes] = []
        self.eof = False
        self.lost: tuple[Exception | None] | None = None
        self.handed = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        if self.saved["held"]:   # the old process had stopped reading it (over its output
            transport.pause_reading()   # budget): so do we, until its connection reads again

    def data_received(self, data: bytes) -> None:
        """One read is kept (uvloop reads once `connection_made` has returned, whatever it
        asked), then no more until the connection has its transport: what follows (more
        input, an end, a reset) comes to the connection, in order, and a client the old
        process no longer read is read at most once."""
        self.early.append(bytes(data))
        self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = (exc,)

    def hand_over(self) -> None:
        """The connection takes its transport: its queued output goes first, then the input
        it had not handled, then what came meanwhile (`end_input`: then an end of input)."""
        if self.transport is None or self.lost is not None:
            return
        self.handed = True
        conn, transport = self.conn, self.transport
        early = b"".join(self.early)
        if early:
            conn.in_bytes += len(early)
            conn.in_lines += early.count(b"\n")
            conn.backlog += early
        transport.set_protocol(conn)
        conn.adopt(transport, self.saved)

    def end_input(self) -> None:
        """An end of input that came before the connection had its transport: its input
        is handled, then the end, as the connection would have had them."""
        if self.handed and self.eof:
            conn, transport = self.conn, self.transport
            while conn.backlog and not conn.closing:
                backlog, conn.backlog = conn.backlog, b""
                conn.in_bytes -= len(backlog)
                conn.in_lines -= backlog.count(b"\n")
                conn.consume(backlog)
            if not conn.closing and not conn.eof_received():
                transport.close()

    def leave_if_lost(self) -> None:
        """A client gone before it was handed its transport leaves as any client does."""
        if self.handed or self.lost is None:
            return
        conn = self.conn
        conn.state.enter(conn)
        conn.connection_lost(self.lost[0])
