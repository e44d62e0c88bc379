"""The command line: parse argv, run one command, print its messages, exit with its LSB status.

This is the only module that writes to the terminal or exits. A command's
result goes to stdout, notes and warnings to stderr. No user mistake and no
run-time fault ends in a Python traceback here: every failure is said once,
as `chatd: <reason>` on stderr (a config file's errors one a line), with an
exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, NoReturn

from . import __version__, control, lifetime, upgrade
from .config import KEYS, SCHEMA
from .errors import EXIT_FAILED, EXIT_USAGE, ChatdError, UsageError
from .moderation import REQUEST_MAX, TEXT_MAX, parse_duration, parse_network, show_network

# The moderation commands (README "Moderation"): their arguments, in order; "..." takes the rest.
MODERATION = {"who": (), "kick": ("target", "reason..."), "ban": ("target", "duration?"),
              "unban": ("target",), "bans": (), "say": ("text...",), "stats": ()}
COMMANDS = ("start", "run", "stop", "restart", "reload", "upgrade", "status", "check-config", *MODERATION)

# Options that set a config key: flag -> dotted key, from the schema (`Key.flag`).
SETTING_FLAGS = {key.flag: key.dotted for key in SCHEMA if key.flag}
SHORT_FLAGS = {"--port": "-p"}

SUMMARY = "a TCP line-echo and chat daemon, done the textbook way"
SYNOPSIS = (
    "chatd [start] [OPTIONS]",
    "chatd run | -f | --foreground [OPTIONS]",
    "chatd stop [--timeout S] [OPTIONS]",
    "chatd restart | reload | check-config [OPTIONS]",
    "chatd upgrade [--timeout S] [OPTIONS]",
    "chatd status [--json] [OPTIONS]",
    "chatd who | bans | stats [--json] [OPTIONS]",
    "chatd kick NICK|ADDRESS [REASON] [OPTIONS]",
    "chatd ban ADDRESS|CIDR [DURATION] [OPTIONS]",
    "chatd unban ADDRESS|CIDR [OPTIONS]",
    "chatd say TEXT [OPTIONS]",
    "chatd --help | --version",
)


@dataclass(frozen=True)
class Section:
    """One section of the manual: `chatd --help` and the man page chatd(8) (chatd.manual) both
    render these, so the two cannot say different things. `entries` are (term, text); every
    text is one paragraph, wrapped by whoever renders it."""

    title: str
    intro: str = ""
    entries: tuple[tuple[str, str], ...] = ()
    width: int = 15      # --help: the term column
    sub: bool = False    # chatd(8): a subsection of the section before it


DESCRIPTION = Section("DESCRIPTION", (
    "chatd serves lines over TCP: in echo mode each line comes back as it was sent; in chat "
    "mode clients take nicks and talk in rooms. The same command starts it (detached, or in the "
    "foreground for systemd and other supervisors) and controls a running one: stop, restart "
    "in place, live upgrade, status, moderation. Settings come from a TOML file (-c; see "
    "chatd.conf(5)) and the options; without -c every setting has its default."))
COMMAND_HELP = Section("COMMANDS", entries=(
    ("start", "detach and serve; return once it serves, or fail with its reason (the default command)"),
    ("run", "serve in the foreground: systemd, supervisors, containers, a terminal (also -f, --foreground)"),
    ("stop", "graceful stop (SIGUSR1); wait until the process has exited; after --timeout send "
             "SIGTERM, 5 s later SIGKILL"),
    ("restart", "SIGHUP: re-read the config and apply it in place, print the outcome; start chatd "
                "if it is not running"),
    ("reload", "as restart, but never start a stopped chatd (LSB reload)"),
    ("upgrade", "live upgrade: the running chatd hands every listener and client, with its state, "
                "to the chatd installed now, which serves on; clients see no disconnect (TLS clients "
                "are told to reconnect); the old code serves on if the new one fails to take over "
                f"within --timeout (default {upgrade.DEFAULT_TIMEOUT_S:g} s)"),
    ("status", "is it running? pid, address, mode, clients, uptime, ... (--json: one JSON object)"),
    ("check-config", "validate the config without touching the running daemon"),
))
MODERATION_HELP = Section("MODERATION", "through the control socket X.sock; root and chatd's user only", sub=True, entries=(
    ("who", "every client: nick, room, address, connected for, bytes in and out (--json: one JSON object)"),
    ("kick NICK|ADDRESS [REASON]", 'close a chat client by nick (or every client from an address, in '
                                   'either mode); it is told "*** you were kicked: REASON", its room '
                                   'sees it leave "(kicked: REASON)"'),
    ("ban ADDRESS|CIDR [DURATION]", "kick the clients it matches and refuse newcomers from it, unread "
                                    "and untold, for DURATION (30s, 10m, 2h, 1d or seconds; default: "
                                    "until unbanned or stopped); kept across restarts in place, not "
                                    "across stop"),
    ("unban ADDRESS|CIDR", "lift a ban"),
    ("bans", "the bans in force (--json)"),
    ("say TEXT", '"*** TEXT" to every client'),
    ("stats", "the metrics: clients, connections, lines, bytes, drops, restarts (--json)"),
))
OPTIONS_INTRO = (
    "Every command accepts every option. Each setting is also a config key; the command line "
    "wins over the file. An instance is its pid file, chosen by -c and --pidfile; the other "
    "settings describe the server you mean, and a control command whose settings differ from "
    "the running instance's refuses to act on it.")
# The setting options: flag -> (metavar, what it sets); the key and its default follow, from the schema.
SETTING_HELP = {
    "--listen": ("LIST", "addresses to listen on, comma-separated, each HOST:PORT, [V6]:PORT or :PORT, "
                         "maybe after tls:// or proxy://"),
    "--host": ("ADDR", "address to listen on; default: every address, IPv4 and IPv6"),
    "--port": ("N", "TCP port, 1-65535"),
    "--mode": ("echo|chat", "what the server does with a line"),
    "--workers": ("N", "worker processes sharing the listening socket, each a node of the bus"),
    "--loop": ("auto|uvloop|asyncio", "event loop; auto: uvloop if installed"),
    "--pidfile": ("PATH", "the pid file, which names the instance; default: see FILES"),
    "--user": ("NAME|#UID", "drop privileges to this user after binding"),
    "--group": ("NAME|#GID", "... and this group"),
    "--log": ("syslog|stderr|PATH", "where the log goes; default: stderr for run; syslog if its "
                                    "socket exists, else X.log beside the pid file, for start"),
    "--log-level": ("LEVEL", "debug, info, warning or error"),
    "--log-format": ("text|json", "json: one JSON object a line"),
    "--bus": ("URL", "share chat with other chatd processes through this Redis server, "
                     "redis://HOST[:PORT][/DB] or unix:///PATH; default: this process alone; "
                     "needs chatd[cluster]"),
    "--node-id": ("NAME", "this process's name on the bus; default: HOST-PORT"),
}
EXIT_HELP = Section("EXIT STATUS", "LSB init-script codes", (
    ("start, run", "0 serving (or already running, for start); 1 failed, with the reason; 2 bad "
                   "usage; 4 insufficient privilege; 6 bad or missing config"),
    ("stop", "0 stopped or not running; 1 needed SIGKILL; 4 not allowed"),
    ("restart, reload", "0 applied; 6 config rejected (old one still serving); 1 failed or no "
                        "answer; 7 reload of a stopped chatd"),
    ("upgrade", "0 upgraded (old and new version printed); 1 failed, the old one still serving "
                "(with the reason); 7 not running"),
    ("status", "0 running; 1 dead but pid file left; 3 not running; 4 cannot tell"),
    ("check-config", "0 valid; 6 invalid (file:line and what is wrong)"),
    ("who, kick, ban, unban, bans, say, stats", "0 done; 1 refused (no such nick, no such ban, "
                                                "workers > 1); 2 bad usage (missing NICK, bad CIDR "
                                                "or DURATION); 4 not allowed (another user's chatd); "
                                                "7 not running"),
), width=16)
FILES_HELP = Section("FILES", "X is --pidfile or [daemon] pidfile without .pid, else DIR/NAME where NAME "
                              "is chatd or the -c file's stem and DIR is $RUNTIME_DIRECTORY, /run/chatd "
                              "(root), $XDG_RUNTIME_DIR/chatd, or /tmp/chatd-$UID.", (
    ("X.pid", "the pid file: the daemon's pid, locked while it runs"),
    ("X.lock", "the guard lock of the control commands"),
    ("X.state", "what the daemon serves, for status and restart (JSON)"),
    ("X.log", "the log of a detached chatd without syslog, and the fallback while a log target fails"),
    ("X.sock", "the control socket of the moderation commands (mode 0600)"),
    ("/etc/chatd/chatd.conf", "the config the systemd unit passes with -c; chatd reads no file "
                              "unless -c names one"),
), width=23)
ENVIRONMENT_HELP = Section("ENVIRONMENT", entries=(
    ("RUNTIME_DIRECTORY", "the directory of the pid file and its siblings (systemd's RuntimeDirectory=)"),
    ("XDG_RUNTIME_DIR", "a normal user's default directory is $XDG_RUNTIME_DIR/chatd, else /tmp/chatd-$UID"),
    ("NOTIFY_SOCKET", "systemd's notify socket: chatd stays in the foreground and reports READY=1, "
                      "STATUS=, RELOADING=1 and STOPPING=1 there"),
    ("WATCHDOG_USEC, WATCHDOG_PID", "systemd's watchdog: the event loop pings it at half the interval"),
    ("LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES", "socket activation: chatd serves the sockets systemd passes"),
    ("UPSTART_JOB", "upstart's expect stop: chatd stays in the foreground and stops itself (SIGSTOP) "
                    "once it serves"),
    ("JOURNAL_STREAM", "when it names stderr, log lines carry the journal's priority prefixes"),
    ("CHATD_DEBUG", "when set, an internal error shows its Python traceback"),
    ("CHATD_TAKEOVER", "set by chatd upgrade for the new code it starts; not for users"),
), width=19)
SIGNALS_HELP = Section("SIGNALS", entries=(
    ("SIGUSR1", "graceful stop"),
    ("SIGHUP", "restart in place (and reopen the log)"),
    ("SIGTERM, SIGINT, SIGQUIT", "prompt tidy exit"),
    ("SIGPIPE, SIGUSR2, SIGALRM", "ignored"),
    ("SIGTSTP, SIGTTIN, SIGTTOU", "ignored when detached; their defaults under chatd run"),
    ("during an upgrade", "a stop signal calls it off (then stops); a SIGHUP is acted on by "
                          "whichever code serves after it"),
), width=19)


class _Offered(tuple[str, ...]):
    """Values shell completion offers (shtab reads an argument's `choices`) that argparse does
    not enforce: chatd's own checks judge a value, in chatd's words."""

    def __contains__(self, value: object) -> bool:
        return True


FILE = {"bash": "_shtab_compgen_files", "zsh": "_files", "tcsh": "f"}   # shtab.FILE: complete a path


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError instead of printing and exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def parser() -> _Parser:
    """chatd's command line, with each option's help (`chatd --help`, chatd(8)) and what shell
    completion offers (`python3 -m shtab --shell=bash chatd.cli.parser`)."""
    p = _Parser(prog="chatd", add_help=False, allow_abbrev=False)
    p.add_argument("command", nargs="?", default=None, choices=_Offered(COMMANDS))
    p.add_argument("args", nargs="*", default=[])
    p.add_argument("-c", "--config", default=None, metavar="PATH",
                   help="TOML config file; without it every setting has its default").complete = FILE
    for flag, dotted in SETTING_FLAGS.items():
        key, (metavar, text) = KEYS[dotted], SETTING_HELP[flag]
        default = "" if key.default in ("", ()) else f", default {key.default}"
        action = p.add_argument(*filter(None, (SHORT_FLAGS.get(flag), flag)), dest=dotted, default=None,
                                metavar=metavar, help=f"{text} ([{key.section}] {key.name}{default})",
                                choices=_Offered(key.choices) if key.choices else None)
        if key.is_path:
            action.complete = FILE
    p.add_argument("--timeout", default=None, metavar="S",
                   help="stop: seconds to wait before SIGTERM (default drain_timeout + 5); upgrade: "
                        f"seconds for the new code to take over (default {upgrade.DEFAULT_TIMEOUT_S:g})")
    p.add_argument("--json", action="store_true", help="status, who, bans, stats: print one JSON object")
    p.add_argument("-f", "--foreground", action="store_true", help="the same as the run command")
    p.add_argument("-h", "--help", action="store_true", help="this text")
    p.add_argument("--version", action="store_true", help="print the version")
    return p


def option_help() -> Section:
    """The OPTIONS section, from the parser: every option it takes, and only those."""
    entries = []
    for action in parser()._actions:
        if action.option_strings:
            term = ", ".join(action.option_strings) + (f" {action.metavar}" if action.metavar else "")
            entries.append(("    " + term if term.startswith("--") else term, action.help or ""))
    return Section("OPTIONS", OPTIONS_INTRO, tuple(entries), width=25)


def manual() -> tuple[Section, ...]:
    """Every section of `chatd --help` in order (chatd(8) adds NAME, SYNOPSIS, EXAMPLES, SEE ALSO)."""
    return (DESCRIPTION, COMMAND_HELP, MODERATION_HELP, option_help(), EXIT_HELP, SIGNALS_HELP,
            FILES_HELP, ENVIRONMENT_HELP)


def help_text(width: int = 79) -> str:
    """`chatd --help`: the manual as plain text."""
    out = ["NAME", f"    chatd - {SUMMARY}", "", "SYNOPSIS", *(f"    {line}" for line in SYNOPSIS)]
    for section in manual():
        out += ["", section.title]
        if section.intro:
            out += textwrap.wrap(section.intro, width, initial_indent="    ", subsequent_indent="    ")
        for term, text in section.entries:
            column = 4 + section.width
            lines = textwrap.wrap(text, width - column)
            if len(term) + 4 > column - 1:
                out.append(f"    {term}")
            else:
                out.append(f"    {term:<{section.width}}{lines.pop(0)}")
            out += [" " * column + line for line in lines]
    return "\n".join(out + ["", f"chatd {__version__}"])


def parse(argv: list[str]) -> control.Options | str:
    """The options, or "help"/"version"."""
    args = parser().parse_intermixed_args(argv)
    if args.help:
        return "help"
    if args.version:
        return "version"
    command = args.command or "start"
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    if args.foreground and command == "start":
        command = "run"
    opts = control.Options(command=command, config=args.config, json=args.json)
    if command in MODERATION:
        opts.request = moderation_request(command, args.args)
    elif args.args:
        raise UsageError(f"unrecognized arguments: {' '.join(args.args)}")
    for flag, key in SETTING_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            opts.overrides[key] = (value, flag)
    if args.timeout is not None:
        try:
            opts.timeout = float(args.timeout)
        except ValueError:
            raise UsageError(f"--timeout: expected seconds, got {args.timeout!r}") from None
        if not opts.timeout > 0 or opts.timeout == float("inf"):
            raise UsageError(f"--timeout: must be a positive number of seconds, got {args.timeout!r}")
    return opts


def moderation_request(command: str, words: list[str]) -> dict[str, Any]:
    """What a moderation command asks the daemon, its arguments checked here (exit 2)."""
    names = MODERATION[command]
    request: dict[str, Any] = {"cmd": command}
    rest = list(words)
    for name in names:
        if name.endswith("..."):
            request[name[:-3]] = " ".join(rest)
            rest = []
        elif rest:
            request[name.rstrip("?")] = rest.pop(0)
        elif not name.endswith("?"):
            raise UsageError(f"{command}: missing {name.upper()}")
    if rest:
        raise UsageError(f"{command}: unexpected {' '.join(rest)!r}")
    if command == "say" and not request["text"].strip():
        raise UsageError("say: missing TEXT")
    if command in ("ban", "unban"):
        request["target"] = show_network(parse_network(request["target"]))
    if "duration" in request:
        request["seconds"] = parse_duration(request.pop("duration"))
    if len(json.dumps(request)) + 1 > REQUEST_MAX:   # the daemon reads one line of this much
        raise UsageError(f"{command}: the arguments are too long (a request is at most {REQUEST_MAX} "
                         f"bytes; a text is cut at {TEXT_MAX} characters anyway)")
    return request


def _say(text: str) -> None:
    print(text, flush=True)


def _warn(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _fail(message: str, status: int) -> NoReturn:
    """`chatd: ` and each line of `message` (a config file's errors are one a line), then exit."""
    try:
        for line in message.splitlines() or [""]:
            print(f"chatd: {line}", file=sys.stderr, flush=True)
        if status == EXIT_USAGE:
            print("Try 'chatd --help'.", file=sys.stderr, flush=True)
    except OSError:
        pass
    sys.exit(status)


def run_command(argv: list[str]) -> int:
    parsed = parse(argv)
    if parsed == "help":
        _say(help_text())
        return 0
    if parsed == "version":
        _say(f"chatd {__version__}")
        return 0
    opts = parsed
    out = control.Console(say=_say, warn=_warn)
    verbs = {
        "start": lambda: control.start(opts, out),
        "run": lambda: control.run(opts, out),
        "stop": lambda: control.stop(opts, out),
        "restart": lambda: control.restart(opts, out),
        "reload": lambda: control.restart(opts, out, reload=True),
        "upgrade": lambda: control.upgrade_daemon(opts, out),
        "status": lambda: control.status(opts, out),
        "check-config": lambda: control.check_config(opts, out),
    } | dict.fromkeys(MODERATION, lambda: control.moderate(opts, out))
    return verbs[opts.command]()


def main(argv: list[str] | None = None) -> NoReturn:
    """The `chatd` console script."""
    try:
        takeover = upgrade.Takeover.from_environment()
        if takeover is not None:   # started by `chatd upgrade`: argv is the old daemon's
            sys.exit(lifetime.take_over(takeover))
        status = run_command(sys.argv[1:] if argv is None else argv)
    except ChatdError as e:
        _fail(e.message, e.status)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except BrokenPipeError:
        # Output went to a pipe that closed (`chatd status | head -1`): nothing to say.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(EXIT_FAILED)
    except Exception as e:   # noqa: BLE001 - a bug must still not print a traceback at users
        if os.environ.get("CHATD_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e} (set CHATD_DEBUG=1 for details)", EXIT_FAILED)
    try:
        sys.stdout.flush()
    except OSError:
        pass
    sys.exit(status)
