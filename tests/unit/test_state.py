"""How a restart ended (`state.RestartOutcome`): what the daemon records in the state file, and
what `restart` and `reload` make of whatever they read back."""

from __future__ import annotations

import json

import pytest

from chatd.errors import EXIT_CONFIG, EXIT_FAILED, EXIT_OK
from chatd.state import RestartOutcome, StateFile, read_state


@pytest.mark.parametrize("kind, status", [("applied", EXIT_OK), ("rejected", EXIT_CONFIG),
                                          ("failed", EXIT_FAILED)])
def test_each_kind_has_its_exit_status(kind, status):
    assert RestartOutcome(kind, "why", 1.5).exit_status == status


def test_the_state_file_holds_it_as_it_always_did_and_gives_it_back(tmp_path):
    """1. the daemon records an outcome in its state file;
    2. a command reads the file back.
    Result: the JSON object of old ("time", "outcome", "message"), and the same outcome."""
    outcome = RestartOutcome("rejected", "server.mode changed; nothing changed", 1764868800.25)
    sf = StateFile(str(tmp_path / "x.state"))
    sf.open(last_restart=outcome.to_state())
    raw = json.loads((tmp_path / "x.state").read_text())["last_restart"]
    assert raw == {"time": 1764868800.25, "outcome": "rejected",
                   "message": "server.mode changed; nothing changed"}
    assert RestartOutcome.from_state(read_state(sf.path)["last_restart"]) == outcome
    sf.remove()


@pytest.mark.parametrize("value", [None, "applied", 3, ["applied", "ok"]])
def test_what_is_no_object_is_no_outcome(value):
    assert RestartOutcome.from_state(value) is None


@pytest.mark.parametrize("value, expected", [
    ({}, RestartOutcome("failed", "", 0.0)),
    ({"outcome": "bogus", "message": "m", "time": 2}, RestartOutcome("failed", "m", 2)),
    ({"outcome": None, "message": None, "time": "noon"}, RestartOutcome("failed", "None", 0.0)),
    ({"outcome": "applied", "message": 42, "time": True}, RestartOutcome("applied", "42", 0.0)),
    ({"outcome": "rejected", "message": ["a", 1]}, RestartOutcome("rejected", "['a', 1]", 0.0)),
])
def test_malformed_content_is_read_as_the_commands_always_read_it(value, expected):
    """An unknown outcome is a failure; a message is shown as Python formats it (a missing one
    empty); a time that is no number is 0."""
    assert RestartOutcome.from_state(value) == expected
