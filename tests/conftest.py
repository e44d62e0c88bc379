"""Fixtures: a chatd instance in a temporary directory, stopped by pid whatever happens; and for
chat over a bus, a private redis-server and chatd nodes sharing it (helpers: bus_support.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bus_support import HEARTBEAT, NODE_TIMEOUT, RedisServer
from support import Chatd, free_port

LOOPS = ["asyncio", "uvloop"]


def require_real(what: str) -> None:
    """Skip when a real component is missing, but fail in CI (CHATD_REQUIRE_REAL=1)."""
    if os.environ.get("CHATD_REQUIRE_REAL") == "1":
        pytest.fail(f"{what} is required here (CHATD_REQUIRE_REAL=1) but missing")
    pytest.skip(f"{what} is not available")


@pytest.fixture
def make_chatd(tmp_path):
    """A factory of chatd instances; every one is stopped at teardown and checked for tracebacks."""
    made: list[Chatd] = []

    public_dirs: list[str] = []

    def make(loop: str = "auto", extra_config: str = "", name: str = "", public: bool = False) -> Chatd:
        """`public`: a world-readable directory, for a daemon that drops privileges."""
        if public:
            directory = Path(tempfile.mkdtemp(prefix="chatd-test-"))
            directory.chmod(0o755)
            public_dirs.append(str(directory))
        else:
            directory = tmp_path / (name or f"i{len(made)}")
            directory.mkdir()
        inst = Chatd(directory, free_port(), loop=loop, extra_config=extra_config)
        made.append(inst)
        return inst

    yield make
    problems = []
    for inst in made:
        inst.cleanup()
        problems += inst.tracebacks()
    for directory in public_dirs:
        shutil.rmtree(directory, ignore_errors=True)
    assert not problems, "tracebacks seen:\n" + "\n".join(problems)


@pytest.fixture
def chatd(make_chatd) -> Chatd:
    return make_chatd()


@pytest.hookimpl(tryfirst=True)   # before `-m 'not slow'` picks the default step's tests
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """In a module marked `asyncio_twin_slow`, a test's run on asyncio's own loop (the same
    case as on uvloop) goes to the slow step: the default step keeps one loop of each case
    there, and test_echo, test_clients and test_chat keep both (.ci/run runs both steps)."""
    for item in items:
        params = getattr(item, "callspec", None)
        if (item.get_closest_marker("asyncio_twin_slow") and params is not None
                and "asyncio" in params.params.values()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(params=LOOPS)
def loop_chatd(request, make_chatd) -> Chatd:
    """A chatd instance on each event loop in turn."""
    if request.param == "uvloop" and importlib.util.find_spec("uvloop") is None:
        require_real("uvloop")
    return make_chatd(loop=request.param)


# ------------------------------------------------------------------ chat over a bus (tests/cluster)

@pytest.fixture
def redis_server(tmp_path):
    """A factory: redis_server(aof=False) -> a started RedisServer, stopped at teardown."""
    if shutil.which("redis-server") is None:
        require_real("redis-server")
    try:
        import redis  # noqa: F401  (the 'cluster' extra)
    except ImportError:
        require_real("the redis Python package (pip install 'chatd[cluster]')")
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
            f'{k} = "{v}"\n' if isinstance(v, str) else f"{k} = {v}\n" for k, v in settings.items()
            if v is not None)   # None: the key left out
        node = make_chatd(extra_config=extra, name=f"node{n}")
        node.write_config(host=f"127.0.0.{n}", mode="chat")
        node.host = f"127.0.0.{n}"
        if start:
            node.start()
        return node

    return make


