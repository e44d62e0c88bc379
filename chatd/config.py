"""Configuration: the schema of every key, its default, and `load()` with file:line errors.

The config file is TOML, read with `tomllib`. Every key has a default, so no
file is needed. Command-line values win over the file. tomllib reports lines
only for syntax errors, so `_locate_keys` finds each key's line itself.

`load()` reports every error in the file at once, each as FILE:LINE, in file
order (see `load` and `_parse`); a bad command-line value is reported alone.

Checking a value may ask the system, read-only: `[daemon] user` and `group`
are looked up in the user and group databases (pwd, grp), `[server] host` is
resolved (getaddrinfo, so DNS or /etc/hosts), and `[server] loop = "uvloop"`
looks whether uvloop is importable (without importing it). Nothing is
written, bound, or changed here.
"""

from __future__ import annotations

import dataclasses
import grp
import importlib.util
import ipaddress
import os
import pwd
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from . import access, files, listen, tls
from .errors import ChatdError, ConfigError, setting_error
from .metrics import parse_listen
from .rooms import ROOM_RE   # "#name"; a config value may leave out the '#'

FACILITIES = (
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp",
    "cron", "authpriv", "ftp",
    "local0", "local1", "local2", "local3", "local4", "local5", "local6", "local7",
)
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_LISTENERS = 64
LOG_FORMATS = ("text", "json")
HOSTNAME_RE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")


class Invalid(ValueError):
    """A value that fails its check; the message says what was expected."""


# ---------------------------------------------------------------- value checks

Check = Callable[[Any], Any]


def _accepting(text: str, choices: tuple[str, ...] = ()) -> Callable[[Check], Check]:
    """Mark a check with what it accepts, in words (`Key.accepts`, which chatd.conf(5) shows)
    and, for a closed set, the values (`Key.choices`, which shell completion offers)."""
    def mark(check: Check) -> Check:
        check.accepts = text            # type: ignore[attr-defined]
        check.choices = choices         # type: ignore[attr-defined]
        return check
    return mark


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", tuple: "an array", dict: "a table"}.get(type(value), type(value).__name__)


def _int(lo: int, hi: int | None = None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip(), 10)
            except ValueError:
                raise Invalid(f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected an integer, got {_type_name(value)}")
        if value < lo or (hi is not None and value > hi):
            raise Invalid(f"must be {span}, got {value}")
        return value
    span = f"between {lo} and {hi}" if hi is not None else f"at least {lo}"
    return _accepting(f"an integer {span}")(check)


def _float(lo: float, strictly_above: bool = False, hi: float | None = None) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise Invalid(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Invalid(f"expected a number, got {_type_name(value)}")
        value = float(value)
        if value != value or value in (float("inf"), float("-inf")):
            raise Invalid(f"expected a finite number, got {value}")
        if value < lo or (strictly_above and value == lo):
            raise Invalid(f"must be {floor}, got {value:g}")
        if hi is not None and value > hi:
            raise Invalid(f"must be at most {hi:g}, got {value:g}")
        return value
    floor = f"{'greater than' if strictly_above else 'at least'} {lo:g}"
    return _accepting(f"a number {floor}" + (f", at most {hi:g}" if hi is not None else ""))(check)


@_accepting("a string")
def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"expected a string, got {_type_name(value)}")
    if "\0" in value:
        raise Invalid("must not contain a NUL character")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = _str(value)
        if value not in choices:
            raise Invalid(f"must be one of {', '.join(choices)}; got {value!r}")
        return value
    return _accepting("one of " + ", ".join(f'"{c}"' for c in choices), choices)(check)


@_accepting("an IP address or host name, or empty")
def _host(value: Any) -> str:
    value = _str(value).strip()
    if value.startswith("[") and value.endswith("]"):
        value = value[1:-1]
    if not value:
        return value    # every address (listen.every_address)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not HOSTNAME_RE.fullmatch(value):
        raise Invalid(f"not an IP address or host name: {value!r}")
    try:
        socket.getaddrinfo(value, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise Invalid(f"cannot resolve {value!r}: {e.strerror}") from None
    except UnicodeError:   # a label IDNA cannot encode: empty ("a..b") or over 63 characters
        raise Invalid(f"not an IP address or host name: {value!r}") from None
    return value


@_accepting('an array of strings, each "HOST:PORT", "[V6]:PORT" or ":PORT", maybe after a scheme')
def _listen(value: Any) -> tuple[str, ...]:
    """An array of endpoints, or (from the command line) one string of them split by commas;
    each checked for shape and its host resolved (listen.parse_endpoint)."""
    if isinstance(value, str):
        given, value = value, [part for part in value.split(",") if part.strip()]
        if not value:   # `--listen "$UNSET"` must not mean host and port: every address
            raise Invalid(f"no address given ({given!r}); list at least one, HOST:PORT")
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"expected an array of addresses, got {_type_name(value)}")
    entries = []
    for item in value:
        if not isinstance(item, str):
            raise Invalid(f"each address must be a string, got {_type_name(item)}")
        try:
            endpoint = listen.parse_endpoint(_str(item))
        except ValueError as e:
            raise Invalid(str(e)) from None
        if endpoint.host:
            _host(endpoint.host)
        entries.append(item.strip())
    if len(entries) > MAX_LISTENERS:
        raise Invalid(f"at most {MAX_LISTENERS} addresses, got {len(entries)}")
    return tuple(entries)


MAX_RULES = 4096   # entries in one [access] list


@_accepting(f"an array of at most {MAX_RULES} strings, each an IPv4 or IPv6 address or CIDR block")
def _networks(value: Any) -> tuple[str, ...]:
    """An array of addresses and CIDR blocks, IPv4 or IPv6 (access.network checks each)."""
    if not isinstance(value, (list, tuple)):
        raise Invalid(f"expected an array of addresses or CIDR blocks, got {_type_name(value)}")
    if len(value) > MAX_RULES:
        raise Invalid(f"at most {MAX_RULES} entries, got {len(value)}")
    for item in value:
        if not isinstance(item, str):
            raise Invalid(f"each entry must be a string, got {_type_name(item)}")
        try:
            access.network(item)
        except ValueError as e:
            raise Invalid(str(e)) from None
    return tuple(item.strip() for item in value)


LOOPS = ("auto", "uvloop", "asyncio")


@_accepting('one of "auto", "uvloop" (if installed), "asyncio"', LOOPS)
def _loop(value: Any) -> str:
    value = _choice(*LOOPS)(value)
    if value == "uvloop" and importlib.util.find_spec("uvloop") is None:
        raise Invalid("uvloop is not installed here; use 'auto' or 'asyncio'")
    return value


@_accepting('a user name or "#UID", or empty')
def _user(value: Any) -> str:
    value = _str(value).strip()
    if value:
        lookup_user(value)
    return value


@_accepting('a group name or "#GID", or empty')
def _group(value: Any) -> str:
    value = _str(value).strip()
    if value:
        lookup_group(value)
    return value


@_accepting("a room name: 1 to 32 letters, digits, _ or -, maybe after a #")
def _room(value: Any) -> str:
    value = _str(value)
    if not ROOM_RE.fullmatch(value if value.startswith("#") else "#" + value):
        raise Invalid("a room is 1 to 32 letters, digits, '_' or '-' (a leading '#' is optional)")
    return value.lstrip("#").lower()


@_accepting("a path, or empty")
def _path(value: Any) -> str:
    return _str(value)


BUS_RE = re.compile(r"redis://(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>\d{1,5}))?"
                    r"(?:/(?P<db>\d{1,2}))?|unix://(?P<path>/[^?#]+)(?:\?db=(?P<udb>\d{1,2}))?")
DAY_S = 86400.0   # the longest a [cluster] timing may be (redis-py and Redis take milliseconds)
NODE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
PREFIX_RE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@_accepting('"redis://HOST[:PORT][/DB]", "unix:///PATH[?db=DB]", or empty')
def _bus(value: Any) -> str:
    """"" (one process), redis://HOST[:PORT][/DB] or unix:///PATH[?db=DB]: checked for shape
    here; whether the server answers is found at start."""
    value = _str(value).strip()
    if not value:
        return value
    m = BUS_RE.fullmatch(value)
    if m is None:
        raise Invalid(f'expected "", redis://HOST[:PORT][/DB] or unix:///PATH, got {value!r}')
    if m["port"] and not 1 <= int(m["port"]) <= 65535:
        raise Invalid(f"port must be between 1 and 65535, got {m['port']}")
    if m["host"] and m["host"].startswith("["):
        try:
            ipaddress.IPv6Address(m["host"][1:-1])
        except ValueError:
            raise Invalid(f"not an IPv6 address in brackets: {m['host']!r}") from None
    elif m["host"]:
        _host(m["host"])
    return value


@_accepting('"HOST:PORT", "[IPV6]:PORT", or empty')
def _metrics_listen(value: Any) -> str:
    """"" (off), "HOST:PORT" or "[IPV6]:PORT": the address `[metrics] listen` binds."""
    value = _str(value).strip()
    if not value:
        return value
    try:
        host, _ = parse_listen(value)
    except ValueError as e:
        raise Invalid(str(e)) from None
    _host(host)
    return value


def _pattern(regex: re.Pattern[str], what: str, empty: bool = True) -> Callable[[Any], str]:
    """A string of `regex`'s shape (or empty, if `empty`)."""
    def check(value: Any) -> str:
        value = _str(value)
        if (value or not empty) and not regex.fullmatch(value):
            raise Invalid(f"{what}; got {value!r}")
        return value
    return _accepting(f"a string of {what}" + (", or empty" if empty else ""))(check)


def lookup_user(spec: str) -> pwd.struct_passwd | int:
    """A user by name or "#uid": its passwd entry, or the bare uid if it has none."""
    if spec.startswith("#"):
        uid = _int(0, 2**32 - 2)(spec[1:])
        try:
            return pwd.getpwuid(uid)
        except KeyError:
            return uid
    try:
        return pwd.getpwnam(spec)
    except KeyError:
        raise Invalid(f"no such user: {spec!r}") from None


def lookup_group(spec: str) -> int:
    """A group id by name or "#gid"."""
    if spec.startswith("#"):
        return _int(0, 2**32 - 2)(spec[1:])
    try:
        return grp.getgrnam(spec).gr_gid
    except KeyError:
        raise Invalid(f"no such group: {spec!r}") from None


# ---------------------------------------------------------------- the schema

# What a restart in place (SIGHUP) does with a changed key: the README's reference table says it.
AT_ONCE = "at once"
NEW_CONNECTIONS = "new connections"
ALL_CONNECTIONS = "every connection"
NEEDS_RESTART = "needs stop and start"
RESTART_EFFECTS = {   # each in words, for chatd.conf(5)
    AT_ONCE: "the new value applies as the restart completes",
    NEW_CONNECTIONS: "clients already connected keep the value they came with",
    ALL_CONNECTIONS: "connected clients take the new value too",
    NEEDS_RESTART: "the restart is rejected, naming the key, and nothing changes: stop and start chatd",
}


@dataclass(frozen=True)
class Key:
    """One config key: where it lives, its default, its check, its command-line flag, what it
    means (`help`) and what a restart in place does with a new value (`on_restart`).

    The command line's setting options (`cli`) and the README's reference table are made
    from these, so neither can drift from the schema.
    """

    section: str
    name: str
    default: Any
    check: Callable[[Any], Any]
    flag: str = ""           # the command-line option that sets it, if any
    is_path: bool = False    # relative paths resolve against the file's directory
    help: str = ""
    on_restart: str = AT_ONCE

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.name}"

    @property
    def accepts(self) -> str:
        """What the value may be, in words: "an integer between 1 and 65535"."""
        return str(getattr(self.check, "accepts"))

    @property
    def choices(self) -> tuple[str, ...]:
        """The values, when they are a closed set; else ()."""
        return tuple(getattr(self.check, "choices"))


SCHEMA: tuple[Key, ...] = (
    Key("server", "listen", (), _listen, "--listen",
        help='addresses to listen on, each "HOST:PORT", "[V6]:PORT" or ":PORT" (every address), '
             'optionally prefixed "tls://" (see [tls]), "proxy://" (a PROXY protocol header first, '
             'from [access] proxy_from) or "tls+proxy://"; on the command line, comma-separated; '
             'empty: host and port; a restart binds new ones before closing old ones'),
    Key("server", "host", "", _host, "--host",
        help='the address to listen on when listen is empty; empty: every address, IPv4 and IPv6 '
             '(one dual-stack socket; IPv4 alone where the host has no IPv6)'),
    Key("server", "port", 7777, _int(1, 65535), "--port",
        help="the TCP port when listen is empty, 1-65535"),
    Key("server", "mode", "echo", _choice("echo", "chat"), "--mode", help='"echo" or "chat"',
        on_restart=NEW_CONNECTIONS),
    Key("server", "backlog", 1024, _int(1, 65535), help="listen(2) backlog"),
    Key("server", "workers", 1, _int(1, 64), "--workers", on_restart=NEEDS_RESTART,
        help="worker processes serving one listening socket, each a node of the bus (> 1 needs "
             "[cluster] bus); a dead one is started again"),
    Key("server", "loop", "auto", _loop, "--loop",
        help='"auto" (uvloop when importable), "uvloop", or "asyncio"', on_restart=NEEDS_RESTART),
    Key("daemon", "pidfile", "", _path, "--pidfile", is_path=True, on_restart=NEEDS_RESTART,
        help="the pid file, which names the instance; empty: DIR/NAME.pid (see Files)"),
    Key("daemon", "user", "", _user, "--user", on_restart=NEEDS_RESTART,
        help='drop privileges to this user (name or "#uid") after binding; empty: stay who you are'),
    Key("daemon", "group", "", _group, "--group", on_restart=NEEDS_RESTART,
        help='... and this group (name or "#gid"); empty: the user\'s group'),
    Key("daemon", "drain_timeout", 10.0, _float(0.0, strictly_above=True),
        help="seconds a graceful stop may wait for slow clients (> 0)"),
    Key("log", "target", "", _path, "--log", is_path=True,
        help='"syslog", "stderr", or a file path; empty: stderr for run, else syslog if its '
             'socket exists, else X.log beside the pid file'),
    Key("log", "level", "info", _choice(*LOG_LEVELS), "--log-level",
        help="debug, info, warning or error; debug adds per-connection detail"),
    Key("log", "format", "text", _choice(*LOG_FORMATS), "--log-format",
        help='"text", or "json": one JSON object a line, for log shippers (README "Logging")'),
    Key("log", "syslog_socket", "/dev/log", _path, is_path=True, help="the syslog daemon's socket"),
    Key("log", "facility", "daemon", _choice(*FACILITIES),
        help="a syslog facility name: daemon, user, local0 ... local7"),
    Key("limits", "max_line", 4096, _int(16, 1 << 24), on_restart=NEW_CONNECTIONS,
        help="bytes in one line, terminator excluded (>= 16)"),
    Key("limits", "max_clients", 10000, _int(0), on_restart=NEW_CONNECTIONS,
        help="clients at once; past it a newcomer is told it is full; 0: no limit"),
    Key("limits", "max_clients_per_ip", 100, _int(0), on_restart=NEW_CONNECTIONS,
        help="clients at once from one address; 0: no limit"),
    Key("limits", "connect_rate", 0.0, _float(0.0), on_restart=NEW_CONNECTIONS,
        help="new connections per second from one address (an IPv6 /64), sustained; past it a "
             'newcomer is told "ERR too many connections, slow down"; 0: no limit'),
    Key("limits", "connect_burst", 10, _int(1), on_restart=NEW_CONNECTIONS,
        help="new connections one address may open at once under connect_rate (>= 1)"),
    Key("limits", "logged_per_ip", 100, _int(0),
        help="newcomers from one address (an IPv6 /64) logged one by one per 10 s, 10 times "
             "that from all; past it they are counted, one line per address; 0: no limit"),
    Key("limits", "idle_timeout", 0.0, _float(0.0), on_restart=ALL_CONNECTIONS,
        help="seconds since the last byte received before a client is closed; 0: never"),
    Key("limits", "output_buffer", 262144, _int(16, 1 << 30), on_restart=NEW_CONNECTIONS,
        help="bytes queued for one client (>= max_line): echo stops reading it; chat charges "
             "what passes it to the senders, and drops a client that stops taking it"),
    Key("limits", "rate", 10.0, _float(0.0), on_restart=ALL_CONNECTIONS,
        help="chat lines per second per client, sustained; 0: no limit"),
    Key("limits", "burst", 20, _int(1), on_restart=ALL_CONNECTIONS,
        help="chat lines a client may send at once (>= 1)"),
    Key("limits", "keepalive", 60, _int(0, 32767), on_restart=NEW_CONNECTIONS,
        help="seconds of silence before TCP keepalive probes find dead peers; 0: off"),
    Key("access", "allow", (), _networks, on_restart=NEW_CONNECTIONS,
        help='addresses and CIDR blocks ("192.0.2.0/24", "2001:db8::/32") that may connect; '
             "empty: all"),
    Key("access", "deny", (), _networks, on_restart=NEW_CONNECTIONS,
        help="addresses and CIDR blocks that may not connect, even if allowed: closed at once, "
             "nothing read or sent"),
    Key("access", "proxy_from", (), _networks, on_restart=NEW_CONNECTIONS,
        help='the proxies whose PROXY protocol header is believed on a "proxy://" listener; '
             "others are closed"),
    Key("chat", "motd", "", _str, on_restart=NEW_CONNECTIONS,
        help='text sent to each new chat client; one line per "\\n"'),
    Key("chat", "default_room", "lobby", _room, on_restart=NEW_CONNECTIONS,
        help="the room everyone joins first"),
    Key("cluster", "bus", "", _bus, "--bus", on_restart=NEEDS_RESTART,
        help='chat mode shared with other chatd processes through this Redis server: '
             '"redis://HOST[:PORT][/DB]" or "unix:///PATH"; empty: this process alone '
             '(README "More than one process")'),
    Key("cluster", "node_id", "", _pattern(NODE_ID_RE, "1 to 64 letters, digits, _ . or -"),
        "--node-id", on_restart=NEEDS_RESTART,
        help="this process's name on the bus, unique among those sharing it (a duplicate is "
             "refused at start); empty: HOST-PORT"),
    Key("cluster", "prefix", "chatd", _pattern(PREFIX_RE, "1 to 64 letters, digits, _ . : or -", empty=False),
        on_restart=NEEDS_RESTART,
        help="the start of every Redis key and channel chatd uses, so clusters can share a server"),
    Key("cluster", "heartbeat", 1.0, _float(0.1, hi=DAY_S), help="seconds between liveness heartbeats (>= 0.1)"),
    Key("cluster", "node_timeout", 3.0, _float(0.3, hi=DAY_S),
        help="seconds without a heartbeat after which a node is taken for dead and its users "
             "leave (at least 3 x heartbeat)"),
    Key("cluster", "reconnect_max", 5.0, _float(0.1, hi=DAY_S),
        help="the longest wait, in seconds, between attempts to reach a lost bus"),
    Key("cluster", "guest_block", 100, _int(1, 1_000_000), on_restart=NEEDS_RESTART,
        help="guest numbers leased from the bus at a time"),
    Key("metrics", "listen", "", _metrics_listen, on_restart=NEEDS_RESTART,
        help='serve the metrics in the Prometheus text format at http://HOST:PORT/metrics: '
             '"HOST:PORT" or "[IPV6]:PORT"; empty: off (README "Metrics")'),
    Key("tls", "certificate", "", _path, is_path=True, on_restart=NEW_CONNECTIONS,
        help='the PEM certificate (chain) of "tls://" listeners; a restart reads it again'),
    Key("tls", "key", "", _path, is_path=True, on_restart=NEW_CONNECTIONS,
        help="its PEM private key, which every user may not read (o-r)"),
    Key("tls", "client_ca", "", _path, is_path=True, on_restart=NEW_CONNECTIONS,
        help="PEM CA certificates: when set, every TLS client must show a certificate one of "
             "them signed, and in chat mode takes its subject CN as nick; empty: none asked"),
    Key("tls", "handshake_timeout", 10.0, _float(0.0, strictly_above=True, hi=300.0),
        on_restart=NEW_CONNECTIONS,
        help="seconds a TLS client has for its handshake, holding a client slot meanwhile"),
)
TLS_FILES = ("tls.certificate", "tls.key", "tls.client_ca")
KEYS: dict[str, Key] = {k.dotted: k for k in SCHEMA}
SECTIONS = tuple(dict.fromkeys(k.section for k in SCHEMA))


def _section_class(section: str) -> type:
    fields = [(k.name, type(k.default), field(default=k.default)) for k in SCHEMA if k.section == section]
    return dataclasses.make_dataclass(section.capitalize() + "Config", fields, frozen=True)


ServerConfig = _section_class("server")
DaemonConfig = _section_class("daemon")
LogConfig = _section_class("log")
LimitsConfig = _section_class("limits")
AccessConfig = _section_class("access")
ChatConfig = _section_class("chat")
ClusterConfig = _section_class("cluster")
MetricsConfig = _section_class("metrics")
TlsConfig = _section_class("tls")


@dataclass(frozen=True)
class Config:
    """Every setting, validated; `origins` says where each non-default value came from."""

    server: Any = field(default_factory=ServerConfig)
    daemon: Any = field(default_factory=DaemonConfig)
    log: Any = field(default_factory=LogConfig)
    limits: Any = field(default_factory=LimitsConfig)
    access: Any = field(default_factory=AccessConfig)
    chat: Any = field(default_factory=ChatConfig)
    cluster: Any = field(default_factory=ClusterConfig)
    metrics: Any = field(default_factory=MetricsConfig)
    tls: Any = field(default_factory=TlsConfig)
    path: str | None = None                     # the absolute config file path, if any
    origins: dict[str, str] = field(default_factory=dict, compare=False)
    tls_context: Any = field(default=None, compare=False, repr=False)   # tls.server_context

    def get(self, dotted: str) -> Any:
        section, name = dotted.split(".")
        return getattr(getattr(self, section), name)

    def origin(self, dotted: str) -> str:
        """Where a key's value came from: "FILE:LINE", "--flag", or "default"."""
        return self.origins.get(dotted, "default")

    def differences(self, other: Config) -> list[str]:
        """Dotted names of the keys whose values differ between two configs."""
        return [k.dotted for k in SCHEMA if self.get(k.dotted) != other.get(k.dotted)]


# ---------------------------------------------------------------- locating keys

_HEADER_RE = re.compile(r"^\s*\[\[?\s*([^\[\]]+?)\s*\]\]?\s*(#.*)?$")
_KEY_RE = re.compile(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""")


def _split_dotted(text: str) -> tuple[str, ...]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", text)
    return tuple(p[1:-1] if p[:1] in "\"'" else p for p in parts)


def _locate_keys(text: str) -> dict[tuple[str, ...], int]:
    """Map each table header and key (as a path of names) to its 1-based line.

    A small scanner, not a TOML parser: it runs only on text tomllib accepted,
    and skips the inside of multi-line strings.
    """
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    in_multiline: str | None = None
    for lineno, line in enumerate(text.splitlines(), 1):
        if in_multiline:
            if in_multiline in line:
                in_multiline = None
            continue
        m = _HEADER_RE.match(line)
        if m:
            table = _split_dotted(m.group(1))
            found.setdefault(table, lineno)
            continue
        m = _KEY_RE.match(line)
        if m:
            found.setdefault(table + _split_dotted(m.group(1)), lineno)
            in_multiline = _opens_multiline(line[m.end():])
    return found


def _opens_multiline(value: str) -> str | None:
    """The quote of a multi-line string that `value` (the text after `=`) leaves open."""
    i, n = 0, len(value)
    while i < n:
        c = value[i]
        if c == "#":
            return None
        quote = value[i:i + 3]
        if quote in ('"""', "'''"):
            close = value.find(quote, i + 3)
            if close < 0:
                return quote
            i = close + 3
        elif c == '"':
            i += 1
            while i < n and value[i] != '"':
                i += 2 if value[i] == "\\" else 1
            i += 1
        elif c == "'":
            close = value.find("'", i + 1)
            i = n if close < 0 else close + 1
        else:
            i += 1
    return None


# ---------------------------------------------------------------- loading

def _read(path: str) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        raw = files.read_regular(path)   # a FIFO must not hang a command, or the daemon's restart
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8") from None
    return _parse(text, path), _locate_keys(text)


SYNTAX_ROUNDS = 20   # at most this many TOML syntax errors are looked for


def _parse(text: str, path: str) -> dict[str, Any]:
    """tomllib's data for `text`, or one ConfigError listing every syntax error found.

    tomllib stops at the first syntax error. To find the later ones, the line
    it names is blanked (made empty, so every line keeps its number) and the
    text parsed again, up to SYNTAX_ROUNDS times. The search stops at an error
    "at end of document", and when blanking would change nothing (the line is
    already empty, or the same error comes back). Blanking a line can cause an
    error of its own (say, the keys under a broken table header then land in
    the table before it), so the errors after the first are best effort.

    If there is any syntax error, only syntax errors are reported: the keys of
    a half-parsed file would give misleading errors about their values.
    """
    lines = text.split("\n")              # tomllib counts lines by "\n" too
    last_line = len(text.splitlines()) or 1
    found: dict[tuple[int, str], str] = {}   # (line or 0, message) -> the error as reported
    for _ in range(SYNTAX_ROUNDS):
        try:
            data = tomllib.loads("\n".join(lines))
        except tomllib.TOMLDecodeError as e:
            # tomllib's message ends with "(at line N, column M)"; restate it as file:line.
            msg = str(e)
            m = re.search(r"\(at line (\d+), column \d+\)$", msg)
            end = re.search(r"\(at end of document\)$", msg)
            if m:
                line, msg = int(m.group(1)), msg[: m.start()].strip()
            elif end:
                line, msg = last_line, msg[: end.start()].strip() + " at the end"
            else:
                line = 0
            if (line, msg) in found:
                break
            found[line, msg] = f"{path}:{line}: TOML syntax error: {msg}" if line \
                else f"{path}: TOML syntax error: {msg}"
            if m is None or not 1 <= line <= len(lines) or lines[line - 1] == "":
                break
            lines[line - 1] = ""
        else:
            if not found:
                return data
            break
    errors = [found[k] for k in sorted(found, key=lambda k: k[0] or float("inf"))]
    raise ConfigError("\n".join(errors), errors=errors)


def load(path: str | None = None, overrides: dict[str, tuple[Any, str]] | None = None,
         cwd: str | None = None) -> Config:
    """Build a Config from defaults, then the file at `path`, then `overrides`.

    `overrides` maps dotted keys to (value, origin), origin being the flag
    ("--port"); its relative paths resolve against `cwd`. Raises ConfigError
    (file, exit 6) or UsageError (command line, exit 2) naming where the bad
    value came from.

    Every error in the file is reported, not just the first: one ConfigError
    whose `errors` are the file's unknown sections and keys, bad values, and
    broken rules between two keys (`_check_across`, for keys whose own values
    are good), in file order, each "FILE:LINE: ...". A TOML syntax error hides
    the rest (see `_parse`). The command line is checked after the file, and
    reports its first bad value only; the file's errors win over it.
    """
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    errors: list[tuple[float, str]] = []    # (line, error) in the file
    invalid: set[str] = set()               # keys whose value in the file was rejected
    abspath = None
    if path is not None:
        abspath = os.path.abspath(os.path.join(cwd or os.getcwd(), path))
        data, lines = _read(abspath)
        base = os.path.dirname(abspath)
        for section, table in data.items():
            line = lines.get((section,), "?")
            where = f"{abspath}:{line}"
            if section not in SECTIONS:
                errors.append((_line_order(line), f"{where}: unknown section [{_shown(section)}] "
                                                  f"(known: {', '.join(SECTIONS)})"))
                continue
            if not isinstance(table, dict):
                errors.append((_line_order(line),
                               f"{where}: {_shown(section)} must be a table, got {_type_name(table)}"))
                continue
            for name, value in table.items():
                line = lines.get((section, name), lines.get((section,), "?"))
                where = f"{abspath}:{line}"
                key = KEYS.get(f"{section}.{name}")
                if key is None:
                    known = ", ".join(k.name for k in SCHEMA if k.section == section)
                    errors.append((_line_order(line),
                                   f"{where}: unknown key '{_shown(name)}' in [{section}] (known: {known})"))
                    continue
                try:
                    if isinstance(value, str) and not isinstance(key.default, str):
                        # Strings are parsed only from the command line; in TOML a number is a number.
                        raise Invalid(f"expected {_type_name(key.default)}, got a string")
                    value = key.check(value)
                except Invalid as e:
                    errors.append((_line_order(line), f"{where}: [{section}] {name}: {e}"))
                    invalid.add(key.dotted)
                    continue
                if key.is_path and value and value not in ("syslog", "stderr"):
                    value = os.path.normpath(os.path.join(base, value))
                values[key.dotted] = value
                origins[key.dotted] = where
    for dotted, (value, origin) in (overrides or {}).items():
        key = KEYS[dotted]
        try:
            value = key.check(value)
        except Invalid as e:
            if errors:
                raise _file_errors(errors) from None
            raise setting_error(origin, str(e)) from None
        if key.is_path and value and value not in ("syslog", "stderr"):
            value = os.path.normpath(os.path.join(cwd or os.getcwd(), value))
        values[dotted] = value
        origins[dotted] = origin
        invalid.discard(dotted)
    cfg = _build(values, origins, abspath)
    on_command_line = []
    for origin, message in _check_across(cfg, invalid):
        if origin.startswith("-"):
            on_command_line.append(setting_error(origin, message))
        else:
            errors.append((_line_order(origin.rpartition(":")[2]), f"{origin}: {message}"))
    if cfg.tls.certificate and cfg.tls.key and not invalid & set(TLS_FILES):
        try:
            cfg = dataclasses.replace(cfg, tls_context=tls.server_context(
                cfg.tls.certificate, cfg.tls.key, cfg.tls.client_ca))
        except tls.TlsError as e:
            origin = cfg.origin("tls." + e.key)
            errors.append((_line_order(origin.rpartition(":")[2]), f"{origin}: [tls] {e.key}: {e}"))
    if errors:
        raise _file_errors(errors)
    if on_command_line:
        raise on_command_line[0]
    return cfg


def from_settings(settings: dict[str, Any], origins: dict[str, str], path: str | None) -> Config:
    """The config a running daemon serves with, rebuilt from its state record (a live upgrade,
    upgrade.py): every value checked as the schema checks it, the file not read again (a
    live upgrade changes the code, not the settings; `chatd restart` re-reads the file).
    Only the values set (in the file or on the command line: `origins`) are carried, so
    keys this version does not know are left out and the defaults are this version's.
    Raises ChatdError if a value is not valid here."""
    known = {k: v for k, v in settings.items() if k in KEYS and k in origins}   # the defaults: ours
    try:
        cfg = load(None, {k: (v, origins.get(k, "the running daemon")) for k, v in known.items()}, cwd="/")
    except ChatdError as e:
        raise ChatdError(f"the running daemon's settings are not valid in this version: {e}") from None
    return dataclasses.replace(cfg, path=path, origins={k: o for k, o in origins.items() if k in known})


def _shown(name: str) -> str:
    """A name from the file as an error shows it: escaped if it would break the line."""
    return name if name.isprintable() else repr(name)[1:-1]


def _line_order(line: int | str) -> float:
    """Where an error sorts: by its line; one without a line ("?") after the rest."""
    return float(line) if str(line).isdigit() else float("inf")


def _file_errors(errors: list[tuple[float, str]]) -> ConfigError:
    """One ConfigError listing the file's errors in file order (the sort is stable)."""
    listed = [text for _, text in sorted(errors, key=lambda e: e[0])]
    return ConfigError("\n".join(listed), errors=listed)


def _build(values: dict[str, Any], origins: dict[str, str], path: str | None) -> Config:
    sections = {}
    for section, cls in (("server", ServerConfig), ("daemon", DaemonConfig), ("log", LogConfig),
                         ("limits", LimitsConfig), ("access", AccessConfig), ("chat", ChatConfig),
                         ("cluster", ClusterConfig), ("metrics", MetricsConfig), ("tls", TlsConfig)):
        kwargs = {}
        for key in SCHEMA:
            if key.section == section and key.dotted in values:
                v = values[key.dotted]
                kwargs[key.name] = float(v) if isinstance(key.default, float) else v
        sections[section] = cls(**kwargs)
    return Config(path=path, origins=origins, **sections)


def _check_across(cfg: Config, invalid: set[str] | frozenset[str] = frozenset()) -> list[tuple[str, str]]:
    """Rules that tie two keys together: (origin, message) for each broken rule.

    A rule is checked only when neither of its keys is in `invalid` (a value
    the file gave and the check rejected): the default standing in for it
    would make the rule's error a misleading one.
    """
    found: list[tuple[str, str]] = []
    if not invalid & {"limits.output_buffer", "limits.max_line"} \
            and cfg.limits.output_buffer < cfg.limits.max_line:
        found.append((cfg.origin("limits.output_buffer") if "limits.output_buffer" in cfg.origins
                      else cfg.origin("limits.max_line"),
                      f"[limits] output_buffer ({cfg.limits.output_buffer}) must be at least "
                      f"max_line ({cfg.limits.max_line})"))
    if not invalid & {"daemon.user", "daemon.group"} \
            and cfg.daemon.user.startswith("#") and not cfg.daemon.group:
        if isinstance(lookup_user(cfg.daemon.user), int):
            found.append((cfg.origin("daemon.user"),
                          f"user {cfg.daemon.user} has no passwd entry; set a group too"))
    if "server.listen" not in invalid and cfg.server.listen:
        # The command line wins over the file; within one of them, listen stands alone.
        on_command_line = cfg.origin("server.listen") == "--listen"
        set_too = [k for k in ("server.host", "server.port")
                   if cfg.origin(k) != "default" and cfg.origin(k).startswith("-") == on_command_line]
        if set_too:
            found.append((cfg.origin(set_too[0]),
                          f"{cfg.origin(set_too[0])} is given beside --listen; give the addresses "
                          f"in --listen alone" if on_command_line else
                          f"[server] {set_too[0][7:]} is set beside [server] listen; give the "
                          f"address in listen alone"))
        else:
            try:
                planned = listen.plan(listen.endpoints(cfg))
            except ChatdError as e:
                found.append((cfg.origin("server.listen"), e.message))
            else:
                for address, endpoint in planned:
                    if endpoint.proxy and not cfg.access.proxy_from and "access.proxy_from" not in invalid:
                        found.append((cfg.origin("server.listen"),
                                      f"{endpoint.scheme} listeners need [access] proxy_from: the "
                                      f"proxies whose PROXY headers are believed"))
                        break
                    if endpoint.tls and not (cfg.tls.certificate and cfg.tls.key):
                        found.append((cfg.origin("server.listen"),
                                      f"{endpoint.label(address)} needs [tls] certificate and key"))
                        break
    if not invalid & set(TLS_FILES):
        tls_set = [k for k in TLS_FILES if cfg.get(k)]
        if tls_set and not (cfg.tls.certificate and cfg.tls.key):
            missing = "key" if cfg.tls.certificate else "certificate"
            found.append((cfg.origin(tls_set[0]),
                          f"[tls] {tls_set[0][4:]} is set, but not [tls] {missing}"))
    if "server.workers" not in invalid and cfg.server.workers > 1 and not cfg.cluster.bus:
        found.append((cfg.origin("server.workers"),
                      f"[server] workers = {cfg.server.workers} needs [cluster] bus: the workers "
                      f"share rooms and nicks through it"))
    if not invalid & {"server.workers", "metrics.listen"} \
            and cfg.server.workers > 1 and cfg.metrics.listen:
        found.append((cfg.origin("metrics.listen"),
                      f"[metrics] listen needs [server] workers = 1 (it is {cfg.server.workers}): "
                      f"each worker counts its own clients"))
    if not invalid & {"cluster.heartbeat", "cluster.node_timeout"} \
            and cfg.cluster.node_timeout < 3 * cfg.cluster.heartbeat:
        found.append((cfg.origin("cluster.node_timeout") if "cluster.node_timeout" in cfg.origins
                      else cfg.origin("cluster.heartbeat"),
                      f"[cluster] node_timeout ({cfg.cluster.node_timeout:g}) must be at least 3 x "
                      f"heartbeat ({cfg.cluster.heartbeat:g}): one late heartbeat must not make a "
                      f"node dead"))
    return found


def reference_table() -> str:
    """The README's table of every key (section "Configuration"): made from the schema, and a
    test keeps the README's copy equal to it."""
    rows = ["| key | default | flag | what it sets | a restart applies it |", "|---|---|---|---|---|"]
    for key in SCHEMA:
        default = tomllib_literal(key.default)
        flag = f"`{key.flag}`" if key.flag else ""
        rows.append(f"| `[{key.section}] {key.name}` | `{default}` | {flag} | {key.help.replace('|', '/')} "
                    f"| {key.on_restart} |")
    return "\n".join(rows)


def tomllib_literal(value: Any) -> str:
    """A default as it is written in TOML."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple):
        return "[" + ", ".join(tomllib_literal(v) for v in value) + "]"
    return repr(value)
