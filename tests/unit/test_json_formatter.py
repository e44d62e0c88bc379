"""log.JsonFormatter in-process: any message and arguments make one line of one JSON object with
the keys every line has; the EVENTS table names format strings chatd really logs."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

from hypothesis import given, strategies as st

from chatd.log import EVENTS, LOGGER_NAME, JsonFormatter

KEYS = {"time", "level", "event", "message", "pid"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
# every string chatd's code holds, the parts of an implicit concatenation joined
STRINGS = {node.value for path in (Path(__file__).parents[2] / "chatd").glob("*.py")
           for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
           and isinstance(node.value, str)}
ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()))   # control characters, lone surrogates too
VALUES = st.one_of(ANY_TEXT, st.integers(), st.floats(), st.none(), st.booleans(),
                   st.binary(max_size=20), st.tuples(ANY_TEXT))


def record(msg: object, args: tuple, level: int = logging.INFO, name: str = LOGGER_NAME) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def parse(line: str) -> dict:
    """As a target writes it (UTF-8, backslashreplace) and a shipper reads it."""
    assert line.splitlines() == [line]   # no \n, \r, NEL, U+2028 ...
    data = line.encode("utf-8", "backslashreplace")
    obj = json.loads(data.decode("utf-8"))
    assert isinstance(obj, dict) and KEYS <= obj.keys()
    assert TIME.fullmatch(obj["time"])
    return obj


@given(text=ANY_TEXT, args=st.lists(VALUES, max_size=4),
       level=st.sampled_from([logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR]))
def test_any_message_and_arguments_make_one_line_of_one_object(text, args, level):
    msg = text.replace("%", "%%") + " %s" * len(args)
    obj = parse(JsonFormatter().format(record(msg, tuple(args), level)))
    assert obj["message"] == logging.Formatter().format(record(msg, tuple(args)))
    assert obj["level"] == logging.getLevelName(level).lower()
    assert re.fullmatch(r"[a-z_]+", obj["event"])


@given(values=st.lists(VALUES, min_size=2, max_size=2))
def test_an_events_arguments_are_its_fields_and_never_replace_the_common_keys(values):
    peer, reason = values
    obj = parse(JsonFormatter().format(record("refused %s: %s", (peer, reason))))
    assert obj["event"] == "refused"
    for name, value in (("peer", peer), ("reason", reason)):
        if isinstance(value, (str, int, bool)) or value is None:
            assert obj[name] == value
        elif isinstance(value, float) and value == value and abs(value) != float("inf"):
            assert obj[name] == value
        else:   # NaN, infinities, bytes, tuples: as text, which JSON can hold
            assert obj[name] == str(value)
    obj = parse(JsonFormatter().format(record("chatd %s starting (pid %d, config %s)", ("1", 1, "none"))))
    assert obj["pid"] != 1 and obj["version"] == "1" and obj["config"] == "none"


def test_the_important_lines_carry_their_fields():
    f = JsonFormatter()
    rec = record("disconnect %s: %s (%d clients)", ("127.0.0.1:4000", "eof", 2))
    obj = parse(f.format(rec))
    when = datetime.strptime(obj["time"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)
    assert abs(when.timestamp() - rec.created) < 2e-6
    assert (obj["event"], obj["peer"], obj["reason"], obj["clients"]) == ("disconnect", "127.0.0.1:4000", "eof", 2)
    assert obj["message"] == "disconnect 127.0.0.1:4000: eof (2 clients)"
    obj = parse(f.format(record("%s (%s), %d clients", ("graceful stop", "SIGUSR1", 0))))
    assert (obj["event"], obj["how"], obj["signal"], obj["clients"]) == ("stop", "graceful stop", "SIGUSR1", 0)


def test_other_lines_are_named_by_their_first_word():
    f = JsonFormatter()
    assert parse(f.format(record("%s", ("stopped",))))["event"] == "stopped"
    assert parse(f.format(record("worker %d started (pid %d)", (1, 2))))["event"] == "worker"
    assert parse(f.format(record("%s", ("",))))["event"] == "log"
    assert parse(f.format(record("Stray %s", ("x",))))["event"] == "log"
    assert parse(f.format(record("Unclosed transport", (), name="asyncio")))["event"] == "asyncio"


def test_a_traceback_is_a_field_not_more_lines():
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        rec = logging.LogRecord("asyncio", logging.ERROR, __file__, 1, "Exception in callback", (),
                                sys.exc_info())
    obj = parse(JsonFormatter().format(rec))
    assert "ValueError: boom" in obj["exception"] and obj["message"] == "Exception in callback"


def test_every_event_is_a_format_chatd_logs_with_a_name_for_each_argument():
    for fmt, (event, names) in EVENTS.items():
        assert fmt in STRINGS, fmt
        assert len(re.findall(r"%[-#0 +]*\d*(?:\.\d+)?[sdrgf]", fmt)) == len(names), fmt
        assert re.fullmatch(r"[a-z_]+", event) and all(re.fullmatch(r"[a-z_]*", n) for n in names)
