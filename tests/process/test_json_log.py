"""`[log] format = "json"` through the real daemon: every line one JSON object with time, level,
event, message and pid, the important events with their fields, to a file, stderr, the journal
and the fallback file (rsyslog: tests/process/test_rsyslog.py); switched both ways by a restart
in place; hostile chat input cannot break it; a bad value is a clear error."""

from __future__ import annotations

import json
import os
import re
import signal

from support import LineClient, figures, wait_for

KEYS = {"time", "level", "event", "message", "pid"}
TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
PEER = re.compile(r"127\.0\.0\.1:\d+")
KEYS_BYTES = 200        # a line's keys, time and pid, at most: the rest is its message and fields
NEWCOMER = ("accepted", "connect", "disconnect", "closed")   # one newcomer's lines at debug


def objects(text: str) -> list[dict]:
    """Every line of `text` as a JSON object with the keys every line has."""
    found = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict) and KEYS <= obj.keys(), line
        assert TIME.fullmatch(obj["time"]) and obj["level"] in ("debug", "info", "warning", "error"), line
        found.append(obj)
    return found


def use_json(inst, fmt: str = "json") -> None:
    """Set `[log] format` in the instance's config file (its [log] table is written last)."""
    text = re.sub(r'\nformat = "\w+"', "", inst.config.read_text())
    inst.config.write_text(text.replace('level = "debug"', f'level = "debug"\nformat = "{fmt}"'))


def echo_once(port: int) -> None:
    with LineClient(port) as c:
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"


def test_a_file_gets_one_object_a_line_with_each_events_fields(chatd):
    use_json(chatd)
    pid = chatd.start()
    echo_once(chatd.port)
    wait_for(lambda: '"event":"disconnect"' in chatd.log_text(), what="the disconnect line")
    chatd.cmd("restart", check=0)
    chatd.cmd("stop", check=0)
    lines = objects(chatd.log_text())
    assert {o["pid"] for o in lines} == {pid}
    events = [o["event"] for o in lines]
    for event in ("starting", "ready", "accepted", "connect", "disconnect", "closed", "signal", "restart",
                  "stop", "stopped"):
        assert event in events, events
    by = {o["event"]: o for o in lines}
    assert by["ready"]["mode"] == "echo" and by["ready"]["address"] == f"127.0.0.1:{chatd.port}"
    assert PEER.fullmatch(by["connect"]["peer"]) and by["connect"]["clients"] == 1
    assert by["connect"]["message"] == f"connect {by['connect']['peer']} (1 clients)"
    disconnect = by["disconnect"]
    assert (disconnect["peer"], disconnect["clients"]) == (by["connect"]["peer"], 0)
    assert disconnect["reason"] and disconnect["level"] == "info"
    assert by["restart"]["outcome"] == "applied"
    assert by["stop"]["how"] == "graceful stop" and by["stop"]["signal"] == "SIGUSR1"
    assert by["closed"]["received"] == 2 and by["closed"]["sent"] == 2 and "" not in by["closed"]
    # bounded as the text line is: its words twice (message and fields) and the keys
    sizes = {}
    for o, raw in zip(lines, chatd.log_text().splitlines()):
        sizes[o["event"]] = len(raw.encode())
        assert sizes[o["event"]] <= 2 * len(o["message"].encode()) + KEYS_BYTES, raw
    figures("json_log", **{f"{e}_bytes": sizes[e] for e in NEWCOMER},
            newcomer_bytes=sum(sizes[e] for e in NEWCOMER))


def test_chatd_run_writes_json_to_stderr_with_the_flag(chatd):
    chatd.config.write_text(chatd.config.read_text().replace(f'target = "{chatd.logfile}"', ""))
    proc = chatd.run_foreground("--log-format", "json")
    echo_once(chatd.port)
    wait_for(lambda: b'"event":"disconnect"' in chatd.foreground_stderr(), what="the disconnect line")
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    lines = objects(chatd.foreground_stderr().decode())
    assert {o["pid"] for o in lines} == {proc.pid}
    events = [o["event"] for o in lines]
    assert events[-2:] == ["stop", "stopped"] and "ready" in events and "connect" in events, events
    assert [o["signal"] for o in lines if o["event"] == "stop"] == ["SIGTERM"]


def test_the_journal_gets_its_priority_prefix_before_the_object(chatd):
    chatd.config.write_text(chatd.config.read_text().replace(f'target = "{chatd.logfile}"', ""))
    use_json(chatd)
    chatd.run_stderr.touch()   # run_foreground reopens it: the same inode
    st = chatd.run_stderr.stat()
    proc = chatd.run_foreground(env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 0
    lines = chatd.foreground_stderr().decode().splitlines()
    levels = {"7": "debug", "6": "info", "4": "warning", "3": "error"}
    assert all(re.match(r"<[3467]>\{", line) for line in lines), lines
    found = objects("\n".join(line[3:] for line in lines))
    assert [levels[line[1]] for line in lines] == [o["level"] for o in found]
    assert [o["event"] for o in found][-1] == "stopped" and "ready" in [o["event"] for o in found]


def test_a_restart_in_place_switches_text_and_json_both_ways(chatd):
    chatd.start()
    echo_once(chatd.port)
    use_json(chatd)
    chatd.cmd("restart", check=0)
    echo_once(chatd.port)
    use_json(chatd, "text")
    chatd.cmd("restart", check=0)
    echo_once(chatd.port)
    chatd.cmd("stop", check=0)
    lines = chatd.log_text().splitlines()
    kinds = "".join("j" if line.startswith("{") else "t" for line in lines)
    assert re.fullmatch(r"t+j+t+", kinds), lines
    json_part = objects("\n".join(line for line in lines if line.startswith("{")))
    assert [o["event"] for o in json_part if o["event"] in ("connect", "disconnect")] == ["connect", "disconnect"]
    restart = [o for o in json_part if o["event"] == "restart"]
    assert len(restart) == 1 and "log.format 'text' -> 'json'" in restart[0]["detail"]
    back = lines[kinds.rindex("j") + 1:]
    assert any("INFO: restart applied: changed log.format 'json' -> 'text'" in line for line in back), back
    text_newcomer = [line for line in back if re.search(r"(DEBUG|INFO): (accepted|connect|disconnect|closed) 1", line)]
    json_newcomer = [line for line, o in zip([x for x in lines if x.startswith("{")], json_part)
                     if o["event"] in NEWCOMER]
    assert len(text_newcomer) == len(json_newcomer) == len(NEWCOMER), (text_newcomer, json_newcomer)
    figures("json_vs_text", text_newcomer_bytes=sum(len(x.encode()) + 1 for x in text_newcomer),
            json_newcomer_bytes=sum(len(x.encode()) + 1 for x in json_newcomer))


def test_hostile_chat_input_cannot_break_a_line(make_chatd):
    inst = make_chatd()
    inst.write_config(mode="chat")
    use_json(inst)
    inst.start()
    hostile = [b'/nick a"b\\c\n', b'/nick "},{"event":"x\n', b'say "\\\x1b[2J\x07\x00\r\x85\xe2\x80\xa8\n',
               b"\xff\xfe bad utf-8 \xc3\n", b"/quit \"bye\\\"\x01\n"]
    with LineClient(inst.port) as c:
        for line in hostile:
            c.send(line)
        c.recv_until_eof()
    wait_for(lambda: '"event":"disconnect"' in inst.log_text(), what="the disconnect line")
    inst.cmd("stop", check=0)
    lines = objects(inst.log_text())
    assert not [o for o in lines if o["event"] == "x"]
    assert [o["clients"] for o in lines if o["event"] == "disconnect"] == [0]


def test_the_fallback_file_is_json_too(chatd, tmp_path):
    """The target is a syslog socket that is not there: lines go to X.log, as JSON."""
    text = chatd.config.read_text().replace(f'target = "{chatd.logfile}"',
                                            f'target = "syslog"\nsyslog_socket = "{tmp_path / "gone"}"')
    chatd.config.write_text(text)
    use_json(chatd)
    chatd.start()
    echo_once(chatd.port)
    wait_for(lambda: '"event":"disconnect"' in chatd.log_text(), what="the disconnect line in X.log")
    lines = objects(chatd.log_text())
    failed = [o for o in lines if o["event"] == "log_failed"]
    assert len(failed) == 1 and failed[0]["fallback"] == str(chatd.logfile) and failed[0]["level"] == "warning"


def test_a_bad_format_is_a_clear_error_from_the_flag_or_the_file(chatd):
    bad = chatd.cmd("check-config", "--log-format", "xml", check=2)
    assert bad.stderr.decode().startswith("chatd: ") and "--log-format" in bad.stderr.decode(), bad.stderr
    use_json(chatd, "xml")
    line = chatd.config.read_text().splitlines().index('format = "xml"') + 1
    bad = chatd.cmd("check-config", check=6)
    assert f"{chatd.config}:{line}" in bad.stderr.decode() and "text, json" in bad.stderr.decode(), bad.stderr
    use_json(chatd)
    chatd.cmd("check-config", check=0)
