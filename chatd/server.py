"""The Server: startup, main loop, shutdown; signals dispatched to `handle_<name>`; restart in place.

`serve()` reads as the daemon's table of contents. Signal handlers only put
the signal number on a queue; the main loop takes it off and calls the
matching `handle_<sig>` method, so all work happens in the loop.

Tests: tests/process/test_signals.py, tests/unit/test_server.py, tests/process/test_upgrade.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import __version__, listen, upgrade
from . import config as config_mod
from .accept import Acceptor, Gate
from .config import Config
from .connection import CHURN_INTERVAL_S, ServerState
from .daemon import raise_fd_limit
from .errors import EXIT_FAILED, ChatdError, StartError
from .log import Logging, resolve_target
from .metrics import Endpoint, render_json, render_prometheus, render_text
from .moderation import Bans, ControlSocket, Moderator, parse_network
from .modes import MODES, ChatMode
from .notify import Notifier
from .paths import check_log_file
from .signals import STOP_SIGNALS, SignalQueue, SignalRecorder, signal_name
from .state import RestartKind, RestartOutcome, StateFile

log = logging.getLogger("chatd")

TIDY_GRACE_S = 0.5        # SIGTERM: how long queued output may still flush
STATE_REFRESH_S = 1.0     # how often the state file's client count is brought up to date
LOOP_ERROR_S = 10.0       # the same event-loop error is logged at most this often
# What each signal the main loop dispatches asks for (logged at debug).
SIGNAL_MEANINGS = {
    signal.SIGHUP: "restart requested",
    signal.SIGUSR1: "graceful stop requested",
    signal.SIGTERM: "stop requested",
    signal.SIGINT: "stop requested",
    signal.SIGQUIT: "stop requested",
}
# Keys a running daemon cannot change: they need a stop and a start (the schema says which).
FIXED_KEYS = tuple(key.dotted for key in config_mod.SCHEMA if key.on_restart == config_mod.NEEDS_RESTART)


def new_event_loop(choice: str) -> tuple[asyncio.AbstractEventLoop, str]:
    """uvloop when asked for or (with "auto") when importable; asyncio's own loop otherwise."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if choice == "uvloop":
                raise StartError("--loop uvloop: uvloop is not installed") from None
        else:
            return uvloop.new_event_loop(), f"uvloop {uvloop.__version__}"
    return asyncio.new_event_loop(), "asyncio"


@dataclass
class Listener:
    address: listen.Address
    sock: socket.socket
    endpoint: listen.Endpoint     # what its connections start with (TLS, a PROXY header)
    acceptor: Acceptor | None = None
    name: str = ""            # LISTEN_FDNAMES's name, for a socket handed over by systemd

    def __str__(self) -> str:
        """"tls://127.0.0.1:7443", or with socket activation's name "... (systemd: tls)"."""
        label = self.endpoint.label(self.address)
        return f"{label} (systemd: {self.name})" if self.name else label


def state_fields(cfg: Config, listeners: list[Listener], loop_name: str, logs: Logging,
                 clients: int) -> dict[str, Any]:
    """What control commands learn from the state file: `status` shows it, and every command
    compares the options it was given with `settings` and `listeners`."""
    return {"address": describe_listeners(listeners), "mode": cfg.server.mode, "loop": loop_name,
            "log": logs.status(), "clients": clients,
            "listeners": [[li.address.host, li.address.port] for li in listeners],
            "settings": settings_of(cfg)}


def settings_of(cfg: Config) -> dict[str, Any]:
    """Every key's value, as the state file and a live upgrade's record carry them."""
    return {key.dotted: cfg.get(key.dotted) for key in config_mod.SCHEMA}


def daemon_record(cfg: Config, listeners: list[Listener], runtime: Runtime, began: float,
                  slot: Callable[[int], int]) -> dict[str, Any]:
    """The part of a live upgrade's record that any chatd process hands on, a daemon, a worker
    or a supervisor (upgrade.py lists the fields): how it was started, the settings it serves
    with, and its descriptors, each by `slot`. A worker's "state" is its report socket to
    the supervisor (workers.Report), and "worker" says which slot it serves."""
    control = runtime.control
    record = {
        "format": upgrade.FORMAT, "version": __version__, "pid": os.getpid(), "began": began,
        "command": runtime.command, "config": cfg.path, "origins": cfg.origins,
        "overrides": {k: list(v) for k, v in runtime.overrides.items()},
        "settings": settings_of(cfg),
        "target": runtime.target, "foreground": runtime.foreground, "detached": runtime.detached,
        "paths": dataclasses.asdict(runtime.paths),
        "notify": {"address": runtime.notifier.address, "watchdog_usec": runtime.notifier.watchdog_usec},
        "fds": {"listeners": [{"fd": slot(li.sock.fileno()), "name": li.name} for li in listeners],
                "metrics": None if runtime.metrics_sock is None else slot(runtime.metrics_sock.fileno()),
                "control": None if control is None else {"fd": slot(control.sock.fileno()),
                                                         "path": control.path, "ident": control.ident},
                "pidfile": slot(runtime.pidfile_fd) if runtime.pidfile_fd is not None else None,
                "log": None if (log_fd := runtime.logs.descriptor()) is None else slot(log_fd),
                "state": None if runtime.state.fd is None else slot(runtime.state.fd),
                "stdio": [slot(0), slot(1), slot(2)]}}
    if runtime.slot:
        record["worker"] = {"slot": runtime.slot, "lease": runtime.lease, "supervisor": os.getppid()}
    return record


def describe_listeners(listeners: list[Listener]) -> str:
    return ", ".join(str(li) for li in listeners)


@dataclass
class Runtime:
    """What the server keeps up to date besides its sockets (state file, logging), and how it
    asks, once it has stopped, for everything the daemon holds to be given back."""

    state: StateFile
    logs: Logging
    foreground: bool
    release: Callable[[str], None]        # `lifetime.Held.release`: all given back, once
    ready: Callable[[dict[str, Any]], None]
    recorder: SignalRecorder
    notifier: Notifier = field(default_factory=Notifier)
    overrides: dict[str, tuple[Any, str]] = field(default_factory=dict)
    lease: str = ""                       # a worker slot's bus lease token (workers.py)
    slot: int = 0                         # the worker slot this process serves; 0: the daemon
    forget: Callable[[], None] = lambda: None   # a forked worker drops the daemon's files
    metrics_sock: socket.socket | None = None   # `[metrics] listen`'s, bound with the listeners
    control: ControlSocket | None = None  # X.sock, for `chatd who`, `kick`, ... (moderation.py)
    command: list[str] = field(default_factory=list)   # how to start chatd again (`chatd upgrade`)
    target: str = ""                      # the log target, as resolved at start
    detached: bool = False
    paths: Any = None                     # paths.InstancePaths
    pidfile_fd: int | None = None         # the locked pid file's descriptor, for the next process
    handed_over: Callable[[], None] = lambda: None   # a live upgrade committed: close, remove nothing


class Server:
    """One chatd instance's event-loop side."""

    def __init__(self, cfg: Config, listeners: list[Listener], runtime: Runtime,
                 max_clients: int, loop_name: str) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.runtime = runtime
        self.max_clients = max_clients
        self.loop_name = loop_name
        self.stop_signal: int | None = None
        self.generation = 0
        self.last_restart: RestartOutcome | None = None
        self.started = time.time()
        self.signals: SignalQueue
        self.state: ServerState
        self.gate: Gate
        self._tasks: list[asyncio.Task[None]] = []
        self.endpoint: Endpoint | None = None
        self.bans = Bans()        # kept across restarts in place; asked by the gate
        self.moderator: Moderator | None = None
        self._loop_errors: dict[str, tuple[float, int]] = {}   # message -> (logged at, since)
        self.busy = asyncio.Lock()          # a restart and a live upgrade, one at a time
        self.handover: upgrade.Handover | None = None   # the live upgrade in progress
        self.deferred: list[int] = []       # SIGHUPs that came during it
        self.last_upgrade: dict[str, Any] | None = None

    # ------------------------------------------------------------------ lifecycle

    async def serve(self, takeover: upgrade.Takeover | None = None) -> int:
        if takeover is None:
            await self.startup()
        else:
            await self.take_over(takeover)
        try:
            await self.main_loop()
        finally:
            await self.shutdown()
        return 0

    async def startup(self) -> None:
        """Take the signals over, serve every listener, then report ready."""
        await self._begin()
        for mode in MODES.values():
            await mode.start(self.state, self.cfg)
        await self._open()
        self._abort_if_stopped_early()
        self.runtime.state.update(**self._state_fields(), generation=0, last_restart=None,
                                  last_upgrade=None, started=self.started)
        info = {"address": self.address, "mode": self.cfg.server.mode, "loop": self.loop_name,
                "log": self.runtime.logs.status()}
        log.info("ready: %s mode on %s, event loop %s", self.cfg.server.mode, self.address, self.loop_name)
        self.runtime.notifier.ready(self.status_text())
        self.runtime.ready(info)
        self._run_tasks()

    async def take_over(self, takeover: upgrade.Takeover) -> None:
        """`startup` for a live upgrade's new process (upgrade.py): everything the old one
        held, rebuilt from its record without touching a socket; then, once the old process
        has committed, every client served on where it was and the listeners accepted
        again. Anything that fails before the commit leaves the old process serving."""
        try:
            await self._begin()
            clients = self._restore(takeover)
            bus = takeover.record["server"].get("bus")
            if bus is not None:   # the same node of the bus, on its lease (README "Live upgrade")
                chat = MODES["chat"]
                assert isinstance(chat, ChatMode)
                await chat.resume(self.state, self.cfg, bus, takeover.early)
            commit = await takeover.prepared({"clients": len(clients)})
        except BaseException as e:   # noqa: BLE001 - whatever it is, the old one serves on
            takeover.fail(f"{type(e).__name__}: {e}" if not isinstance(e, ChatdError) else e.message)
        takeover.committed()
        await takeover.adopt(clients)
        if bus is not None:
            self.state.chat.backend.deliver_held()   # type: ignore[union-attr]
        await self._open()
        for header in takeover.record.get("headers", ()):   # PROXY headers being read
            self.gate.resume_header(takeover.sock(header["fd"]), tuple(header["addr"]),
                                    self.listeners[header["listener"]], header["buf"])
        old = takeover.record
        self.last_upgrade = {"time": time.time(), "from": old["version"], "to": __version__,
                             "from_pid": old["pid"], "clients": len(clients),
                             "took_s": round(time.monotonic() - float(old["began"]), 3)}
        self.runtime.state.update(**self._state_fields(), pid=os.getpid(), version=__version__,
                                  last_upgrade=self.last_upgrade)
        log.info("upgraded from chatd %s (pid %d): %d clients carried over; %s mode on %s, "
                 "event loop %s", old["version"], old["pid"], len(clients), self.cfg.server.mode,
                 self.address, self.loop_name)
        self.runtime.notifier.status(self.status_text())
        takeover.serving()
        self._run_tasks()
        for sig in commit.get("signals") or ():
            self.signals.put(int(sig))

    async def _begin(self) -> None:
        """What every start does first: the loop's error handler, the signals, the state all
        connections share, the gate and the mode."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._on_loop_error)
        self.signals = SignalQueue(loop)
        self.runtime.recorder.take_over(self.signals.put)
        self.state = ServerState(self.cfg.limits, self.max_clients, loop)
        self.state.lease = self.runtime.lease
        self.gate = Gate(self.state, loop)
        self.gate.bans = self.bans
        self.gate.access.configure(self.cfg)
        self._apply_mode(self.cfg)
        self.gate.use_tls(self.cfg.tls_context, self.cfg.tls.handshake_timeout)

    async def _open(self) -> None:
        """Accept on every listener, serve the metrics endpoint and the control socket."""
        for listener in self.listeners:
            self._serve_on(listener)
        if self.runtime.metrics_sock is not None:
            self.endpoint = Endpoint(self.runtime.metrics_sock,
                                     lambda: render_prometheus(self.metrics_snapshot()))
        if self.runtime.control is not None:
            self.moderator = Moderator(self, self.runtime.control)
            await self.moderator.start()
        self.gate.measure()

    def _run_tasks(self) -> None:
        self._tasks.append(asyncio.create_task(self._refresh_state()))
        self._tasks.append(asyncio.create_task(self._sweep_idle()))
        self._tasks.append(asyncio.create_task(self._flush_churn()))
        if self.runtime.notifier.watchdog_interval:
            self._tasks.append(asyncio.create_task(self._watchdog(self.runtime.notifier.watchdog_interval)))

    async def main_loop(self) -> None:
        while self.stop_signal is None:
            sig = await self.signals.get()
            await self.dispatch(sig)

    async def dispatch(self, sig: int) -> None:
        name = signal_name(sig)
        log.debug("signal %s: %s", name, SIGNAL_MEANINGS.get(sig, "seen"))
        if self.handover is not None:   # README "Live upgrade": what a signal does meanwhile
            if sig == signal.SIGHUP:
                self.deferred.append(sig)
                return
            self.handover.abort(f"{name} arrived")
        handler = getattr(self, "handle_" + name[3:].lower())
        await handler()

    async def shutdown(self) -> None:
        """Stop accepting, close every client (gracefully after SIGUSR1), then ask for what the
        daemon holds (state file, pid file, logs) to be given back."""
        if self.handover is not None:   # called off by the stop signal: let it see to that
            await self.handover.finished.wait()
        graceful = self.stop_signal == signal.SIGUSR1
        self.state.stopping = True
        how = "graceful stop" if graceful else "stop"
        log.info("%s (%s), %d clients", how, signal_name(self.stop_signal) if self.stop_signal else "error",
                 len(self.state.connections))
        self.runtime.notifier.stopping(f"{how}, {len(self.state.connections)} clients")
        if self.moderator is not None:
            self.moderator.stop()
        for listener in self.listeners:
            self._close_listener(listener)
        self.listeners = []
        self.gate.close_headers()
        if self.endpoint is not None:
            self.endpoint.close()
        await self.gate.settle()
        if graceful:
            await self._drain_clients()
        for mode in MODES.values():
            await mode.stop(self.state)
        await self._close_clients()
        self.gate.close()
        for task in self._tasks:
            task.cancel()
        self.state.churn.flush()
        self.gate.refused.flush()
        self.runtime.release("stopped")

    # ------------------------------------------------------------------ signals

    async def handle_usr1(self) -> None:
        """SIGUSR1: graceful stop (stop accepting, answer what arrived, FIN, close; exit 0)."""
        if self.stop_signal is None:
            self.stop_signal = signal.SIGUSR1

    async def handle_term(self) -> None:
        """SIGTERM: tidy up and exit promptly."""
        self.stop_signal = signal.SIGTERM

    async def handle_int(self) -> None:
        """SIGINT (Ctrl-C on `chatd run`): as SIGTERM, without a traceback."""
        self.stop_signal = signal.SIGINT

    async def handle_quit(self) -> None:
        """SIGQUIT: as SIGTERM."""
        self.stop_signal = signal.SIGQUIT

    async def handle_hup(self) -> None:
        """SIGHUP: reopen the log, then re-read the config and apply it in place.

        - the log file is reopened first, even if the config is then rejected;
        - an invalid config, or a change to a key that needs a stop and start,
          is rejected and the daemon serves exactly as before;
        - a valid one is applied: new address bound before the old one closes,
          mode and limits for new connections; connected clients stay.
        """
        self.runtime.notifier.reloading()
        reopen_failures = self.runtime.logs.reopen()
        async with self.busy:
            kind, message = await self.restart()
        message = "; ".join([message, *reopen_failures])
        self.generation += 1
        self.state.metrics.restarted(kind)
        level = logging.INFO if kind == "applied" else logging.WARNING
        log.log(level, "restart %s: %s", kind, message)
        self.last_restart = RestartOutcome(kind, message, time.time())
        self.runtime.state.update(**self._state_fields(), generation=self.generation,
                                  last_restart=self.last_restart.to_state())
        self.runtime.notifier.ready(self.status_text())

    # ------------------------------------------------------------------ live upgrade

    async def upgrade(self, timeout: float, answer: Callable[[dict[str, Any]], None]) -> None:
        """`chatd upgrade` (upgrade.py), answered through `answer`; if it happens, this
        process answers and exits."""
        why = self._cannot_upgrade()
        if not why and (self.stop_signal is not None or self.state.stopping):
            why = "chatd is stopping"
        if why:
            return answer({"ok": False, "error": why, "status": EXIT_FAILED})
        async with self.busy:
            handover = self.handover = upgrade.Handover(self, timeout, answer)
            try:
                await handover.run()
            finally:
                self.handover = None
                for sig in self.deferred:
                    self.signals.put(sig)
                self.deferred.clear()
        log.warning("upgrade failed, still serving: %s", handover.failure)
        self.last_upgrade = {"time": time.time(), "failed": handover.failure}
        self.runtime.state.update(last_upgrade=self.last_upgrade)

    def _cannot_upgrade(self) -> str:
        """Why this daemon cannot be upgraded in place ("" if it can)."""
        if self.runtime.foreground and not self.runtime.notifier.enabled and not self.runtime.slot:
            return (f"chatd runs in the foreground (pid {os.getpid()}), watched by whoever started "
                    f"it, and the new code runs as a new process; restart it there instead, or "
                    f"run it under systemd or with 'chatd start'")
        if not self.runtime.command:
            return "chatd does not know how it was started, so cannot start its new code"
        return ""

    def pause_accepting(self) -> None:
        """Leave newcomers in the listeners' backlogs (and scrapers in the endpoint's)."""
        for listener in self.listeners:
            if listener.acceptor is not None:
                listener.acceptor.stop()
        if self.endpoint is not None:
            self.endpoint.close()

    def resume_accepting(self) -> None:
        for listener in self.listeners:
            if listener.acceptor is not None:
                listener.acceptor.start()
        if self.endpoint is not None:
            self.endpoint.resume()

    def capture(self, began: float) -> tuple[dict[str, Any], list[int]]:
        """The state record of a live upgrade and its descriptors (upgrade.py's docstring
        lists the fields). Read-only: a failed upgrade serves on from here unchanged."""
        fds: list[int] = []

        def slot(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1

        state, runtime, cfg = self.state, self.runtime, self.cfg
        if state.chat is not None:
            state.chat.flush()
        now = state.loop.time()
        conns = [c for c in state.connections if not c.closing and not c.transport.is_closing()]
        index: dict[Any, int] = {c: i for i, c in enumerate(conns)}
        clients = []
        for conn in conns:
            saved = conn.capture(now, index)
            saved["fd"] = slot(conn.transport.get_extra_info("socket").fileno())
            clients.append(saved)
        metrics = state.metrics
        record = daemon_record(cfg, self.listeners, runtime, began, slot) | {
            "server": {"generation": self.generation, "started": self.started,
                       "last_restart": self.last_restart.to_state() if self.last_restart else None,
                       "bans": self.bans.listing(), "state": runtime.state.data,
                       "metrics": {"accepted": metrics.accepted, "refusals": metrics.refusals,
                                   "disconnects": metrics.disconnects, "restarts": metrics.restarts,
                                   "gone": metrics.gone,
                                   "sent": list(state.chat.sent) if state.chat else [0, 0]},
                       "chat": state.chat.capture(index) if state.chat else None,
                       "bus": state.chat.backend.capture()   # type: ignore[attr-defined]
                              if state.chat and state.chat.backend.shared else None},
            "clients": clients,
            "headers": [{"fd": slot(sock.fileno()), "addr": list(stage.where[0]), "buf": stage.buf,
                         "listener": self.listeners.index(stage.where[1])}
                        for sock, stage in self.gate.headers.items() if stage.where[1] in self.listeners]}
        return record, fds

    def _restore(self, takeover: upgrade.Takeover) -> list[tuple[Any, dict[str, Any]]]:
        """The old process's server and clients (its record), rebuilt here; no socket is
        touched until the commit (`Takeover.adopt`)."""
        saved = takeover.record["server"]
        self.generation = int(saved["generation"])
        self.started = float(saved["started"])
        self.last_restart = RestartOutcome.from_state(saved["last_restart"])
        for ban in saved["bans"]:
            left = ban["expires_in_s"]
            if left is None or left > 0:
                self.bans.add(parse_network(ban["ban"]), left)
        metrics, counted = self.state.metrics, saved["metrics"]
        metrics.accepted = int(counted["accepted"])
        metrics.refusals.update(counted["refusals"])
        metrics.disconnects.update(counted["disconnects"])
        metrics.restarts.update(counted["restarts"])
        metrics.gone = [int(n) for n in counted["gone"]]
        now = self.state.loop.time()
        conns = []
        for client in takeover.record["clients"]:
            cls = MODES[client["mode"]].connection_class(self.loop_name, bool(client["debug"]))
            conns.append(cls(self.state, client["ip"], client["peer"]))
        if saved["chat"] is not None or any(c.MODE == "chat" for c in conns):
            chat = ChatMode.service(self.state)
            chat.sent = [int(n) for n in counted["sent"]]
        for conn, client in zip(conns, takeover.record["clients"]):
            conn.restore(client, now, conns)
            self.state.readmit(conn.ip)
        if saved["chat"] is not None:
            self.state.chat.restore(saved["chat"], conns)   # type: ignore[union-attr]
        return list(zip(conns, takeover.record["clients"]))

    # ------------------------------------------------------------------ restart

    async def restart(self) -> tuple[RestartKind, str]:
        """Re-read the config and apply it in place: the outcome's kind and its reason."""
        old = self.cfg
        try:
            new = config_mod.load(old.path, self.runtime.overrides)
            target = resolve_target(new, self.runtime.foreground)
        except ChatdError as e:
            return "rejected", str(e).replace("\n", "; ")   # a file's errors: one line for log and state
        for key in FIXED_KEYS:
            if new.get(key) != old.get(key):
                return "rejected", (f"{key} changed from {old.get(key)!r} to {new.get(key)!r}, "
                                    f"which needs 'chatd stop' and 'chatd start'; nothing changed")
        if any(li.name for li in self.listeners):
            for key in listen.ADDRESS_KEYS:
                if new.get(key) != old.get(key):
                    return "rejected", (f"{key} changed from {old.get(key)!r} to {new.get(key)!r}, "
                                        f"but the listening sockets were handed over by socket "
                                        f"activation; change the .socket unit instead; nothing changed")
        changed = old.differences(new)
        log_keys = [k for k in changed if k.startswith("log.")]
        if log_keys:
            try:
                if target not in ("syslog", "stderr", ""):
                    target = check_log_file(target)   # as `start` does: never a path another user chose
            except ChatdError as e:
                return "rejected", f"{e}; nothing changed"
            try:
                self.runtime.logs.configure(new, target)
            except ChatdError as e:
                return "failed", f"{e}; nothing changed"
        try:
            note = await self._rebind(new)
        except ChatdError as e:
            if log_keys:
                self.runtime.logs.configure(old, resolve_target(old, self.runtime.foreground))
            return "failed", f"{e}; nothing changed"
        if "server.backlog" in changed:
            for listener in self.listeners:
                listener.sock.listen(new.server.backlog)
        self.cfg = new
        self.max_clients, warning = raise_fd_limit(new.limits.max_clients)
        if warning:
            log.warning("%s", warning)
        self.state.limits = new.limits
        self.state.max_clients = self.max_clients
        self.gate.access.configure(new)
        self._apply_mode(new)
        self.gate.use_tls(new.tls_context, new.tls.handshake_timeout)
        self.gate.measure()
        reread = "; [tls] certificate and key read again for new connections" if new.tls_context else ""
        if not changed:
            log.debug("restart: nothing changed")
            return "applied", "config re-read; nothing changed" + reread
        for key in changed:
            log.debug("restart: %s %r -> %r (from %s)", key, old.get(key), new.get(key), new.origin(key))
        parts = [f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed]
        return "applied", "changed " + ", ".join(parts) + (f" {note}" if note else "") + reread

    async def _rebind(self, new: Config) -> str:
        """Listen on the new addresses before closing the old ones; an address kept with
        another scheme keeps its socket and takes the new scheme for new connections."""
        if all(new.get(k) == self.cfg.get(k) for k in listen.ADDRESS_KEYS):
            return ""
        wanted = dict(listen.plan(listen.endpoints(new)))
        retire = [li for li in self.listeners if li.address not in wanted]
        kept = [li for li in self.listeners if li.address in wanted]
        have = [li.address for li in self.listeners]
        add = [(a, e) for a, e in wanted.items() if a not in have]
        note = ""
        if any(li.address.overlaps(a) for li in retire for a, _ in add):
            note = await self._rebind_overlapping(retire, add, new.server.backlog)
        else:
            self._bind_and_serve(add, new.server.backlog)
            for listener in retire:
                self._retire(listener)
        for listener in kept:   # only now: a failed restart must leave every scheme as it was
            listener.endpoint = wanted[listener.address]
        return note

    async def _rebind_overlapping(self, retire: list[Listener], add: list[tuple[listen.Address, listen.Endpoint]],
                                  backlog: int) -> str:
        """0.0.0.0 -> 127.0.0.1 on one port: the kernel allows only close, then bind."""
        for listener in retire:
            self._retire(listener)
        try:
            self._bind_and_serve(add, backlog)
        except ChatdError as e:
            try:
                self._bind_and_serve([(li.address, li.endpoint) for li in retire], backlog)
            except ChatdError as e2:
                raise ChatdError(f"{e}; and the old address could not be bound again: {e2}") from None
            raise
        return ("(the addresses overlap, so the old listener was closed before the new one "
                "was bound; connections attempted in between were refused)")

    def _bind_and_serve(self, add: list[tuple[listen.Address, listen.Endpoint]], backlog: int) -> None:
        """Bind every one of `add` (all or none) and serve each."""
        socks = listen.bind_all([a for a, _ in add], backlog)
        for (address, endpoint), sock in zip(add, socks):
            listener = Listener(address, sock, endpoint)
            self._serve_on(listener)
            self.listeners.append(listener)

    # ------------------------------------------------------------------ listeners

    def _serve_on(self, listener: Listener) -> None:
        listener.acceptor = Acceptor(listener.sock, self.gate, listener)
        listener.acceptor.start()

    def _close_listener(self, listener: Listener) -> None:
        if listener.acceptor is not None:
            listener.acceptor.stop()
        listener.sock.close()

    def _retire(self, listener: Listener) -> None:
        """Stop serving an old address, but first accept what waits in its backlog."""
        self.listeners.remove(listener)
        acceptor = listener.acceptor or Acceptor(listener.sock, self.gate, listener)
        acceptor.stop()
        acceptor.accept_waiting(batch=100000)
        listener.sock.close()

    # ------------------------------------------------------------------ clients

    async def _drain_clients(self) -> None:
        """SIGUSR1: let every client finish cleanly, for at most drain_timeout seconds.

        First every client's input that had arrived is read and answered (chat
        lines reach the others while they are all still open); then each one
        gets its farewell and a FIN. A further SIGTERM, SIGINT or SIGQUIT cuts
        the wait short.
        """
        self.state.stopping = True
        drainers = [conn.drain() for conn in list(self.state.connections)]
        deadline = time.monotonic() + self.cfg.daemon.drain_timeout
        if await self._wait_draining(lambda: all(d.caught_up for d in drainers), deadline):
            for drainer in drainers:
                drainer.finish()
            if not await self._wait_draining(self.state.all_closed.is_set, deadline):
                log.warning("drain_timeout: %d clients still open", len(self.state.connections))

    async def _wait_draining(self, done: Callable[[], bool], deadline: float) -> bool:
        """Poll `done` until the deadline; False if a further stop signal came first."""
        while not done() and time.monotonic() < deadline:
            try:
                sig = await asyncio.wait_for(self.signals.get(), min(0.02, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                continue
            if sig in STOP_SIGNALS and sig != signal.SIGUSR1:
                log.info("%s during the graceful stop: closing now", signal_name(sig))
                self.stop_signal = sig
                return False
        return True

    async def _close_clients(self) -> None:
        """Close what is left, let queued output flush briefly, then abort the rest."""
        for conn in list(self.state.connections):
            conn.close("server stopping")
        try:
            await asyncio.wait_for(self.state.all_closed.wait(), TIDY_GRACE_S)
        except asyncio.TimeoutError:
            for conn in list(self.state.connections):
                conn.abort("server stopping")
            try:
                await asyncio.wait_for(self.state.all_closed.wait(), TIDY_GRACE_S)
            except asyncio.TimeoutError:
                pass

    async def _sweep_idle(self) -> None:
        """Close clients that sent nothing for idle_timeout seconds (checked a few times per timeout)."""
        loop = asyncio.get_running_loop()
        while True:
            idle = self.state.limits.idle_timeout
            await asyncio.sleep(max(0.05, min(1.0, idle / 4)) if idle else 1.0)
            if not idle:
                continue
            now = loop.time()
            for conn in list(self.state.connections):
                if conn.active:
                    conn.active = False
                    conn.idle_since = now
                elif now - conn.idle_since >= idle:
                    conn.close("idle")

    async def _flush_churn(self) -> None:
        """Each CHURN_INTERVAL_S, the summary lines of the connections not logged one by one."""
        while True:
            await asyncio.sleep(CHURN_INTERVAL_S)
            self.state.churn.flush()
            self.gate.refused.flush()

    async def _refresh_state(self) -> None:
        """Bring the client count in the state file and systemd's STATUS= up to date; retry a
        state file that could not be written."""
        clients = len(self.state.connections)
        while True:
            await asyncio.sleep(STATE_REFRESH_S)
            self.runtime.state.retry()
            if len(self.state.connections) != clients:
                clients = len(self.state.connections)
                self.runtime.state.update(clients=clients)
                self.runtime.notifier.status(self.status_text())

    async def _watchdog(self, interval: float) -> None:
        """WATCHDOG=1 at half of WATCHDOG_USEC, from the loop itself: a wedged loop stops it."""
        while True:
            self.runtime.notifier.watchdog()
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ helpers

    @property
    def address(self) -> str:
        return describe_listeners(self.listeners)

    def status_text(self) -> str:
        """What `systemctl status` shows: mode, address, clients, and the last restart."""
        n = len(self.state.connections)
        text = f"{self.cfg.server.mode} on {self.address}, {n} client{'' if n == 1 else 's'}"
        if self.last_restart:
            text += f"; last restart {self.last_restart.kind}: {self.last_restart.message}"
        return text

    def metrics_snapshot(self) -> dict[str, Any]:
        """Every metric now (metrics.py), for `render_text` (`chatd stats`) and
        `render_prometheus` (`[metrics] listen`)."""
        now = time.time()
        chat = self.state.chat
        log_failures, log_fallback = self.runtime.logs.failures()
        extra = {"build": {(__version__, self.loop_name, self.cfg.server.mode): 1},
                 "start_time": self.started, "uptime": max(0.0, now - self.started),
                 "generation": self.generation, "log_failures": log_failures,
                 "log_fallback": log_fallback, "bans": len(self.bans.listing())}
        labels: dict[Any, str] = {}   # local address -> its listener's, found once a snapshot

        def listener_of(conn: Any) -> str:
            local = conn.transport.get_extra_info("sockname")
            label = labels.get(local)
            if label is None:
                label = labels[local] = self._listener_of(local)
            return label
        return self.state.metrics.snapshot(self.state.connections, listener_of,
                                           tuple(chat.sent) if chat else (0, 0), extra)

    def _listener_of(self, sockname: Any) -> str:
        """The listener that serves the local address `sockname` (a connection's)."""
        try:
            host, port = sockname[:2]
            local = listen.Address(listen.family_of(host), ipaddress.ip_address(host).compressed, port)
        except (TypeError, ValueError):
            return "?"
        for listener in self.listeners:
            if listener.address.serves(local):
                return str(listener)
        return str(local)

    def stats(self) -> dict[str, Any]:
        """What `chatd stats --json` shows: the metrics by family (metrics.render_json)."""
        return render_json(self.metrics_snapshot())

    def stats_text(self) -> str:
        """What `chatd stats` prints: the metrics, one aligned line a family and series."""
        return render_text(self.metrics_snapshot())

    def _state_fields(self) -> dict[str, Any]:
        return state_fields(self.cfg, self.listeners, self.loop_name, self.runtime.logs,
                            len(self.state.connections))

    def _apply_mode(self, cfg: Config) -> None:
        """Set `cfg`'s mode up and make new connections from its class (modes.Mode). Runs at
        start and on each restart, so a restart that changes the mode or the log level
        changes them for new connections; connected clients keep theirs."""
        mode = MODES[cfg.server.mode]
        mode.configure(self.state, cfg)
        self.gate.connection_class = mode.connection_class(self.loop_name, cfg.log.level == "debug")

    def _abort_if_stopped_early(self) -> None:
        """A stop signal before ready aborts the start (README "Signals"); a SIGHUP waits."""
        stop = self.signals.stop_pending()
        if stop is not None:
            raise StartError(f"start aborted by {signal_name(stop)}")

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """One log line for whatever the loop could not handle; never a traceback, and the
        same error at most once per LOOP_ERROR_S, with a count of those not logged."""
        exc = context.get("exception")
        detail = f": {type(exc).__name__}: {exc}" if exc else ""
        text = f"event loop: {context.get('message', 'error')}{detail}"
        now = time.monotonic()
        last, unsaid = self._loop_errors.get(text, (-LOOP_ERROR_S, 0))
        if now - last < LOOP_ERROR_S:
            self._loop_errors[text] = (last, unsaid + 1)
            return
        if len(self._loop_errors) > 100:
            self._loop_errors.clear()
        self._loop_errors[text] = (now, 0)
        log.error("%s%s", text, f" (and {unsaid} more times since it was last logged)" if unsaid else "")

