"""Fixtures: a chatd instance in a temporary directory, stopped by pid whatever happens."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

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


@pytest.fixture(params=LOOPS)
def loop_chatd(request, make_chatd) -> Chatd:
    """A chatd instance on each event loop in turn."""
    if request.param == "uvloop" and importlib.util.find_spec("uvloop") is None:
        require_real("uvloop")
    return make_chatd(loop=request.param)
