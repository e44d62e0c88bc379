"""Chat shared by several chatd processes through a Redis bus (README "More than one process").

`ClusterBackend` is rooms.py's ChatBackend for a node of a cluster: it keeps
this process's members as `LocalBackend` does (a line reaches them at once,
by the same road as before) and keeps the bus up to date, over bus.py's Link:

- a line said here is published once, to its room's channel (`ROOM`), never
  once per recipient; a pass's publishes go in one pipeline. Each node
  subscribes to the rooms its own users are in, and to its own channel (`TO`,
  private messages);
- what comes off the bus is JSON (never pickle) and is checked again as if a
  client had typed it: nicks and rooms must have their shape, text goes
  through `clean_text` and must show something, reasons must be one of those
  chatd gives. Anything else is forged or broken: dropped, and logged at most
  once per FORGED_LOG_S. So no message can make a `*** ` line, a false
  `<nick>`, or a terminal escape;
- every message carries its origin (node id and a random epoch per process
  start) and a sequence number per room, so a line comes at most once and each
  sender's lines in order; a gap means lines were lost (one notice per room per
  GAP_EPISODE_S);
- nicks are claimed on the bus (atomically, in a script: one wins a race); rosters
  and the room list live there, so `/who`, `/names` and `/rooms` say the same on
  every node; guest numbers are leased in blocks (`INCRBY`), and a node back on a
  bus that restarted empty first raises the counter to the end of its own block;
- liveness: each node's key has a TTL of node_timeout, renewed every heartbeat;
  every heartbeat a node also runs the janitor, which takes any node whose key
  expired out of the rosters and publishes its users' leaves ("server lost").
  A node that finds its own key gone has lost its lease: its users were taken
  out, so it joins again as after an outage.

Bus lost and back, a nick lost while cut off, lines lost, and nodes lost are
each logged once per event, and each user is told with one of NOTICES.

Tests: tests/cluster/test_cluster.py, tests/unit/test_cluster_wire.py, tests/cluster/test_workers.py, tests/cluster/test_upgrade_cluster.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import time
from typing import Any, Callable

from . import bus
from .config import NODE_ID_RE
from .errors import StartError
from .protocol import clean_text
from .rooms import (NICK_RE, ROOM_RE, Answer, ChatService, LocalBackend, Peer, line, notice, quoted,
                    skeleton)

log = logging.getLogger("chatd")
FORGED_LOG_S = 10.0       # forged or broken bus messages: logged at most this often
SEEN_MAX = 1000           # origins per room whose last sequence number is kept
SEQ_WINDOW = 1_000_000    # a sequence number further ahead than this is dropped (forged)
MESSAGE_MAX = 1 << 20     # bytes in one bus message (a read's lines, joined, are far less)
EPOCH_RE = re.compile(r"[0-9a-f]{16}")
PLAIN_TEXT = re.compile(r"[\x20-\x7e\n]*")   # printable ASCII lines: nothing to sanitize
GAP_EPISODE_S = 10.0      # lines lost in a room: its members are told at most this often
ANSWER_MIN_S = 1.0        # the bus may always take this long to answer (`answer_timeout`)
GONE_TTL_S = 3600         # how long the bus remembers that a janitor took a node out
NOTICES = {
    "lost": "Lost contact with the other servers; only people on this server can hear you.",
    "restored": "Contact with the other servers restored; lines sent meanwhile did not reach them.",
    "gap": "Some lines from another server were lost on the way here.",
    "nick_lost": "Your nick {old} was taken on another server while this one was cut off; "
                 "you are now {new}.",
}
NICK_CUT_OFF = "cannot change nicks while cut off from the other servers"
# The reasons a leave may carry over the bus: those chatd itself gives (chat.py, rooms.py).
REASON_RE = re.compile(r'connection closed|client closed|idle|too slow|flooding|quit'
                       r'|quit: "(?:[^"\\]|\\["\\])*"|joined #[a-z0-9_-]{1,32}'
                       r'|server lost|server shutting down')

# ---------------------------------------------------------------- scripts (Lua, run atomically)
# Keys: P:node:ID (a lease token, TTL node_timeout; a worker started in a dead one's place
# holds the same token, takes the lease over and takes its predecessor's users out), P:nodes (set of ids), P:gone:ID (a janitor
# took ID out), P:nick:SKEL ("ID nick"), P:roster:ROOM (SKEL -> "ID nick"), P:rooms (set),
# P:members:ID (SKEL -> "nick room"), P:guests (counter).

_CLEANUP = """
local function cleanup(p, id)
  local mine = id .. ' '
  local m = redis.call('hgetall', p .. ':members:' .. id)
  local out = {}
  for i = 1, #m, 2 do
    local skel, v = m[i], m[i + 1]
    local sp = string.find(v, ' ', 1, true)
    local nick, room = string.sub(v, 1, sp - 1), string.sub(v, sp + 1)
    local held = redis.call('hget', p .. ':roster:' .. room, skel)
    if held and string.sub(held, 1, #mine) == mine then
      redis.call('hdel', p .. ':roster:' .. room, skel)
    end
    local owner = redis.call('get', p .. ':nick:' .. skel)
    if owner and string.sub(owner, 1, #mine) == mine then
      redis.call('del', p .. ':nick:' .. skel)
    end
    out[#out + 1] = nick
    out[#out + 1] = room
  end
  redis.call('del', p .. ':members:' .. id)
  return out
end
"""
REGISTER = _CLEANUP + """
local p, id, token, ttl, first = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local key = p .. ':node:' .. id
local held = redis.call('get', key)
if held and held ~= token then return {0, {}, 0} end
local before, took = {}, 0
if first == '1' then   -- ids are unique: users still listed under ours are a dead process's
  before = cleanup(p, id)
  if held or #before > 0 then took = 1 end
end
redis.call('set', key, token, 'px', ttl)
redis.call('sadd', p .. ':nodes', id)
if redis.call('del', p .. ':gone:' .. id) == 1 then return {2, before, took} end
return {1, before, took}
"""
HEARTBEAT = """
local p, id, token, ttl = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local key = p .. ':node:' .. id
local held = redis.call('get', key)
if held == token then redis.call('pexpire', key, ttl) return 1 end
if held then return -1 end
if redis.call('sismember', p .. ':nodes', id) == 1 then
  redis.call('set', key, token, 'px', ttl)
  return 2
end
return 0
"""
JANITOR = _CLEANUP + """
local p = ARGV[1]
local out = {}
for _, id in ipairs(redis.call('smembers', p .. ':nodes')) do
  if redis.call('exists', p .. ':node:' .. id) == 0 then
    redis.call('srem', p .. ':nodes', id)
    redis.call('set', p .. ':gone:' .. id, 1, 'ex', ARGV[2])
    out[#out + 1] = id
    out[#out + 1] = cleanup(p, id)
  end
end
return out
"""
DEREGISTER = _CLEANUP + """
local p, id, token = ARGV[1], ARGV[2], ARGV[3]
local held = redis.call('get', p .. ':node:' .. id)
if held and held ~= token then return {} end   -- another process has the id now: its users
redis.call('del', p .. ':node:' .. id)
redis.call('srem', p .. ':nodes', id)
return cleanup(p, id)
"""
CLAIM = """
local p, id, skel, nick, room, old = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local mine = id .. ' '
local owner = redis.call('get', p .. ':nick:' .. skel)
if owner and string.sub(owner, 1, #mine) ~= mine then return 0 end
redis.call('set', p .. ':nick:' .. skel, mine .. nick)
if old ~= '' and old ~= skel then
  local had = redis.call('get', p .. ':nick:' .. old)
  if had and string.sub(had, 1, #mine) == mine then redis.call('del', p .. ':nick:' .. old) end
  local held = redis.call('hget', p .. ':roster:' .. room, old)
  if held and string.sub(held, 1, #mine) == mine then redis.call('hdel', p .. ':roster:' .. room, old) end
  redis.call('hdel', p .. ':members:' .. id, old)
end
redis.call('hset', p .. ':roster:' .. room, skel, mine .. nick)
redis.call('sadd', p .. ':rooms', room)
redis.call('hset', p .. ':members:' .. id, skel, nick .. ' ' .. room)
return 1
"""
REASSERT = _CLEANUP + """
local p, id = ARGV[1], ARGV[2]
local mine = id .. ' '
cleanup(p, id)
local lost = {}
for i = 3, #ARGV - 2, 3 do
  local skel, nick, room = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local owner = redis.call('get', p .. ':nick:' .. skel)
  if owner and string.sub(owner, 1, #mine) ~= mine then
    lost[#lost + 1] = skel
  else
    redis.call('set', p .. ':nick:' .. skel, mine .. nick)
    redis.call('hset', p .. ':roster:' .. room, skel, mine .. nick)
    redis.call('sadd', p .. ':rooms', room)
    redis.call('hset', p .. ':members:' .. id, skel, nick .. ' ' .. room)
  end
end
return lost
"""
PART = """
local p, id, skel, room, gone = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local mine = id .. ' '
local held = redis.call('hget', p .. ':roster:' .. room, skel)
if held and string.sub(held, 1, #mine) == mine then redis.call('hdel', p .. ':roster:' .. room, skel) end
if gone == '1' then
  redis.call('hdel', p .. ':members:' .. id, skel)
  local owner = redis.call('get', p .. ':nick:' .. skel)
  if owner and string.sub(owner, 1, #mine) == mine then redis.call('del', p .. ':nick:' .. skel) end
end
return 1
"""
ROOMS = """
local p = ARGV[1]
local out = {}
for _, room in ipairs(redis.call('smembers', p .. ':rooms')) do
  local n = redis.call('hlen', p .. ':roster:' .. room)
  if n == 0 then redis.call('srem', p .. ':rooms', room) else
    out[#out + 1] = room
    out[#out + 1] = n
  end
end
return out
"""
MESSAGE = """
local owner = redis.call('get', ARGV[1] .. ':nick:' .. ARGV[2])
if not owner then return {-1, ''} end
local sp = string.find(owner, ' ', 1, true)
return {redis.call('publish', ARGV[1] .. ':to:' .. string.sub(owner, 1, sp - 1), ARGV[3]),
        string.sub(owner, sp + 1)}
"""
RAISE = """
local now = tonumber(redis.call('get', KEYS[1]) or '0')
if now < tonumber(ARGV[1]) then redis.call('set', KEYS[1], ARGV[1]) end
return 1
"""


def listen_early(where: dict[str, Any]) -> bus.EarlyListener:
    """`ClusterBackend.channels`' listener for a live upgrade's new process (upgrade.py)."""
    return bus.EarlyListener(where["url"], where["channels"], where["timeout"])


class Forged(ValueError):
    """A bus message that chatd would never have sent."""


def answer_timeout(node_timeout: float) -> float:
    """How long the bus may take to answer before the link counts as lost: half the lease,
    so a stalled bus is noticed before the lease runs out, but never under ANSWER_MIN_S, so a
    busy machine's hiccup is not taken for an outage."""
    return max(ANSWER_MIN_S, node_timeout / 2)


def default_node_id(port: int) -> str:
    return f"{socket.gethostname().split('.')[0]}-{port}"


class ClusterBackend(LocalBackend):
    """This node's members, and what it shares with the other nodes through the bus."""

    shared = True

    def __init__(self, service: ChatService, url: str, node_id: str, prefix: str,
                 heartbeat: float, node_timeout: float, reconnect_max: float,
                 guest_block: int, lease: str = "") -> None:
        """`lease`: the token of a worker slot (workers.py), else one of our own."""
        super().__init__()
        self.service = service
        self.node_id = node_id
        self.prefix = prefix
        self.heartbeat = heartbeat
        self.node_timeout = node_timeout
        self.guest_block = guest_block
        self.token = lease or os.urandom(8).hex()   # what our key holds while we are alive
        self.epoch = os.urandom(8).hex()     # this process's start: origin of what it publishes
        self.news: list[str] = []            # what a newcomer is told (cut off: NOTICES["lost"])
        self.closing = False
        self.link = bus.Link(url, timeout=answer_timeout(node_timeout), reconnect_max=reconnect_max,
                             on_connect=self._on_connect, on_message=self._on_message,
                             on_lost=self._on_lost, on_restored=self._on_restored)
        self._head = json.dumps({"o": node_id, "e": self.epoch}, separators=(",", ":"))[:-1]
        self._own = (self._head + ",").encode()
        self._seq: dict[str, list[int]] = {}   # room here -> [its incarnation, our last number]
        self._incarnation = 0                   # counts rooms published to, for `_seq`
        self._seen: dict[str, dict[tuple[str, str, int], int]] = {}   # room -> origin -> last
        self._gaps: dict[str, float] = {}              # room -> when its members were last told
        self._guests: list[int] = []                  # [next, end] of the block in use
        self._spare: list[int] | None = None          # the next block, leased ahead
        self._guest_waiters: list[Callable[[], None]] = []   # newcomers waiting for a block
        self._leasing = False
        self._lost_at = 0.0
        self._janitor_after = 0.0   # no janitor before this (loop time): nodes cut off with us
        self._lease_until = 0.0     # our lease is surely held until then (loop time)
        self._first = True          # come back first
        self._rejoin = False        # our users were taken out (lease lost): tell the others again
        self._taken: list[Peer] = []  # users whose nick another node took while we were cut off
        self._orphans: list[bytes] = []   # (nick, room) pairs of a dead predecessor in our slot
        self._claiming: set[str] = set()   # skeletons a rename here has asked the bus for
        self._changes = 0           # joins, leaves and renames here, counted...
        self._asserted = 0          # ...and that count when the bus was last told of them all
        self._forged = (0.0, 0)     # (last logged, not logged since)
        self._room_channel = f"{prefix}:room:"
        self._room_prefix = self._room_channel.encode()   # the same, as channels come off the bus
        self._heart: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.held: list[tuple[bytes, bytes]] | None = None   # a live upgrade's, until its clients are served
        self.early: Any = None                                # ... and what it heard before (bus.py)

    # ------------------------------------------------------------ live upgrade (upgrade.py)

    def capture(self) -> dict[str, Any]:
        """What a live upgrade carries of this node besides its users: the lease token (the
        new process holds the node's lease on, as the same node), the guest blocks, and the
        last sequence number seen from each origin in each room (so nothing comes twice, and
        what was said while neither process listened is told as a gap)."""
        return {"token": self.token, "guests": self._guests, "spare": self._spare,
                "seen": [[room, *origin, last] for room, seen in self._seen.items()
                         for origin, last in seen.items()]}

    def channels(self) -> dict[str, Any]:
        """Where a live upgrade's new process listens before this process freezes (upgrade.py)."""
        return {"url": self.link.url, "timeout": self.link.timeout,
                "channels": [self._room_channel + room for room in self._rooms]
                + [f"{self.prefix}:to:{self.node_id}"]}

    def resume(self, local: LocalBackend, saved: dict[str, Any], early: Any = None) -> None:
        """Before `start`, in a live upgrade's new process: this node's users as `local` holds
        them (restored from the record), the bus state `capture` saw, and the node comes back
        rather than first (its users are put on the bus again as they are, none announced).
        What the bus delivers is held until `deliver_held` (the clients have no transport yet),
        as is what `early` (bus.EarlyListener) heard before."""
        self._rooms, self._nicks, self.next_guest = local._rooms, local._nicks, local.next_guest
        self._guests = [int(n) for n in saved["guests"]]
        self._spare = None if saved["spare"] is None else [int(n) for n in saved["spare"]]
        for room, node, epoch, incarnation, last in saved["seen"]:
            self._seen.setdefault(room, {})[(node, epoch, incarnation)] = last
        self._first = False
        for room in self._rooms:
            self.link.subscribe(self._room_channel + room)
        self.held = []
        self.early = early

    def deliver_held(self) -> None:
        """The clients are served: what the bus delivered meanwhile, in order."""
        held, self.held = self.held or [], None
        early, self.early = self.early, None
        ours = json.dumps({"o": self.node_id}, separators=(",", ":"))[:-1].encode() + b","
        for channel, data in (early.stop() if early is not None else []):
            if not data.startswith(ours):   # the old process's own: its users saw them
                self._on_message(channel, data)
        for channel, data in held:
            self._on_message(channel, data)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Join the bus; a bus that cannot be reached, or a node id in use, stops the start."""
        self.link.subscribe(f"{self.prefix}:to:{self.node_id}")
        try:
            await self.link.open()
        except bus.Refused as e:
            await self.link.close()
            raise StartError(str(e)) from None
        except (ValueError, *bus.FAILURES) as e:   # ValueError: a URL redis-py cannot use
            await self.link.close()
            raise StartError(f"[cluster] bus {self.link.url}: cannot reach it: {bus.describe(e)}") from None
        self._janitor_after = self._loop.time() + self.node_timeout
        self._heart = self._loop.call_later(self.heartbeat, self._beat)
        log.info("bus %s: joined as node %s", self.link.url, self.node_id)
        orphans, self._orphans = self._orphans, []
        self._publish_leaves(orphans, "server lost")

    def retime(self, heartbeat: float, node_timeout: float, reconnect_max: float) -> None:
        """A restart's new [cluster] timings, from the next heartbeat on."""
        self.heartbeat, self.node_timeout = heartbeat, node_timeout
        self.link.timeout, self.link.reconnect_max = answer_timeout(node_timeout), reconnect_max

    async def close(self) -> None:
        """Leave the bus: this node's users leave every other node at once ("server shutting
        down"), then the link closes."""
        self.closing = True
        if self._heart is not None:
            self._heart.cancel()
        if self.link.up:
            done = self._loop.create_future()
            self.link.call("EVAL", DEREGISTER, 0, self.prefix, self.node_id, self.token,
                           then=lambda answer: done.done() or done.set_result(answer))
            answer = await done
            if isinstance(answer, list):
                self._publish_leaves(answer, "server shutting down")
                flushed = self._loop.create_future()
                self.link.call("PING", then=lambda _: flushed.done() or flushed.set_result(None))
                await flushed
        await self.link.close()

    async def _on_connect(self, client: Any) -> None:
        """Register (refused if another process holds our id), lease guest numbers, and if we
        come back, raise the guest counter and put our users back on the bus."""
        ttl = int(self.node_timeout * 1000)
        asked = self._loop.time()
        got, before, took = await client.eval(REGISTER, 0, self.prefix, self.node_id, self.token,
                                              ttl, "1" if self._first else "0")
        if took:   # a process that died with our id (a worker in our slot): its users are gone
            log.info("bus: took over node %s from a process that died: %d users left",
                     self.node_id, len(before) // 2)
            self._orphans = before
        if got == 0:
            raise bus.Refused(f"[cluster] node_id {self.node_id!r} is in use by another chatd "
                              f"on {self.link.url}; give each node its own")
        if got == 2:
            self._rejoin = True
        self._lease_until = asked + self.node_timeout
        if self._guests:
            await client.eval(RAISE, 1, f"{self.prefix}:guests",
                              max(self._guests[1], (self._spare or [0, 0])[1]))
        if not self._guests or self._guests[0] > self._guests[1]:
            end = await client.incrby(f"{self.prefix}:guests", self.guest_block)
            self._guests = [end - self.guest_block + 1, end]
        if not self._first:
            await self._reassert(client)

    async def _reassert(self, client: Any) -> None:
        """Back on the bus: what it holds of this node is replaced, at once, by where its users
        are now (some left, joined or quit meanwhile). A nick another node's user took
        meanwhile is lost: its holder here becomes a guest once the link is up (`_taken`)."""
        self._asserted = self._changes
        lost = await client.eval(REASSERT, 0, self.prefix, self.node_id, *self._places())
        self._taken = self._holders(lost)

    def _places(self) -> list[str]:
        """(skeleton, nick, room) of every user here, flat, as REASSERT takes them."""
        return [x for room, members in self._rooms.items() for peer in members
                for x in (skeleton(peer.nick), peer.nick, room)]

    def _holders(self, skeletons: Any) -> list[Peer]:
        """The users here who hold these nicks (REASSERT's answer: the ones it could not keep)."""
        if not isinstance(skeletons, list):
            return []
        return [peer for skel in skeletons
                if (peer := self._nicks.get(skel.decode())) is not None]

    def _on_lost(self, why: str) -> None:
        if self.closing:
            return
        self._lost_at = self._loop.time()
        self._first = False
        self.news = [NOTICES["lost"]]
        log.warning("bus %s: lost (%s); chat stays on this node until it is back", self.link.url, why)
        self.service.everyone(notice(NOTICES["lost"]))

    def _on_restored(self) -> None:
        """The link is up again: the notice to everyone, nick clashes settled, and if users
        came, went or moved while `_reassert` ran (what they asked of the bus was answered
        DOWN), the bus is told again where everyone is."""
        if self._changes != self._asserted:
            self._asserted = self._changes
            self.link.call("EVAL", REASSERT, 0, self.prefix, self.node_id, *self._places(),
                           then=lambda lost: [self._clash(peer) for peer in self._holders(lost)])
        self.news = []
        self._seen.clear()   # what was lost meanwhile was told as an outage, not as a gap
        self._janitor_after = self._loop.time() + self.node_timeout
        taken, self._taken = self._taken, []
        rejoin, self._rejoin = self._rejoin, False
        for peer in taken:
            self._clash(peer, tell_others=not rejoin)
        if rejoin:
            for room, members in self._rooms.items():
                for peer in members:
                    self._publish(room, "join", peer.nick)
        log.info("bus %s: back after %.1f s; %d users placed again, %d renamed",
                 self.link.url, self._loop.time() - self._lost_at,
                 sum(len(m) for m in self._rooms.values()), len(taken))
        self.service.everyone(notice(NOTICES["restored"]))

    def _lose_nick(self, peer: Peer, tell_others: bool = True) -> None:
        """`peer`'s nick is held by another node's user: it becomes a fresh guest. The other
        nodes are told of the rename only if they still know `peer` by its old nick: not when
        a janitor took our users out (`tell_others` False), for they saw it leave, the nick
        is now their own user's, and they see it join again under the new one."""
        old = peer.nick
        number = self.guest()
        if number is None:   # a block is on its way: then, if it still holds that nick
            return self.when_guests(lambda: self._clash(peer, tell_others))
        new = f"guest{number}"
        self.link.call("EVAL", CLAIM, 0, self.prefix, self.node_id, skeleton(new), new, peer.room, "")
        if tell_others:
            self._publish(peer.room, "nick", old, new)
        self.service.rename_here(peer, new, NOTICES["nick_lost"].format(old=old, new=new))
        log.info("bus: the nick %s was taken on another node while this one was cut off; its "
                 "holder here is now %s", old, new)

    # ------------------------------------------------------------ liveness

    def _beat(self) -> None:
        """Renew our lease, and take out nodes whose lease expired (not while we, too, may
        have just been cut off: they get node_timeout to come back first)."""
        self._heart = self._loop.call_later(self.heartbeat, self._beat)
        if not self.link.up:
            return
        sent = self._loop.time()
        self.link.call("EVAL", HEARTBEAT, 0, self.prefix, self.node_id, self.token,
                       int(self.node_timeout * 1000), then=lambda answer: self._beaten(answer, sent))
        if self._loop.time() >= self._janitor_after:
            self.link.call("EVAL", JANITOR, 0, self.prefix, GONE_TTL_S, then=self._swept)

    def _beaten(self, answer: Any, sent: float) -> None:
        if not self.link.up:
            return   # lost meanwhile (an answer of the same batch found the lease gone): in hand
        if answer in (1, 2):   # the bus renewed it no earlier than we asked
            self._lease_until = sent + self.node_timeout
        if answer == 2:
            log.warning("bus: this node's lease had expired (no heartbeat for %g s); renewed "
                        "before any other node took its users out", self.node_timeout)
        elif answer in (0, -1):
            self._rejoin = answer == 0
            log.warning("bus: this node's lease expired (no heartbeat for %g s) and %s; joining "
                        "again", self.node_timeout,
                        "its users were taken out" if answer == 0 else "another process holds its id")
            self.link.lose("lease lost")

    def _swept(self, answer: Any) -> None:
        if not isinstance(answer, list):
            return
        for i in range(0, len(answer) - 1, 2):
            node, users = answer[i].decode(), answer[i + 1]
            log.info("bus: node %s is gone (no heartbeat for %g s): %d users left",
                     node, self.node_timeout, len(users) // 2)
            self._publish_leaves(users, "server lost")

    def _lease_expired(self) -> bool:
        """Has our lease run out since the bus last renewed it? (This process was stopped,
        say, for longer than node_timeout: it runs again before its first heartbeat after
        that is answered.) Then another node's janitor may have taken our users out, what
        the subscription delivers now was said while we were away (a late replay, including
        our own users' "left (server lost)"), and what our users typed meanwhile would reach
        people who saw them leave. So the link is given up, as when a heartbeat finds the
        lease gone, and the node joins again; True while the link is down."""
        if self.link.up and self._loop.time() > self._lease_until:
            log.warning("bus: this node's lease expired (no renewal for %.1f s); dropping what "
                        "the bus sent meanwhile and joining again",
                        self._loop.time() - self._lease_until + self.node_timeout)
            self.link.lose("lease lost")
        return not self.link.up

    def _publish_leaves(self, users: list[bytes], reason: str) -> None:
        """Leaves of users a janitor or a stop took out: published, and shown here too."""
        for i in range(0, len(users) - 1, 2):
            nick, room = users[i].decode(), users[i + 1].decode()
            self._publish(room, "leave", nick, reason)
            if room in self._rooms and not self.closing:
                self.service.broadcast(room, notice(f"{nick} left {room} ({reason})"))

    # ------------------------------------------------------------ what happens here

    def guest(self) -> int | None:
        """The next number of the leased block. A spare block is leased once half of this one
        is used, and taken when it runs out; with no spare yet, None (the newcomer waits for
        `when_guests`), so a burst of arrivals never runs past what the bus leased us. Cut off
        with both used up, numbers go on past the block, and a clash is settled when the bus
        is back (the holder here becomes a guest again)."""
        block = self._guests
        if block[0] > block[1]:
            if self._spare is not None:
                block[:], self._spare = self._spare, None
            elif self.link.up:
                self._lease()
                return None
            else:
                block[1] = block[0]
        number = block[0]
        block[0] += 1
        if self._spare is None and block[1] - block[0] < self.guest_block // 2:
            self._lease()
        return number

    def when_guests(self, then: Callable[[], None]) -> None:
        self._guest_waiters.append(then)
        self._lease()

    def _lease(self) -> None:
        if not self._leasing and self.link.up:
            self._leasing = True
            self.link.call("INCRBY", f"{self.prefix}:guests", self.guest_block, then=self._leased)

    def _leased(self, answer: Any) -> None:
        """A block came (or the bus is lost: then waiting newcomers count past the block)."""
        self._leasing = False
        if isinstance(answer, int):
            self._spare = [answer - self.guest_block + 1, answer]
        waiting, self._guest_waiters = self._guest_waiters, []
        for then in waiting:
            then()

    def join(self, room: str, peer: Peer) -> None:
        self._changes += 1
        if room not in self._rooms:
            self.link.subscribe(self._room_channel + room)
        super().join(room, peer)
        if self.closing:
            return
        self.link.call("EVAL", CLAIM, 0, self.prefix, self.node_id, skeleton(peer.nick), peer.nick,
                       room, "", then=lambda ok: ok == 0 and self._clash(peer))
        self._publish(room, "join", peer.nick)

    def _clash(self, peer: Peer, tell_others: bool = True) -> None:
        """The bus says another node's user holds `peer`'s nick (a guest number clash, after
        the bus restarted): `peer` becomes another guest."""
        if self._nicks.get(skeleton(peer.nick)) is peer:
            self._lose_nick(peer, tell_others)

    def leave(self, room: str, peer: Peer, reason: str | None) -> None:
        self._changes += 1
        super().leave(room, peer, reason)
        if room not in self._rooms:   # nobody here: the room is forgotten (`_publish`)
            self.link.unsubscribe(self._room_channel + room)
            for kept in (self._seq, self._seen, self._gaps):
                kept.pop(room, None)
        if self.closing:
            return
        gone = reason is None or not reason.startswith("joined ")
        self.link.call("EVAL", PART, 0, self.prefix, self.node_id, skeleton(peer.nick), room,
                       "1" if gone else "0")
        # No reason: this server is stopping, and tells only the other servers' users.
        self._publish(room, "leave", peer.nick, reason or "server shutting down")

    def renamed(self, peer: Peer, new: str) -> None:
        self._changes += 1
        super().renamed(peer, new)

    def rename(self, peer: Peer, new: str, then: Callable[[str | None], None]) -> None:
        if not self.link.up:
            return then(NICK_CUT_OFF)
        old = peer.nick
        key = skeleton(new)
        if key in self._claiming:   # another user here asked first; the bus has not answered
            return then(f"nick taken: {new}")
        self._claiming.add(key)

        def answered(ok: Any) -> None:
            self._claiming.discard(key)
            if self._nicks.get(skeleton(old)) is not peer or peer.nick != old:
                if ok == 1:   # it left, or was renamed by the bus, meanwhile: give it back
                    self.link.call("EVAL", PART, 0, self.prefix, self.node_id, key, peer.room, "1")
                if self._nicks.get(skeleton(peer.nick)) is peer:   # still here: answer it
                    then(f"your nick changed meanwhile; try /nick {new} again")
                return
            if ok == 1:
                if self._nicks.get(key, peer) is not peer:
                    return then(f"nick taken: {new}")
                self.renamed(peer, new)
                self._publish(peer.room, "nick", old, new)
                return then(None)
            then(NICK_CUT_OFF if ok is bus.DOWN else f"nick taken: {new}")

        self.link.call("EVAL", CLAIM, 0, self.prefix, self.node_id, key, new, peer.room,
                       skeleton(old), then=answered)

    def said(self, peer: Peer, kind: str, text: str) -> None:
        self._publish(peer.room, kind, peer.nick, text)

    def roster(self, room: str, then: Answer) -> None:
        def answered(held: Any) -> None:
            if isinstance(held, list):
                return then([v.decode().partition(" ")[2] for v in held], False)
            super(ClusterBackend, self).roster(room, lambda names, _: then(names, True))
        self.link.call("HVALS", f"{self.prefix}:roster:{room}", then=answered)

    def rooms(self, then: Answer) -> None:
        def answered(listed: Any) -> None:
            if isinstance(listed, list):
                pairs = sorted((listed[i].decode(), listed[i + 1]) for i in range(0, len(listed) - 1, 2))
                return then([f"{room} ({n})" for room, n in pairs], False)
            super(ClusterBackend, self).rooms(lambda rooms, _: then(rooms, True))
        self.link.call("EVAL", ROOMS, 0, self.prefix, then=answered)

    def message(self, peer: Peer, nick: str, text: str, then: Callable[[str], None]) -> None:
        if not NICK_RE.fullmatch(nick):
            return then(f"no such nick: {quoted(nick)}")
        if not self.link.up:
            return then(f"{nick} cannot be reached right now")
        payload = self._encode({"k": "msg", "n": peer.nick, "to": skeleton(nick), "t": text})

        def answered(got: Any) -> None:
            if not isinstance(got, list) or got[0] == 0:
                return then(f"{nick} cannot be reached right now")
            if got[0] == -1:
                return then(f"no such nick: {quoted(nick)}")
            then("")

        self.link.call("EVAL", MESSAGE, 0, self.prefix, skeleton(nick), payload, then=answered)

    # ------------------------------------------------------------ publishing

    def _publish(self, room: str, kind: str, nick: str, text: str = "") -> None:
        """One message to a room's channel. Numbered per room, from 1 in each incarnation (a
        room is forgotten when its last user here leaves, so this stays bounded; a room
        published to without users here, by a janitor or a stop, gets one of its own)."""
        if self.closing and kind != "leave":
            return
        numbers = self._seq.get(room)
        if numbers is None:
            self._incarnation += 1
            numbers = [self._incarnation, 0]
            if room in self._rooms:
                self._seq[room] = numbers
        numbers[1] += 1
        if not self.closing and self._lease_expired():
            return
        self.link.call("PUBLISH", self._room_channel + room,
                       self._encode({"i": numbers[0], "s": numbers[1], "k": kind, "n": nick, "t": text}))

    def _encode(self, fields: dict[str, Any]) -> bytes:
        """Our head (origin, start token) and `fields`, as compact JSON."""
        return (self._head + "," + json.dumps(fields, separators=(",", ":"))[1:]).encode()

    # ------------------------------------------------------------ what comes off the bus

    def _on_message(self, channel: bytes, data: bytes) -> None:
        if self.held is not None:
            self.held.append((channel, data))
            return
        if data.startswith(self._own) or self._lease_expired():
            return   # our own publish, back from a room we are in; or stale
        try:
            if len(data) > MESSAGE_MAX:
                raise Forged(f"over {MESSAGE_MAX} bytes")
            if channel.startswith(self._room_prefix):
                self._from_room(channel[len(self._room_prefix):].decode(), data)
            else:
                self._private(data)
        except Exception as e:   # noqa: BLE001 - whatever it holds (JSON nested too deep: a
            self._forged_message(channel, e)   # RecursionError), it must not stop the reader

    def _from_room(self, room: str, data: bytes) -> None:
        """A room's message: checked whole (origin, sequence number, what it says) before its
        sequence number counts, so a malformed one cannot silence a real sender; then at most
        once and in order per origin, and a gap told."""
        if room not in self._rooms:
            return   # in flight when we left the room
        msg = json.loads(data)
        if type(msg) is not dict:
            raise Forged("not an object")
        origin, seq = (msg["o"], msg["e"], msg["i"]), msg["s"]
        if (type(origin[0]) is not str or not NODE_ID_RE.fullmatch(origin[0])
                or type(origin[1]) is not str or not EPOCH_RE.fullmatch(origin[1])
                or type(origin[2]) is not int or type(seq) is not int or seq < 1):
            raise Forged("a bad origin or sequence number")
        data = self._shown(room, msg)
        seen = self._seen.setdefault(room, {})
        last = seen.get(origin)
        if last is None and len(seen) >= SEEN_MAX:
            seen.clear()   # forged origins by the thousand: bounded, at the cost of order
        if last is not None and (seq <= last or seq > last + SEQ_WINDOW):
            return   # again, late, or from too far ahead: at most once, in order
        seen[origin] = seq
        if last is not None and seq > last + 1:
            self._gap(room)
        self.service.broadcast(room, data)

    def _shown(self, room: str, msg: dict[str, Any]) -> bytes:
        """What a room's message shows its members here, as chatd itself would say it."""
        kind, nick, text = msg["k"], _nick(msg["n"]), msg["t"]
        if kind == "say":
            text = _text(text)
            if PLAIN_TEXT.fullmatch(text):   # printable ASCII: nothing to clean (the hot path)
                prefix = f"<{nick}> "
                return "".join([f"{prefix}{t}\r\n" for t in text.split("\n") if t.strip()]).encode() \
                    or _nothing()
            lines = [cleaned for raw in text.split("\n") if (cleaned := _clean(raw))]
            return b"".join(line(f"<{nick}> {t}") for t in lines) or _nothing()
        if kind == "me":
            return line(f"* {nick} {_one_line(text)}")
        if kind == "join":
            return notice(f"{nick} joined {room}")
        if kind == "leave":
            reason = _text(text)
            if not REASON_RE.fullmatch(reason) or not reason.isprintable():
                raise Forged("an unknown reason")
            return notice(f"{nick} left {room} ({reason})")
        if kind == "nick":
            return notice(f"{nick} is now known as {_nick(text)}")
        raise Forged("an unknown kind")

    def _private(self, data: bytes) -> None:
        msg = json.loads(data)
        if msg.get("k") != "msg":
            raise Forged("an unknown kind")
        nick, to, text = _nick(msg["n"]), _text(msg["to"]), _one_line(msg["t"])
        target = self._nicks.get(to)
        if target is not None:
            self.service.tell(target, line(f"*{nick}* {text}"))

    def _gap(self, room: str) -> None:
        now = self._loop.time()
        if now - self._gaps.get(room, -GAP_EPISODE_S) >= GAP_EPISODE_S:
            log.warning("bus: lines to %s were lost on the way to this node", room)
            self.service.broadcast(room, notice(NOTICES["gap"]))
        self._gaps[room] = now

    def _forged_message(self, channel: bytes, e: Exception) -> None:
        now = time.monotonic()
        last, unsaid = self._forged
        if now - last < FORGED_LOG_S:
            self._forged = (last, unsaid + 1)
            return
        self._forged = (now, 0)
        more = f" (and {unsaid} more since the last logged)" if unsaid else ""
        log.warning("bus: dropped a message on %s that chatd would not send: %s%s",
                    channel.decode("utf-8", "replace")[:80], e or type(e).__name__, more)


def _text(value: Any) -> str:
    if type(value) is not str:
        raise Forged("text that is no string")
    return value


def _nick(value: Any) -> str:
    if type(value) is not str or not NICK_RE.fullmatch(value):
        raise Forged("a bad nick")
    return value


def _clean(raw: str) -> str:
    """A line from the bus as a client's would be: sanitized, and empty if it shows nothing."""
    text = clean_text(raw.encode("utf-8", "replace"))
    return text if text.strip() else ""


def _nothing() -> bytes:
    raise Forged("a line with nothing to show")


def _one_line(value: Any) -> str:
    text = _text(value)
    if "\n" in text or not (cleaned := _clean(text)):
        raise Forged("not one line with something to show")
    return cleaned

