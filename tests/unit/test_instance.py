"""chatd.instance in-process: comparing options with a running instance's state file."""

from __future__ import annotations

from chatd.instance import mismatches

STATE = {"settings": {"server.mode": "echo", "log.level": "info"},
         "listeners": [["0.0.0.0", 7777], ["::1", 7778]]}


def test_a_wildcard_listener_serves_a_specific_address():
    assert mismatches({"server.host": "127.0.0.1", "server.port": 7777}, STATE) == []
    assert mismatches({"server.port": 7778}, STATE) == []
    assert mismatches({"server.host": "::1", "server.port": 7777}, STATE) == ["--host ::1", "--port 7777"]


def test_other_settings_compare_by_value():
    assert mismatches({"server.mode": "echo", "log.level": "info"}, STATE) == []
    assert mismatches({"server.mode": "chat"}, STATE) == ["--mode chat"]
def test_a_malformed_state_file_matches_no_address_option():
    """instance.mismatches never raises on a state file it did not write; it proves nothing."""
    for listeners in ([["not-an-ip", 7777]], [[1, 2, 3]], [["127.0.0.1", "x"]]):
        state = {"settings": {"server.mode": "echo"}, "listeners": listeners}
        assert mismatches({"server.port": 7777}, state) == ["--port 7777"]
    assert mismatches({"server.mode": "chat"}, None) == ["--mode chat"]
    assert mismatches({}, None) == []
