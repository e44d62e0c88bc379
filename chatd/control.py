"""The commands: start, run, stop, restart, reload, status, check-config, and the moderation
commands (who, kick, ban, unban, bans, say, stats). Each returns an LSB status.

They follow libucw's daemon-control protocol: every command holds the guard
lock while it looks at the pid file and acts, so concurrent commands never
leave two daemons or none; "running" means "the pid-file lock is held".
A command's result goes to `Console.say` (stdout), notes and warnings to
`Console.warn` (stderr); failures are raised as ChatdError, and `cli` prints
each once. Which instance a command acts on, and when it refuses to: `instance`. What a
started daemon does, from its pid file to its exit, is `lifetime`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from . import config as config_mod, daemon, files, instance, upgrade
from .config import Config
from .daemon import ReadinessPipe
from .errors import (EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_NOT_RUNNING_RELOAD, EXIT_OK, EXIT_PRIVILEGE,
                     ChatdError, PrivilegeError, StartError)
from .lifetime import Launch, serve
from .log import log, resolve_target
from .moderation import duration_text, peer_credentials, via_directory
from .paths import SYSTEM_DIR, InstancePaths, check_log_file, instance_paths, prepare_directory, secured
from .pidfile import AlreadyRunning, Probe, clear_stale, guard, open_holder, probe
from .notify import Notifier, listen_fds, supervised, take_upstart_job
from .signals import SignalRecorder
from .state import RestartOutcome, read_state

Say = Callable[[str], None]


@dataclass(frozen=True)
class Console:
    """Where a command's words go: its result to stdout, notes and warnings to stderr.

    Failures are not said here: they are raised, and `cli` prints each once.
    """

    say: Say
    warn: Say

START_TIMEOUT_S = 60.0     # how long the invoker waits for the daemon's word
RESTART_TIMEOUT_S = 15.0   # how long restart/reload wait for the outcome
KILL_WAIT_S = 5.0          # after SIGTERM, then after SIGKILL


@dataclass
class Options:
    """The command line, parsed: what to do and the settings given for it."""

    command: str = "start"
    config: str | None = None
    overrides: dict[str, tuple[str, str]] = field(default_factory=dict)   # key -> (value, flag)
    timeout: float | None = None
    json: bool = False
    cwd: str = field(default_factory=os.getcwd)
    request: dict[str, Any] = field(default_factory=dict)   # a moderation command's, for X.sock


def load_config(opts: Options) -> Config:
    return config_mod.load(opts.config, opts.overrides, cwd=opts.cwd)


def _find_instance(opts: Options, out: Console | None) -> tuple[Config | None, InstancePaths]:
    """The config and the instance's file names, through the pid directory's resolved path once
    the whole path is found safe (`secured`); a broken config is a warning (to `out`)."""
    cfg, paths, problem = instance.find(opts.config, opts.overrides, opts.cwd)
    if problem and out is not None:
        out.warn(f"warning: {problem}; using pid file {paths.pidfile}")
    _trust_drop_user(cfg)
    return cfg, _secured(paths)


def _secured(paths: InstancePaths) -> InstancePaths:
    """`paths.secured`, where the pid directory's owner may own chatd's files (`files`)."""
    return secured(paths, files.trusted_for(paths.pidfile))


def _trust_drop_user(cfg: Config | None) -> None:
    """A daemon that dropped privileges runs as its `user`: trust that user's files and locks."""
    with contextlib.suppress(ChatdError):
        if cfg is not None:
            files.trust(daemon.check_privilege_drop(cfg.daemon.user, cfg.daemon.group))


def _refuse_mismatch(opts: Options, paths: InstancePaths, found: Probe, what: str,
                     status: int) -> dict[str, Any] | None:
    """Fail if the options describe another server than the one running (see `instance`);
    else the running one's state, as read for the comparison."""
    wanted = instance.requested(opts.overrides, opts.cwd)
    state = read_state(paths.state)
    differ = instance.mismatches(wanted, state)
    if differ:
        raise instance.mismatch_error(paths, found.pid, state, differ, what, opts.command, status)
    return state


def _check_not_running(found: Probe, out: Console) -> Probe:
    """A locked pid file that does not name a process holding the lock itself was not written
    by chatd: someone holds a lock on it to keep chatd from starting. Replace it (under the
    guard). One naming another user's process, which we cannot check, is refused."""
    if found.running and found.problem:
        if found.pid is not None:
            raise PrivilegeError(f"pid file {found.path} is locked, but {found.problem}; "
                                 f"not starting anything")
        out.warn(f"warning: pid file {found.path} is locked, but {found.problem}; replacing it")
        try:
            os.unlink(found.path)
        except OSError as e:
            raise PrivilegeError(f"cannot replace pid file {found.path}: {e.strerror}") from None
        return probe(found.path)
    return found


# ---------------------------------------------------------------------- start and run

def _prepare(opts: Options, foreground: bool, notifier: Notifier | None = None) -> Launch:
    """Everything that can be checked before forking: config, log target, privileges, pid
    directory and log file; and the sockets socket activation handed to this very process."""
    cfg = load_config(opts)
    target = resolve_target(cfg, foreground=foreground)
    files.trust(daemon.check_privilege_drop(cfg.daemon.user, cfg.daemon.group))
    paths = prepare_directory(cfg, instance_paths(cfg))
    if target not in ("syslog", "stderr"):
        resolved = check_log_file(target or paths.fallback_log)
        target = resolved if target else ""
    return Launch(cfg, target, paths, detached=not foreground, notifier=notifier or Notifier(),
                  activated=listen_fds(), upstart=foreground and take_upstart_job(),
                  command=upgrade.own_command(opts.cwd))


def start(opts: Options, out: Console) -> int:
    """Detach and serve; return 0 only once the daemon serves (or was already running).

    Under a supervisor (NOTIFY_SOCKET or UPSTART_JOB set) chatd never detaches:
    the supervisor tracks the pid it started, so `start` serves as `run` does.
    Options that describe another server than the running one fail (`instance`).
    """
    if supervised():
        return run(opts, out)
    launch = _prepare(opts, foreground=False)
    with guard(launch.paths.guard):
        found = _check_not_running(probe(launch.paths.pidfile), out)
        if found.running:
            state = _refuse_mismatch(opts, launch.paths, found, "not starting anything", EXIT_FAILED)
            out.say(f"chatd is already running (pid {found.pid}): {instance.describe(state)}")
            return EXIT_OK
        launch.recorder.install(detached=True)
        pipe = ReadinessPipe()
        child = daemon.fork_invoker()
        if child:
            return _wait_for_daemon(pipe, child, launch.paths, launch.recorder, out)
        _become_daemon(launch, pipe)   # never returns


def _become_daemon(launch: Launch, pipe: ReadinessPipe) -> None:
    """In the first child: detach, serve, and exit with the daemon's status."""
    code = EXIT_FAILED
    try:
        os.close(pipe.r)
        daemon.detach_session()
        daemon.fork_again()
        pipe.send(event="pid", pid=os.getpid())
        daemon.close_inherited_fds(keep={pipe.w} | {a.sock.fileno() for a in launch.activated})
        daemon.set_umask()
        daemon.change_directory()
        code = serve(launch, pipe.ready)
    except ChatdError as e:
        pipe.fail(e)
        code = e.status
    except BaseException as e:   # noqa: BLE001 - the invoker must hear of any failure
        pipe.fail(ChatdError(f"internal error: {type(e).__name__}: {e}"))
        log.error("internal error: %s: %s", type(e).__name__, e)
    daemon.end(code)


def _wait_for_daemon(pipe: ReadinessPipe, child: int, paths: InstancePaths,
                     recorder: SignalRecorder, out: Console) -> int:
    """The invoker's side: reap the middle child, then wait for the daemon's word."""
    os.waitpid(child, 0)
    forwarded: set[int] = set()

    def forward_stop(pid: int | None) -> None:
        # Ctrl-C on `chatd start` aborts the start, even after the daemon left our session.
        sig = recorder.stop_requested()
        if sig is not None and pid and sig not in forwarded:
            forwarded.add(sig)
            with contextlib.suppress(OSError):
                os.kill(pid, sig)

    message = pipe.wait(START_TIMEOUT_S, forward_stop)
    event = message.get("event")
    if event == "ready":
        log_note = message.get("log", "")
        out.say(f"chatd started (pid {message['pid']}): {message.get('mode')} mode on "
            f"{message.get('address')}, event loop {message.get('loop')}, log: {log_note}")
        return EXIT_OK
    pid = message.get("pid")
    if event == "timeout" and pid:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if pid:
        _wait_exited(pid, KILL_WAIT_S)   # the pipe closes a moment before the process is gone
    clear_stale(paths.pidfile)
    if event == "fail":
        raise ChatdError(message.get("message", "failed"), message.get("status", EXIT_FAILED))
    if event == "timeout":
        raise StartError(f"no word from the daemon (pid {pid}) within {START_TIMEOUT_S:g} s; killed it")
    raise StartError("the daemon exited during start-up without saying why")


def run(opts: Options, out: Console) -> int:
    """Serve in the foreground (systemd, supervisors, containers, a terminal).

    Under systemd a failed start is also reported on the notify socket (ERRNO=).
    """
    notifier = Notifier.from_environment()
    try:
        launch = _prepare(opts, foreground=True, notifier=notifier)
        with contextlib.ExitStack() as held:
            held.enter_context(guard(launch.paths.guard))
            found = _check_not_running(probe(launch.paths.pidfile), out)
            if found.running:
                state = _refuse_mismatch(opts, launch.paths, found, "not starting anything", EXIT_FAILED)
                raise AlreadyRunning(launch.paths.pidfile, found.pid, instance.describe(state))
            launch.recorder.install(detached=False)

            def ready(**info: Any) -> None:
                held.close()   # the guard: other commands may look now
                if launch.upstart:
                    os.kill(os.getpid(), signal.SIGSTOP)   # upstart continues us (SIGCONT)

            return serve(launch, ready)
    except ChatdError as e:
        notifier.failed(e.errno_value, e.message)
        raise
    finally:
        notifier.close()


# ---------------------------------------------------------------------- stop

def _process_start_time(pid: int) -> str | None:
    """The process's start time (field 22 of /proc/PID/stat), or None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def _wait_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _process_start_time(pid) is not None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.005)
    return True


def _signal(pidfd: int, pid: int, sig: int) -> None:
    """Send `sig` through the daemon's pidfd (`pidfile.open_holder`): it reaches that process or none."""
    try:
        signal.pidfd_send_signal(pidfd, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        raise PrivilegeError(f"not allowed to signal chatd (pid {pid}): it belongs to another user") from None


def _gone(paths: InstancePaths, pidfd: int, timeout: float) -> bool:
    """Wait until the pid-file lock is free and the process has exited (its pidfd is readable)."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if select.select([pidfd], [], [], 0)[0] and not probe(paths.pidfile).running:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def stop(opts: Options, out: Console) -> int:
    """Graceful stop: SIGUSR1 (and SIGCONT), wait for the exit; SIGTERM, then SIGKILL, if it hangs."""
    cfg, paths = _find_instance(opts, out)
    drain = cfg.daemon.drain_timeout if cfg else config_mod.KEYS["daemon.drain_timeout"].default
    timeout = opts.timeout if opts.timeout is not None else drain + 5
    with guard(paths.guard):
        found = probe(paths.pidfile)
        if found.foreign:
            out.say(f"chatd is not running (pid file {found.path} is locked, but {found.problem})")
            return EXIT_OK
        if not found.running:
            if found.content.strip():
                clear_stale(paths.pidfile)
                out.say(f"chatd is not running (removed a stale pid file naming "
                        f"{found.content.strip().decode(errors='replace')[:20]})")
            else:
                out.say("chatd is not running")
            return EXIT_OK
        _refuse_mismatch(opts, paths, found, "not stopping it", EXIT_FAILED)
        pidfd = open_holder(found)
        try:
            return _stop(paths, pidfd, found.pid or 0, timeout, out)
        finally:
            os.close(pidfd)


def _stop(paths: InstancePaths, pidfd: int, pid: int, timeout: float, out: Console) -> int:
    """SIGUSR1 and SIGCONT; after `timeout` SIGTERM, then SIGKILL: all through the pidfd."""
    _signal(pidfd, pid, signal.SIGUSR1)
    _signal(pidfd, pid, signal.SIGCONT)
    if _gone(paths, pidfd, timeout):
        out.say(f"chatd stopped (pid {pid})")
        return EXIT_OK
    out.warn(f"chatd (pid {pid}) has not stopped after {timeout:g} s; sending SIGTERM")
    _signal(pidfd, pid, signal.SIGTERM)
    if _gone(paths, pidfd, KILL_WAIT_S):
        out.say(f"chatd stopped by SIGTERM (pid {pid})")
        return EXIT_OK
    out.warn(f"chatd (pid {pid}) ignored SIGTERM for {KILL_WAIT_S:g} s; sending SIGKILL")
    _signal(pidfd, pid, signal.SIGKILL)
    if _gone(paths, pidfd, KILL_WAIT_S):
        clear_stale(paths.pidfile)
        raise ChatdError(f"chatd (pid {pid}) had to be killed with SIGKILL", EXIT_FAILED)
    raise ChatdError(f"chatd (pid {pid}) survived SIGKILL")


# ---------------------------------------------------------------------- restart and reload

def restart(opts: Options, out: Console, reload: bool = False) -> int:
    """SIGHUP: the daemon re-reads its config and applies it in place; print the outcome.

    `restart` starts a stopped chatd; `reload` (LSB) does not, and exits 7. A running
    chatd keeps the options it was started with and re-reads only its config file, so
    options that differ from the running ones fail rather than being ignored. A broken
    config file is not warned about here: the daemon's verdict says why, once.
    """
    _, paths = _find_instance(opts, None)
    with guard(paths.guard):
        found = probe(paths.pidfile)
        if found.running and not found.foreign:
            before = _refuse_mismatch(opts, paths, found,
                                      "a running chatd keeps the options it was started with and "
                                      "re-reads only its config file (set the value there, or stop "
                                      "it and start it with the new options)", EXIT_FAILED)
            return _restart_running(found, paths, out, before or {})
    if reload:
        raise ChatdError("chatd is not running", EXIT_NOT_RUNNING_RELOAD)
    out.warn("chatd is not running; starting it")
    return start(opts, out)


def _restart_running(found: Probe, paths: InstancePaths, out: Console, before: dict[str, Any]) -> int:
    """SIGHUP, then wait until the state file's generation grows past `before`'s."""
    pid = found.pid or 0
    generation = before.get("generation")
    generation = generation if isinstance(generation, int) else -1
    pidfd = open_holder(found)
    try:
        _signal(pidfd, pid, signal.SIGHUP)
    finally:
        os.close(pidfd)
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        now = read_state(paths.state) or {}
        gen = now.get("generation")
        outcome = RestartOutcome.from_state(now.get("last_restart"))
        if isinstance(gen, int) and gen > generation and outcome is not None:
            if outcome.kind == "applied":
                out.say(f"chatd restarted in place (pid {pid}): {outcome.message}")
                return outcome.exit_status
            if outcome.kind == "rejected":
                raise ChatdError(f"config rejected; still serving with the old one: {outcome.message}",
                                 outcome.exit_status)
            raise ChatdError(f"restart failed; still serving as before: {outcome.message}", outcome.exit_status)
        time.sleep(0.02)
    raise ChatdError(f"no answer from chatd (pid {pid}) within {RESTART_TIMEOUT_S:g} s")


# ---------------------------------------------------------------------- status

def status(opts: Options, out: Console) -> int:
    """Is it running? 0 yes, 1 dead with a pid file, 3 not running, 4 cannot tell.

    With `--json` the answer is one JSON object on stdout (`STATUS_KEYS`), whatever the
    exit status. A running instance that is not the server the options describe is not
    what was asked about: 3, with the reason.
    """
    try:
        cfg, paths = _find_instance(opts, out)
        candidates = [paths]
        explicit = opts.config or "daemon.pidfile" in opts.overrides or (cfg and cfg.daemon.pidfile)
        if not explicit and paths.default_dir and os.path.dirname(paths.pidfile) != SYSTEM_DIR:
            candidates.append(_secured(instance_paths(cfg or Config(), directory=SYSTEM_DIR)))
    except PrivilegeError as e:
        raise ChatdError(f"cannot tell: {e}", EXIT_PRIVILEGE) from None
    first: Probe | None = None
    for where in candidates:
        try:
            with guard(where.guard, read_only=True):
                found = probe(where.pidfile)
        except ChatdError as e:
            raise ChatdError(f"cannot tell: {e}", EXIT_PRIVILEGE) from None
        if found.foreign:
            raise ChatdError(f"cannot tell: pid file {found.path} is locked, but {found.problem}",
                             EXIT_PRIVILEGE)
        if found.running:
            try:
                state = _refuse_mismatch(opts, where, found, "so no chatd here is the one those "
                                         "options describe", EXIT_NOT_RUNNING)
            except ChatdError as e:
                if not opts.json:
                    raise
                _print_json(_report(None, where) | {"mismatch": e.message}, out)
                return e.status
            report = _report(found, where, state)
            _print_json(report, out) if opts.json else _print_status(report, out)
            return EXIT_OK
        first = first or found
        if found.exists:
            break
    assert first is not None
    stale = first.content.strip().decode(errors="replace")[:20]
    if opts.json:
        _print_json(_report(None, paths) | {"pidfile": first.path, "stale_pid": stale or None}, out)
    elif stale:
        out.say(f"chatd is not running, but its pid file {first.path} still names "
                f"{stale} (it crashed or was killed)")
    else:
        out.say("chatd is not running")
    return EXIT_FAILED if stale else EXIT_NOT_RUNNING


# `status --json`: these keys, always all of them (null where unknown or not running).
STATUS_KEYS = ("running", "pid", "version", "address", "mode", "clients", "uptime_s", "started",
               "event_loop", "log", "last_restart", "last_upgrade", "pidfile", "config", "stale_pid",
               "pid_problem")


def _report(found: Probe | None, paths: InstancePaths, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """The status of an instance (its state file's `state`, when running) as one dict: the
    text form and `--json` both show it."""
    report: dict[str, Any] = dict.fromkeys(STATUS_KEYS)
    report |= {"running": found is not None, "pidfile": paths.pidfile}
    if found is None:
        return report
    st = state or {}
    started = st.get("started")
    last = st.get("last_restart")
    report |= {"pid": found.pid, "version": st.get("version"), "address": st.get("address"),
               "mode": st.get("mode"), "clients": st.get("clients"), "event_loop": st.get("loop"),
               "log": st.get("log"), "config": st.get("config"),
               "last_restart": last if isinstance(last, dict) else None,
               "last_upgrade": st.get("last_upgrade") if isinstance(st.get("last_upgrade"), dict) else None}
    if isinstance(started, (int, float)):
        report |= {"started": started, "uptime_s": round(max(0.0, time.time() - started), 3)}
    if found.pid is None:
        report["pid_problem"] = found.problem
    return report


def _print_json(report: dict[str, Any], out: Console) -> None:
    out.say(json.dumps(report, sort_keys=False))


def _print_status(report: dict[str, Any], out: Console) -> None:
    out.say(f"chatd is running (pid {report['pid'] or 'unknown: ' + report['pid_problem']})")
    uptime = report["uptime_s"]
    last = report["last_restart"]
    if last:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time", 0)))
        last_text = f"{when} {last.get('outcome')}: {last.get('message')}"
    else:
        last_text = "never"
    for key, value in (("address", report["address"]), ("mode", report["mode"]),
                       ("clients", report["clients"]),
                       ("uptime", None if uptime is None else duration_text(uptime)),
                       ("event loop", report["event_loop"]), ("log", report["log"]),
                       ("last restart", last_text),
                       ("last upgrade", _upgrade_text(report["last_upgrade"])), ("pid file", report["pidfile"]),
                       ("config", report["config"] or "none (defaults)"),
                       ("version", report["version"])):
        out.say(f"{key}: {'unknown' if value is None else value}")


def _upgrade_text(last: dict[str, Any] | None) -> str:
    """`status`'s line for the last `chatd upgrade`: when, from what, or why it failed."""
    if not last:
        return "never"
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(last.get("time") or 0))
    if "failed" in last:
        return f"{when} failed, still the old code: {last.get('failed')}"
    return (f"{when} from {last.get('from')} (pid {last.get('from_pid')}), {last.get('clients')} "
            f"clients carried over in {last.get('took_s')} s")


# ---------------------------------------------------------------------- check-config

def check_config(opts: Options, out: Console) -> int:
    cfg = load_config(opts)
    if cfg.path:
        out.say(f"{cfg.path}: OK")
    else:
        out.say("no config file given (-c): the defaults and the command-line options are valid")
    return EXIT_OK


# ---------------------------------------------------------------------- moderation

CONTROL_TIMEOUT_S = 10.0     # for the daemon's answer on the control socket
UPGRADE_MARGIN_S = 15.0      # past an upgrade's own timeout: killing the new code, taking back
ANSWER_MAX = 64 << 20        # bytes of one answer (`who` of 10,000 clients is about 2 MB)


def moderate(opts: Options, out: Console) -> int:
    """who, kick, ban, unban, bans, say, stats: `opts.request` to the daemon's control socket
    (moderation.py), found as `status` finds the daemon. 0 done; 1 the daemon refused (no
    such nick, ...), or workers > 1; 4 another user's chatd; 7 not running (as reload)."""
    _, paths = _find_instance(opts, out)
    with guard(paths.guard, read_only=True):
        found = probe(paths.pidfile)
    answer = _control(opts, paths, found, CONTROL_TIMEOUT_S)
    SHOW[opts.command](answer, opts.json, out)
    return EXIT_OK


def upgrade_daemon(opts: Options, out: Console) -> int:
    """`chatd upgrade` (upgrade.py): the running daemon hands everything to the chatd installed
    now. 0 upgraded; 1 not upgraded, the old one still serving (with the new code's reason);
    7 not running. It holds the guard lock throughout, so a restart, a stop or a second
    upgrade waits for it."""
    _, paths = _find_instance(opts, out)
    timeout = opts.timeout if opts.timeout is not None else upgrade.DEFAULT_TIMEOUT_S
    if timeout > upgrade.MAX_TIMEOUT_S:
        raise ChatdError(f"--timeout: at most {upgrade.MAX_TIMEOUT_S:g} s for an upgrade", EXIT_USAGE)
    with guard(paths.guard):
        found = probe(paths.pidfile)
        before = read_state(paths.state) or {}
        opts.request = {"cmd": "upgrade", "timeout": timeout}
        try:
            answer = _control(opts, paths, found, timeout + UPGRADE_MARGIN_S)
        except ChatdError as e:
            if e.status in (EXIT_NOT_RUNNING_RELOAD, EXIT_PRIVILEGE):
                raise
            raise ChatdError(f"upgrade failed; chatd {before.get('version', '')} (pid {found.pid}) "
                             f"still serving: {e.message}", EXIT_FAILED) from None
    old, new = answer.get("old") or {}, answer.get("new") or {}
    out.say(f"chatd upgraded from {old.get('version')} (pid {old.get('pid')}) to {new.get('version')} "
            f"(pid {new.get('pid')}) in {answer.get('took_s')} s; {answer.get('clients')} clients "
            f"carried over")
    return EXIT_OK


def _control(opts: Options, paths: InstancePaths, found: Probe, timeout: float) -> dict[str, Any]:
    """`opts.request` to the running daemon's control socket; its answer if it did it."""
    if found.foreign or (found.running and found.pid is None):
        raise PrivilegeError(f"cannot tell whether chatd runs: pid file {found.path} is locked, "
                             f"but {found.problem}")
    if not found.running:
        raise ChatdError("chatd is not running", EXIT_NOT_RUNNING_RELOAD)
    state = _refuse_mismatch(opts, paths, found, "not acting on it", EXIT_FAILED) or {}
    workers = (state.get("settings") or {}).get("server.workers", 1)
    if isinstance(workers, int) and workers > 1 and opts.command != "upgrade":
        raise ChatdError(f"chatd {opts.command} is not supported with workers > 1 (the clients "
                         f"are spread over {workers} processes)")
    answer = _ask(paths.control, found.pid or 0, opts.request, timeout)
    if not answer.get("ok"):
        status = answer.get("status")
        raise ChatdError(str(answer.get("error")), status if isinstance(status, int) else EXIT_FAILED)
    return answer


def _ask(path: str, pid: int, request: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One request, one answer, from the process `pid` alone (SO_PEERCRED): what is at `path`
    must be a socket, and whatever else listens there is not believed."""
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ChatdError(f"cannot reach control socket {path}: {e.strerror}") from None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            if not stat.S_ISSOCK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise PrivilegeError(f"control socket {path} is not a socket; refusing it")
            sock.settimeout(timeout)
            sock.connect(via_directory(dir_fd, name))
            if peer_credentials(sock)[0] != pid:
                raise PrivilegeError(f"control socket {path} is not served by chatd (pid {pid}); "
                                     f"refusing it")
            try:
                sock.sendall(json.dumps(request).encode() + b"\n")
            except BrokenPipeError:
                pass   # answered (refused) and closed before it read: the answer is there
            data = bytearray()
            while not data.endswith(b"\n") and len(data) < ANSWER_MAX:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                data += chunk
        answer = json.loads(data)
        if not isinstance(answer, dict):
            raise ValueError("not an object")
        return answer
    except PermissionError:
        raise PrivilegeError(f"not allowed to use chatd's control socket {path} (only root and "
                             f"the user chatd runs as may)") from None
    except (FileNotFoundError, ConnectionRefusedError):
        raise ChatdError(f"chatd (pid {pid}) has no control socket at {path}") from None
    except TimeoutError:
        raise ChatdError(f"no answer from chatd (pid {pid}) on {path} within "
                         f"{timeout:g} s") from None
    except OSError as e:
        raise ChatdError(f"control socket {path}: {e.strerror or e}") from None
    except ValueError:
        raise ChatdError(f"chatd (pid {pid}) gave no answer on {path}") from None
    finally:
        os.close(dir_fd)


Show = Callable[[dict[str, Any], bool, Console], None]


def _listing(key: str, nothing: str, header: list[str], row: Callable[[dict[str, Any]], list[str]]) -> Show:
    """How an answer that is a list under `key` is shown: as it came (`--json`), else a
    table with `header`, one `row` per item, or `nothing`."""
    def show(answer: dict[str, Any], as_json: bool, out: Console) -> None:
        items = answer.get(key) or []
        if as_json:
            return _print_json({key: items}, out)
        if not items:
            return out.say(nothing)
        rows = [header] + [row(item) for item in items]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for r in rows:
            out.say("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
    return show


def _who_row(c: dict[str, Any]) -> list[str]:
    return [c.get("nick") or "-", c.get("room") or "-", str(c.get("address")),
            duration_text(c.get("connected_s") or 0),
            *("?" if c.get(k) is None else str(c.get(k)) for k in ("bytes_in", "bytes_out"))]


def _ban_row(b: dict[str, Any]) -> list[str]:
    left = b.get("expires_in_s")
    return [str(b.get("ban")), "never (until unbanned)" if left is None else duration_text(left)]


def _kicked(answer: dict[str, Any]) -> str:
    kicked = answer.get("kicked") or []
    return ", ".join(kicked) if kicked else "nobody"


def _show_stats(answer: dict[str, Any], as_json: bool, out: Console) -> None:
    if as_json:
        return _print_json(answer.get("stats") or {}, out)
    out.say(str(answer.get("text")))


SHOW: dict[str, Show] = {
    "who": _listing("clients", "no clients", ["NICK", "ROOM", "ADDRESS", "CONNECTED", "BYTES IN",
                                              "BYTES OUT"], _who_row),
    "kick": lambda a, j, out: out.say(f"kicked {_kicked(a)}"),
    "ban": lambda a, j, out: out.say(f"banned {a.get('ban')}; kicked {_kicked(a)}"),
    "unban": lambda a, j, out: out.say(f"unbanned {a.get('ban')}"),
    "bans": _listing("bans", "no bans", ["BAN", "EXPIRES IN"], _ban_row),
    "say": lambda a, j, out: out.say(f"said to {a.get('clients')} clients"),
    "stats": _show_stats,
}
