"""Chat mode's rooms, nicks and commands (README "Chat mode"), as bytes on the wire.

The service never waits for anyone: every `peer.send` is a synchronous write
into that peer's own bounded output queue, and a peer that cannot keep up is
dropped by its connection, not waited for. What one pass of the event loop
produces (lines from every sender read in that pass, notices, replies) is held
and sent when the pass ends (`defer`, the loop's `call_soon`: before the next
pass reads anything): each recipient gets all of it in one `send_batch`, one
write, in the order it happened. Sixteen lines in one read, or four senders'
reads in one pass, are one write per receiver, not sixteen or four. Before a
room's members change, what is held goes out, so a line reaches exactly the
members of its room when it was said. A client's lines all come in by one
function, `said` (the fast paths' too), so that a line said elsewhere can reach
this process's members by the same road; the rooms, nicks and guest numbers
live behind `ChatBackend` (`LocalBackend`: this process's own dicts). Text
reaching `said` is already sanitized (`protocol.clean_text`); every line sent
here ends with CRLF, and every user line gets a server prefix, so no user can
forge a `*** ` line, and text a user typed inside a `*** ` line is `quoted`.
Nicks are unique by look (`skeleton`). What a peer said goes out with `by` set
to it, so that its connection can charge it for what passes a recipient's
budget (chat.py). Imports nothing else from chatd.

Tests: tests/unit/test_rooms.py, tests/unit/test_chat_paths.py, tests/process/test_chat.py, tests/process/test_chat_hidden_text.py, tests/process/test_chat_targeted.py
"""

from __future__ import annotations

import re
from typing import Callable, Protocol, Sequence

NICK_RE = re.compile(r"[A-Za-z0-9_.-]{1,16}")
ROOM_RE = re.compile(r"#[A-Za-z0-9_-]{1,32}")
# What a nick looks like: case-folded, and I/l/1 (i, being I's lower case, with them) as l,
# O/0 as o. "rn" and "m" stay apart: a terminal's fixed-width font shows rn in two cells.
LOOKALIKE = str.maketrans("i10", "llo")
GUEST_RE = re.compile(r"guest[2-9lo]+")     # a guest name's skeleton: guest and digits
QUOTE_MAX = 32                              # characters of user text inside a `*** ` line


def skeleton(nick: str) -> str:
    """The key under which a nick is unique: nicks that look alike (`aIice`, `alice`,
    `ALICE`; `b0b`, `bob`) have one skeleton, so only one of them can be in use."""
    return nick.casefold().translate(LOOKALIKE)


def quoted(text: str) -> str:
    """User text as it appears inside a `*** ` line: runs of blanks (TABs too) made one
    space, `"` and `\\` escaped with a backslash (a quote the user typed cannot close ours),
    at most QUOTE_MAX characters (longer is cut, never inside an escape, ending "..."), in
    double quotes: short, on one screen line, and visibly the user's, so it cannot pass for
    a notice."""
    text = " ".join(text.split()).replace("\\", "\\\\").replace('"', '\\"')
    if len(text) > QUOTE_MAX:
        text = text[:QUOTE_MAX - 3]
        if (len(text) - len(text.rstrip("\\"))) % 2:   # an odd run of backslashes ends in
            text = text[:-1]                             # half an escape
        text = text.rstrip() + "..."
    return f'"{text}"'


class Peer(Protocol):
    """What the service needs of a chat client."""

    nick: str
    room: str

    def send(self, data: bytes, by: Peer | None = None) -> None:
        """Queue `data`: what `by` said (a line, an action, a private message), which may
        queue past this peer's budget at `by`'s charge; or, with no `by`, a notice or reply
        of the server's, which never does."""
        ...

    def send_batch(self, data: bytes, parts: list[tuple[bytes, Peer | None]]) -> None:
        """What one pass holds for this peer: `parts`, each (data, by) as `send` takes
        them, in order, and `data`, their bytes joined (one write, when it can be)."""
        ...

    def quit(self, reason: str) -> None: ...


def line(text: str) -> bytes:
    return (text + "\r\n").encode("utf-8")


def notice(text: str) -> bytes:
    return line("*** " + text)


def error(text: str) -> bytes:
    return line("*** error: " + text)


def send_each(members: dict[Peer, None], data: bytes, skip: Peer | None, by: Peer | None) -> None:
    """`data` to every member but `skip`, each through its `send`."""
    for member in tuple(members):   # a send may drop a member
        if member is not skip:
            member.send(data, by)


def by_name(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (n.casefold(), n))


THIS_NODE = " (this server only: cut off from the others)"


def roster(room: str, names: list[str], partial: bool) -> bytes:
    """The `*** #room: a, b` line of /who and of arrival (`partial`: this server's only)."""
    names = by_name(names)
    listed = ", ".join(names) if names else "nobody else here"
    return notice(f"{room}: {listed}{THIS_NODE if partial else ''}")


Command = Callable[["ChatService", Peer, str], None]
def send_parts(peer: Peer, parts: list[tuple[bytes, Peer | None]]) -> None:
    """`parts` (each (data, by)) to `peer`: one `send`, or one `send_batch` of them joined."""
    if len(parts) == 1:
        peer.send(*parts[0])
    elif parts:
        peer.send_batch(b"".join([d for d, _ in parts]), parts)


Fanout = Callable[[dict[Peer, None], bytes, "Peer | None", "Peer | None"], None]
Held = tuple["str | Peer", bytes, "Peer | None", "Peer | None"]   # to (room or peer), data, skip, by
COMMANDS: dict[str, Command] = {}
HELP: list[str] = []


def command(usage: str, text: str, *aliases: str) -> Callable[[Command], Command]:
    """Register `cmd_<name>` (and its aliases) with the usage and text /help shows."""
    def register(fn: Command) -> Command:
        for name in (fn.__name__[4:], *aliases):
            COMMANDS[name] = fn
        HELP.append(f"{usage:<17} {text}")
        return fn
    return register


Answer = Callable[[list[str], bool], None]   # (names or "room count" entries, this node only?)


class ChatBackend(Protocol):
    """Where the rooms, nicks and guest numbers live: this process's own dicts
    (`LocalBackend`), or those and the bus that chatd processes share (cluster.py). Nicks
    are held by their skeleton. What the bus must be asked is answered through a callback
    (`then`), at once here, later over the bus; `holder` and `members` are always this
    process's own."""

    shared: bool   # lines said here also go to other processes (`said`)
    news: Sequence[str]   # what a newcomer is told of the other servers (cut off: that)

    def guest(self) -> int | None:
        """A guest number never handed out before; None if there is none to hand now (then
        `when_guests`)."""
        ...

    def when_guests(self, then: Callable[[], None]) -> None:
        """Call `then` once guest numbers may be had again."""
        ...

    def holder(self, key: str) -> Peer | None:
        """Who in this process holds the nick whose skeleton is `key`, if anyone."""
        ...

    def claim(self, key: str, peer: Peer) -> None:
        """`peer` holds the nick whose skeleton is `key` from now on (a guest's, on arrival)."""
        ...

    def release(self, key: str) -> None:
        """The nick whose skeleton is `key` is free again (its holder has left)."""
        ...

    def rename(self, peer: Peer, new: str, then: Callable[[str | None], None]) -> None:
        """`peer` takes the nick `new` in place of its own: `then(None)` once it holds it, or
        `then(why)` with the error to show it (taken, or cannot be changed now)."""
        ...

    def members(self, room: str) -> dict[Peer, None] | None:
        """`room`'s members in this process, in order of arrival (None: nobody). Asked once
        per room when a pass ends: the fan-out's own loop walks what it returns."""
        ...

    def join(self, room: str, peer: Peer) -> None: ...

    def rooms_here(self) -> list[dict[Peer, None]]:
        """Every room's members in this process."""
        ...

    def leave(self, room: str, peer: Peer, reason: str | None) -> None:
        """`peer` leaves `room` (`reason`: why, as its room is told; None: nobody is told);
        a room left empty is gone."""
        ...

    def said(self, peer: Peer, kind: str, text: str) -> None:
        """`peer` said `text` in its room (kind "say": lines joined by LF; "me": an action)."""
        ...

    def roster(self, room: str, then: Answer) -> None:
        """`then(nicks in room, this node only?)`."""
        ...

    def rooms(self, then: Answer) -> None:
        """`then(["#room (n)", ...], this node only?)`: every room, and how many are in it."""
        ...

    def message(self, peer: Peer, nick: str, text: str, then: Callable[[str], None]) -> None:
        """A private message to `nick`, whom this process does not hold: `then(error)`, or
        `then("")` once it is on its way."""
        ...


class LocalBackend:
    """The ChatBackend of one chatd process: its own dicts."""

    shared = False
    news: Sequence[str] = ()

    def __init__(self) -> None:
        self._rooms: dict[str, dict[Peer, None]] = {}   # room -> its members, in order of arrival
        self._nicks: dict[str, Peer] = {}               # skeleton(nick) -> peer
        self.next_guest = 1                             # guest numbers are never reused

    def guest(self) -> int | None:
        number = self.next_guest
        self.next_guest += 1
        return number

    def when_guests(self, then: Callable[[], None]) -> None:
        then()

    def holder(self, key: str) -> Peer | None:
        return self._nicks.get(key)

    def claim(self, key: str, peer: Peer) -> None:
        self._nicks[key] = peer

    def release(self, key: str) -> None:
        del self._nicks[key]

    def rename(self, peer: Peer, new: str, then: Callable[[str | None], None]) -> None:
        key = skeleton(new)
        if key != skeleton(peer.nick) and self.holder(key) is not None:
            return then(f"nick taken: {new}")
        self.renamed(peer, new)
        then(None)

    def renamed(self, peer: Peer, new: str) -> None:
        """This process's own record of a rename (the bus has agreed to it, if there is one)."""
        self.release(skeleton(peer.nick))
        self.claim(skeleton(new), peer)

    def members(self, room: str) -> dict[Peer, None] | None:
        return self._rooms.get(room)

    def join(self, room: str, peer: Peer) -> None:
        self._rooms.setdefault(room, {})[peer] = None

    def rooms_here(self) -> list[dict[Peer, None]]:
        return list(self._rooms.values())

    def leave(self, room: str, peer: Peer, reason: str | None) -> None:
        members = self._rooms.get(room, {})
        members.pop(peer, None)
        if not members:
            self._rooms.pop(room, None)

    def said(self, peer: Peer, kind: str, text: str) -> None:
        """Nobody else to tell."""

    def roster(self, room: str, then: Answer) -> None:
        then([p.nick for p in self._rooms.get(room) or ()], False)

    def rooms(self, then: Answer) -> None:
        then([f"{room} ({len(members)})" for room, members in sorted(self._rooms.items())], False)

    def message(self, peer: Peer, nick: str, text: str, then: Callable[[str], None]) -> None:
        then(f"no such nick: {quoted(nick)}")


class ChatService:
    """Everyone connected in chat mode: nicks, rooms, and what they say."""

    def __init__(self, motd: str = "", default_room: str = "lobby",
                 defer: Callable[[Callable[[], None]], object] | None = None,
                 fanout: Fanout | None = None) -> None:
        """`defer(fn)` runs `fn` when the loop's current pass ends (the loop's `call_soon`);
        without it, everything is sent at once. `fanout(members, data, skip, by)` sends one
        room's `data` to its members but `skip`: the connection class's own loop (the hot
        path), or `send` to each."""
        self.backend: ChatBackend = LocalBackend()
        self.motd: list[str] = []
        self.default_room = "#lobby"
        self._held: list[Held] = []   # what this pass produced, in order
        self._defer = defer
        self._fanout = fanout or send_each
        self._due = False             # a `_pass_ended` is deferred
        self.sent = [0, 0]            # bytes and lines handed to recipients (the metrics)
        self._waiting: dict[Peer, list[bytes | str]] = {}   # said while the bus decides a /nick
                                                            # or leases guest numbers
        self.configure(motd, default_room)

    def configure(self, motd: str, default_room: str) -> None:
        """Apply [chat] settings (at start and on restart): new arrivals see them."""
        text = motd.removesuffix("\n")   # a TOML multi-line string ends with one
        self.motd = text.split("\n") if text else []
        self.default_room = "#" + default_room.lstrip("#").lower()

    # ------------------------------------------------------------ live upgrade (upgrade.py)

    def capture(self, index: dict[Peer, int]) -> dict:
        """The rooms with their members in order of arrival (by the record's client numbers),
        and the next guest number: what a live upgrade carries besides each client's nick."""
        backend = self.backend
        return {"next_guest": getattr(backend, "next_guest", 1),
                "rooms": {room: [index[p] for p in members if p in index]
                          for room, members in getattr(backend, "_rooms", {}).items()}}

    def restore(self, saved: dict, clients: Sequence[Peer]) -> None:
        """The rooms and nicks as `capture` saw them; every client has its nick and room set."""
        backend = self.backend
        if isinstance(backend, LocalBackend):
            backend.next_guest = max(backend.next_guest, int(saved["next_guest"]))
        for room, members in saved["rooms"].items():
            for i in members:
                peer = clients[i]
                backend.join(room, peer)
                backend.claim(skeleton(peer.nick), peer)

    # ------------------------------------------------------------ arriving and leaving

    def arrive(self, peer: Peer) -> None:
        """A new client: a guest nick, the welcome, the MOTD, what it must know of the
        other servers (cluster.py), then the default room. With no guest number to hand
        (the bus is leasing more), the client waits, and what it says meanwhile follows."""
        number = self.backend.guest()
        if number is None:
            self._waiting[peer] = []
            self.backend.when_guests(lambda: self._arrived(peer))
            return
        backend = self.backend
        nick = f"guest{number}"
        while backend.holder(skeleton(nick)) is not None:   # cannot happen (guest names are
            nick = f"guest{backend.guest()}"                 # reserved); be sure
        peer.nick = nick
        backend.claim(skeleton(nick), peer)
        self.tell(peer, notice(f"Welcome to chatd, {nick}. Type /help for commands."))
        for text in self.motd:
            self.tell(peer, notice(text))
        for text in self.backend.news:
            self.tell(peer, notice(text))
        self._enter(peer, self.default_room)

    def _arrived(self, peer: Peer) -> None:
        """Guest numbers came: a waiting newcomer (if it is still here) arrives, and what it
        said meanwhile follows."""
        if peer not in self._waiting:
            return   # it left
        later = self._waiting.pop(peer)
        self.arrive(peer)
        if peer in self._waiting:   # no number yet again: it waits on, its lines in order
            self._waiting[peer][:0] = later
            return
        self._replay(peer, later)

    def _replay(self, peer: Peer, later: list[bytes | str]) -> None:
        """What `peer` said while it waited, in order, for as long as it is still here."""
        for what in later:
            if self.backend.holder(skeleton(peer.nick)) is not peer:
                break   # it left meanwhile
            self.said(peer, what)

    def depart(self, peer: Peer, reason: str, tell_others: bool = True) -> None:
        """`peer` leaves the server; the others in its room are told why (unless we stop)."""
        self._waiting.pop(peer, None)
        if self.backend.holder(skeleton(peer.nick)) is not peer:
            return   # already gone, or never named
        self._leave_room(peer, reason if tell_others else None)
        self.backend.release(skeleton(peer.nick))

    def _enter(self, peer: Peer, room: str) -> None:
        self.flush()   # what was said before goes to the members of then
        me = skeleton(peer.nick)
        self.backend.roster(room, lambda names, partial: self.tell(
            peer, roster(room, [n for n in names if skeleton(n) != me], partial)))
        self.broadcast(room, notice(f"{peer.nick} joined {room}"), skip=peer)
        self.backend.join(room, peer)
        peer.room = room

    def _leave_room(self, peer: Peer, reason: str | None) -> None:
        self.flush()
        room = peer.room
        self.backend.leave(room, peer, reason)
        if reason is not None and self.backend.members(room):
            self.broadcast(room, notice(f"{peer.nick} left {room} ({reason})"), skip=peer)

    # ------------------------------------------------------------ from other servers

    def everyone(self, data: bytes) -> None:
        """A notice to every client of this process (the bus was lost, or is back)."""
        for members in tuple(self.backend.rooms_here()):
            for member in tuple(members):
                self.tell(member, data)

    def rename_here(self, peer: Peer, new: str, why: str) -> None:
        """The bus took `peer`'s nick away (another server's user holds it): it becomes `new`,
        and it and its room are told (`why`, to it alone)."""
        old = peer.nick
        self.backend.renamed(peer, new)
        peer.nick = new
        self.tell(peer, notice(why))
        self.broadcast(peer.room, notice(f"{old} is now known as {new}"))

    # ------------------------------------------------------------ sending

    def broadcast(self, room: str, data: bytes, by: Peer | None = None,
                  skip: Peer | None = None) -> None:
        """`data` (said by `by`, or a notice) to everyone in `room` but `skip`, at the end
        of this pass."""
        self._hold((room, data, skip, by))

    def tell(self, peer: Peer, data: bytes, by: Peer | None = None) -> None:
        """`data` (said by `by`, or a notice) to one peer, at the end of this pass, after what
        was held before it."""
        self._hold((peer, data, None, by))

    def _hold(self, entry: Held) -> None:
        self._held.append(entry)
        if not self._due:
            if self._defer is None:
                self.flush()
                return
            self._due = True
            self._defer(self._pass_ended)

    def _pass_ended(self) -> None:
        self._due = False
        self.flush()

    def flush(self) -> None:
        """Send what is held: to each recipient, everything for it, in order, in one batch.
        (Also called early, before members change and before a connection's last words.)"""
        held, self._held = self._held, []
        if not held:
            return
        to, data, skip, by = held[0]
        if len(held) == 1:
            if to.__class__ is str:
                members = self.backend.members(to)
                if members:
                    self._count(data, len(members) - (skip in members))
                    self._fanout(members, data, skip, by)
            else:
                self._count(data, 1)
                to.send(data, by)
        elif to.__class__ is str and all(h[0] == to for h in held):
            self._flush_room(to, held)
        else:
            self._flush_mixed(held)

    def _flush_room(self, room: str, held: list[Held]) -> None:
        """The common case, one room: members no entry skips share one joined copy."""
        parts = [(h[1], h[3]) for h in held]
        joined = b"".join([h[1] for h in held])
        skips = {h[2] for h in held}
        members = self.backend.members(room) or {}
        self._count(joined, len(members))
        for _, data, skip, _ in held:
            if skip in members:
                self._count(data, -1)
        for member in tuple(members):
            if member not in skips:
                member.send_batch(joined, parts)
                continue
            send_parts(member, [(h[1], h[3]) for h in held if h[2] is not member])

    def _flush_mixed(self, held: list[Held]) -> None:
        """Several rooms, or replies among the lines: gather per recipient, then send."""
        batches: dict[Peer, list[tuple[bytes, Peer | None]]] = {}
        for to, data, skip, by in held:
            if to.__class__ is str:
                for member in self.backend.members(to) or ():
                    if member is not skip:
                        batches.setdefault(member, []).append((data, by))
                        self._count(data, 1)
            else:
                batches.setdefault(to, []).append((data, by))
                self._count(data, 1)
        for member, parts in batches.items():
            send_parts(member, parts)

    def _count(self, data: bytes, recipients: int) -> None:
        """Count `data` as handed to `recipients` more (fewer, if negative) recipients."""
        sent = self.sent
        sent[0] += len(data) * recipients
        sent[1] += data.count(b"\n") * recipients

    # ------------------------------------------------------------ lines

    def said(self, peer: Peer, what: bytes | str) -> None:
        """What `peer` said: the one way in for a client's lines, so that every line takes
        the same road to the members. `bytes`: plain talk, lines each ending in LF, printable
        ASCII with a visible character and no command, which go out as they came, prefixed
        as one block (the hot path); `str`: one sanitized, non-empty line, maybe a command.
        What a peer says while the bus decides on its /nick waits, and follows the answer."""
        if self._waiting and peer in self._waiting:
            self._waiting[peer].append(what)
        elif what.__class__ is not str:
            prefix = b"<%s> " % peer.nick.encode()
            self.broadcast(peer.room, prefix + what[:-1].replace(b"\n", b"\r\n" + prefix) + b"\r\n",
                           peer, skip=peer)
            if self.backend.shared:
                self.backend.said(peer, "say", what[:-1].decode())
        elif what.startswith("//"):
            self.say(peer, what[1:])
        elif what.startswith("/"):
            name, _, args = what[1:].partition(" ")
            handler = COMMANDS.get(name.lower())
            if handler is None:
                self.tell(peer, error(f"unknown command {quoted('/' + name)} (try /help)"))
            else:
                handler(self, peer, args.strip())
        else:
            self.say(peer, what)

    def say(self, peer: Peer, text: str) -> None:
        self.broadcast(peer.room, line(f"<{peer.nick}> {text}"), peer, skip=peer)
        if self.backend.shared:
            self.backend.said(peer, "say", text)

    # ------------------------------------------------------------ commands

    @command("/nick NAME", "change your nick")
    def cmd_nick(self, peer: Peer, args: str) -> None:
        new = args
        if not new:
            return self.tell(peer, error("usage: /nick NAME"))
        if not NICK_RE.fullmatch(new):
            return self.tell(peer, error(f"bad nick: {quoted(new)} (1 to 16 letters, digits, _ - .)"))
        key = skeleton(new)
        mine = key == skeleton(peer.nick)
        if GUEST_RE.fullmatch(key) and not mine:
            return self.tell(peer, error(f"nick reserved for guests: {new}"))
        if not mine and self.backend.holder(key) is not None:
            return self.tell(peer, error(f"nick taken: {new}"))
        if new == peer.nick:
            return self.tell(peer, notice(f"you are already {new}"))
        old = peer.nick

        def done(why: str | None) -> None:
            later = self._waiting.pop(peer, [])
            if why is not None:
                self.tell(peer, error(why))
            else:
                peer.nick = new
                self.broadcast(peer.room, notice(f"{old} is now known as {new}"))
            self._replay(peer, later)

        self._waiting[peer] = []
        self.backend.rename(peer, new, done)

    @command("/join #ROOM", "leave this room for another (made if need be)")
    def cmd_join(self, peer: Peer, args: str) -> None:
        if not args:
            return self.tell(peer, error("usage: /join #ROOM"))
        room = args if args.startswith("#") else "#" + args
        if not ROOM_RE.fullmatch(room):
            return self.tell(peer, error(f"bad room name: {quoted(args)} (# and 1 to 32 letters, digits, _ or -)"))
        room = room.lower()
        if room == peer.room:
            return self.tell(peer, error(f"you are already in {room}"))
        self._leave_room(peer, f"joined {room}")
        self._enter(peer, room)

    @command("/who, /names", "who is in this room", "names")
    def cmd_who(self, peer: Peer, args: str) -> None:
        room = peer.room
        self.backend.roster(room, lambda names, partial: self.tell(peer, roster(room, names, partial)))

    @command("/rooms", "the rooms, and how many are in each")
    def cmd_rooms(self, peer: Peer, args: str) -> None:
        self.backend.rooms(lambda rooms, partial: self.tell(
            peer, notice(f"rooms: {', '.join(rooms)}{THIS_NODE if partial else ''}")))

    @command("/me ACTION", "say what you do: * alice waves")
    def cmd_me(self, peer: Peer, args: str) -> None:
        if not args:
            return self.tell(peer, error("usage: /me ACTION"))
        self.broadcast(peer.room, line(f"* {peer.nick} {args}"), peer, skip=peer)
        if self.backend.shared:
            self.backend.said(peer, "me", args)

    @command("/msg NICK TEXT", "a private message, whatever room NICK is in")
    def cmd_msg(self, peer: Peer, args: str) -> None:
        nick, _, text = args.partition(" ")
        text = text.strip()
        if not nick or not text:
            return self.tell(peer, error("usage: /msg NICK TEXT"))
        target = self.backend.holder(skeleton(nick))
        if target is None:
            def sent(why: str) -> None:
                self.tell(peer, error(why) if why else line(f"-> *{nick}* {text}"))
            return self.backend.message(peer, nick, text, sent)
        self.tell(target, line(f"*{peer.nick}* {text}"), peer)
        self.tell(peer, line(f"-> *{target.nick}* {text}"))

    @command("/quit [REASON]", "leave")
    def cmd_quit(self, peer: Peer, args: str) -> None:
        peer.quit(f"quit: {quoted(args)}" if args else "quit")

    @command("/help", "this list")
    def cmd_help(self, peer: Peer, args: str) -> None:
        self.tell(peer, notice("commands:"))
        for text in HELP:
            self.tell(peer, notice(text))
        self.tell(peer, notice(f"{'//text':<17} say a line that starts with /"))
