"""The README's first command, as printed, as a new normal user in a copy of the checkout.

It installs and starts chatd (no config, default port 7777); then, in a new login shell,
`chatd` is found by name and the README's "Try it" works. Before that, root has run
`pip install .` in the same checkout: the build must leave nothing in the tree that would
break the user's install.

Isolation: everything runs in a private network namespace (`unshare --net`, only its own
loopback), so port 7777 never meets another program on this machine. pip cannot reach an
index from there, so the wheels the install needs are downloaded first, outside it, and
pip is pointed at them with PIP_FIND_LINKS and PIP_NO_INDEX: the command itself is the
README's, unchanged. The user is `nobody` with a new HOME made from /etc/skel, as
`useradd -m` makes one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import require_real
from support import alive, kill_and_wait

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


def readme_commands() -> list[str]:
    """The two commands the README opens with (its first two ```sh blocks)."""
    text = (REPO / "README.md").read_text()
    head = text.split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", head, re.S)
    return [block.strip() for block in blocks]


def test_the_readme_opens_with_the_two_commands():
    first, second = readme_commands()[:2]
    assert "pip install" in first and "chatd start" in first and "\n" not in first
    assert second == "sudo bash .ci/run"
    assert (REPO / ".ci" / "run").is_file()


def tracked_files() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True)
    return [name for name in out.stdout.decode().split("\0") if name]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def home():
    """A checkout owned by nobody, nobody's new HOME and XDG_RUNTIME_DIR, and a wheelhouse,
    in a directory of its own under /tmp (pytest's own is closed to other users)."""
    tmp_path = Path(tempfile.mkdtemp(prefix="chatd-install-test-", dir="/tmp"))
    for tool in ("unshare", "setpriv", "nc"):
        if shutil.which(tool) is None:
            require_real(tool)
    if not Path(SYSTEM_PYTHON).exists():
        require_real(SYSTEM_PYTHON)
    tmp_path.chmod(0o755)
    src = tmp_path / "chatd"
    for name in tracked_files():
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    wheels = tmp_path / "wheels"
    got = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(wheels),
                          "flit_core>=3.8,<5", "uvloop>=0.17"], capture_output=True, timeout=300)
    assert got.returncode == 0, got.stderr.decode()[-2000:]
    user_home = tmp_path / "home"
    user_home.mkdir()
    for name in (".profile", ".bashrc"):
        if Path("/etc/skel", name).exists():
            shutil.copy(Path("/etc/skel", name), user_home / name)
    xdg = tmp_path / "xdg"
    xdg.mkdir(mode=0o700)
    for path in [src, user_home, xdg, *src.rglob("*"), *user_home.rglob("*")]:
        os.chown(path, NOBODY, NOBODY)
    wheels.chmod(0o755)
    daemons: list[int] = []
    yield {"src": src, "home": user_home, "xdg": xdg, "wheels": wheels, "tmp": tmp_path, "daemons": daemons}
    pidfile = xdg / "chatd" / "chatd.pid"
    if pidfile.exists() and pidfile.read_text().strip().isdigit():
        daemons.append(int(pidfile.read_text()))
    for pid in daemons:
        if alive(pid) and str(tmp_path) in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace"):
            kill_and_wait(pid)
    shutil.rmtree(tmp_path, ignore_errors=True)


def in_private_network(script: str, env: dict, cwd: Path, as_root: bool = False,
                       timeout: float = 300) -> subprocess.CompletedProcess:
    """`script` under bash in a new network namespace with only loopback, as nobody unless `as_root`."""
    user = [] if as_root else ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    argv = ["unshare", "--net", "--", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
            *user, "env", "-i", *[f"{k}={v}" for k, v in env.items()], "bash", "-c", script]
    return subprocess.run(argv, cwd=cwd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_first_command_as_a_new_user_then_try_it_in_a_new_shell(home):
    src, user_home = home["src"], home["home"]
    offline = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(home["wheels"]), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}

    # root installs from the same checkout first (as the systemd section does)
    before = tree(src)
    root_venv = home["tmp"] / "root-venv"
    proc = in_private_network(f"{SYSTEM_PYTHON} -m venv {root_venv} && {root_venv}/bin/pip install -q .",
                              {"HOME": "/root", "PATH": "/usr/bin:/bin"} | offline, src, as_root=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert tree(src) == before, f"root's pip install left {tree(src) - before} in the checkout"

    # the README's first command, exactly as printed, in a shell like a fresh login's
    first = readme_commands()[0]
    env = {"HOME": str(user_home), "USER": "nobody", "LOGNAME": "nobody", "SHELL": "/bin/bash",
           "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/games:/usr/games",
           "XDG_RUNTIME_DIR": str(home["xdg"]), "LANG": "C.UTF-8"} | offline
    script = (f"{first}\necho FIRST-EXIT=$?\n"
              # then a new login shell, which reads ~/.profile as a new terminal would
              "bash -l -c 'command -v chatd; printf \"hello\\nworld\" | nc -N 127.0.0.1 7777; "
              "chatd status; echo STATUS-EXIT=$?; chatd stop; echo STOP-EXIT=$?'\n")
    proc = in_private_network(script, env, src)
    out, err = proc.stdout.decode(), proc.stderr.decode()
    assert "FIRST-EXIT=0" in out, out + err
    # every address: one dual-stack [::] socket (0.0.0.0 where the host has no IPv6)
    assert re.search(r"chatd started \(pid \d+\): echo mode on (\[::\]|0\.0\.0\.0):7777", out), out + err
    # the first shell's PATH did not have ~/.local/bin yet: it says exactly what to do
    assert 'export PATH="$HOME/.local/bin:$PATH"' in out, out
    assert f"{user_home}/.local/bin/chatd\n" in out, out          # found by name in the new shell
    assert "hello\nworld" in out, out
    assert "chatd is running" in out and "STATUS-EXIT=0" in out, out + err
    assert "chatd stopped" in out and "STOP-EXIT=0" in out, out + err
    assert "Traceback" not in out + err
    assert tree(src) == before, f"the user's install left {tree(src) - before} in the checkout"
