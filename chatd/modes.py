"""The modes (README "Echo mode", "Chat mode"), by name: what each makes connections from and sets up.

A mode supplies the class new connections are made from, for the event loop and
the log level, and `configure`, which builds or updates what its connections
share from a config. The server looks its mode up in MODES at start and on each
restart, and so needs none of the modes' own modules.

Tests: tests/unit/test_modes.py, tests/unit/test_server.py, tests/cluster/test_upgrade_cluster.py
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from .chat import ChatConnection, DebugChatConnection
from .config import Config
from .connection import Connection, ServerState
from .errors import StartError
from .echo import (BufferedEchoConnection, DebugBufferedEchoConnection, DebugEchoConnection,
                   EchoConnection)
from .protocol import clean_text
from .rooms import ChatService


class Mode(ABC):
    """One mode: its connection classes and its part of a config."""

    name = ""

    @abstractmethod
    def classes(self, loop_name: str) -> tuple[type[Connection], type[Connection]]:
        """The mode's class on the loop `loop_name`, and its subclass that logs
        per-connection detail (connection.DebugConnection)."""

    def connection_class(self, loop_name: str, debug: bool) -> type[Connection]:
        """The class for new connections: at log level debug (`debug`) the one that logs
        per-connection detail; at any other the mode's own, so the hot paths pay nothing
        for it."""
        own, logs = self.classes(loop_name)
        return logs if debug else own

    def configure(self, state: ServerState, cfg: Config) -> None:
        """Build or update what this mode's connections share (at start and on each restart
        into it); connections of another mode that are still open keep theirs."""

    async def start(self, state: ServerState, cfg: Config) -> None:
        """Once, before the server is ready, whatever the mode in use: take what the mode
        needs outside this process (raises StartError if it cannot)."""

    async def stop(self, state: ServerState) -> None:
        """Once, when the server stops, before its clients are closed: give that back."""


class EchoMode(Mode):
    name = "echo"

    def classes(self, loop_name: str) -> tuple[type[Connection], type[Connection]]:
        """uvloop reads into buffers of its own; asyncio's loop is faster with a
        BufferedProtocol (measured: 1.8-3.4 times the plain Protocol there, and no
        different on uvloop)."""
        if loop_name.startswith("uvloop"):
            return EchoConnection, DebugEchoConnection
        return BufferedEchoConnection, DebugBufferedEchoConnection


class ChatMode(Mode):
    name = "chat"

    def classes(self, loop_name: str) -> tuple[type[Connection], type[Connection]]:
        return ChatConnection, DebugChatConnection

    def configure(self, state: ServerState, cfg: Config) -> None:
        """The chat service, made once (a restart keeps its rooms and nicks), with the MOTD
        and default room for new clients; the MOTD is sanitized like user text."""
        motd = "\n".join(clean_text(text.encode()) for text in cfg.chat.motd.split("\n"))
        self.service(state).configure(motd if cfg.chat.motd else "", cfg.chat.default_room)
        backend = state.chat.backend   # type: ignore[union-attr]
        if backend.shared:
            backend.retime(cfg.cluster.heartbeat, cfg.cluster.node_timeout,   # type: ignore[attr-defined]
                           cfg.cluster.reconnect_max)

    @staticmethod
    def service(state: ServerState) -> ChatService:
        if state.chat is None:
            state.chat = ChatService(defer=state.loop.call_soon, fanout=ChatConnection.fanout)
        return state.chat

    async def start(self, state: ServerState, cfg: Config, before: Any = None, lease: str = "") -> None:
        """With `[cluster] bus` set, chat is shared through it (cluster.py, which imports
        redis: only then), whatever the mode at start, so a restart into chat mode finds it.
        (`before`, `lease`: `resume`'s.)"""
        bus = cfg.cluster
        if not bus.bus:
            return
        try:
            from .cluster import ClusterBackend, default_node_id
        except ImportError as e:
            raise StartError(f"[cluster] bus is set, but {e.name or 'redis'} is not installed: "
                             f"pip install 'chatd[cluster]'") from None
        service = self.service(state)
        backend = ClusterBackend(service, bus.bus, bus.node_id or default_node_id(cfg.server.port),
                                 bus.prefix, bus.heartbeat, bus.node_timeout, bus.reconnect_max,
                                 bus.guest_block, lease=lease or state.lease)
        if before is not None:
            before(backend)
        await backend.start()
        service.backend = backend

    async def resume(self, state: ServerState, cfg: Config, saved: dict, early: Any = None) -> None:
        """`start`, in a live upgrade's new process: the same node, on its lease (`saved`:
        ClusterBackend.capture), its users as the record restored them."""
        service = self.service(state)
        local = service.backend
        await self.start(state, cfg, lambda backend: backend.resume(local, saved, early), saved["token"])

    @staticmethod
    def listen_early(where: dict) -> Any:
        """A live upgrade's new process, before its loop runs: listen to its node's channels
        (`where`: ClusterBackend.channels), so the old one may freeze (cluster.py)."""
        from .cluster import listen_early
        return listen_early(where)

    async def stop(self, state: ServerState) -> None:
        if state.chat is not None and state.chat.backend.shared:
            await state.chat.backend.close()   # type: ignore[attr-defined]


MODES: dict[str, Mode] = {mode.name: mode for mode in (EchoMode(), ChatMode())}
