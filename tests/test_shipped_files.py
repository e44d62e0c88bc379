"""The files chatd ships stay true to the code: the sample config and the logrotate snippet."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from chatd import config

REPO = Path(__file__).resolve().parent.parent


def test_sample_config_lists_every_key_with_its_default():
    """Uncommenting every `# key = value` line of etc/chatd.conf gives exactly the defaults."""
    text = (REPO / "etc" / "chatd.conf").read_text()
    uncommented = re.sub(r"^# (\w+ = )", r"\1", text, flags=re.M)
    data = tomllib.loads(uncommented)
    listed = {f"{section}.{key}": value for section, table in data.items() for key, value in table.items()}
    assert set(listed) == set(config.KEYS), set(listed) ^ set(config.KEYS)
    for dotted, key in config.KEYS.items():
        assert listed[dotted] == key.default, dotted


def test_sample_config_is_valid_as_shipped(tmp_path):
    cfg = config.load(str(REPO / "etc" / "chatd.conf"))
    assert cfg.differences(config.load()) == []


def test_logrotate_snippet_sends_sighup_never_sigusr1():
    text = (REPO / "etc" / "chatd.logrotate").read_text()
    body = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert "postrotate" in body and "chatd reload" in body
    assert "USR1" not in body and "chatd stop" not in body
