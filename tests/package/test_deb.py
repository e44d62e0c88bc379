"""chatd's Debian package (debian/, README "The Debian package"): built from a copy
of the checkout, linted, then installed, upgraded while it serves, and purged under a real
systemd in `systemd-nspawn` (tests/nspawn.py).

The container boots the host's whole root under an overlay whose upper layer is a tmpfs: dpkg
installs into the overlay, never into the host. The host's own enabled services are masked, and
/usr/sbin/policy-rc.d (this machine's "start no service" rule, which would also forbid the
package's `stop`) is removed inside, so the maintainer scripts act as on a booted Debian.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from chatd import __version__
from conftest import require_real
from installs import EXITS_EARLY, edit
from nspawn import ENV, MASKED, PORT, Container, booted
from support import LineClient, figures

REPO = Path(__file__).resolve().parents[2]
VERSION_B = f"{__version__}+upgrade1"
VERSION_BROKEN = f"{__version__}+upgrade2"
CONF = "/etc/chatd/chatd.conf"
CHAT_CONF = '[server]\nmode = "chat"\n'
NICKS = ("alice", "bob", "carol")

# path in the package -> what must be there (the units name /usr/bin/chatd)
SHIPPED = {
    "./usr/bin/chatd": None,
    "./usr/lib/python3/dist-packages/chatd/server.py": None,
    "./lib/systemd/system/chatd.service": "ExecStart=/usr/bin/chatd run -c /etc/chatd/chatd.conf",
    "./lib/systemd/system/chatd.socket": "ListenStream=7777",
    "./etc/chatd/chatd.conf": "[server]",
    "./etc/logrotate.d/chatd": "/usr/bin/chatd reload -c /etc/chatd/chatd.conf",
    "./etc/rsyslog.d/30-chatd.conf": 'if $programname == "chatd" then',
    "./usr/share/man/man8/chatd.8.gz": None,
    "./usr/share/man/man5/chatd.conf.5.gz": None,
    "./usr/share/bash-completion/completions/chatd": None,
    "./usr/share/zsh/vendor-completions/_chatd": None,
}
CONFFILES = {"/etc/chatd/chatd.conf", "/etc/logrotate.d/chatd", "/etc/rsyslog.d/30-chatd.conf"}
TOOLS = ("dpkg-buildpackage", "dpkg-checkbuilddeps", "dh", "dh_python3", "lintian", "fakeroot")
BUILD_DEPS = ("debhelper", "dh-python", "pybuild-plugin-pyproject", "flit", "python3-all")


def _copy(dest: Path) -> Path:
    """The checkout as it is now (uncommitted changes too), without its venv, git or caches."""
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "__pycache__", ".pytest_cache", ".pybuild", "*.pyc", "*.egg-info"))
    return dest


def build(where: Path, version: str = __version__, change: tuple[str, str, str] | None = None) -> Path:
    """`dpkg-buildpackage -b -us -uc` in a copy of the checkout under `where`, as chatd `version`
    (its __init__.py and debian/changelog), with `change` (tests/installs.py) made: the .deb,
    which lands in `where`, never beside the checkout."""
    src = _copy(where / "src")
    if version != __version__:
        edit(src / "chatd" / "__init__.py", f'__version__ = "{__version__}"', f'__version__ = "{version}"')
        edit(src / "debian" / "changelog", f"chatd ({__version__})", f"chatd ({version})")
    if change is not None:
        edit(src / "chatd" / change[0], change[1], change[2])
    env = {"PATH": ENV["PATH"], "HOME": str(where), "LC_ALL": "C.UTF-8"}
    proc = subprocess.run(["dpkg-buildpackage", "-b", "-us", "-uc"], cwd=src, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"dpkg-buildpackage failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    deb = where / f"chatd_{version}_all.deb"
    assert deb.is_file(), sorted(p.name for p in where.iterdir())
    return deb


def require_tools() -> None:
    """Skip without root or the packaging tools (fail with CHATD_REQUIRE_REAL=1)."""
    for tool in TOOLS:
        if shutil.which(tool, path=ENV["PATH"]) is None:
            require_real(f"{tool} (apt-get install {' '.join(BUILD_DEPS)} lintian fakeroot)")
    missing = subprocess.run(["dpkg-checkbuilddeps"], cwd=REPO, env=ENV, capture_output=True, text=True,
                             timeout=60, stdin=subprocess.DEVNULL)
    if missing.returncode != 0:
        require_real(f"the build dependencies: {missing.stderr.strip()}")


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    """The package of the checkout's chatd, built once for the module."""
    require_tools()
    began = time.monotonic()
    made = build(tmp_path_factory.mktemp("deb-a"))
    figures("package build", seconds=f"{time.monotonic() - began:.1f}", bytes=made.stat().st_size)
    return made


def _contents(deb: Path) -> dict[str, str]:
    """Path in the package -> its text (for the files SHIPPED names a text for)."""
    listing = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, timeout=60, check=True)
    names = subprocess.run(["tar", "-t"], input=listing.stdout, capture_output=True, timeout=60,
                           check=True).stdout.decode().splitlines()
    out = {}
    for name in names:
        text = ""
        if SHIPPED.get(name):
            text = subprocess.run(["tar", "-xO", name], input=listing.stdout, capture_output=True, timeout=60,
                                  check=True).stdout.decode()
        out[name] = text
    return out


@pytest.mark.slow   # the build takes 4-10 s, which the default step has not to spare
def test_package_ships_every_file_where_its_tool_reads_it(deb):
    files = _contents(deb)
    for path, wanted in SHIPPED.items():
        assert path in files, f"{path} not in the package:\n" + "\n".join(sorted(files))
        if wanted:
            assert wanted in files[path], f"{path}:\n{files[path]}"
    assert not [p for p in files if "/usr/local" in p or "__pycache__" in p], sorted(files)
    for path, text in files.items():
        assert "/usr/local" not in text, path
    info = subprocess.run(["dpkg-deb", "-f", str(deb), "Version", "Depends", "Recommends", "Suggests"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert f"Version: {__version__}\n" in info, info
    assert "Recommends: python3-uvloop" in info and "python3-redis" in info.partition("Suggests:")[2], info
    assert "uvloop" not in info.partition("Depends:")[2].partition("\n")[0], info   # a speed-up only
    control = subprocess.run(["dpkg-deb", "-I", str(deb), "conffiles"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    assert set(control.split()) == CONFFILES, control


def test_debian_changelog_has_chatds_version():
    """debian/changelog's version is the package's: the one chatd/__init__.py says."""
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"chatd ({__version__}) "), first


@pytest.mark.slow
def test_lintian_finds_no_error_and_no_warning(deb):
    """lintian (Debian 12's), pedantic: what it still says is information only (README)."""
    proc = subprocess.run(["lintian", "--pedantic", "--display-info", "--no-tag-display-limit", str(deb)],
                          env=ENV, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    tags = [line for line in proc.stdout.splitlines() if re.match(r"[EWIPX]: ", line)]
    assert proc.returncode == 0 and not [t for t in tags if t[0] in "EW"], proc.stdout + proc.stderr
    figures("lintian", tags=len(tags), info="; ".join(t.split(": ", 2)[-1] for t in tags))


# ------------------------------------------------------------------ installed under systemd

class Box(Container):
    """The container, with the packages bound at /srv/debs."""

    def dpkg(self, *args: str, check: int | None = 0) -> str:
        return self.run("dpkg", *args, check=check, timeout=120).stdout.decode(errors="replace")

    def chatd(self, *args: str, check: int | None = 0) -> str:
        """The installed chatd command, as root types it."""
        return self.run("/usr/bin/chatd", *args, "-c", CONF, check=check).stdout.decode()

    def install(self, name: str) -> tuple[str, float]:
        """`dpkg -i /srv/debs/NAME`: what its maintainer scripts said, and the seconds it took."""
        began = time.monotonic()
        proc = self.run("dpkg", "-i", f"/srv/debs/{name}", check=0, timeout=120)
        return (proc.stdout + proc.stderr).decode(errors="replace"), time.monotonic() - began

    def gone(self, path: str) -> bool:
        return self.run("test", "-e", path).returncode != 0 and self.run("test", "-L", path).returncode != 0


def _masks() -> tuple[str, ...]:
    """The host's enabled services and timers: the overlay boots the host's /etc with them."""
    enabled = {link.name for link in Path("/etc/systemd/system").glob("*.wants/*")
               if link.suffix in (".service", ".timer")}
    return tuple(sorted(enabled | set(MASKED)))


@pytest.fixture(scope="module")
def box(deb, tmp_path_factory):
    """A booted container with A (the checkout's chatd), B (a newer version) and a newer one
    whose daemon exits before it takes over (`broken`) at /srv/debs."""
    debs = tmp_path_factory.mktemp("debs")
    debs.chmod(0o755)
    shutil.copy(deb, debs / "a.deb")
    began = time.monotonic()
    shutil.copy(build(tmp_path_factory.mktemp("deb-b"), VERSION_B), debs / "b.deb")
    shutil.copy(build(tmp_path_factory.mktemp("deb-broken"), VERSION_BROKEN, EXITS_EARLY), debs / "broken.deb")
    figures("package builds for the upgrade", seconds=f"{time.monotonic() - began:.1f}")
    with booted(Box, lambda _workdir: {str(debs): "/srv/debs"}, overlay=True, masked=_masks()) as box:
        box.run("rm", "-f", "/usr/sbin/policy-rc.d", check=0)
        yield box


@pytest.fixture
def fresh(box):
    """chatd not installed before and after (purged, whatever the test left)."""
    box.dpkg("--purge", "chatd")
    yield box
    box.dpkg("--purge", "chatd", check=None)


def _room(box: Box, nicks: tuple[str, ...]) -> list[LineClient]:
    """Chat members who set their nicks, each seen by all."""
    members: list[LineClient] = []
    for nick in nicks:
        member, = box.clients(1)
        while not member.recv_line().startswith(b"*** #lobby:"):
            pass
        member.send(f"/nick {nick}\n".encode())
        for seen in [*members, member]:
            while not seen.recv_line().endswith(f" is now known as {nick}\r\n".encode()):
                pass
        members.append(member)
    return members


def _talk(members: list[LineClient], text: str) -> None:
    """Each member says a line, and every other hears it next, under the member's nick."""
    for i, speaker in enumerate(members):
        speaker.send(f"{text} {i}\n".encode())
        for j, hearer in enumerate(members):
            if j != i:
                assert hearer.recv_line() == f"<{NICKS[i]}> {text} {i}\r\n".encode()


def _start_chat(box: Box) -> list[LineClient]:
    box.run("sh", "-c", f"printf '{CHAT_CONF}' > {CONF}", check=0)   # the admin's change to a conffile
    box.systemctl("start", "chatd")
    members = _room(box, NICKS)
    _talk(members, "before")
    return members


def _purge_tells_and_removes(box: Box, members: list[LineClient]) -> float:
    """`dpkg --purge`: chatd stopped gracefully (each member told), then nothing of it left."""
    began = time.monotonic()
    said = box.dpkg("--purge", "chatd")
    took = time.monotonic() - began
    for member in members:
        assert member.recv_until_eof() == b"*** server shutting down\r\n", said
        member.close()
    assert box.show("chatd.service", "LoadState")["LoadState"] == "not-found"
    for path in ("/usr/bin/chatd", "/lib/systemd/system/chatd.service", "/etc/chatd", "/etc/logrotate.d/chatd",
                 "/etc/rsyslog.d/30-chatd.conf", "/var/log/chatd", "/var/log/private/chatd", "/run/chatd",
                 "/usr/lib/python3/dist-packages/chatd"):
        assert box.gone(path), f"{path} left after purge"
    assert box.dpkg("-s", "chatd", check=None).strip() == ""
    return took


@pytest.mark.slow
def test_install_enables_nothing_start_serves_purge_removes_all(fresh):
    box = fresh
    said, took = box.install("a.deb")
    assert "Traceback" not in said, said
    for unit in ("chatd.service", "chatd.socket"):
        props = box.show(unit, "UnitFileState", "ActiveState")
        assert props == {"UnitFileState": "disabled", "ActiveState": "inactive"}, (unit, props)
    ss = box.run("ss", "-Hltn", f"sport = :{PORT}", namespaces="-n", check=0).stdout.decode()
    assert ss.strip() == "", ss
    assert box.run("/usr/bin/chatd", "--version", check=0).stdout.decode().split() == ["chatd", __version__]
    assert box.run("man", "-w", "chatd.conf", check=0).stdout.decode().strip() == "/usr/share/man/man5/chatd.conf.5.gz"
    box.run("systemd-analyze", "verify", "chatd.service", "chatd.socket", check=0)

    members = _start_chat(box)
    props = box.show("chatd", "ActiveState", "ExecMainStartTimestamp")
    assert props["ActiveState"] == "active", props
    box.run("test", "-d", "/var/log/chatd", check=0)   # LogsDirectory=, made at start
    stop_s = _purge_tells_and_removes(box, members)
    figures("package install and purge", install_s=f"{took:.2f}", purge_s=f"{stop_s:.2f}")


@pytest.mark.slow
def test_package_upgrade_upgrades_the_running_chatd_in_place(fresh):
    """`dpkg -i` of a newer build while chatd serves: postinst runs `chatd upgrade`; the chat
    goes on, systemd counts no restart, the main pid is the new version's."""
    box = fresh
    box.install("a.deb")
    members = _start_chat(box)
    before = box.show("chatd", "MainPID", "InvocationID")
    old = int(before["MainPID"])

    said, took = box.install("b.deb")
    found = re.search(rf"chatd upgraded from {re.escape(__version__)} \(pid {old}\) to "
                      rf"{re.escape(VERSION_B)} \(pid (\d+)\) in ([0-9.]+) s; (\d+) clients carried over", said)
    assert found, said
    new = int(found.group(1))
    _talk(members, "after")
    props = box.show("chatd", "ActiveState", "SubState", "MainPID", "NRestarts", "InvocationID", "Result")
    assert (props["ActiveState"], props["SubState"], props["Result"]) == ("active", "running", "success"), props
    assert props["MainPID"] == str(new) != str(old) and props["NRestarts"] == "0", props
    assert props["InvocationID"] == before["InvocationID"], props   # the same run of the unit
    status = box.chatd("status")
    assert f"version: {VERSION_B}" in status and f"pid {new}" in status, status
    assert int(found.group(3)) == len(members)
    # py3compile ran before the upgrade: the new process found compiled code (it could not write it)
    box.run("test", "-f", "/usr/lib/python3/dist-packages/chatd/__pycache__/server.cpython-311.pyc", check=0)
    journal = box.journal()
    for bad in ("Traceback", "Scheduled restart", "Failed"):
        assert bad not in journal, journal[-3000:]
    _purge_tells_and_removes(box, members)
    figures("package upgrade under systemd", clients_kept=f"{len(members)}/{len(members)}",
            dpkg_i_s=f"{took:.2f}", chatd_upgrade_s=found.group(2), nrestarts=props["NRestarts"])


@pytest.mark.slow
def test_failed_or_forbidden_live_upgrade_keeps_the_old_version_serving(fresh):
    """A policy-rc.d that forbids restarts, then a new version whose daemon exits before it
    takes over: each
    install succeeds and says the old version serves on, and it does (same main pid, no
    restart); the next good version then upgrades it in place."""
    box = fresh
    box.install("a.deb")
    members = _start_chat(box)
    old = box.main_pid()

    def still_serving(version: str) -> None:
        props = box.show("chatd", "ActiveState", "MainPID", "NRestarts")
        assert props == {"ActiveState": "active", "MainPID": str(old), "NRestarts": "0"}, props
        assert f"Version: {version}\n" in box.dpkg("-s", "chatd")
        state = json.loads(box.chatd("status", "--json"))
        assert (state["pid"], state["version"]) == (old, __version__), state
        _talk(members, f"still on {version}")

    box.run("sh", "-c", "printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d",
            check=0)
    try:
        said, _ = box.install("b.deb")
    finally:
        box.run("rm", "-f", "/usr/sbin/policy-rc.d", check=0)
    assert f"chatd: policy-rc.d forbids restarting chatd.service: the running chatd (pid {old}) keeps serving" in said, said
    still_serving(VERSION_B)

    said, _ = box.install("broken.deb")
    assert f"chatd: the live upgrade failed: the running chatd (pid {old}) keeps serving" in said, said
    assert f"chatd {__version__} (pid {old}) still serving" in said, said    # chatd upgrade's own words
    assert "this build refuses to start" in said and "Traceback" not in said, said
    still_serving(VERSION_BROKEN)
    figures("a failed live upgrade, as dpkg -i shows it", said=said.strip().replace("\n", " | "))

    said, _ = box.install("b.deb")   # a downgrade from the broken one: configured all the same
    assert re.search(rf"chatd upgraded from {re.escape(__version__)} \(pid {old}\) to {re.escape(VERSION_B)}", said), said
    _talk(members, "after")
    assert box.show("chatd", "NRestarts")["NRestarts"] == "0"
    _purge_tells_and_removes(box, members)
