"""The files chatd ships stay true to the code: the sample config and the logrotate snippet."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

from chatd import config
from conftest import require_real

REPO = Path(__file__).resolve().parent.parent


def test_sample_config_lists_every_key_with_its_default():
    """Uncommenting every `# key = value` line of etc/chatd.conf gives exactly the defaults."""
    text = (REPO / "etc" / "chatd.conf").read_text()
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    data = tomllib.loads(uncommented)
    listed = {f"{section}.{key}": value for section, table in data.items() for key, value in table.items()}
    assert set(listed) == set(config.KEYS), set(listed) ^ set(config.KEYS)
    for dotted, key in config.KEYS.items():
        value = listed[dotted]
        assert (tuple(value) if isinstance(value, list) else value) == key.default, dotted


def test_sample_config_is_valid_as_shipped(tmp_path):
    cfg = config.load(str(REPO / "etc" / "chatd.conf"))
    assert cfg.differences(config.load()) == []


def test_logrotate_snippet_sends_sighup_never_sigusr1():
    text = (REPO / "etc" / "chatd.logrotate").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "postrotate" in body and "chatd reload" in body
    assert "USR1" not in body and "chatd stop" not in body


def test_logrotate_snippet_has_a_maxsize_and_logrotate_parses_it(tmp_path):
    """A flood cannot fill /var/log between two weekly rotations: `maxsize` rotates earlier.
    `logrotate -d` (debug: it reads the config and changes nothing) must accept the snippet."""
    text = (REPO / "etc" / "chatd.logrotate").read_text()
    assert re.search(r"^\s+maxsize \d+[kMG]$", text, re.M), text
    logrotate = shutil.which("logrotate") or shutil.which("logrotate", path="/usr/sbin")
    if logrotate is None:
        require_real("logrotate")
    conf = tmp_path / "chatd.logrotate"
    conf.write_text(text)
    conf.chmod(0o644)   # logrotate ignores a config others may write
    proc = subprocess.run([logrotate, "-d", "-s", str(tmp_path / "state"), str(conf)],
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "error" not in out, out
    assert re.search(r"log files >= \d+ are rotated earlier", out), out
