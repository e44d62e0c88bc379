"""Moderation and operations through the control socket X.sock (README "Moderation").

Never over the chat connection: the daemon listens on a Unix socket beside its pid
file, mode 0600 and owned by the user chatd serves as, and answers only root and that
user (SO_PEERCRED, checked on every connection). One JSON request line, one JSON
answer line, with a size limit and a deadline, served from the event loop: a stuck
control client holds nothing but its own connection. The socket is bound under an
unpredictable name and renamed over X.sock, so whatever was planted there is replaced,
never followed; it is removed at exit only if it is still ours.

Bans live in the Server (`Bans`), so a restart in place keeps them; `accept.Gate` asks
them before it admits anyone, and turns a banned newcomer away as an [access] deny is. The parsing of addresses and durations is here too, for
the command line (control.py) and the daemon alike.

Tests: tests/process/test_moderation.py, tests/unit/test_bans.py
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from .access import Network, ipv4_if_mapped
from .connection import Connection
from .errors import EXIT_FAILED, EXIT_PRIVILEGE, EXIT_USAGE, ChatdError, PrivilegeError, UsageError
from .protocol import clean_text
from .rooms import skeleton
from .upgrade import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("chatd")

REQUEST_MAX = 8192          # bytes in one request line
REQUEST_TIMEOUT_S = 5.0     # for the whole request line to arrive, and the answer to leave
TEXT_MAX = 400              # characters of a `say` text or a kick reason
REFUSAL_LOG_S = 10.0        # another user's connection is logged at most this often
BANS_MAX = 10000            # bans at once
DURATION_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
DURATION_MAX_S = 366 * 86400
LOOKS = frozenset({"who", "bans", "stats"})   # change nothing: logged at debug (monitors poll them)


# ---------------------------------------------------------------------- parsing

def parse_duration(text: str | float) -> float:
    """"30s", "10m", "2h", "1d" or plain seconds ("45", "1.5"), or a number of seconds (as the
    command line sends it to the daemon): positive, at most a year."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    elif m := DURATION_RE.fullmatch(str(text).strip()):
        seconds = float(m.group(1)) * UNITS[m.group(2)]
    else:
        raise UsageError(f"bad duration {text!r}: expected seconds or N followed by s, m, h or d "
                         f"(30s, 10m, 2h, 1d)")
    if not 0 < seconds <= DURATION_MAX_S:
        raise UsageError(f"bad duration {text!r}: must be more than 0 and at most 366d")
    return seconds


def parse_network(text: str) -> Network:
    """An address or a CIDR, IPv4 or IPv6; an IPv4-mapped IPv6 one is taken as the IPv4 one.
    Host bits under the prefix are ignored (10.1.2.3/8 is 10.0.0.0/8)."""
    try:
        net = ipaddress.ip_network(text.strip().partition("%")[0], strict=False)
    except ValueError:
        raise UsageError(f"bad address {text!r}: expected an IPv4 or IPv6 address or CIDR "
                         f"(192.0.2.7, 10.0.0.0/8, 2001:db8::/32)") from None
    return ipv4_if_mapped(net)


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """A client's address as accept gave it, an IPv4-mapped IPv6 one as IPv4; None if it is
    none (a Unix peer)."""
    try:
        addr = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def show_network(net: Network) -> str:
    """A single address without its /32 or /128."""
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


def duration_text(seconds: float) -> str:
    s = int(max(0, seconds))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h}h {m:02d}m {s:02d}s"


# ---------------------------------------------------------------------- bans

class Bans:
    """The addresses refused at accept time, each until its expiry (monotonic) or for good
    (None); expired ones go when the first of them is due. A lookup costs one dict probe per
    prefix length in use, not one test per ban (measured with 10,000 bans: 4.5 us for an
    accept no ban covers, where testing each ban took 1.5 ms)."""

    def __init__(self) -> None:
        self.entries: dict[Network, float | None] = {}
        self.index: dict[tuple[int, int, int], Network] = {}   # _key(net) -> net
        self.lengths: dict[tuple[int, int], int] = {}          # (version, prefix) -> bans
        self.due = math.inf                                    # the first expiry

    def __bool__(self) -> bool:
        return bool(self.entries)

    def add(self, net: Network, seconds: float | None) -> None:
        if net not in self.entries:
            if len(self.entries) >= BANS_MAX:
                raise ChatdError(f"too many bans ({BANS_MAX}); unban some first")
            self.index[_key(net)] = net
            length = (net.version, net.prefixlen)
            self.lengths[length] = self.lengths.get(length, 0) + 1
        until = None if seconds is None else time.monotonic() + seconds
        self.entries[net] = until
        self.due = min(self.due, until if until is not None else math.inf)

    def remove(self, net: Network) -> bool:
        self._expire()
        if net not in self.entries:
            return False
        self._drop(net)
        return True

    def _drop(self, net: Network) -> None:
        del self.entries[net]
        del self.index[_key(net)]
        length = (net.version, net.prefixlen)
        self.lengths[length] -= 1
        if not self.lengths[length]:
            del self.lengths[length]

    def match(self, ip: str) -> Network | None:
        """The ban in force that covers `ip`, if any."""
        addr = client_address(ip)
        if addr is None:
            return None
        if time.monotonic() >= self.due:
            self._expire()
        value, version, bits = int(addr), addr.version, addr.max_prefixlen
        for v, prefix in self.lengths:
            if v == version:
                net = self.index.get((v, prefix, value >> (bits - prefix)))
                if net is not None:
                    return net
        return None

    def listing(self) -> list[dict[str, Any]]:
        self._expire()
        now = time.monotonic()
        return [{"ban": show_network(net),
                 "expires_in_s": None if until is None else round(until - now, 1)}
                for net, until in self.entries.items()]

    def _expire(self) -> None:
        now = time.monotonic()
        for net in [n for n, until in self.entries.items() if until is not None and until <= now]:
            self._drop(net)
        self.due = min((u for u in self.entries.values() if u is not None), default=math.inf)


def _key(net: Network) -> tuple[int, int, int]:
    return net.version, net.prefixlen, int(net.network_address) >> (net.max_prefixlen - net.prefixlen)


# ---------------------------------------------------------------------- the socket

def via_directory(dir_fd: int, name: str) -> str:
    """A path to `name` in the directory open as `dir_fd`, short enough for sun_path (108
    bytes) however deep the directory is."""
    return f"/proc/self/fd/{dir_fd}/{name}"


@dataclass
class ControlSocket:
    """The listening socket at `path`, and how to tell at exit that the file is still ours."""

    path: str
    sock: socket.socket
    ident: tuple[int, int]      # (st_dev, st_ino) of the socket file

    @classmethod
    def bind(cls, path: str, uid: int) -> ControlSocket:
        """Bind under a temporary name (umask 0177, then chmod 0600 and chown to `uid`, the
        user chatd serves as) and rename it over `path`: what was there, a planted symlink
        too, is replaced and never followed. Before the privilege drop, which is why it is
        chatd's user's and not root's."""
        directory, name = os.path.split(path)
        temp = f".{name}.{secrets.token_hex(8)}"
        try:
            dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise ChatdError(f"cannot create control socket {path}: {e.strerror}") from None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            old = os.umask(0o177)
            try:
                sock.bind(via_directory(dir_fd, temp))
            finally:
                os.umask(old)
            os.chmod(temp, 0o600, dir_fd=dir_fd)   # ours: an unpredictable name, just made
            os.chown(temp, uid, -1, dir_fd=dir_fd, follow_symlinks=False)
            sock.listen(16)
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except OSError as e:
            sock.close()
            try:
                os.unlink(temp, dir_fd=dir_fd)
            except OSError:
                pass
            cls_ = PrivilegeError if isinstance(e, (PermissionError, IsADirectoryError)) else ChatdError
            raise cls_(f"cannot create control socket {path}: {e.strerror}") from None
        finally:
            os.close(dir_fd)
        return cls(path, sock, (st.st_dev, st.st_ino))

    def close(self) -> None:
        """Close it, and remove the file if it is still the one we made (a daemon that
        dropped privileges may not be allowed to: the next start replaces it)."""
        self.sock.close()
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.ident:
                os.unlink(self.path)
        except OSError:
            pass


def peer_credentials(sock: Any) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket (SO_PEERCRED): for a
    listening socket's, the process that made it."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      struct.calcsize("3i")))
    return pid, uid


# ---------------------------------------------------------------------- the daemon's side

def _mode_of(conn: Connection) -> str:
    return "chat" if hasattr(conn, "nick") else "echo"


def _traffic(conn: Connection) -> tuple[int | None, int | None]:
    """Bytes received from and sent to the client (acknowledged), as the kernel counts them
    (TCP_INFO's tcpi_bytes_received and tcpi_bytes_acked): nothing is counted per read."""
    try:
        info = conn.transport.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP,
                                                                  socket.TCP_INFO, 256)
        acked, received = struct.unpack_from("QQ", info, 120)
    except (OSError, AttributeError, struct.error):
        return None, None
    return received, acked


class Doorman:
    """Who may use the control socket: root and the user chatd serves as (SO_PEERCRED, on
    every connection). A refusal is logged at most every REFUSAL_LOG_S."""

    def __init__(self) -> None:
        self.refused_logged = -REFUSAL_LOG_S

    def refusal(self, sock: Any) -> tuple[int, int, dict[str, Any] | None]:
        """The peer's pid and uid, and the answer that refuses it (None: it may ask)."""
        pid, uid = peer_credentials(sock)
        if uid in (0, os.geteuid()):
            return pid, uid, None
        now = time.monotonic()
        if now - self.refused_logged >= REFUSAL_LOG_S:
            self.refused_logged = now
            log.warning("control socket: refused pid %d of uid %d (only root and uid %d)",
                        pid, uid, os.geteuid())
        return pid, uid, failure(f"not allowed: only root and uid {os.geteuid()} may control chatd",
                                  EXIT_PRIVILEGE)


def parse_request(line: bytes) -> dict[str, Any]:
    """A request line: a JSON object with a "cmd"; UsageError otherwise."""
    try:
        request = json.loads(line)
        if isinstance(request, dict) and isinstance(request.get("cmd"), str):
            return request
    except (ValueError, RecursionError):   # "[[[...": 8 KiB of nesting
        pass
    raise UsageError("bad request")


def upgrade_timeout(request: dict[str, Any]) -> float:
    """`chatd upgrade`'s timeout, checked."""
    timeout = request.get("timeout", DEFAULT_TIMEOUT_S)
    if (not isinstance(timeout, (int, float)) or isinstance(timeout, bool)
            or not 0 < timeout <= MAX_TIMEOUT_S):
        raise UsageError(f"upgrade: the timeout must be 0-{MAX_TIMEOUT_S:g} seconds")
    return float(timeout)


class Moderator:
    """Serves the control socket for one Server: who, kick, ban, unban, bans, say, stats."""

    def __init__(self, server: Server, control: ControlSocket) -> None:
        self.server = server
        self.control = control
        self.listener: asyncio.AbstractServer | None = None
        self.doorman = Doorman()
        self.handlers: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "who": self.who, "kick": self.kick, "ban": self.ban, "unban": self.unban,
            "bans": self.bans, "say": self.say, "stats": self.stats, "upgrade": self.upgrade}

    async def start(self) -> None:
        self.listener = await asyncio.start_unix_server(self._serve, sock=self.control.sock,
                                                        limit=REQUEST_MAX)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            answer = await asyncio.wait_for(self._answer(reader, writer), REQUEST_TIMEOUT_S)
            if "upgrade" in answer:   # bounded by its own timeout, and answered at once (upgrade.py)
                return await self.server.upgrade(answer["upgrade"], lambda a: _answer_now(writer, a))
            writer.write(json.dumps(answer).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
        except (asyncio.TimeoutError, OSError, ValueError):
            pass   # a stuck or vanished control client: only its connection is dropped
        finally:
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
        pid, uid, refusal = self.doorman.refusal(writer.get_extra_info("socket"))
        if refusal is not None:
            return refusal
        try:
            request = parse_request(await reader.readline())
            handler = self.handlers[request["cmd"]]
        except (UsageError, KeyError, ValueError):   # ValueError: a line past REQUEST_MAX
            return failure("bad request", EXIT_USAGE)
        try:
            answer = handler(request)
        except ChatdError as e:
            return failure(e.message, e.status)
        except (ValueError, KeyError, TypeError) as e:
            return failure(f"bad request: {e}", EXIT_USAGE)
        log.log(logging.DEBUG if request["cmd"] in LOOKS else logging.INFO,
                "control: %s by uid %d (pid %d)", request["cmd"], uid, pid)
        return {"ok": True} | answer

    # ------------------------------------------------------------ the commands

    def _clients(self) -> list[Connection]:
        return [c for c in self.server.state.connections if not c.closing]

    def who(self, request: dict[str, Any]) -> dict[str, Any]:
        now = self.server.state.loop.time()
        clients = []
        for conn in sorted(self._clients(), key=lambda c: c.opened):
            received, sent = _traffic(conn)
            clients.append({"nick": getattr(conn, "nick", None) or None,
                            "room": getattr(conn, "room", None) or None, "address": conn.peer,
                            "mode": _mode_of(conn), "connected_s": round(now - conn.opened, 1),
                            "bytes_in": received, "bytes_out": sent})
        return {"clients": clients}

    def kick(self, request: dict[str, Any]) -> dict[str, Any]:
        """By nick (chat clients, compared as nicks are) or by address (any client)."""
        target = str(request["target"])
        reason = _text(request.get("reason") or "")
        addr = client_address(target)
        if addr is not None:
            victims = [c for c in self._clients() if client_address(c.ip) == addr]
            missing = f"no client from {target} on this server"
        else:
            key = skeleton(target)
            victims = [c for c in self._clients() if skeleton(getattr(c, "nick", "") or "\0") == key]
            missing = f"no such nick on this server: {target}"
        if not victims:
            raise ChatdError(missing, EXIT_FAILED)
        why = f"kicked: {reason}" if reason else "kicked"
        for conn in victims:
            conn.dismiss(f"you were {why}", why)
        return {"kicked": [_name(c) for c in victims]}

    def ban(self, request: dict[str, Any]) -> dict[str, Any]:
        net = parse_network(str(request["target"]))
        seconds = request.get("seconds")
        seconds = None if seconds is None else parse_duration(seconds)
        self.server.bans.add(net, seconds)
        victims = [c for c in self._clients() if (a := client_address(c.ip)) is not None and a in net]
        for conn in victims:
            conn.dismiss("you were banned", "banned")
        log.warning("banned %s %s; clients kicked: %d", show_network(net),
                    "until unbanned" if seconds is None else f"for {duration_text(seconds)}",
                    len(victims))
        return {"ban": show_network(net), "kicked": [_name(c) for c in victims]}

    def unban(self, request: dict[str, Any]) -> dict[str, Any]:
        net = parse_network(str(request["target"]))
        if not self.server.bans.remove(net):
            raise ChatdError(f"no ban on {show_network(net)} (see chatd bans)", EXIT_FAILED)
        log.info("unbanned %s", show_network(net))
        return {"ban": show_network(net)}

    def bans(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"bans": self.server.bans.listing()}

    def say(self, request: dict[str, Any]) -> dict[str, Any]:
        text = _text(str(request["text"]))
        if not text:
            raise UsageError("nothing to say: the text is empty once sanitized")
        clients = self._clients()
        for conn in clients:
            conn.notify(text)
        return {"clients": len(clients)}

    def upgrade(self, request: dict[str, Any]) -> dict[str, Any]:
        """`chatd upgrade`: its timeout checked here, the upgrade itself run by `_serve`."""
        return {"upgrade": upgrade_timeout(request)}

    def stats(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"stats": self.server.stats(), "text": self.server.stats_text()}


def _answer_now(writer: asyncio.StreamWriter, answer: dict[str, Any]) -> None:
    """Write `answer` at once, past the loop (a live upgrade's old process runs no loop pass
    more after its commit): a line that small fits the socket's buffer."""
    try:
        os.write(writer.get_extra_info("socket").fileno(), json.dumps(answer).encode() + b"\n")
    except (OSError, AttributeError):
        pass


def _text(text: str) -> str:
    """Operator text as any server notice is sent: sanitized, one line, bounded."""
    return " ".join(clean_text(text.encode("utf-8", "replace")).split())[:TEXT_MAX]


def _name(conn: Connection) -> str:
    nick = getattr(conn, "nick", "")
    return f"{nick} ({conn.peer})" if nick else conn.peer


def failure(message: str, status: int) -> dict[str, Any]:
    return {"ok": False, "error": message, "status": status}

