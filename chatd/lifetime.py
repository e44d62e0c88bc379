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

from . import __version__, daemon, listen, metrics
from .config import Config
from .log import Logging, log
from .moderation import ControlSocket
from .notify import Activated, Notifier
from .paths import InstancePaths
from .pidfile import PidFile
from .server import Listener, Runtime, Server, describe_listeners, new_event_loop
from .signals import SignalRecorder, ignore_late_signals
from .state import StateFile
from .workers import Supervisor


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
        if cfg.server.workers == 1:   # with workers, no process holds all the clients
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
                          metrics_sock=metrics_sock, control=held.control)
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
