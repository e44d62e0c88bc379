"""Shell completion: etc/completion/ is what shtab makes from chatd's own parser (a rebuild
equals it), and bash, sourcing it, completes commands, options, their values and paths."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import shtab

from chatd import cli
from conftest import require_real

REPO = Path(__file__).resolve().parents[2]
BASH = REPO / "etc" / "completion" / "chatd.bash"
ZSH = REPO / "etc" / "completion" / "_chatd"
# COMP_WORDS and COMP_CWORD as bash sets them for the line typed, then the completion function.
COMPLETE = 'source "$0"; COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); COMP_LINE="$*"; ' \
           'COMP_POINT=${#COMP_LINE}; _shtab_chatd; printf "%s\\n" "${COMPREPLY[@]}"'


@pytest.mark.parametrize("shell, committed", [("bash", BASH), ("zsh", ZSH)])
def test_the_committed_completion_is_what_shtab_makes(shell, committed):
    proc = subprocess.run([sys.executable, "-m", "shtab", f"--shell={shell}", "chatd.cli.parser"],
                          capture_output=True, text=True, timeout=60, check=True)
    assert proc.stdout == committed.read_text(), \
        f"{committed.relative_to(REPO)} is stale, or made by another shtab than {shtab.__version__} " \
        f"(pyproject's [build] extra): python3 -m shtab --shell={shell} chatd.cli.parser > {committed.relative_to(REPO)}"


def complete(*words: str, cwd: Path = REPO) -> set[str]:
    """What bash offers for the line `words` (the last one being typed), with etc/completion/chatd.bash."""
    bash = shutil.which("bash") or require_real("bash")
    proc = subprocess.run([bash, "--norc", "--noprofile", "-c", COMPLETE, str(BASH), "chatd", *words],
                          capture_output=True, text=True, timeout=30, cwd=cwd)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    return set(proc.stdout.split())


def test_bash_completes_a_command():
    assert complete("st") == {"start", "stop", "status", "stats"}
    assert complete("") >= set(cli.COMMANDS)
    assert complete("check") == {"check-config"}


def test_bash_completes_an_option():
    assert complete("--lo") == {"--log", "--log-level", "--log-format", "--loop"}
    assert complete("status", "--js") == {"--json"}
    assert complete("restart", "-c", "x.conf", "--pid") == {"--pidfile"}


def test_bash_completes_an_options_value():
    assert complete("--mode", "") == {"echo", "chat"}
    assert complete("start", "--log-level", "w") == {"warning"}


def test_bash_completes_a_config_path(tmp_path):
    (tmp_path / "chat.conf").write_text("")
    (tmp_path / "echo.conf").write_text("")
    (tmp_path / "etc").mkdir()
    assert complete("start", "-c", "ch", cwd=tmp_path) == {"chat.conf"}
    assert complete("--config", "e", cwd=tmp_path) == {"echo.conf", "etc"}
    assert complete("--pidfile", "", cwd=tmp_path) == {"chat.conf", "echo.conf", "etc"}


def test_zsh_reads_its_completion():
    zsh = shutil.which("zsh") or require_real("zsh")
    proc = subprocess.run([zsh, "-n", str(ZSH)], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert ZSH.read_text().startswith("#compdef chatd\n")
