"""The man pages chatd(8) and chatd.conf(5), made from chatd's own help and config schema.

chatd(8) renders the sections `chatd --help` shows (`cli.manual()`: the options come
from the parser itself), chatd.conf(5) every key of `config.SCHEMA`, so neither page can
say something the code does not. `python3 -m chatd.manual --out DIR` writes both;
etc/man/ holds them as committed, and a test rebuilds them and compares. The date is
the version's (`chatd.__date__`), not today's, so a rebuild is byte for byte the same.

Tests: tests/unit/test_manual.py
"""

from __future__ import annotations

import argparse
import os
import re
from typing import Callable

from . import __date__, __version__, cli
from .config import KEYS, RESTART_EFFECTS, SCHEMA, SECTIONS, tomllib_literal

GENERATED = (r'.\" Made by chatd.manual from the help and config schema of chatd; do not edit. '
             "Rebuild: python3 -m chatd.manual --out etc/man")
EXAMPLES = (   # chatd(8): a test parses each command with chatd's own parser
    ("Serve chat on port 7000 in the foreground, logging to the terminal:",
     "chatd run --mode chat -p 7000 --log stderr"),
    ("Start the system instance, then ask how it is:",
     "chatd start -c /etc/chatd/chatd.conf\nchatd status -c /etc/chatd/chatd.conf"),
    ("Check an edited config, then apply it in place (clients stay connected):",
     "chatd check-config -c /etc/chatd/chatd.conf\nchatd reload -c /etc/chatd/chatd.conf"),
    ("After installing a new version, hand the running daemon's clients to it:",
     "chatd upgrade -c /etc/chatd/chatd.conf"),
    ("Keep a network out for an hour, then list the bans:",
     "chatd ban 192.0.2.0/24 1h -c /etc/chatd/chatd.conf\nchatd bans --json -c /etc/chatd/chatd.conf"),
)
CONF_DESCRIPTION = (
    "chatd reads its settings from the TOML file that -c names; the systemd unit passes "
    "-c /etc/chatd/chatd.conf. Without -c no file is read. Every key has a default, so a file "
    "sets only what differs, and an option on the command line wins over the file.",
    "Unknown sections and keys, wrong types and values out of range are errors for "
    "check-config, start, run, restart and reload alike, each reported as FILE:LINE, in file "
    "order; a TOML syntax error hides the rest, and then only syntax errors are reported. A "
    'number must be a TOML number, never a string (port = "7777" is an error); an integer is '
    "accepted where a number with a fraction is expected. A relative path is relative to the "
    "file's directory.",
    "A restart in place (SIGHUP, chatd restart, chatd reload) reads the file again. What it "
    "does with a changed key is said for each key below:",
)
CONF_EXAMPLE = """\
[server]
listen = ["127.0.0.1:7777", "proxy://127.0.0.1:7779"]
mode = "chat"

[access]
proxy_from = ["127.0.0.1"]
deny = ["192.0.2.0/24"]

[limits]
idle_timeout = 600.0

[chat]
motd = "welcome to chatd"
default_room = "lobby"
"""
SEE_ALSO = {
    "chatd.8": ("chatd.conf(5)", "systemd.service(5)", "sd_notify(3)", "daemon(7)", "signal(7)",
                "logrotate(8)", "rsyslogd(8)"),
    "chatd.conf.5": ("chatd(8)",),
}
# How a term (the tag of an entry) is set: a command line (literal words bold, PLACEHOLDERS
# italic), names (the upper-case ones bold), or a file name (italic).
TERM_STYLES = {"FILES": "file", "ENVIRONMENT": "names", "SIGNALS": "names"}


def escape(text: str) -> str:
    """Text safe as roff input: backslashes as \\e, every hyphen as \\- (so options and commands
    copy as typed; the pages turn hyphenation off, .nh), characters past ASCII by code point,
    and no line that starts with a control character."""
    text = text.replace("\\", r"\e").replace("-", r"\-")
    text = "".join(c if ord(c) < 128 else f"\\[u{ord(c):04X}]" for c in text)
    return "\n".join(r"\&" + line if line[:1] in (".", "'") else line for line in text.split("\n"))


def _font(font: str, text: str) -> str:
    return f"\\f{font}{escape(text)}\\fR"


SYNTAX = re.compile(r"(?P<literal>--?[A-Za-z][\w-]*|\b[a-z][\w.-]*)|(?P<placeholder>\b[A-Z][A-Z0-9_]*\b)")
NAME = re.compile(r"\b[A-Z][A-Z0-9_]*\b")


def _styled(pattern: re.Pattern[str], text: str, style: Callable[[re.Match[str]], str]) -> str:
    """`text` escaped, with each match of `pattern` set by `style`."""
    out, at = [], 0
    for m in pattern.finditer(text):
        out += [escape(text[at:m.start()]), style(m)]
        at = m.end()
    return "".join(out + [escape(text[at:])])


def syntax(text: str) -> str:
    """A command line as man pages set one: what is typed bold, what stands for a value italic."""
    return _styled(SYNTAX, text, lambda m: _font("B" if m["literal"] else "I", m[0]))


def term(text: str, style: str) -> str:
    text = text.strip()
    if style == "file":
        return _font("I", text)
    if style == "names":
        return _styled(NAME, text, lambda m: _font("B", m[0]))
    return syntax(text)


def _head(name: str, section: int, kind: str) -> list[str]:
    return [GENERATED, f'.TH {name} {section} {__date__} "chatd {__version__}" "{kind}"', ".nh"]


def _section(section: cli.Section) -> list[str]:
    out = [f".SS {section.title.capitalize()}" if section.sub else f'.SH "{section.title}"']
    if section.intro:
        out.append(escape(section.intro))
    for tag, text in section.entries:
        out += [".TP", term(tag, TERM_STYLES.get(section.title, "syntax")), escape(text)]
    return out


def _see_also(page: str) -> list[str]:
    refs = SEE_ALSO[page]
    return ['.SH "SEE ALSO"'] + [f".BR {name} ({number[:-1]}){',' if i < len(refs) - 1 else ''}"
                                 for i, ref in enumerate(refs) for name, number in [ref.split("(")]]


def _example(lines: str) -> list[str]:
    return [".PP", ".RS 4", ".nf", *(escape(line) for line in lines.split("\n")), ".fi", ".RE"]


def chatd_8() -> str:
    """The man page chatd(8)."""
    out = _head("CHATD", 8, "System Manager's Manual")
    out += [".SH NAME", escape(f"chatd - {cli.SUMMARY}"), ".SH SYNOPSIS", ".nf"]
    out += [syntax(line) for line in cli.SYNOPSIS] + [".fi"]
    for section in cli.manual():
        out += _section(section)
    out.append(".SH EXAMPLES")
    for i, (caption, commands) in enumerate(EXAMPLES):
        out += [".PP"] * bool(i) + [escape(caption)] + _example(commands)
    return "\n".join(out + _see_also("chatd.8")) + "\n"


def options_of(dotted: str) -> str:
    """The command-line options that set a key: "-p, --port"; "" if none does."""
    return next((", ".join(a.option_strings) for a in cli.parser()._actions if a.dest == dotted), "")


def chatd_conf_5() -> str:
    """The man page chatd.conf(5): every key of the schema, by section."""
    out = _head("CHATD.CONF", 5, "File Formats Manual")
    out += [".SH NAME", escape("chatd.conf - the configuration file of chatd(8)"),
            ".SH SYNOPSIS", _font("I", "/etc/chatd/chatd.conf"), ".br", syntax("chatd -c FILE"),
            ".SH DESCRIPTION", escape(CONF_DESCRIPTION[0])]
    for paragraph in CONF_DESCRIPTION[1:]:
        out += [".PP", escape(paragraph)]
    for effect, words in RESTART_EFFECTS.items():
        out += [".TP", _font("I", effect), escape(words)]
    out.append(".SH SETTINGS")
    for section in SECTIONS:
        out.append(f".SS [{section}]")
        for key in (k for k in SCHEMA if k.section == section):
            flags = options_of(key.dotted)
            out += [".TP", _font("B", key.name), escape(key.help), ".br",
                    escape(f"Value: {key.accepts}. Default: {tomllib_literal(key.default)}."),
                    *([f"Option: {syntax(flags)}."] if flags else []),
                    escape(f"On restart: {key.on_restart}.")]
    out += ['.SH FILES', ".TP", _font("I", "/etc/chatd/chatd.conf"),
            escape(dict(cli.FILES_HELP.entries)["/etc/chatd/chatd.conf"]),
            ".SH EXAMPLES", escape("A chat server on the loopback address, behind a local proxy "
                                   "on a second port, idle clients closed after ten minutes:")]
    out += _example(CONF_EXAMPLE.rstrip("\n"))
    return "\n".join(out + _see_also("chatd.conf.5")) + "\n"


PAGES = {"chatd.8": chatd_8, "chatd.conf.5": chatd_conf_5}


def write(directory: str) -> list[str]:
    """Write both pages into `directory` (made if missing); their paths."""
    os.makedirs(directory, exist_ok=True)
    written = []
    for name, render in PAGES.items():
        path = os.path.join(directory, name)
        with open(path, "w", encoding="ascii") as f:
            f.write(render())
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m chatd.manual", description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, metavar="DIR", help="where to write chatd.8 and chatd.conf.5")
    write(parser.parse_args(argv).out)


if __name__ == "__main__":
    main()
