"""Installed chatd versions side by side, for the live-upgrade tests (README "Live upgrade").

Each install is a copy of the checkout's `chatd` package under ROOT/NAME with its version
string changed (and, for the broken ones, one more change), and a `bin/chatd` script as pip
would write it. ROOT/current is a symlink to one of them: a daemon started as
ROOT/current/bin/chatd runs again, on `chatd upgrade`, whatever `current` points at then, as
a daemon started as /usr/bin/chatd runs whatever a package upgrade left there.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """\
#!{python}
import os
import sys
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.realpath(__file__))))
from chatd.cli import main
main()
"""

# Broken versions, each a change to one file of the package: (file, old text, new text).
IMPORT_FAILS = ("server.py", "import asyncio\n", "import asyncio\nimport chatd_no_such_module\n")
EXITS_EARLY = ("lifetime.py", "    recorder = SignalRecorder()\n    recorder.install(detached=True)\n",
               "    raise SystemExit('chatd: this build refuses to start')\n")
EXITS_SLOWLY = ("lifetime.py", "    recorder = SignalRecorder()\n    recorder.install(detached=True)\n",
                "    import time\n    takeover.channel.close()\n    time.sleep(0.3)\n"
                "    raise SystemExit('chatd: this build refuses to start')\n")
HANGS = ("lifetime.py", "    recorder = SignalRecorder()\n    recorder.install(detached=True)\n",
         "    import time\n    time.sleep(3600)\n")
NEW_FORMAT = ("upgrade.py", "FORMAT = 1 ", "FORMAT = 2 ")
# Not broken, only slow: it rebuilds everything, says so in the log, then takes `seconds`
# more before "prepared", so a test can act while the old process is frozen.
SLOW_S = 1.0


def slow_takeover(seconds: float) -> tuple[str, str, str]:
    return ("server.py", "            clients = self._restore(takeover)\n",
            "            clients = self._restore(takeover)\n"
            f"            log.info('test: restored, taking %g s more', {seconds!r})\n"
            f"            time.sleep({seconds!r})\n")


SLOW_TAKEOVER = slow_takeover(SLOW_S)
# Writes 300 KB to its stderr (a pipe the old process reads) while the old one is frozen.
CHATTY = ("server.py", "            clients = self._restore(takeover)\n",
          "            clients = self._restore(takeover)\n"
          "            import sys\n            sys.stderr.write('w' * 300000)\n            sys.stderr.flush()\n")
# Dies once it has taken over, before it serves: no way back for the old process.
DIES_AFTER_COMMIT = ("server.py", "        await takeover.adopt(clients)\n",
                     "        raise SystemExit('chatd: this build dies serving')\n")
# Slow just after the commit, as a new process the scheduler leaves waiting: the old one
# may exit before the pid file names the new one.
SLOW_COMMIT = ("upgrade.py", "        were the pipe it read our output from), and the pid file names us.\"\"\"\n",
               "        were the pipe it read our output from), and the pid file names us.\"\"\"\n"
               "        time.sleep(" + repr(SLOW_S) + ")\n")


class Installs:
    """Versions of chatd installed under `root`, and the `current` link between them; the
    scripts run `python` (another user may not be able to run the test's own)."""

    def __init__(self, root: Path, python: str = sys.executable) -> None:
        self.root = root
        self.python = python
        root.mkdir(parents=True, exist_ok=True)

    def make(self, name: str, version: str, change: tuple[str, str, str] | None = None) -> Path:
        """Install the checkout's chatd as `name`, its version `version`, with `change`."""
        where = self.root / name
        package = where / "chatd"
        shutil.copytree(REPO / "chatd", package, ignore=shutil.ignore_patterns("__pycache__"))
        edit(package / "__init__.py", '__version__ = "', f'__version__ = "{version}"  # ')
        if change is not None:
            edit(package / change[0], change[1], change[2])
        script = where / "bin" / "chatd"
        script.parent.mkdir()
        script.write_text(SCRIPT.format(python=self.python))
        script.chmod(0o755)
        return where

    def use(self, name: str) -> None:
        """Point `current` at `name`, atomically (as a package manager replaces a file)."""
        link = self.root / "current"
        temp = self.root / f".current.{os.getpid()}"
        temp.unlink(missing_ok=True)
        temp.symlink_to(name)
        os.replace(temp, link)

    @property
    def command(self) -> list[str]:
        """How the daemon is started: the script through the link, as a user types it."""
        return [str(self.root / "current" / "bin" / "chatd")]


def stopped_mid_upgrade(inst, installs: Installs, daemon: int, began: int) -> None:
    """Start `chatd upgrade` to a version that hangs (the install "hangs": HANGS), wait until
    the daemon has started its new code (`began` "upgrade: started" lines before it), and
    SIGTERM the daemon (pid `daemon`): the upgrade is called off (exit 1), and the daemon
    stops, its new code with it (nothing of the installs lives on)."""
    from support import alive, processes_mentioning, wait_for
    installs.use("hangs")
    up = upgrading(inst, "--timeout", "20")
    wait_for(lambda: inst.log_text().count("upgrade: started") > began, what="the upgrade to begin")
    os.kill(daemon, signal.SIGTERM)
    _, err = up.communicate(timeout=60)
    assert up.returncode == 1 and b"upgrade called off: SIGTERM arrived" in err, err
    wait_for(lambda: not alive(daemon), what="the daemon to stop")
    wait_for(lambda: not processes_mentioning(str(installs.root)), timeout=10,
             what="every process of the installs, the hanging new code too, to be gone")


def upgrading(inst, *args: str) -> subprocess.Popen:
    """`chatd upgrade ARGS` against the instance `inst`, running meanwhile (the checkout's
    command: a broken install's own could not even run)."""
    from support import chatd_command
    return subprocess.Popen(chatd_command() + ["upgrade", *args, "-c", str(inst.config)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise AssertionError(f"{path.name} no longer holds {old!r}: update tests/installs.py")
    path.write_text(text.replace(old, new, 1))

