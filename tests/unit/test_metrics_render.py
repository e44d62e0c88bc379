"""metrics.py in-process: the totals of closed and open connections, both renderings (checked
with prometheus_client's parser), `[metrics] listen`'s values, and the log's failure counts."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd.log import FILE_FORMAT, FailoverHandler
from chatd.metrics import FAMILIES, Metrics, parse_listen, render_prometheus, render_text


def conn(mode: str, counts: tuple[int, int, int]) -> SimpleNamespace:
    return SimpleNamespace(MODE=mode, in_bytes=counts[0], in_lines=counts[1], out_bytes=counts[2])


def snapshot() -> dict:
    m = Metrics()
    m.accepted = 3
    m.refused("server full")
    m.refused('odd "reason"\\ with\nnewline')
    m.closed(conn("echo", (10, 0, 10)), "idle")
    m.restarted("applied")
    open_ = [conn("echo", (5, 0, 5)), conn("chat", (7, 2, 0)), conn("chat", (1, 0, 0))]
    extra = {"build": {("0.1.0", "asyncio", "chat"): 1}, "start_time": 1700000000.0,
             "uptime": 12.5, "generation": 1, "log_failures": 0, "log_fallback": 4, "bans": 2}
    return m.snapshot(open_, lambda c: "127.0.0.1:7777", (30, 3), extra)


def test_a_snapshot_adds_the_closed_the_open_and_what_was_counted_elsewhere():
    s = snapshot()
    assert (s["bytes_in"], s["lines_in"], s["bytes_out"], s["lines_out"]) == (23, 2, 45, 3)
    assert s["clients"] == {("echo", "127.0.0.1:7777"): 1, ("chat", "127.0.0.1:7777"): 2}
    assert s["disconnects"][("idle",)] == 1 and s["disconnects"][("too slow",)] == 0
    assert s["refused"][("server full",)] == 1 and s["refused"][("per-address limit",)] == 0
    assert s["restarts"] == {("applied",): 1, ("rejected",): 0, ("failed",): 0}


def test_the_prometheus_text_parses_with_escaped_labels_and_every_family():
    text = render_prometheus(snapshot())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    # prometheus_client names a counter family without its _total suffix
    assert {f[1].removesuffix("_total") for f in FAMILIES} == set(families)
    refused = {s.labels["reason"]: s.value for s in families["chatd_connections_refused"].samples}
    assert refused['odd "reason"\\ with\nnewline'] == 1
    assert families["chatd_received_bytes"].samples[0].value == 23
    assert families["chatd_clients"].type == "gauge"
    assert families["chatd_disconnects"].type == "counter"
    for line in text.splitlines():
        assert not line.startswith("# TYPE") or line.split()[2] in {f[1] for f in FAMILIES}


def test_the_text_for_people_is_aligned_with_totals_over_series():
    text = render_text(snapshot())
    lines = text.splitlines()
    pad = " " * 34   # the longest title, the odd reason, and two spaces
    odd = '  odd \\"reason\\"\\\\ with\\nnewline'   # escaped: one line, no line break
    for title, value in (("build info", "version 0.1.0; loop asyncio; mode chat"), ("clients", "3"),
                         ("  chat, 127.0.0.1:7777", "2"), ("  echo, 127.0.0.1:7777", "1"),
                         ("connections refused", "2"), (odd, "1"), ("received bytes", "23"),
                         ("uptime seconds", "12.500"), ("log fallback lines", "4"), ("bans", "2")):
        assert (title + pad)[:34] + value in lines, (title, text)
    assert len(lines) == 33 + 5 + 1 + 3, text   # + the refusals of accept.REFUSED_AS, bans, kicked, banned, handshake failed


@pytest.mark.parametrize("value, parsed", [
    ("127.0.0.1:9777", ("127.0.0.1", 9777)),
    ("[::1]:9777", ("::1", 9777)),
    ("localhost:1", ("localhost", 1)),
])
def test_listen_values(value, parsed):
    assert parse_listen(value) == parsed


@pytest.mark.parametrize("value", ["127.0.0.1", ":9777", "::1:9777", "127.0.0.1:0", "h:65536", "a b:1"])
def test_bad_listen_values(value):
    with pytest.raises(ValueError):
        parse_listen(value)


class Failing(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise OSError("disk full")

    def handle(self, record: logging.LogRecord) -> bool:
        self.emit(record)
        return True


def test_a_failing_log_target_is_counted(tmp_path):
    """One failed write to the target (it is retried only after RETRY_S); its line, the note
    about the failure and the next line go to the fallback file."""
    handler = FailoverHandler(Failing(), str(tmp_path / "x.log"), logging.Formatter(FILE_FORMAT),
                              lambda failure: None)
    for text in ("one", "two"):
        handler.emit(logging.LogRecord("chatd", logging.INFO, __file__, 0, text, (), None))
    assert (handler.failures, handler.fallback_lines) == (1, 3)
    handler.close()
