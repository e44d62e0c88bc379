"""`[server] workers = N`: N worker processes serve one inherited listening socket (README
"More than one process").

With more than one worker the daemon does not serve clients itself: after it
has taken its resources (sockets, pid file, state file, logs, privilege drop;
lifetime.py), it becomes the supervisor, gunicorn's arbiter in shape: a
synchronous loop that sleeps in poll() on its workers' report sockets and a
signal wake-up pipe, and dispatches each signal by name to `handle_<name>`.
Each worker is forked from it and runs a whole `Server` on the inherited
listening sockets, as a node of the bus named NODE_ID-1 ... NODE_ID-N, so rooms
span the workers. The kernel hands each connection to whichever worker accepts
it first; a worker that dies is started again at once (then after a growing
pause if it keeps dying young), and meanwhile the others go on accepting from
the same queue, so no connection is refused.

The supervisor alone writes the state file, serves the control socket (`chatd
upgrade` only: workers_upgrade.py) and talks to systemd; workers report to it
(ready, failed, their client counts, an upgrade's outcome, a new worker's taking
over) in JSON lines on a socket, on which the supervisor asks them for an upgrade.
Signals: a stop signal is passed to every worker and waited for; SIGHUP is
checked here first (an invalid config, or a change that needs a stop and start,
is rejected and the workers are not disturbed), then passed on, and each worker
applies it in place.

Tests: tests/cluster/test_workers.py
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Any

from . import config as config_mod
from . import daemon, listen
from .config import Config
from .errors import ChatdError, StartError
from .log import resolve_target
from .notify import Notifier
from .paths import check_log_file
from .server import (FIXED_KEYS, Listener, Runtime, Server, describe_listeners, new_event_loop,
                     state_fields)
from .signals import (STOP_SIGNALS, SignalRecorder, first_stop, held_signals, signal_name,
                      stop_waking, wake_on)
from .state import RestartOutcome
from .workers_upgrade import Desk, Rolling, resume

log = logging.getLogger("chatd")
START_TIMEOUT_S = 30.0    # a worker must say ready (or why not) within this
TICK_S = 1.0              # the loop wakes at least this often (client counts, restarts due)
YOUNG_S = 5.0             # a worker that dies again younger than this waits before its next
PAUSE_MAX_S = 30.0        # start, twice as long each time, up to this
KILL_AFTER_S = 5.0        # a stop: workers still alive this long after their deadline are killed


@dataclass
class Worker:
    """One slot's current process and what it last reported."""

    slot: int
    pid: int = 0
    report: int = -1             # the supervisor's end of the worker's report socket
    buffer: bytes = b""
    started: float = 0.0
    ready: bool = False
    clients: int = 0
    loop: str = ""
    lease: str = field(default_factory=lambda: os.urandom(8).hex())   # its bus lease, kept
    deaths: int = 0            # deaths in a row, each younger than YOUNG_S
    pause: float = 0.0         # the wait before the next start: 0 the first time, then 1, 2, 4 s...
    due: float = 0.0           # when the next start may happen (monotonic)
    answer: dict[str, Any] | None = None   # its live upgrade's outcome (workers_upgrade.py)
    leaving: int = 0           # the process it took the slot over from, until that one is reaped

    @property
    def serving(self) -> bool:
        """Ready, and can be asked for an upgrade: not dead, waiting or starting."""
        return bool(self.pid and self.ready and self.report >= 0)


@dataclass
class Report:
    """A worker's side of its report socket: stands in for the state file (`update`, `retry`,
    and `fd`, which a live upgrade hands on) and for the readiness pipe (`ready`), so its
    Server runs unchanged; and takes the supervisor's requests (`listen`)."""

    sock: socket.socket
    data: dict[str, Any] = field(default_factory=dict)
    tasks: set[Any] = field(default_factory=set)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    def send(self, **message: Any) -> None:
        try:
            self.sock.sendall((json.dumps(message) + "\n").encode())
        except OSError:
            pass   # the supervisor is gone or not reading: it learns by other means

    def remove(self) -> None:
        """Nothing to remove: the state file is the supervisor's."""

    def listen(self, loop: asyncio.AbstractEventLoop, server: Server) -> None:
        """Serve the supervisor's requests, a JSON line each, from `server`'s loop. There is
        one: {"cmd": "upgrade", "timeout": S, "deadline": MONOTONIC}, this worker's part of a
        live upgrade (workers_upgrade.py), answered as {"event": "upgrade", "answer": ...}.
        The deadline is CLOCK_MONOTONIC's, which every process here shares; a supervisor of
        an older version sends none."""
        fd, buffer = self.sock.fileno(), bytearray()

        def readable() -> None:
            try:
                data = self.sock.recv(4096, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:   # the supervisor is gone: its death signal stops us
                loop.remove_reader(fd)
                return
            buffer.extend(data)
            while b"\n" in buffer:
                line, _, rest = bytes(buffer).partition(b"\n")
                buffer[:] = rest
                try:
                    request = json.loads(line)
                    timeout = float(request["timeout"])
                    if "deadline" in request:   # a request read late (we were stopped) is stale
                        timeout = float(request["deadline"]) - time.monotonic()
                except (ValueError, KeyError, TypeError):
                    continue
                if timeout <= 0:   # the supervisor gave up on it and said it failed: no answer,
                    log.warning("upgrade: asked too late (the supervisor gave up); not upgrading")
                    continue       # which it would take for the next upgrade's
                task = loop.create_task(server.upgrade(
                    timeout, lambda answer: self.send(event="upgrade", answer=answer)))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        loop.add_reader(fd, readable)

    def update(self, **fields: Any) -> None:
        if "clients" in fields:
            self.send(event="clients", clients=fields["clients"])

    def retry(self) -> None:
        """Nothing to retry: a lost report is replaced by the next."""

    def ready(self, info: dict[str, Any]) -> None:
        self.send(event="ready", **info)


class Supervisor:
    """The daemon's body with [server] workers > 1."""

    def __init__(self, cfg: Config, listeners: list[Listener], runtime: Runtime,
                 max_clients: int) -> None:
        self.cfg = cfg
        self.listeners = listeners
        self.runtime = runtime
        self.max_clients = max_clients
        self.workers = {slot: Worker(slot) for slot in range(1, cfg.server.workers + 1)}
        self.stop_signal: int | None = None
        self.signals: list[int] = []
        self.generation = 0
        self.last_restart: RestartOutcome | None = None
        self.started = time.time()
        self.clients = 0
        self.last_upgrade: dict[str, Any] | None = None
        self.desk = Desk(self, runtime.control)   # the control socket: `chatd upgrade`
        self.rolling: Rolling | None = None       # the live upgrade in progress
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ------------------------------------------------------------------ lifecycle

    def serve(self, resumed: tuple[dict[str, Any], list[int]] | None = None) -> int:
        """Start the workers, or, after a live upgrade's re-exec, go on with those in
        `resumed` (workers_upgrade.py); supervise them until stopped."""
        self.runtime.recorder.take_over(self.signals.append)
        wake_on(self._wake_w)
        daemon.become_subreaper()
        try:
            if resumed is None:
                self.startup()
            else:
                resume(self, *resumed)
            self.main_loop()
        except BaseException as e:
            self.shutdown(f"{e}" if isinstance(e, ChatdError) else f"{type(e).__name__}: {e}")
            raise
        self.shutdown()
        return 0

    def startup(self) -> None:
        """Start every worker; ready once all are (a worker's failure is the start's)."""
        for worker in self.workers.values():
            self._start(worker)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not all(w.ready for w in self.workers.values()):
            stop = first_stop(self.signals)
            if stop is not None:
                raise StartError(f"start aborted by {signal_name(stop)}")
            if time.monotonic() > deadline:
                raise StartError(f"workers not ready within {START_TIMEOUT_S:g} s")
            self._wait(min(TICK_S, deadline - time.monotonic()), starting=True)
        loop = next(iter(self.workers.values())).loop
        self.runtime.state.update(**state_fields(self.cfg, self.listeners, loop, self.runtime.logs, 0),
                                  generation=0, last_restart=None, started=self.started,
                                  workers=[w.pid for w in self.workers.values()])
        log.info("ready: %s mode on %s, %d workers, event loop %s", self.cfg.server.mode,
                 describe_listeners(self.listeners), len(self.workers), loop)
        self.runtime.notifier.ready(self.status_text())
        self.runtime.ready({"address": describe_listeners(self.listeners), "mode": self.cfg.server.mode,
                            "loop": f"{loop}, {len(self.workers)} workers",
                            "log": self.runtime.logs.status()})

    def main_loop(self) -> None:
        while self.stop_signal is None:
            self._wait(TICK_S if self.rolling is None else Rolling.TICK_S)
            while self.signals and self.stop_signal is None:
                sig = first_stop(self.signals)
                if sig is None and self.rolling is not None:
                    break   # a SIGHUP waits for the upgrade to end (README "Live upgrade")
                sig = sig or self.signals[0]
                self.signals.remove(sig)
                getattr(self, "handle_" + signal_name(sig)[3:].lower())()
            if self.rolling is not None and self.stop_signal is None:
                self.rolling.step()
            now = time.monotonic()
            for worker in self.workers.values():
                if not worker.pid and now >= worker.due:
                    self._start(worker)
            self._count_clients()

    def shutdown(self, failure: str = "") -> None:
        """Pass the stop on to every worker, wait for them (a graceful stop: drain_timeout),
        kill what is left, then give everything back. `failure`: why, if no signal asked."""
        sig = self.stop_signal or signal.SIGTERM
        if self.rolling is not None:
            self.rolling.fail(f"upgrade called off: {signal_name(sig)} arrived")
        running = sum(1 for w in self.workers.values() if w.pid)
        if failure:
            log.error("stopping %d workers: %s", running, failure)
        else:
            log.info("%s (%s): stopping %d workers",
                     "graceful stop" if sig == signal.SIGUSR1 else "stop", signal_name(sig), running)
        self.runtime.notifier.stopping("stopping workers")
        self._signal_all(sig)
        wait = self.cfg.daemon.drain_timeout if sig == signal.SIGUSR1 else 0.0
        deadline = time.monotonic() + wait + KILL_AFTER_S
        while any(w.pid for w in self.workers.values()) and time.monotonic() < deadline:
            for late in [s for s in self.signals if s in STOP_SIGNALS and s != sig]:
                self._signal_all(late)   # SIGTERM during a graceful stop: pass it on too
            self.signals.clear()
            self._wait(0.1, stopping=True)
        self._signal_all(signal.SIGKILL)
        while any(w.pid for w in self.workers.values()):
            self._wait(0.1, stopping=True)
        stop_waking()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        self.desk.close()
        self.runtime.release("stopped")

    # ------------------------------------------------------------------ signals

    def handle_term(self) -> None:
        self.stop_signal = signal.SIGTERM

    def handle_int(self) -> None:
        self.stop_signal = signal.SIGINT

    def handle_quit(self) -> None:
        self.stop_signal = signal.SIGQUIT

    def handle_usr1(self) -> None:
        self.stop_signal = signal.SIGUSR1

    def handle_hup(self) -> None:
        """Reopen the log; check the config here; if it may be applied, each worker applies it."""
        self.runtime.notifier.reloading()
        failures = self.runtime.logs.reopen()
        kind, message = self.restart()
        if kind == "applied":
            self._signal_all(signal.SIGHUP)
        message = "; ".join([message, *failures])
        self.generation += 1
        log.log(logging.INFO if kind == "applied" else logging.WARNING, "restart %s: %s", kind, message)
        self.last_restart = RestartOutcome(kind, message, time.time())
        self.runtime.state.update(**state_fields(self.cfg, self.listeners, self.loop_name(),
                                                 self.runtime.logs, self.clients),
                                  generation=self.generation, last_restart=self.last_restart.to_state())
        self.runtime.notifier.ready(self.status_text())

    def restart(self) -> tuple[str, str]:
        """What a restart would change, and whether the workers may apply it: the keys a
        running daemon cannot change, and the address (the workers share the supervisor's
        socket), need a stop and start."""
        old = self.cfg
        try:
            new = config_mod.load(old.path, self.runtime.overrides)
            target = resolve_target(new, self.runtime.foreground)
            if target not in ("syslog", "stderr", ""):
                check_log_file(target)
        except ChatdError as e:
            return "rejected", str(e).replace("\n", "; ")
        for key in (*FIXED_KEYS, *listen.ADDRESS_KEYS):
            if new.get(key) != old.get(key):
                return "rejected", (f"{key} changed from {old.get(key)!r} to {new.get(key)!r}, "
                                    f"which needs 'chatd stop' and 'chatd start' with workers; "
                                    f"nothing changed")
        changed = old.differences(new)
        if any(k.startswith("log.") for k in changed):
            self.runtime.logs.configure(new, target)
        self.cfg = new
        if not changed:
            return "applied", "config re-read; nothing changed"
        return "applied", "changed " + ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed)

    # ------------------------------------------------------------------ workers

    def _start(self, worker: Worker) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = ours.detach(), theirs.detach()
        with held_signals():   # one sent to the new worker before its own table: kept pending
            pid = daemon.fork_worker()
            if pid == 0:
                os.close(r)
                daemon.end(self._work(worker.slot, w))
        os.close(w)
        os.set_blocking(r, False)
        worker.pid, worker.report, worker.buffer = pid, r, b""
        worker.started, worker.ready, worker.clients = time.monotonic(), False, 0
        log.debug("worker %d started (pid %d)", worker.slot, pid)

    def _work(self, slot: int, fd: int) -> int:
        """In the worker: the signal table of its own, a loop, and a Server as a node
        NODE_ID-SLOT; its exit status."""
        report = Report(socket.socket(fileno=fd))
        try:
            self.runtime.forget()   # the pid file's lock, state file and control socket are the supervisor's
            self.desk.forget()
            stop_waking()
            os.close(self._wake_r)
            os.close(self._wake_w)
            for other in self.workers.values():
                if other.report >= 0:
                    os.close(other.report)
            recorder = SignalRecorder()
            recorder.install(detached=not self.runtime.foreground)
            cfg = self._worker_config(slot)
            loop, loop_name = new_event_loop(cfg.server.loop)
            runtime = worker_runtime(self.runtime, report, cfg, slot, self.workers[slot].lease, recorder)
            listeners = [Listener(li.address, li.sock, li.endpoint, name=li.name) for li in self.listeners]
            server = Server(cfg, listeners, runtime, self.max_clients, loop_name)
            report.listen(loop, server)
            try:
                return loop.run_until_complete(server.serve())
            finally:
                loop.close()
        except ChatdError as e:
            report.send(event="fail", message=e.message, status=e.status)
            return e.status
        except BaseException as e:   # noqa: BLE001 - the supervisor must hear of any failure
            report.send(event="fail", message=f"internal error: {type(e).__name__}: {e}", status=1)
            log.error("worker %d: internal error: %s: %s", slot, type(e).__name__, e)
            return 1

    def _worker_config(self, slot: int) -> Config:
        """The config with this worker's node id: NODE_ID-SLOT (NODE_ID: [cluster] node_id, or
        HOST-PORT), set as a setting is, so a live upgrade's record carries it."""
        from .cluster import default_node_id   # only with a bus, which workers need
        base = self.cfg.cluster.node_id or default_node_id(self.cfg.server.port)
        return dataclasses.replace(self.cfg, cluster=dataclasses.replace(self.cfg.cluster, node_id=f"{base}-{slot}"),
                                   origins=self.cfg.origins | {"cluster.node_id": "[server] workers"})

    def _wait(self, timeout: float, starting: bool = False, stopping: bool = False) -> None:
        """Sleep until a signal, a report, a control request or `timeout`; then take the
        reports and requests, and reap."""
        reports = {w.report: w for w in self.workers.values() if w.report >= 0}
        desk = [] if starting or stopping else self.desk.fds()
        poller = select.poll()   # not select(): a control client's descriptor may be past FD_SETSIZE
        for fd in (self._wake_r, *reports, *desk):
            poller.register(fd, select.POLLIN)
        try:
            readable = [fd for fd, _ in poller.poll(max(0.0, timeout) * 1000)]
        except InterruptedError:
            readable = []
        for fd in readable:
            if fd in desk:
                self.desk.readable(fd)
            elif fd == self._wake_r:
                while True:
                    try:
                        if not os.read(self._wake_r, 512):
                            break
                    except BlockingIOError:
                        break
            else:
                self._read(reports[fd], starting)
        self._reap(starting, stopping)

    def _read(self, worker: Worker, starting: bool) -> None:
        try:
            data = os.read(worker.report, 65536)
        except BlockingIOError:
            return
        if not data:
            os.close(worker.report)
            worker.report = -1
            return
        worker.buffer += data
        *lines, worker.buffer = worker.buffer.split(b"\n")
        for raw in lines:
            try:
                message = json.loads(raw)
            except ValueError:
                message = None
            if not isinstance(message, dict):
                log.warning("worker %d (pid %d): its report is not one chatd sends; ignored",
                            worker.slot, worker.pid)
                continue
            event = message.get("event")
            if event == "ready":
                worker.ready, worker.loop = True, str(message.get("loop", ""))
                log.info("worker %d ready (pid %d)", worker.slot, worker.pid)
            elif event == "clients" and type(message.get("clients")) is int:
                worker.clients = message["clients"]
            elif event == "upgrade" and isinstance(message.get("answer"), dict):
                worker.answer = answer = message["answer"]
                new = (answer.get("new") or {}).get("pid") if answer.get("ok") else None
                if type(new) is int:
                    self._handed(worker, new)
            elif event == "took_over" and type(message.get("pid")) is int and message.get("old") == worker.pid:
                self._handed(worker, message["pid"])   # said by the new process at its commit, in
                                                       # case the old one dies before its answer
            elif event == "fail" and starting:
                status = message.get("status")
                raise ChatdError(f"worker {worker.slot}: {message.get('message', 'failed')}",
                                 status if type(status) is int else 1)
            elif event == "fail":
                log.error("worker %d (pid %d) could not start: %s", worker.slot, worker.pid,
                          message.get("message", "failed"))

    @staticmethod
    def _handed(worker: Worker, new: int) -> None:
        """Its slot is the new process's from now on (a live upgrade): the old one exits, and
        the new one, its child, becomes ours."""
        if worker.pid != new:
            worker.leaving, worker.pid = worker.pid, new

    def _reap(self, starting: bool, stopping: bool) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = next((w for w in self.workers.values() if pid in (w.pid, w.leaving)), None)
            if worker is None:
                continue
            if worker.report >= 0:
                self._read(worker, starting)
            if worker.pid != pid:   # it handed its slot to a new process, and left (`upgrade`)
                worker.leaving = 0
                pid, how = self._adopted(worker.pid)
                if not pid:
                    continue
            else:
                how = _how(status)
            if worker.report >= 0:
                os.close(worker.report)
                worker.report = -1
            worker.pid, worker.ready, worker.clients = 0, False, 0
            if stopping:
                log.debug("worker %d exited (%s)", worker.slot, how)
                continue
            if starting:
                raise StartError(f"worker {worker.slot} exited during start-up ({how})")
            worker.deaths = worker.deaths + 1 if time.monotonic() - worker.started < YOUNG_S else 1
            worker.pause = 0.0 if worker.deaths == 1 else min(PAUSE_MAX_S, 2.0 ** (worker.deaths - 2))
            worker.due = time.monotonic() + worker.pause
            log.warning("worker %d (pid %d) exited (%s); %s", worker.slot, pid, how,
                        f"starting another in {worker.pause:g} s" if worker.pause
                        else "starting another")

    @staticmethod
    def _adopted(pid: int) -> tuple[int, str]:
        """A new worker whose old process has left is our child now (we are a subreaper),
        unless it died first and that one reaped it: (0, "") if it lives; else its pid, and how."""
        try:
            got, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return pid, "died before the process it took over from"
        return got, _how(status) if got else ""

    def _signal_all(self, sig: int) -> None:
        for worker in self.workers.values():
            if worker.pid:
                try:
                    os.kill(worker.pid, sig)
                except OSError as e:
                    if e.errno != errno.ESRCH:
                        raise

    def _count_clients(self) -> None:
        clients = sum(w.clients for w in self.workers.values())
        if clients != self.clients:
            self.clients = clients
            self.runtime.state.update(clients=clients)
            self.runtime.notifier.status(self.status_text())
        self.runtime.state.retry()

    def loop_name(self) -> str:
        return next((w.loop for w in self.workers.values() if w.loop), "")

    def status_text(self) -> str:
        text = (f"{self.cfg.server.mode} on {describe_listeners(self.listeners)}, {len(self.workers)} "
                f"workers, {self.clients} client{'' if self.clients == 1 else 's'}")
        if self.last_restart:
            text += f"; last restart {self.last_restart.kind}: {self.last_restart.message}"
        return text


def _how(status: int) -> str:
    """How a process ended, from its wait status."""
    return (f"exit status {os.waitstatus_to_exitcode(status)}" if os.WIFEXITED(status)
            else f"signal {signal_name(os.WTERMSIG(status))}")


REJOIN_S = 30.0   # after its upgrade, for the new worker's old process to have exited


async def rejoin(supervisor: int, old: int) -> None:
    """In a worker that a live upgrade started (lifetime.take_over): once its old process
    has exited, its parent is the supervisor (a subreaper), and it dies with it as a forked
    worker does (daemon.fork_worker). If the supervisor is gone meanwhile, it stops."""
    deadline = time.monotonic() + REJOIN_S
    while os.getppid() == old and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if not daemon.die_with_parent(supervisor):
        log.error("worker: its supervisor (pid %d) is gone; stopping", supervisor)
        os.kill(os.getpid(), signal.SIGTERM)


def worker_runtime(runtime: Runtime, report: Report, cfg: Config, slot: int, lease: str,
                   recorder: SignalRecorder) -> Runtime:
    """A worker's Runtime, from its supervisor's: it reports on `report` instead of the state
    file and readiness pipe, holds none of the daemon's files, and serves as node NODE_ID-SLOT
    on its slot's lease. Forked (`Supervisor._work`) or upgraded in place (lifetime.take_over)."""
    return dataclasses.replace(
        runtime, state=report, release=lambda word: None, forget=lambda: None, ready=report.ready,
        recorder=recorder, notifier=Notifier(), metrics_sock=None, control=None, pidfile_fd=None,
        handed_over=lambda: None, lease=lease, slot=slot,
        overrides=runtime.overrides | {"cluster.node_id": (cfg.cluster.node_id, "[server] workers")})
