"""The daemon's lifetime, after detaching (`start`) or at once (`run`): `serve` reads top to bottom.

Like python-daemon's DaemonContext or uvicorn's Server, one function takes the
daemon from its first resource to its last: listeners, pid file, state file,
logging, the event loop, the privilege drop, serving. Whatever it takes is
given back in one place, once (`Held.release`): as soon as the server has
stopped (it asks through `Runtime.release`, so the pid-file lock that `stop`
waits on goes then), or, if it never got that far, when `serve` unwinds.

Tests: tests/unit/test_lifetime.py, tests/process/test_start.py, tests/process/test_detach.py, tests/process/test_signals.py
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import __version__, daemon, listen, metrics, upgrade
from . import config as config_mod
from .config import Config
from .errors import ChatdError
from .log import Logging, log
from .moderation import ControlSocket
from .notify import Activated, Notifier
from .paths import InstancePaths
from .pidfile import PidFile
from .server import Listener, Runtime, Server, describe_listeners, new_event_loop
from .signals import SignalRecorder, ignore_late_signals
from .state import StateFile
from .workers import Report, Supervisor, rejoin, worker_runtime


@dataclass
class Launch:
    """What a starting daemon carries from its command into its event loop."""

    cfg: Config
    target: str                    # the log target
    paths: InstancePaths
    detached: bool
    notifier: Notifier
    activated: list[Activated]     # sockets handed over by socket activation, if any
    upstart: bool = False          # stop itself (SIGSTOP) once ready: upstart's `expect stop`
    recorder: SignalRecorder = field(default_factory=SignalRecorder)
    command: list[str] = field(default_factory=list)   # how to start chatd again (upgrade.py)


@dataclass
class Held:
    """What the daemon holds for its lifetime, so that one place gives it all back."""

    socks: list[socket.socket]
    pidfile: PidFile
    state: StateFile
    logs: Logging
    control: ControlSocket | None = None
    released: bool = False

    def release(self, last_word: str = "") -> None:
        """Close the listening sockets, remove the state file, release the pid file and close
        the logs; once, whoever asks first. `last_word` is logged after the state file is gone
        and before the pid-file lock is: `stop` returns once the lock is free, and finds it."""
        if self.released:
            return
        self.released = True
        for s in self.socks:
            s.close()
        if self.control is not None:
            self.control.close()
        self.state.remove()
        if last_word:
            log.info("%s", last_word)
        self.pidfile.release()
        self.logs.close()

    def forget(self) -> None:
        """In a forked worker (workers.py): close this process's descriptors of the pid file
        and the state file, which the supervisor holds and gives back. Its lock stays: it
        belongs to the open file, which the supervisor keeps open."""
        self.pidfile.forget()
        self.state.forget()


def serve(launch: Launch, ready: Callable[..., None]) -> int:
    """The daemon's body: take each resource in turn, serve until stopped, give them back."""
    cfg, paths = launch.cfg, launch.paths
    max_clients, fd_warning = daemon.raise_fd_limit(cfg.limits.max_clients)
    planned = listen.plan(listen.endpoints(cfg))
    if launch.activated:
        listeners = [Listener(address, act.sock, listen.scheme_for(address, planned), name=act.name)
                     for act in launch.activated for address in [listen.address_of(act.sock)]]
    else:
        socks = listen.bind_all([address for address, _ in planned], cfg.server.backlog)
        listeners = [Listener(address, sock, endpoint) for (address, endpoint), sock in zip(planned, socks)]
    socks = [li.sock for li in listeners]
    try:
        metrics_sock = metrics.bind(cfg.metrics.listen)
    except BaseException:
        for s in socks:
            s.close()
        raise
    state = StateFile(paths.state)
    logs = Logging(paths.fallback_log, on_change=lambda status: state.update(log=status))
    held = Held(socks + ([metrics_sock] if metrics_sock else []), PidFile(paths.pidfile), state, logs)
    try:
        held.pidfile.acquire(os.getpid())
        state.open(pid=os.getpid(), version=__version__, started=time.time(), config=cfg.path,
                   pidfile=paths.pidfile,
                   mode=cfg.server.mode, address=describe_listeners(listeners), clients=0, generation=0)
        logs.configure(cfg, launch.target)
        state.update(log=logs.status())
        held.control = ControlSocket.bind(paths.control,
                                          daemon.check_privilege_drop(cfg.daemon.user, cfg.daemon.group))
        log.info("chatd %s starting (pid %d, config %s)", __version__, os.getpid(), cfg.path or "none")
        if launch.activated:
            log.info("listening on sockets handed over by socket activation: %s",
                     describe_listeners(listeners))
        if fd_warning:
            log.warning("%s", fd_warning)
        loop, loop_name = new_event_loop(cfg.server.loop)   # imports uvloop while we still may
        daemon.drop_privileges(cfg.daemon.user, cfg.daemon.group)
        if launch.detached:
            daemon.redirect_stdio()
        runtime = Runtime(state=state, logs=logs, foreground=not launch.detached,
                          release=held.release, forget=held.forget,
                          ready=lambda info: ready(**info), recorder=launch.recorder,
                          notifier=launch.notifier, overrides=_absolute_overrides(cfg),
                          metrics_sock=metrics_sock, control=held.control, command=launch.command,
                          target=launch.target, detached=launch.detached, paths=paths,
                          pidfile_fd=held.pidfile.fd, handed_over=logs.close)
        if cfg.server.workers > 1:
            loop.close()   # uvloop is imported; each worker makes its own loop
            try:
                return Supervisor(cfg, listeners, runtime, max_clients).serve()
            finally:
                ignore_late_signals()
        server = Server(cfg, listeners, runtime, max_clients, loop_name)
        try:
            return loop.run_until_complete(server.serve())
        finally:
            loop.close()
            ignore_late_signals()
    finally:
        held.release()


def _absolute_overrides(cfg: Config) -> dict[str, tuple[Any, str]]:
    """The command-line settings, as resolved at start, re-applied over the file on restart."""
    return {key: (cfg.get(key), origin) for key, origin in cfg.origins.items() if origin.startswith("-")}


@dataclass
class Carried:
    """What a live upgrade's record hands on (server.daemon_record), rebuilt in the process
    that takes over: a daemon's, a worker's or a re-executed supervisor's."""

    record: dict[str, Any]
    cfg: Config
    paths: InstancePaths
    listeners: list[Listener]
    metrics_sock: socket.socket | None
    control: ControlSocket | None
    state: StateFile | Report
    pidfile: PidFile
    logs: Logging
    max_clients: int
    fd_warning: str

    @classmethod
    def rebuild(cls, record: dict[str, Any], fds: list[int]) -> Carried:
        """From the record and its descriptors, touching no socket; ChatdError, KeyError,
        TypeError, ValueError or OSError if they cannot be used here."""
        cfg = config_mod.from_settings(record["settings"], record["origins"], record["config"])
        paths = InstancePaths(**record["paths"])
        slots = record["fds"]
        planned = listen.plan(listen.endpoints(cfg))
        listeners = []
        for entry in slots["listeners"]:
            sock = socket.socket(fileno=fds[entry["fd"]])
            address = listen.address_of(sock)
            listeners.append(Listener(address, sock, listen.scheme_for(address, planned), name=entry["name"]))
        metrics_sock = None if slots["metrics"] is None else socket.socket(fileno=fds[slots["metrics"]])
        control = None
        if slots["control"] is not None:
            control = ControlSocket(slots["control"]["path"], socket.socket(fileno=fds[slots["control"]["fd"]]),
                                    tuple(slots["control"]["ident"]))   # type: ignore[arg-type]
        state: StateFile | Report
        if "worker" in record:   # its "state" is its report socket to the supervisor
            state = Report(socket.socket(fileno=fds[slots["state"]]))
        else:
            state = StateFile(paths.state)
            state.adopt((record.get("server") or record["supervisor"])["state"],
                        None if slots["state"] is None else fds[slots["state"]])
        logs = Logging(paths.fallback_log, on_change=lambda status: state.update(log=status))
        logs.configure(cfg, record["target"], None if slots["log"] is None else fds[slots["log"]])
        pidfile = PidFile(paths.pidfile)
        pidfile.fd = None if slots["pidfile"] is None else fds[slots["pidfile"]]
        max_clients, fd_warning = daemon.raise_fd_limit(cfg.limits.max_clients)
        return cls(record, cfg, paths, listeners, metrics_sock, control, state, pidfile, logs,
                   max_clients, fd_warning)

    def held(self, released: bool) -> Held:
        socks = [li.sock for li in self.listeners] + ([self.metrics_sock] if self.metrics_sock else [])
        return Held(socks, self.pidfile, self.state, self.logs, self.control,   # type: ignore[arg-type]
                    released=released)

    def runtime(self, held: Held, recorder: SignalRecorder) -> Runtime:
        record, notify = self.record, self.record["notify"]
        runtime = Runtime(state=self.state, logs=self.logs,   # type: ignore[arg-type]
                          foreground=bool(record["foreground"]), release=held.release,
                          forget=held.forget, ready=lambda info: None, recorder=recorder,
                          notifier=Notifier(notify["address"], int(notify["watchdog_usec"])),
                          overrides={k: (v, o) for k, (v, o) in record["overrides"].items()},
                          metrics_sock=self.metrics_sock, control=self.control,
                          command=list(record["command"]), target=record["target"],
                          detached=bool(record["detached"]), paths=self.paths,
                          pidfile_fd=self.pidfile.fd, handed_over=self.logs.close)
        worker = record.get("worker")
        if worker is not None:
            runtime = worker_runtime(runtime, self.state, self.cfg,   # type: ignore[arg-type]
                                     int(worker["slot"]), str(worker["lease"]), recorder)
        return runtime


def take_over(takeover: upgrade.Takeover) -> int:
    """The body of a process started by `chatd upgrade` (upgrade.py): say hello, take the old
    daemon's (or worker's) record and descriptors, rebuild what `serve` would have taken
    (sockets, pid file, state file, logs, loop) from them, serve once it commits, and give it
    all back at the end as `serve` does. Nothing here is bound, created or removed before the
    commit: any failure until then is told to the old process, which serves on."""
    recorder = SignalRecorder()
    recorder.install(detached=True)
    takeover.hello()
    takeover.receive()
    record = takeover.record
    try:
        carried = Carried.rebuild(record, takeover.fds)
        loop, loop_name = new_event_loop(carried.cfg.server.loop)
    except ChatdError as e:
        takeover.fail(e.message)
    except (KeyError, TypeError, ValueError, OSError) as e:
        takeover.fail(f"the state record cannot be used: {type(e).__name__}: {e}")
    cfg, logs, control, worker = carried.cfg, carried.logs, carried.control, record.get("worker")
    held = carried.held(released=True)   # the old one's until the commit

    def commit() -> None:
        carried.pidfile.rewrite(os.getpid())
        if control is not None:
            control.sock.listen(16)   # its peers' SO_PEERCRED name whoever listened last: us
        if worker is None:
            held.released = False
        else:   # a worker: the slot is ours (told at once: the old one may die unheard), its
            # supervisor's requests come to us now, and we die with it
            carried.state.send(event="took_over", pid=os.getpid(), old=int(record["pid"]))   # type: ignore[union-attr]
            carried.state.listen(loop, server)   # type: ignore[union-attr]
            loop.create_task(rejoin(int(worker["supervisor"]), int(record["pid"])))
        if record["target"] == "stderr":
            try:
                logs.stderr_replaced(cfg)
            except ChatdError as e:
                log.warning("%s", e.message)
    takeover.on_commit = commit
    try:
        if carried.fd_warning:
            log.warning("%s", carried.fd_warning)
        runtime = carried.runtime(held, recorder)
        server = Server(cfg, carried.listeners, runtime, carried.max_clients, loop_name)
        try:
            return loop.run_until_complete(server.serve(takeover))
        finally:
            loop.close()
            ignore_late_signals()
            runtime.notifier.close()
    finally:
        held.release()


def resume_supervisor(record: dict[str, Any], fds: list[int]) -> int:
    """The body of a supervisor that a live upgrade re-executed (workers_upgrade.py): the
    same process, its workers and everything it held rebuilt from its record, serving on."""
    recorder = SignalRecorder()
    recorder.install(detached=bool(record["detached"]))   # the signals held across the exec: ours now
    carried = Carried.rebuild(record, fds)
    held = carried.held(released=False)
    try:
        runtime = carried.runtime(held, recorder)
        new_event_loop(carried.cfg.server.loop)[0].close()   # as `serve`: a worker started later needs uvloop
        try:
            return Supervisor(carried.cfg, carried.listeners, runtime, carried.max_clients).serve((record, fds))
        finally:
            ignore_late_signals()
            runtime.notifier.close()
    finally:
        held.release()
