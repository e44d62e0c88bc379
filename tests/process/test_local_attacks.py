"""Local attacks on root's chatd (README "Files"), mounted for real: an unprivileged user
(`nobody`, through setpriv, as in test_normal_user.py) plants symlinks, hardlinks, FIFOs and
directories at an instance's paths, or hands a pid-file lock on and lets its pid be recycled by
a root process inside a private pid namespace (`unshare --pid --fork --mount-proc`).

The machine's fs.protected_* sysctls are read, never changed: with protected_hardlinks = 1 the
user may only link files it could write anyway, so the hardlink's target is then a root-owned
world-writable file instead of a root-only one. Every command has a timeout (a hang is a
failure, not a stuck suite); every daemon is stopped by its pid; no output may hold a traceback
or "internal error".
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import require_real
from support import LineClient, alive, chatd_command, free_port, listening, wait_for
from test_normal_user import (AS_NOBODY, CLEAN_ENV, NOBODY, SYSTEM_PYTHON,  # noqa: F401 - fixtures
                              nobody, nobody_can_run_chatd)

UNSHARE = "/usr/bin/unshare"
STAGE = Path(__file__).with_name("pidns_stage.py")
ROOT_ENV = {"HOME": "/root", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
DIRS = {"sticky": (0, 0o1777), "user-owned": (NOBODY, 0o755)}


def sysctl(name: str) -> int:
    return int(Path(f"/proc/sys/fs/{name}").read_text())


def as_nobody(code: str, *args: str) -> None:
    subprocess.run(AS_NOBODY + [SYSTEM_PYTHON, "-c", code, *args], env=CLEAN_ENV, cwd="/", check=True,
                   timeout=30, capture_output=True)


def assert_clean(*procs: subprocess.CompletedProcess) -> None:
    for p in procs:
        text = p.stdout + p.stderr
        assert b"Traceback" not in text and b"internal error" not in text, text


@pytest.mark.parametrize("kind", DIRS)
def test_planted_links_never_make_root_write_through_them(nobody, kind):
    """1. nobody, in a directory it can write (sticky and world-writable, or its own), plants a
    symlink at X.log to a root-only 0600 file and a hardlink at X.pid to a root-owned file.
    2. root: `chatd start --pidfile D/X.pid --log D/X.log`.
    Result: exit 4, the directory refused with the reason; neither target changed (content,
    mode); no daemon, nothing served. (Before: the symlinked file got root's log lines, and the
    hardlinked one was truncated, overwritten with the pid and chmodded 0644.)"""
    owner, mode = DIRS[kind]
    d = nobody.mkdtemp(owner=owner, mode=mode)
    secret_dir = nobody.mkdtemp(owner=0, mode=0o755)
    secret = secret_dir / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    linked = secret_dir / "linked"
    linked.write_bytes(b"do not truncate\n")
    linked.chmod(0o666 if sysctl("protected_hardlinks") else 0o600)
    as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2]); os.link(sys.argv[3], sys.argv[4])",
              str(secret), str(d / "chatd.log"), str(linked), str(d / "chatd.pid"))
    port = free_port()
    proc = nobody.run_as_root("start", "--pidfile", str(d / "chatd.pid"), "--log", str(d / "chatd.log"),
                              "-p", str(port), "--host", "127.0.0.1", timeout=60)
    assert proc.returncode == 4, (proc.returncode, proc.stdout, proc.stderr)
    assert b"refusing it" in proc.stderr and str(d).encode() in proc.stderr, proc.stderr
    assert secret.read_bytes() == b"root only\n" and stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert linked.read_bytes() == b"do not truncate\n"
    assert stat.S_IMODE(linked.stat().st_mode) == (0o666 if sysctl("protected_hardlinks") else 0o600)
    assert not listening(port)
    assert_clean(proc)


def test_explicit_log_directory_is_checked_like_the_pid_directory(nobody):
    """1. root's pid directory is its own; `--log` names a file in a directory nobody owns.
    Result: exit 4, "log directory ... belongs to uid 65534"; nothing created there."""
    d = nobody.mkdtemp(owner=0, mode=0o755)
    logdir = nobody.mkdtemp(owner=NOBODY, mode=0o755)
    proc = nobody.run_as_root("start", "--pidfile", str(d / "chatd.pid"), "--log", str(logdir / "x.log"),
                              "-p", str(free_port()), "--host", "127.0.0.1")
    assert proc.returncode == 4 and b"log directory" in proc.stderr and b"uid 65534" in proc.stderr, proc
    assert os.listdir(logdir) == []
    assert_clean(proc)


def test_log_reopened_on_sighup_refuses_a_planted_symlink(make_chatd, tmp_path):
    """1. root's chatd logs to D/chatd.log; 2. the file is replaced by a symlink to a root-only
    file (as logrotate's move would leave room for); 3. `chatd reload`.
    Result: reload exit 0 and says the log file could not be reopened (a symbolic link); the
    target is unchanged; chatd keeps serving and logging to the old file."""
    inst = make_chatd()
    inst.start()
    secret = tmp_path / "secret"
    secret.write_bytes(b"root only\n")
    secret.chmod(0o600)
    os.rename(inst.logfile, inst.dir / "rotated.log")
    inst.logfile.symlink_to(secret)
    proc = inst.cmd("reload", check=0, timeout=30)
    assert b"cannot reopen log file" in proc.stdout and b"symbolic link" in proc.stdout, proc.stdout
    with LineClient(inst.port) as c:
        c.send(b"still here\n")
        assert c.recv_line() == b"still here\n"
    assert secret.read_bytes() == b"root only\n"
    inst.cmd("stop", check=0)


PLANTS = [(name, what) for name in ("pid", "lock", "state", "log") for what in ("fifo", "dir")]


@pytest.mark.parametrize("name, what", PLANTS, ids=[f"{n}-{w}" for n, w in PLANTS])
def test_fifo_or_directory_at_an_instance_path_blocks_and_crashes_nothing(make_chatd, name, what):
    """1. a FIFO or a directory at X.pid, X.lock, X.state or X.log; 2. `chatd status`, `start`,
    `stop`, each with a 20 s timeout.
    Result: none hangs, none prints a traceback or "internal error". At the pid file or the guard:
    each exits 4 with the reason ("cannot tell" for status). At the log file: start exits 4. At
    the state file: a FIFO is replaced (start 0, then stop 0); a directory refuses the start (4)."""
    inst = make_chatd()
    path = inst.dir / f"chatd.{name}"
    os.mkfifo(path) if what == "fifo" else path.mkdir()

    def cmd(command: str) -> subprocess.CompletedProcess:
        # Not inst.cmd: it reads the pid file, and this test's reader must not hang either.
        return subprocess.run(chatd_command() + [command, "-c", str(inst.config)], capture_output=True,
                              timeout=20, stdin=subprocess.DEVNULL)
    try:
        status, start, stop = cmd("status"), cmd("start"), cmd("stop")
    finally:
        if path.is_fifo():
            path.unlink()   # the fixture's cleanup reads the pid file
    assert_clean(status, start, stop)
    if name in ("pid", "lock"):
        assert (status.returncode, start.returncode, stop.returncode) == (4, 4, 4), (status, start, stop)
        assert status.stderr.startswith(b"chatd: cannot tell: "), status.stderr
        assert b"refusing it" in start.stderr and b"refusing it" in stop.stderr, (start, stop)
    elif name == "log" or what == "dir":
        assert start.returncode == 4, start
        refused = b"refusing it" in start.stderr
        assert refused or b"state file" in start.stderr and b"directory" in start.stderr, start
        assert status.returncode == 3 and stop.returncode == 0, (status, stop)
    else:
        assert (start.returncode, stop.returncode) == (0, 0), (start, stop)
    assert not listening(inst.port)


def test_fifos_at_state_paths_never_freeze_the_running_daemon(make_chatd):
    """1. root's chatd runs; 2. a FIFO at X.state.<pid>.tmp (its old temporary name) and one in
    place of X.state; 3. a client connects (the client count is written within a second),
    `chatd status`, `chatd reload`.
    Result: status and reload answer (0) within their timeouts, the daemon echoes throughout,
    and X.state is a regular file again. (Before: the event loop blocked in open(2) for good.)"""
    inst = make_chatd()
    pid = inst.start()
    state = inst.dir / "chatd.state"
    os.mkfifo(inst.dir / f"chatd.state.{pid}.tmp")
    state.unlink()
    os.mkfifo(state)
    with LineClient(inst.port) as c:
        c.send(b"one\n")
        assert c.recv_line() == b"one\n"
        status = inst.cmd("status", timeout=20)
        assert status.returncode == 0 and f"(pid {pid})".encode() in status.stdout, status
        reload = inst.cmd("reload", timeout=30)
        assert reload.returncode == 0, reload
        c.send(b"two\n")
        assert c.recv_line() == b"two\n"
    wait_for(lambda: stat.S_ISREG(os.lstat(state).st_mode), timeout=5, what="X.state replaced")
    assert_clean(status, reload)
    inst.cmd("stop", check=0)
    assert not alive(pid)


def test_a_fifo_config_hangs_neither_a_command_nor_the_daemons_restart(make_chatd):
    """1. root's chatd runs with -c FILE; 2. FILE is replaced by a FIFO; 3. `chatd check-config`,
    `chatd reload`. Result: check-config exits 6 and reload 6 (rejected, "FIFO"), each within
    its timeout; the daemon keeps serving. (Before: both hung, and so did the daemon's loop.)"""
    inst = make_chatd()
    pid = inst.start()
    text = inst.config.read_text()
    inst.config.unlink()
    os.mkfifo(inst.config)
    try:
        check = subprocess.run(chatd_command() + ["check-config", "-c", str(inst.config)],
                               capture_output=True, timeout=20, stdin=subprocess.DEVNULL)
        reload = subprocess.run(chatd_command() + ["reload", "--pidfile", str(inst.pidfile)],
                                capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        assert check.returncode == 6 and b"FIFO" in check.stderr, check
        assert reload.returncode == 6 and b"FIFO" in reload.stderr, reload
        assert_clean(check, reload)
        with LineClient(inst.port) as c:
            c.send(b"alive\n")
            assert c.recv_line() == b"alive\n"
    finally:
        inst.config.unlink()
        inst.config.write_text(text)
    inst.cmd("stop", check=0)
    assert not alive(pid)


def stage_pid_reuse(directory: Path, attacker: list[str], start_args: list[str],
                    start_before: bool, start_after: bool) -> dict:
    """Run pidns_stage.py in a private pid namespace; return what it printed."""
    if not os.access(UNSHARE, os.X_OK):
        require_real("unshare (util-linux)")
    cfg = {"pidfile": str(directory / "chatd.pid"), "chatd": chatd_command(), "attacker": attacker,
           "python": SYSTEM_PYTHON if attacker else sys.executable, "env": ROOT_ENV,
           "signals_file": str(directory.parent / f"{directory.name}.signals"),
           "start_args": start_args, "start_before": start_before, "start_after": start_after}
    proc = subprocess.Popen([UNSHARE, "--pid", "--fork", "--kill-child", "--mount-proc",
                             sys.executable, str(STAGE), json.dumps(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()   # --kill-child: the namespace's init, and so all in it, dies with it
            proc.communicate(timeout=10)
    Path(cfg["signals_file"]).unlink(missing_ok=True)
    assert proc.returncode == 0, (proc.returncode, out, err)
    return json.loads(out)


@pytest.mark.parametrize("kind", DIRS)
def test_pid_reuse_by_a_user_in_a_directory_it_can_write(nobody, kind):
    """Inside a private pid namespace: 1. nobody writes its own pid into D/X.pid, takes the
    flock, forks a child that keeps the descriptor, exits (pid P). 2. root: `chatd start`
    with that --pidfile. 3. P is recycled by a root process that catches SIGUSR1, SIGTERM and
    SIGHUP. 4. root: `chatd reload`, `chatd stop --timeout 1`.
    Result: start exits 4, the directory refused (before: "already running", 0); in the sticky
    directory, reload and stop refuse nobody's pid file itself (4); in nobody's own directory,
    whose owner could replace any file there anyway, the pid the file names holds no lock, so
    no chatd runs there: stop says so (0), reload exits 7; the recycled process caught no signal
    and is alive (before: SIGHUP, SIGUSR1, SIGTERM, then SIGKILL)."""
    owner, mode = DIRS[kind]
    d = nobody.mkdtemp(owner=owner, mode=mode)
    r = stage_pid_reuse(d, AS_NOBODY, ["-p", str(free_port()), "--host", "127.0.0.1"],
                        start_before=True, start_after=False)
    assert r["victim_pid"] == r["attacker_pid"]
    assert r["victim_signals"] == [] and r["victim_alive"], r
    assert r["start_before"][0] == 4 and "already running" not in r["start_before"][1], r["start_before"]
    assert "refusing it" in r["start_before"][2], r["start_before"]
    for what in ("reload", "stop"):
        code, out, err = r[what]
        if kind == "sticky":
            assert code == 4 and "refusing it" in err, (what, r[what])
        else:
            assert code == {"reload": 7, "stop": 0}[what] and "not running" in out + err, (what, r[what])
        assert "Traceback" not in err


def test_pid_reuse_after_a_lock_was_handed_on(make_chatd):
    """Inside a private pid namespace, root's own directory: 1. a process writes its pid into
    X.pid, takes the flock, forks a child that keeps the descriptor, exits (pid P; /proc/locks
    still names P). 2. P is recycled by another root process. 3. `chatd reload`, `chatd stop`.
    4. `chatd start`, then `chatd stop`.
    Result: no chatd holds the file: reload exits 7 and stop 0, both "not running"; the recycled
    process caught no signal and is alive; start replaces the pid file and serves (0), and stop
    stops it (0). (Before the review of issue 12: reload and stop exited 1, "not signalling".)
    (Before: the recycled process got SIGHUP, then SIGUSR1, SIGTERM and SIGKILL.)"""
    inst = make_chatd()
    port = free_port()
    r = stage_pid_reuse(inst.dir, [], ["-p", str(port), "--host", "127.0.0.1", "--log",
                                       str(inst.dir / "chatd.log")],
                        start_before=False, start_after=True)
    assert r["victim_pid"] == r["attacker_pid"]
    assert r["victim_signals"] == [] and r["victim_alive"], r
    for what in ("reload", "stop"):
        code, out, err = r[what]
        assert code == {"reload": 7, "stop": 0}[what] and "not running" in out + err, (what, r[what])
    assert r["start_after"][0] == 0 and "chatd started" in r["start_after"][1], r["start_after"]
    assert r["stop_after"][0] == 0, r["stop_after"]
    assert not listening(port)


HOLD = ("import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print(os.getpid(), flush=True)\n"
        "time.sleep(120)\n")


def hold_as_nobody(path: Path) -> subprocess.Popen:
    """nobody's process holding LOCK_EX on `path` (read-only is enough for flock)."""
    proc = subprocess.Popen(AS_NOBODY + [SYSTEM_PYTHON, "-c", HOLD, str(path)], env=CLEAN_ENV, cwd="/",
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert int(proc.stdout.readline()) == proc.pid
    return proc


def end(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.communicate(timeout=10)


def test_a_symlink_above_the_pid_directory_is_refused_at_start_and_by_every_command(nobody):
    """1. nobody symlinks /tmp/L to a root-owned 0755 directory that holds sub/.
    2. root: `chatd start --pidfile /tmp/L/sub/x.pid`.
    3. nobody repoints /tmp/L at its own 0755 directory with sub/x.pid (its own pid, LOCK_EX held
    by that process), sub/x.state (a fake address) and sub/x.lock.
    4. root: `chatd status`, `stop`, `reload` with that --pidfile.
    Result: start exits 4 ("/tmp/L is a symbolic link of uid 65534"), nothing serves; status
    exits 4 "cannot tell", stop and reload 4, each naming the link; nobody's process caught no
    signal. (Before: start served; status said running at the fake address, and stop exited 0
    "stopped" having killed nobody's process while the real daemon kept serving.)"""
    root_dir = nobody.mkdtemp(owner=0, mode=0o755)
    (root_dir / "sub").mkdir(mode=0o755)
    evil = nobody.mkdtemp(owner=NOBODY, mode=0o755)
    link = Path(f"{evil}-link")
    nobody.own_files.append(link)
    as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(root_dir), str(link))
    port = free_port()
    pidfile = link / "sub" / "x.pid"
    start = nobody.run_as_root("start", "--pidfile", str(pidfile), "-p", str(port), "--host", "127.0.0.1")
    assert start.returncode == 4 and f"{link} is a symbolic link of uid {NOBODY}".encode() in start.stderr, start
    assert not listening(port)
    as_nobody("import json, os, sys\n"
              "evil, link = sys.argv[1:]\n"
              "os.mkdir(evil + '/sub', 0o755)\n"
              "for name in ('x.pid', 'x.lock'): open(f'{evil}/sub/{name}', 'w').close()\n"
              "open(evil + '/sub/x.state', 'w').write(json.dumps({'address': '10.6.6.6:1'}))\n"
              "os.unlink(link); os.symlink(evil, link)\n", str(evil), str(link))
    holder = hold_as_nobody(evil / "sub" / "x.pid")
    try:
        (evil / "sub" / "x.pid").write_text(f"{holder.pid}\n")
        results = {cmd: nobody.run_as_root(cmd, "--pidfile", str(pidfile), timeout=30)
                   for cmd in ("status", "stop", "reload")}
        assert holder.poll() is None
    finally:
        end(holder)
    assert results["status"].stderr.startswith(b"chatd: cannot tell: "), results["status"]
    for cmd, proc in results.items():
        assert proc.returncode == 4 and b"symbolic link of uid 65534" in proc.stderr, (cmd, proc)
        assert b"10.6.6.6" not in proc.stdout
    assert holder.returncode == -9   # our kill, not chatd's signal
    assert_clean(start, *results.values())


def test_a_root_owned_link_is_followed_and_the_daemon_keeps_the_resolved_path(nobody):
    """root's own link to root's own directory: start serves, and the daemon names (and at exit
    removes) its files by the resolved path, so repointing the link later changes nothing."""
    real = nobody.mkdtemp(owner=0, mode=0o755)
    link = Path(f"{real}-link")
    nobody.own_files.append(link)
    link.symlink_to(real)
    port = free_port()
    nobody.run_as_root("start", "--pidfile", str(link / "x.pid"), "-p", str(port), "--host", "127.0.0.1",
                       "--log", str(link / "x.log"), check=0)
    pid = nobody.track(real / "x.pid", str(real))
    status = nobody.run_as_root("status", "--pidfile", str(link / "x.pid"), check=0)
    assert f"pid file: {real}/x.pid".encode() in status.stdout, status.stdout
    nobody.run_as_root("stop", "--pidfile", str(link / "x.pid"), check=0)
    assert not alive(pid) and not (real / "x.pid").exists()


def test_restart_checks_a_new_log_target_as_start_does(make_chatd, nobody):
    """1. root's chatd runs; 2. nobody symlinks /tmp/L to a root-only 0700 directory; 3. root sets
    `[log] target = "/tmp/L/planted.log"` in the config and runs `chatd restart`.
    Result: restart exits 6, "config rejected" naming the link; nothing is created in the root-only
    directory; chatd keeps serving and logging to its old file. `start` with that target exits 4
    the same way. (Before: restart exited 0 and root created planted.log there.)"""
    inst = make_chatd()
    pid = inst.start()
    secret = nobody.mkdtemp(owner=0, mode=0o700)
    link = Path(f"{secret}-link")
    nobody.own_files.append(link)
    as_nobody("import os, sys; os.symlink(sys.argv[1], sys.argv[2])", str(secret), str(link))
    old = inst.config.read_text()
    inst.config.write_text(old.replace(f'target = "{inst.logfile}"', f'target = "{link}/planted.log"'))
    proc = inst.cmd("restart", timeout=30)
    assert proc.returncode == 6 and b"config rejected" in proc.stderr, proc
    assert f"{link} is a symbolic link of uid {NOBODY}".encode() in proc.stderr, proc.stderr
    assert os.listdir(secret) == []
    with LineClient(inst.port) as c:
        c.send(b"still here\n")
        assert c.recv_line() == b"still here\n"
    inst.config.write_text(old)
    inst.cmd("stop", check=0)
    assert not alive(pid)
    inst.config.write_text(old.replace(f'target = "{inst.logfile}"', f'target = "{link}/planted.log"'))
    start = inst.cmd("start", timeout=30)
    assert start.returncode == 4 and b"symbolic link of uid 65534" in start.stderr, start
    assert os.listdir(secret) == [] and not listening(inst.port)
    assert_clean(proc, start)


def test_a_lock_taken_on_a_dropped_daemons_leftover_pid_file_is_not_a_running_chatd(make_chatd, nobody):
    """1. root's chatd with `user = "nobody"` runs and stops; its pid file stays (root's, 0644,
    empty: nobody may not unlink it). 2. nobody opens it read-only and takes LOCK_EX.
    3. root: `chatd status`, `status --json`, `stop`, `reload`, then `start` and `stop`.
    Result: status and status --json exit 4 "cannot tell", naming the holder's pid and uid 65534;
    stop exits 0 "chatd is not running" and reload 7, signalling nothing (the holder lives);
    start replaces the file and serves (0), and stop stops it (0). (Before: status exited 0
    "chatd is running (pid unknown...)", --json running: true; stop and reload exited 1.)"""
    inst = make_chatd(public=True)
    inst.write_config(daemon={"user": "nobody"})
    first = inst.start()
    inst.cmd("stop", check=0)
    assert not alive(first) and inst.pidfile.read_bytes() == b""
    holder = hold_as_nobody(inst.pidfile)
    try:
        status, as_json, stop, reload = (inst.cmd(*args, timeout=30) for args in
                                         (["status"], ["status", "--json"], ["stop"], ["reload"]))
        assert holder.poll() is None
        start = inst.cmd("start", timeout=60)
        assert start.returncode == 0, start
        second = int(inst.pidfile.read_text())
        assert holder.poll() is None
    finally:
        end(holder)
    for proc in (status, as_json):
        assert proc.returncode == 4 and proc.stderr.startswith(b"chatd: cannot tell: "), proc
        assert f"pid {holder.pid} (uid {NOBODY})".encode() in proc.stderr, proc.stderr
    assert stop.returncode == 0 and stop.stdout.startswith(b"chatd is not running"), stop
    assert reload.returncode == 7, reload
    assert holder.returncode == -9   # our kill, not chatd's signal
    inst.cmd("stop", check=0)
    assert not alive(second)
    assert_clean(status, as_json, stop, reload, start)


def test_a_process_of_an_untrusted_user_holding_the_lock_is_not_chatd(nobody):
    """In root's own directory, root's pid file names nobody's process, and that process holds the
    lock (nobody opened the file read-only before root chmodded it 0644 ... or was handed the
    descriptor). Here: root writes the holder's pid into its own 0644 file, nobody takes LOCK_EX.
    Result: status exits 4 "cannot tell" ("runs as uid 65534, not as chatd"); stop exits 0
    "not running" and signals nothing. (Before: status 0 "running", stop signalled nobody's process.)"""
    d = nobody.mkdtemp(owner=0, mode=0o755)
    pidfile = d / "x.pid"
    pidfile.write_text("")
    pidfile.chmod(0o644)
    holder = hold_as_nobody(pidfile)
    try:
        pidfile.write_text(f"{holder.pid}\n")
        status = nobody.run_as_root("status", "--pidfile", str(pidfile), timeout=30)
        stop = nobody.run_as_root("stop", "--pidfile", str(pidfile), timeout=30)
        assert holder.poll() is None
    finally:
        end(holder)
    assert status.returncode == 4 and b"runs as uid 65534, not as chatd" in status.stderr, status
    assert stop.returncode == 0 and b"not running" in stop.stdout, stop
    assert holder.returncode == -9
    assert_clean(status, stop)
