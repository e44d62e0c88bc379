"""Fixtures for chat over a bus: `redis_server` and `make_node` (helpers: tests/bus_support.py)."""

from __future__ import annotations

import os
import shutil

import pytest

from bus_support import HEARTBEAT, NODE_TIMEOUT, RedisServer
from support import Chatd


def _require(what: str) -> None:
    """Skip when a real component is missing, but fail in CI (CHATD_REQUIRE_REAL=1)."""
    if os.environ.get("CHATD_REQUIRE_REAL") == "1":
        pytest.fail(f"{what} is required here (CHATD_REQUIRE_REAL=1) but missing")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def redis_server(tmp_path):
    """A factory: redis_server(aof=False) -> a started RedisServer, stopped at teardown."""
    if shutil.which("redis-server") is None:
        _require("redis-server")
    try:
        import redis  # noqa: F401  (the 'cluster' extra)
    except ImportError:
        _require("the redis Python package (pip install 'chatd[cluster]')")
    made: list[RedisServer] = []

    def make(aof: bool = False) -> RedisServer:
        server = RedisServer(tmp_path / f"redis{len(made)}", aof=aof)
        made.append(server)
        server.start()
        return server

    yield make
    for server in made:
        server.stop()


@pytest.fixture
def make_node(make_chatd):
    """A factory: make_node(bus_url, n) -> a chatd in chat mode on 127.0.0.n, node id "n<n>",
    started with `chatd start` (stopped by pid at teardown)."""

    def make(url: str, n: int, start: bool = True, **cluster: object) -> Chatd:
        settings = {"bus": url, "node_id": f"n{n}", "heartbeat": HEARTBEAT,
                    "node_timeout": NODE_TIMEOUT} | cluster
        extra = "[cluster]\n" + "".join(
            f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in settings.items())
        node = make_chatd(extra_config=extra, name=f"node{n}")
        node.write_config(host=f"127.0.0.{n}", mode="chat")
        node.host = f"127.0.0.{n}"
        if start:
            node.start()
        return node

    return make


