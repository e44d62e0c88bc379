"""The man pages chatd(8) and chatd.conf(5): made from the code (a rebuild equals the committed
pages), clean under mandoc and groff, readable with `man -l` from the checkout, and naming every
command, option, config key, signal and environment variable the code has."""

from __future__ import annotations

import ast
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chatd import __date__, cli, config, manual, signals
from conftest import require_real
from support import chatd_command

REPO = Path(__file__).resolve().parents[2]
PAGES = REPO / "etc" / "man"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        require_real(name)
    return str(path)


def page(name: str) -> str:
    return (PAGES / name).read_text(encoding="ascii")


def titles(text: str) -> list[str]:
    return [line[4:].strip('"') for line in text.splitlines() if line.startswith(".SH ")]


def test_the_committed_pages_are_the_ones_the_code_makes(tmp_path):
    subprocess.run([sys.executable, "-m", "chatd.manual", "--out", str(tmp_path / "man")], check=True,
                   timeout=60, cwd=tmp_path)
    made = sorted(p.name for p in (tmp_path / "man").iterdir())
    assert made == ["chatd.8", "chatd.conf.5"]
    for name in made:
        assert (tmp_path / "man" / name).read_text() == page(name), \
            f"etc/man/{name} is stale: python3 -m chatd.manual --out etc/man"


def test_the_date_is_the_versions_not_todays():
    for name in manual.PAGES:
        head = next(line for line in page(name).splitlines() if line.startswith(".TH "))
        assert shlex.split(head)[3] == __date__
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", __date__)


def test_mandoc_lint_finds_nothing():
    proc = subprocess.run([tool("mandoc"), "-T", "lint", "-W", "warning", *(str(PAGES / n) for n in manual.PAGES)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


def test_groff_warns_of_nothing():
    proc = subprocess.run([tool("groff"), "-ww", "-z", "-man", *(str(PAGES / n) for n in manual.PAGES)],
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr) == (0, "")


def rendered(name: str) -> str:
    env = dict(os.environ, MANPAGER="cat", PAGER="cat", MANWIDTH="250", LC_ALL="C.UTF-8")
    proc = subprocess.run([tool("man"), "-l", str(PAGES / name)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_man_reads_them_from_the_checkout():
    text = rendered("chatd.8")
    for title in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS", "SIGNALS",
                  "FILES", "ENVIRONMENT", "EXAMPLES", "SEE ALSO"):
        assert f"\n{title}\n" in text
    assert "chatd - a TCP line-echo and chat daemon" in text
    assert "-c, --config PATH" in text and "chatd.conf(5)" in text
    text = rendered("chatd.conf.5")
    assert "\n   [server]\n" in text and "Default: 7777." in text and "Option: -p, --port." in text


def test_the_sections_come_in_the_usual_order():
    assert titles(page("chatd.8")) == ["NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "OPTIONS", "EXIT STATUS",
                                       "SIGNALS", "FILES", "ENVIRONMENT", "EXAMPLES", "SEE ALSO"]
    assert titles(page("chatd.conf.5")) == ["NAME", "SYNOPSIS", "DESCRIPTION", "SETTINGS", "FILES", "EXAMPLES",
                                            "SEE ALSO"]


def test_no_hyphen_is_left_to_roff_and_no_line_starts_a_request_by_accident():
    for name in manual.PAGES:
        for line in page(name).splitlines():
            if line.startswith((".\\\"", ".TH ")):   # a comment; the header's date
                continue
            assert not re.search(r"(?<!\\)-", line), line
            assert not line.startswith("'"), line
            assert not line.startswith(".") or re.match(r"\.(TH|SH|SS|TP|PP|RS|RE|nf|fi|br|BR|nh)\b", line), line


def test_escape():
    assert manual.escape(r"a-b\c") == r"a\-b\ec"
    assert manual.escape(".starts\n'quoted\nplain . and ' inside") == "\\&.starts\n\\&'quoted\nplain . and ' inside"
    assert manual.escape("3 × 4") == r"3 \[u00D7] 4"
    assert manual.syntax("kick NICK|ADDRESS [REASON] --json") == \
        r"\fBkick\fR \fINICK\fR|\fIADDRESS\fR [\fIREASON\fR] \fB\-\-json\fR"


def test_every_command_and_option_is_in_chatd_8():
    text = page("chatd.8")
    for command in cli.COMMANDS:
        assert re.search(rf"^\.TP\n\\fB{re.escape(manual.escape(command))}\\fR", text, re.M), command
    options = [s for a in cli.parser()._actions for s in a.option_strings]
    assert "--config" in options and "--log-format" in options
    for option in options:
        assert f".TP\n{manual.syntax(option)}" in text or f", {manual.syntax(option)}" in text, option


def test_every_key_is_in_chatd_conf_5_with_its_facts():
    text = page("chatd.conf.5")
    subsections = dict(re.findall(r"^\.SS \[(\w+)\]\n(.*?)(?=^\.S[SH] )", text, re.M | re.S))
    assert list(subsections) == list(config.SECTIONS)
    for key in config.SCHEMA:
        entry = re.search(rf"^\.TP\n\\fB{key.name}\\fR\n(.*?)(?=^\.TP|\Z)", subsections[key.section], re.M | re.S)
        assert entry, key.dotted
        body = entry[1]
        for fact in (key.help, f"Value: {key.accepts}.", f"Default: {config.tomllib_literal(key.default)}.",
                     f"On restart: {key.on_restart}."):
            assert manual.escape(fact) in body, (key.dotted, fact)
        if key.flag:
            assert manual.syntax(key.flag) in body, key.dotted
    for effect in {k.on_restart for k in config.SCHEMA}:
        assert f".TP\n\\fI{effect}\\fR\n{config.RESTART_EFFECTS[effect]}" in text


def test_chatd_help_prints_every_section_and_option():
    proc = subprocess.run(chatd_command() + ["--help"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout == cli.help_text() + "\n"
    for section in cli.manual():
        assert f"\n{section.title}\n" in proc.stdout
        for tag, _ in section.entries:
            assert f"    {tag.strip()}" in proc.stdout
    assert max(len(line) for line in proc.stdout.splitlines()) <= 79


def test_every_signal_of_the_table_is_documented():
    documented = {name for tag, _ in cli.SIGNALS_HELP.entries for name in re.findall(r"SIG[A-Z0-9]+", tag)}
    table = {s.name for s in (*signals.CAUGHT, *signals.IGNORED, *signals.JOB_CONTROL)}
    assert table <= documented and documented <= table


def environment_reads() -> set[str]:
    """Every variable a chatd module reads from os.environ, by a literal name or a module constant."""
    found = set()
    for path in (REPO / "chatd").glob("*.py"):
        tree = ast.parse(path.read_text())
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.environ.get", "os.environ.pop") \
                    and node.args:
                arg = node.args[0]
                found.add(arg.value if isinstance(arg, ast.Constant) else constants[arg.id])
    return found


def test_every_environment_variable_read_is_documented():
    documented = {name for tag, _ in cli.ENVIRONMENT_HELP.entries for name in re.findall(r"[A-Z_]+", tag)}
    reads = environment_reads()
    assert {"NOTIFY_SOCKET", "RUNTIME_DIRECTORY", "CHATD_DEBUG", "CHATD_TAKEOVER"} <= reads
    assert reads == documented


@pytest.mark.parametrize("caption, commands", manual.EXAMPLES)
def test_every_example_is_a_command_chatd_takes(caption, commands):
    for line in commands.split("\n"):
        words = shlex.split(line)
        assert words[0] == "chatd"
        assert not isinstance(cli.parse(words[1:]), str)


def test_the_config_example_is_valid(tmp_path):
    path = tmp_path / "chatd.conf"
    path.write_text(manual.CONF_EXAMPLE)
    cfg = config.load(str(path))
    assert cfg.server.mode == "chat" and cfg.limits.idle_timeout == 600.0
    assert "\n".join(manual.escape(line) for line in manual.CONF_EXAMPLE.splitlines()) in page("chatd.conf.5")
