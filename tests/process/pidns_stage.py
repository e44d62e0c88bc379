"""Pid reuse on a pid file, staged for real inside a private pid namespace (run by
tests/process/test_local_attacks.py as `unshare --pid --fork --kill-child --mount-proc`).

argv[1] is JSON: pidfile, chatd (argv prefix of root's chatd), attacker (argv prefix that runs
the attacker's python, e.g. setpriv to nobody), python, env, start_before, start_after.
1. The attacker opens the pid file, takes an exclusive flock, writes its own pid, forks a child
   that keeps the descriptor (and so the lock), and exits: /proc/locks keeps naming its pid P.
2. Optionally root's `chatd start --pidfile` runs now (P is dead, nobody has it).
3. P is recycled by a root process (the victim) that records every signal it catches. The
   namespace's pid_max is 4194304 on this kernel, so waiting for the allocator to wrap would
   take minutes: clone3's set_tid gives the freed pid to the victim at once, no sysctl touched.
4. Root's `chatd reload` and `chatd stop --timeout 1` run with that --pidfile.
Prints one JSON object: each command's (exit status, stdout, stderr), the victim's pid and the
signals it caught, whether it is still alive. When this process (pid 1 here) exits, the kernel
kills everything left in the namespace.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import subprocess
import sys

ATTACKER = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.ftruncate(fd, 0)
os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
if os.fork() == 0:
    time.sleep(300)
"""

VICTIM = r"""
import signal, sys, time
out = open(sys.argv[1], "a", buffering=1)
for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, lambda n, f: out.write(signal.Signals(n).name + "\n"))
print("ready", flush=True)
time.sleep(300)
"""


class CloneArgs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in ("flags", "pidfd", "child_tid", "parent_tid", "exit_signal",
                                               "stack", "stack_size", "tls", "set_tid", "set_tid_size",
                                               "cgroup")]


def spawn_with_pid(pid: int, argv: list[str], stdout: int) -> int:
    """clone3 with set_tid = [pid] (root in this namespace may choose a free pid), then exec."""
    tid = (ctypes.c_int32 * 1)(pid)
    args = CloneArgs(exit_signal=signal.SIGCHLD, set_tid=ctypes.addressof(tid), set_tid_size=1)
    libc = ctypes.PyDLL(None, use_errno=True)   # PyDLL: the GIL stays held across the clone
    libc.syscall.restype = ctypes.c_long
    got = libc.syscall(435, ctypes.byref(args), ctypes.c_size_t(ctypes.sizeof(args)))
    if got == 0:
        try:
            os.dup2(stdout, 1)
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    if got < 0:
        raise OSError(ctypes.get_errno(), f"clone3 with set_tid {pid}: {os.strerror(ctypes.get_errno())}")
    return got


def main() -> None:
    cfg = json.loads(sys.argv[1])
    pidfile, env = cfg["pidfile"], cfg["env"]
    result: dict = {}

    def chatd(*args: str, timeout: float = 60) -> tuple[int, str, str]:
        try:
            p = subprocess.run(cfg["chatd"] + list(args), capture_output=True, timeout=timeout,
                               stdin=subprocess.DEVNULL, env=env, cwd="/")
        except subprocess.TimeoutExpired:
            return (-1, "", f"timed out after {timeout} s")
        return (p.returncode, p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace"))

    subprocess.run(cfg["attacker"] + [cfg["python"], "-c", ATTACKER, pidfile], check=True, timeout=30,
                   env=env, cwd="/")
    with open(pidfile) as f:
        pid = int(f.read())
    result["attacker_pid"] = pid
    if cfg["start_before"]:
        result["start_before"] = chatd("start", "--pidfile", pidfile)   # as the report had it
    signals_file = cfg["signals_file"]
    r, w = os.pipe()
    victim = spawn_with_pid(pid, [cfg["python"], "-c", VICTIM, signals_file], w)
    os.close(w)
    assert select.select([r], [], [], 30)[0] and os.read(r, 64).startswith(b"ready"), "victim not ready"
    result["victim_pid"] = victim
    result["reload"] = chatd("reload", "--pidfile", pidfile)
    result["stop"] = chatd("stop", "--pidfile", pidfile, "--timeout", "1")
    result["victim_alive"] = os.waitpid(victim, os.WNOHANG) == (0, 0)
    with open(signals_file) as f:
        result["victim_signals"] = f.read().split()
    if cfg["start_after"]:
        result["start_after"] = chatd("start", "--pidfile", pidfile, *cfg["start_args"])
        result["stop_after"] = chatd("stop", "--pidfile", pidfile)
    if result["victim_alive"]:
        os.kill(victim, signal.SIGKILL)
        os.waitpid(victim, 0)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
