"""The mode registry: the server needs no mode's module, each config mode has its entry, and
chat's setup makes its service once and keeps it across restarts."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from chatd import config
from chatd.chat import ChatConnection
from chatd.connection import ServerState
from chatd.modes import MODES
from chatd.rooms import ChatService

SERVER = Path(__file__).resolve().parents[2] / "chatd" / "server.py"


def test_the_server_imports_no_modes_module():
    """server.py reaches the modes through MODES only: it imports neither chat, echo nor rooms."""
    imported = set()
    for node in ast.walk(ast.parse(SERVER.read_text())):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
            imported.update(alias.name for alias in node.names if not node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "modes" in imported
    assert not {name.rsplit(".", 1)[-1] for name in imported} & {"chat", "echo", "rooms"}, imported


@pytest.mark.parametrize("name", ["echo", "chat"])
def test_every_mode_the_config_accepts_is_registered(name):
    cfg = config.load(overrides={"server.mode": (name, "--mode")})
    assert MODES[cfg.server.mode].name == name
    assert sorted(MODES) == ["chat", "echo"]


def chat_config(motd: str, room: str) -> config.Config:
    return config.load(overrides={"server.mode": ("chat", "--mode"), "chat.motd": (motd, "--motd"),
                                  "chat.default_room": (room, "--room")})


def test_chat_makes_its_service_once_and_applies_each_config():
    """1. chat is set up (start), 2. a client arrives, 3. chat is set up again with another MOTD
    and room (a restart). Result: one service, the client still in it; new settings applied,
    the MOTD sanitized like user text; echo's setup leaves it alone."""
    loop = asyncio.new_event_loop()
    try:
        state = ServerState(config.load().limits, 0, loop)
        assert state.chat is None
        MODES["echo"].configure(state, config.load())
        assert state.chat is None
        MODES["chat"].configure(state, chat_config("hello", "lobby"))
        service = state.chat
        assert isinstance(service, ChatService) and service._fanout == ChatConnection.fanout
        assert (service.motd, service.default_room) == (["hello"], "#lobby")
        someone = object()
        service.backend.claim("someone", someone)
        MODES["chat"].configure(state, chat_config("bell\x07 here\nsecond", "Rust"))
        MODES["echo"].configure(state, config.load())
        assert state.chat is service and service.backend.holder("someone") is someone
        assert (service.motd, service.default_room) == (["bell here", "second"], "#rust")
    finally:
        loop.close()
