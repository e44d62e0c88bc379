"""`chatd upgrade` with `[server] workers` > 1 (README "Live upgrade"): every worker, then the
supervisor, runs the chatd installed now, and no client notices.

The supervisor serves the control socket (`Desk`) for this one command; the others need one
process that holds every client, and are refused. The upgrade (`Rolling`) goes one worker
at a time, so that the others accept meanwhile and a new version that cannot start is found
out on the first: the supervisor asks the worker on its report socket, and the worker does
what a single daemon does (upgrade.Handover): it starts the new code, hands it its clients,
its listeners and its report socket, and exits once the new process serves. The new worker
is the old one's child; the supervisor is a child subreaper (daemon.become_subreaper), so
it becomes the supervisor's, which reaps it and stops it as any worker, and the new worker
then dies with the supervisor as a forked one does (workers.rejoin). Last, the supervisor
re-executes itself (`reexec`): the same pid, so systemd, the pid file and the workers keep
their parent; its state record goes in a memfd named by CHATD_RESUME, its descriptors stay
open across the exec, and its caught signals are blocked until the new code has installed
its own handlers (signals.SignalRecorder.install). The new supervisor (`resume`) answers
`chatd upgrade`.

If a worker's upgrade fails, that worker serves on unchanged, and so do the ones after it;
those before it already run the new code. That cannot happen for a new version that does
not start (the first worker finds it), only for one that fails now and then; the answer
says which workers run what, and `chatd upgrade` again finishes the job.

Tests: tests/cluster/test_upgrade_workers.py
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from . import __version__, daemon
from .errors import EXIT_FAILED, ChatdError
from .moderation import REQUEST_MAX, REQUEST_TIMEOUT_S, ControlSocket, Doorman, failure, parse_request, \
    upgrade_timeout
from .server import daemon_record, state_fields
from .signals import held_signals
from .state import RestartOutcome

if TYPE_CHECKING:
    from .workers import Supervisor, Worker

log = logging.getLogger("chatd")

ENV = "CHATD_RESUME"     # the memfd holding a re-executed supervisor's record
ANSWER_MARGIN_S = 10.0   # past the upgrade's timeout: a worker that has not answered by then failed


def answer(conn: socket.socket, message: dict[str, Any]) -> None:
    """One answer line, and the control client's connection closed (a line that small fits
    its buffer, so the supervisor never waits on a client)."""
    try:
        conn.setblocking(False)
        conn.send(json.dumps(message).encode() + b"\n")
    except OSError:
        pass
    conn.close()


class Desk:
    """The supervisor's control socket: `chatd upgrade`, one JSON line in and one out, read
    without blocking the supervisor's loop (each client has REQUEST_TIMEOUT_S to ask)."""

    def __init__(self, supervisor: Supervisor, control: ControlSocket | None) -> None:
        self.supervisor = supervisor
        self.control = control
        self.doorman = Doorman()
        self.asking: dict[int, tuple[socket.socket, bytearray, float]] = {}
        if control is not None:
            control.sock.setblocking(False)

    def fds(self) -> list[int]:
        """What to wait on: the socket and the clients still asking (the late ones dropped)."""
        if self.control is None:
            return []
        now = time.monotonic()
        for fd, (conn, _, deadline) in list(self.asking.items()):
            if now > deadline:
                del self.asking[fd]
                conn.close()
        return [self.control.sock.fileno(), *self.asking]

    def readable(self, fd: int) -> None:
        assert self.control is not None
        if fd == self.control.sock.fileno():
            try:
                conn, _ = self.control.sock.accept()
            except OSError:
                return
            _, _, refusal = self.doorman.refusal(conn)
            if refusal is not None:
                return answer(conn, refusal)
            conn.setblocking(False)
            self.asking[conn.fileno()] = (conn, bytearray(), time.monotonic() + REQUEST_TIMEOUT_S)
            return
        conn, buffer, _ = self.asking[fd]
        try:
            data = conn.recv(REQUEST_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        buffer += data
        if data and b"\n" not in buffer and len(buffer) < REQUEST_MAX:
            return
        del self.asking[fd]
        if not data and not buffer:
            return conn.close()
        try:
            self.request(conn, parse_request(bytes(buffer).partition(b"\n")[0]))
        except ChatdError as e:
            answer(conn, failure(e.message, e.status))

    def request(self, conn: socket.socket, request: dict[str, Any]) -> None:
        supervisor = self.supervisor
        if request["cmd"] != "upgrade":
            raise ChatdError(f"chatd {request['cmd']} is not supported with workers > 1 (the clients "
                             f"are spread over {len(supervisor.workers)} processes)")
        timeout = upgrade_timeout(request)
        if supervisor.rolling is not None:
            raise ChatdError("an upgrade is in progress")
        if supervisor.stop_signal is not None:
            raise ChatdError("chatd is stopping")
        down = [w.slot for w in supervisor.workers.values() if not w.serving]
        if down:   # found now, not after the workers before it have moved on (a mix of versions)
            raise ChatdError(f"worker {down[0]} is not serving (it is being started again); nothing "
                             f"changed: try again once it serves")
        supervisor.rolling = Rolling(supervisor, conn, timeout)

    def forget(self) -> None:
        """In a forked worker: the control socket and its clients are the supervisor's."""
        for conn, _, _ in self.asking.values():
            conn.close()
        if self.control is not None:
            self.control.sock.close()

    def close(self) -> None:
        for conn, _, _ in self.asking.values():
            conn.close()
        self.asking.clear()


class Rolling:
    """One `chatd upgrade` of every worker in turn, then of the supervisor; `step` moves it on
    from the supervisor's loop."""

    TICK_S = 0.02   # the supervisor's loop wakes this often meanwhile

    def __init__(self, supervisor: Supervisor, conn: socket.socket, timeout: float) -> None:
        self.supervisor = supervisor
        self.conn = conn
        self.timeout = timeout
        self.began = time.monotonic()
        self.deadline = self.began + timeout
        self.queue = sorted(supervisor.workers)
        self.current: Worker | None = None
        self.old_pid = 0
        self.upgraded: list[int] = []   # the slots that run the new code
        self.clients = 0
        self.version = ""
        log.info("upgrade: %d workers, one at a time, then the supervisor", len(self.queue))
        supervisor.runtime.notifier.reloading()

    def step(self) -> None:
        worker = self.current
        if worker is None:
            return self._next()
        if worker.answer is not None:
            said, worker.answer, self.current = worker.answer, None, None
            if not said.get("ok"):
                status = said.get("status")
                return self.fail(f"worker {worker.slot} (pid {self.old_pid}): {said.get('error')}",
                                 status if type(status) is int else EXIT_FAILED)
            self.clients += int(said.get("clients") or 0)
            self.version = str((said.get("new") or {}).get("version"))
            log.info("upgrade: worker %d: pid %d handed %s clients to pid %d (chatd %s)", worker.slot,
                     self.old_pid, said.get("clients"), worker.pid, self.version)
            self._moved(worker)
        elif not worker.pid:
            self.fail(f"worker {worker.slot} (pid {self.old_pid}) died during its upgrade")
        elif worker.pid != self.old_pid and not worker.leaving:   # it died past its commit, unheard
            log.warning("upgrade: worker %d: pid %d died after handing its clients to pid %d",
                        worker.slot, self.old_pid, worker.pid)
            self.current = None
            self._moved(worker)
        elif time.monotonic() > self.deadline + ANSWER_MARGIN_S:
            self.fail(f"worker {worker.slot} (pid {self.old_pid}) did not answer within "
                      f"{self.timeout + ANSWER_MARGIN_S:g} s")

    def _moved(self, worker: Worker) -> None:
        """`worker`'s slot runs the new code."""
        self.upgraded.append(worker.slot)
        self.supervisor.runtime.state.update(workers=[w.pid for w in self.supervisor.workers.values()])

    def _next(self) -> None:
        if not self.queue:
            return self.reexec()
        worker = self.supervisor.workers[self.queue.pop(0)]
        left = self.deadline - time.monotonic()
        if not worker.serving:   # it died during the upgrade: the request found all serving
            return self.fail(f"worker {worker.slot} is not serving (it is being started again)")
        if left <= 0:
            return self.fail(f"not done within {self.timeout:g} s")
        self.current, self.old_pid, worker.answer = worker, worker.pid, None
        try:
            os.write(worker.report, json.dumps({"cmd": "upgrade", "timeout": round(left, 3),
                                                "deadline": self.deadline}).encode() + b"\n")
        except OSError as e:
            self.fail(f"worker {worker.slot} (pid {worker.pid}): cannot ask it: {e.strerror}")

    def fail(self, why: str, status: int = EXIT_FAILED) -> None:
        """Answer why; what is upgraded stays so (the module docstring)."""
        supervisor = self.supervisor
        if self.upgraded:
            why += (f"; worker{'s' if len(self.upgraded) > 1 else ''} "
                    f"{', '.join(map(str, self.upgraded))} already run{'' if len(self.upgraded) > 1 else 's'} "
                    f"chatd {self.version}, the supervisor and the others chatd {__version__}")
        log.warning("upgrade failed: %s", why)
        supervisor.rolling = None
        supervisor.last_upgrade = {"time": time.time(), "failed": why}
        supervisor.runtime.state.update(last_upgrade=supervisor.last_upgrade)
        answer(self.conn, failure(why, status))
        if supervisor.stop_signal is None:
            supervisor.runtime.notifier.ready(supervisor.status_text())

    def reexec(self) -> None:
        """The supervisor runs the new code in its own process (the module docstring); on
        success this never returns."""
        supervisor, runtime = self.supervisor, self.supervisor.runtime
        fds: list[int] = []

        def slot(fd: int) -> int:
            fds.append(fd)
            return len(fds) - 1
        now = time.monotonic()
        record = daemon_record(supervisor.cfg, supervisor.listeners, runtime, self.began, slot)
        record["supervisor"] = {
            "generation": supervisor.generation, "started": supervisor.started,
            "last_restart": supervisor.last_restart.to_state() if supervisor.last_restart else None,
            "signals": list(supervisor.signals), "state": runtime.state.data,
            "answer": slot(self.conn.fileno()), "clients": self.clients,
            "workers": [{"slot": w.slot, "pid": w.pid, "report": None if w.report < 0 else slot(w.report),
                         "lease": w.lease, "ready": w.ready, "clients": w.clients, "loop": w.loop,
                         "deaths": w.deaths, "age": now - w.started, "due_in": max(0.0, w.due - now)}
                        for w in supervisor.workers.values()]}
        record["fd_numbers"] = fds
        memfd = os.memfd_create("chatd-upgrade", 0)
        os.write(memfd, json.dumps(record).encode())
        command = runtime.command
        for fd in (*fds, memfd):
            os.set_inheritable(fd, True)
        log.info("upgrade: the workers run chatd %s; the supervisor runs it next (exec %s)",
                 self.version, command[0])
        try:
            with held_signals():   # until the new code catches them: none acted on by default
                daemon.reexec(command, dict(os.environ, **{ENV: str(memfd)}))
        except OSError as e:
            for fd in fds:
                if fd > 2:
                    os.set_inheritable(fd, False)
            os.close(memfd)
            self.fail(f"the supervisor cannot run {command[0]}: {e.strerror or e}")


def resumed() -> tuple[dict[str, Any], list[int]] | None:
    """The record a re-executed supervisor left in the memfd CHATD_RESUME names, and its
    descriptors; None if this process was not started so."""
    value = os.environ.pop(ENV, None)
    if value is None:
        return None
    try:
        fd = int(value)
        with os.fdopen(fd, "rb") as memfd:
            memfd.seek(0)
            record = json.loads(memfd.read())
        fds = [int(n) for n in record["fd_numbers"]]
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise ChatdError(f"{ENV}={value!r}: no supervisor's record there: {e}") from None
    for fd in fds:
        if fd > 2:
            os.set_inheritable(fd, False)
    return record, fds


def resume(supervisor: Supervisor, record: dict[str, Any], fds: list[int]) -> None:
    """The supervisor's `startup` after its re-exec: its workers as they were, then the
    answer to `chatd upgrade`."""
    saved = record["supervisor"]
    now = time.monotonic()
    supervisor.generation = int(saved["generation"])
    supervisor.started = float(saved["started"])
    supervisor.last_restart = RestartOutcome.from_state(saved["last_restart"])
    supervisor.signals.extend(int(s) for s in saved["signals"])
    for entry in saved["workers"]:
        worker = supervisor.workers[int(entry["slot"])]
        worker.pid, worker.lease, worker.ready = int(entry["pid"]), str(entry["lease"]), bool(entry["ready"])
        worker.clients, worker.loop, worker.deaths = int(entry["clients"]), str(entry["loop"]), int(entry["deaths"])
        worker.started, worker.due = now - float(entry["age"]), now + float(entry["due_in"])
        if entry["report"] is not None:
            worker.report = fds[entry["report"]]
            os.set_blocking(worker.report, False)
    took = now - float(record["began"])
    supervisor.last_upgrade = {"time": time.time(), "from": record["version"], "to": __version__,
                               "from_pid": record["pid"], "clients": saved["clients"], "took_s": round(took, 3)}
    supervisor.clients = sum(w.clients for w in supervisor.workers.values())
    runtime = supervisor.runtime
    runtime.state.update(**state_fields(supervisor.cfg, supervisor.listeners, supervisor.loop_name(),
                                        runtime.logs, supervisor.clients),
                         pid=os.getpid(), version=__version__, last_upgrade=supervisor.last_upgrade,
                         workers=[w.pid for w in supervisor.workers.values()])
    log.info("upgraded from chatd %s: %d workers and the supervisor (pid %d) in %.3f s, %d clients "
             "carried over", record["version"], len(supervisor.workers), os.getpid(), took, saved["clients"])
    answer(socket.socket(fileno=fds[saved["answer"]]),
           {"ok": True, "old": {"version": record["version"], "pid": record["pid"]},
            "new": {"version": __version__, "pid": os.getpid()}, "took_s": round(took, 3),
            "clients": saved["clients"]})
    runtime.notifier.ready(supervisor.status_text())
