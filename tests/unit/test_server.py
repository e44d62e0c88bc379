"""Server pieces in-process: the old listener's backlog is accepted before it closes; the class
new connections are made from, by mode, loop and log level."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from chatd import config, listen
from chatd.accept import Gate
from chatd.chat import ChatConnection
from chatd.connection import DebugConnection, ServerState
from chatd.echo import BufferedEchoConnection, EchoConnection
from chatd.server import Listener, Server


def test_retiring_a_listener_accepts_what_waits_in_its_backlog():
    """1. a client connects to a listener nobody accepts on yet (it waits in the backlog),
    2. the listener is retired, as a restart that moves the address does.
    Result: the client was accepted on the way out and is served."""
    logging.getLogger("chatd").disabled = True
    cfg = config.load()
    address = listen.Address(socket.AF_INET, "127.0.0.1", 0)
    sock = listen.bind(address, 16)
    port = sock.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port), timeout=5)
    client.sendall(b"waited in the backlog\n")

    async def scenario() -> bytes:
        server = Server(cfg, [], runtime=None, max_clients=0, loop_name="asyncio")
        server.state = ServerState(cfg.limits, 0, asyncio.get_running_loop())
        server.gate = Gate(server.state, asyncio.get_running_loop())
        server.gate.connection_class = EchoConnection
        listener = Listener(listen.Address(socket.AF_INET, "127.0.0.1", port), sock, listen.Endpoint("127.0.0.1", port))
        server.listeners.append(listener)
        server._retire(listener)
        assert server.listeners == [] and sock.fileno() == -1
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        data = b""
        while not data.endswith(b"\n"):
            data += await asyncio.wait_for(loop.sock_recv(client, 100), 5)
        return data

    try:
        assert asyncio.run(scenario()) == b"waited in the backlog\n"
    finally:
        client.close()
        logging.getLogger("chatd").disabled = False


def test_a_repeated_loop_error_is_logged_once_per_interval_with_a_count(caplog):
    """1. the loop reports the same error 1,000 times, then another one.
    Result: two lines, not 1,001; the repeats are counted when that error is next logged."""
    logging.getLogger("chatd").disabled = False
    server = Server(config.load(), [], runtime=None, max_clients=0, loop_name="asyncio")
    context = {"message": "accept failed", "exception": OSError(24, "Too many open files")}
    with caplog.at_level(logging.ERROR, logger="chatd"):
        for _ in range(1000):
            server._on_loop_error(None, context)
        server._on_loop_error(None, {"message": "something else"})
        text, (logged_at, unsaid) = next(iter(server._loop_errors.items()))
        server._loop_errors[text] = (logged_at - 60, unsaid)   # the interval has passed
        server._on_loop_error(None, context)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["event loop: accept failed: OSError: [Errno 24] Too many open files",
                     "event loop: something else",
                     "event loop: accept failed: OSError: [Errno 24] Too many open files "
                     "(and 999 more times since it was last logged)"]


@pytest.mark.parametrize("level", ["info", "warning", "error", "debug"])
@pytest.mark.parametrize("mode, loop_name, base", [
    ("echo", "uvloop 0.19.0", EchoConnection),
    ("echo", "asyncio", BufferedEchoConnection),
    ("chat", "uvloop 0.19.0", ChatConnection),
    ("chat", "asyncio", ChatConnection),
])
def test_connection_class_is_the_modes_own_unless_the_level_is_debug(level, mode, loop_name, base):
    """At any level but debug, new connections are made from exactly the mode's class, so its
    hot paths pay nothing for debug logging; at debug, from a subclass of it that logs
    (connection.DebugConnection), with __slots__ and no __dict__ all the same."""
    cfg = config.load(overrides={"log.level": (level, "--log-level"), "server.mode": (mode, "--mode")})
    server = Server(cfg, [], runtime=None, max_clients=0, loop_name=loop_name)
    loop = asyncio.new_event_loop()
    server.state = ServerState(cfg.limits, 0, loop)
    server.gate = Gate(server.state, loop)
    server._apply_mode(cfg)
    server.gate.close()
    loop.close()
    cls = server.gate.connection_class
    if level == "debug":
        assert cls is not base and issubclass(cls, base) and issubclass(cls, DebugConnection)
        assert cls.data_received is not base.data_received
    else:
        assert cls is base
    state = ServerState(cfg.limits, 0, None)
    conn = cls(state, "127.0.0.1", "127.0.0.1:40000")
    assert not hasattr(conn, "__dict__"), cls
    with pytest.raises(AttributeError):
        conn.not_a_slot = 1
