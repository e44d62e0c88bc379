"""Metrics (README "Metrics"): `[metrics] listen` serves the counters at /metrics, through the
real daemon; scripted echo and chat sessions move each counter by exactly what they did.

Every scrape is parsed with prometheus_client's own parser (the `test` extra), and with
`promtool check metrics` (from Debian's `prometheus` package; `.ci/run` unpacks it into the venv;
required under CHATD_REQUIRE_REAL=1). Every wait has a deadline; every daemon is stopped by pid by the fixtures.
"""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chatd import __version__ as chatd_version
from conftest import require_real
from support import LineClient, free_port, wait_for

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def with_metrics(inst, mode: str = "echo", limits: str = "") -> int:
    """Configure `inst` with `[metrics] listen` on a free port (and [limits] keys), start it,
    return the metrics port."""
    port = free_port()
    extra = f'[metrics]\nlisten = "127.0.0.1:{port}"\n' + (f"[limits]\n{limits}" if limits else "")
    inst.write_config(mode=mode, extra=extra)
    inst.start()
    return port


def get(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read().decode()
    finally:
        conn.close()


def scrape(port: int) -> dict[tuple, float]:
    """Every sample of /metrics, parsed by prometheus_client: {(name, sorted labels): value}."""
    status, headers, body = get(port)
    assert status == 200 and headers["Content-Type"] == CONTENT_TYPE, (status, headers)
    assert headers["Connection"] == "close", headers
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def moved(before: dict, after: dict) -> dict[tuple, float]:
    """The samples whose value changed, by how much (the clock's families left out)."""
    clock = ("chatd_uptime_seconds",)
    return {key: after.get(key, 0.0) - before.get(key, 0.0) for key in set(before) | set(after)
            if key[0] not in clock and after.get(key, 0.0) != before.get(key, 0.0)}


def key(name: str, **labels: str) -> tuple:
    return (name, tuple(sorted(labels.items())))


def wait_moved(port: int, before: dict, name: str, by: float, **labels: str) -> dict:
    """Scrape until `name{labels}` has moved by `by` since `before`; the last scrape."""
    def done():
        now = scrape(port)
        return now if value(now, name, **labels) - value(before, name, **labels) >= by else None
    return wait_for(done, what=f"{name}{labels} to move by {by}")


# ------------------------------------------------------------------ sessions


def test_an_echo_session_moves_each_counter_by_what_it_did(loop_chatd):
    chatd = loop_chatd
    """1. a scrape, 2. a client sends two lines and one over-long line, reads them back, closes,
    3. a scrape. Each counter moved by exactly that: one accept, the bytes in and out (the
    over-long line comes back as an ERR line), one "client closed" (echo counts no lines);
    while it was connected, one echo client on its listener."""
    mport = with_metrics(chatd, limits="max_line = 16\n")
    before = scrape(mport)
    build = [(dict(labels), v) for (name, labels), v in before.items() if name == "chatd_build_info"]
    assert len(build) == 1 and build[0][1] == 1, build
    assert build[0][0]["version"] == chatd_version and build[0][0]["mode"] == "echo", build
    sent = b"hello\nworld\n" + b"y" * 20 + b"\n"
    err = b"ERR line too long (max 16 bytes)\r\n"
    with LineClient(chatd.port) as c:
        c.send(sent)
        assert c.recv_exact(12 + len(err)) == b"hello\nworld\n" + err
        during = scrape(mport)
        assert value(during, "chatd_clients", mode="echo", listener=f"127.0.0.1:{chatd.port}") == 1
    after = wait_moved(mport, before, "chatd_disconnects_total", 1, reason="client closed")
    assert moved(before, after) == {
        key("chatd_connections_accepted_total"): 1,
        key("chatd_received_bytes_total"): len(sent), key("chatd_sent_bytes_total"): 12 + len(err),
        key("chatd_disconnects_total", reason="client closed"): 1,
    }, moved(before, after)
    assert value(after, "chatd_clients", mode="echo", listener=f"127.0.0.1:{chatd.port}") == 0


def join(port: int) -> LineClient:
    """A chat client past its welcome and roster lines."""
    c = LineClient(port, timeout=TIMEOUT)
    assert c.recv_line().startswith(b"*** Welcome")
    assert c.recv_line().startswith(b"*** #lobby: ")
    return c


def test_clients_are_labelled_with_the_listener_that_accepted_them(chatd):
    """A listener on 0.0.0.0: a client that connected to 127.0.0.1 is counted on 0.0.0.0:PORT."""
    mport = free_port()
    chatd.write_config(host="0.0.0.0", extra=f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
    chatd.start()
    with LineClient(chatd.port) as c:
        c.send(b"x\n")
        c.recv_line()
        samples = scrape(mport)
    assert value(samples, "chatd_clients", mode="echo", listener=f"0.0.0.0:{chatd.port}") == 1, samples


def test_a_chat_session_counts_lines_in_and_deliveries_out(loop_chatd):
    chatd = loop_chatd
    """1. two chat clients join, 2. a scrape, 3. guest1 says two lines (one read), guest2 one,
    each read by the other, 4. a scrape: 3 lines in, 3 lines delivered, their exact bytes."""
    mport = with_metrics(chatd, mode="chat")
    a = join(chatd.port)
    b = join(chatd.port)
    assert a.recv_line() == b"*** guest2 joined #lobby\r\n"
    before = scrape(mport)
    assert value(before, "chatd_clients", mode="chat", listener=f"127.0.0.1:{chatd.port}") == 2
    a.send(b"one\ntwo\n")
    to_b = b"<guest1> one\r\n<guest1> two\r\n"
    assert b.recv_exact(len(to_b)) == to_b
    b.send(b"x\n")
    assert a.recv_line() == b"<guest2> x\r\n"
    after = scrape(mport)
    assert moved(before, after) == {
        key("chatd_lines_received_total"): 3, key("chatd_received_bytes_total"): 10,
        key("chatd_lines_sent_total"): 3, key("chatd_sent_bytes_total"): len(to_b) + 12,
    }, moved(before, after)
    a.close()
    b.close()


def test_refusals_are_counted_by_reason(chatd):
    """max_clients 2, max_clients_per_ip 1: a second client from 127.0.0.1 is refused
    "per-address limit"; one from 127.0.0.2 is let in; one from 127.0.0.3 is refused "server
    full"."""
    mport = with_metrics(chatd, limits="max_clients = 2\nmax_clients_per_ip = 1\n")
    before = scrape(mport)

    def client(source: str) -> socket.socket:
        s = socket.socket()
        s.settimeout(TIMEOUT)
        s.bind((source, 0))
        s.connect(("127.0.0.1", chatd.port))
        return s

    first = client("127.0.0.1")
    wait_moved(mport, before, "chatd_connections_accepted_total", 1)
    second = client("127.0.0.1")
    assert second.recv(100) == b"ERR server full\r\n"
    third = client("127.0.0.2")
    wait_moved(mport, before, "chatd_connections_accepted_total", 2)
    fourth = client("127.0.0.3")
    assert fourth.recv(100) == b"ERR server full\r\n"
    after = scrape(mport)
    assert moved(before, after) == {
        key("chatd_connections_accepted_total"): 2,
        key("chatd_connections_refused_total", reason="per-address limit"): 1,
        key("chatd_connections_refused_total", reason="server full"): 1,
        key("chatd_clients", mode="echo", listener=f"127.0.0.1:{chatd.port}"): 2,
    }, moved(before, after)
    for s in (first, second, third, fourth):
        s.close()


def test_access_refusals_are_counted_by_reason(chatd):
    """deny 127.0.0.2, allow 127.0.0.0/30 but not .3, connect_rate 1 burst 1: one refusal of
    each kind is counted under its own reason."""
    port = free_port()
    chatd.write_config(extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n'
                             f'[access]\nallow = ["127.0.0.0/30"]\ndeny = ["127.0.0.2"]\n'
                             f'[limits]\nconnect_rate = 1.0\nconnect_burst = 1\n')
    chatd.start()
    before = scrape(port)
    for source in ("127.0.0.2", "127.0.0.5", "127.0.0.1", "127.0.0.1"):
        with socket.socket() as s:
            s.settimeout(TIMEOUT)
            s.bind((source, 0))
            s.connect(("127.0.0.1", chatd.port))
    after = wait_moved(port, before, "chatd_connections_refused_total", 1, reason="connect rate")
    refused = {k: v for k, v in moved(before, after).items() if k[0] == "chatd_connections_refused_total"}
    assert refused == {key("chatd_connections_refused_total", reason="denied"): 1,
                       key("chatd_connections_refused_total", reason="not allowed"): 1,
                       key("chatd_connections_refused_total", reason="connect rate"): 1}, refused


def test_drops_idle_and_flooding_are_counted(chatd):
    """Chat with idle_timeout 0.5, rate 2, burst 3: a silent client is dropped "idle", one that
    sends 50 lines at once "flooding"; each counted once."""
    mport = with_metrics(chatd, mode="chat", limits="idle_timeout = 0.5\nrate = 2\nburst = 3\n")
    before = scrape(mport)
    idle = LineClient(chatd.port, timeout=TIMEOUT)
    assert idle.recv_until_eof().startswith(b"*** Welcome")
    flooder = join(chatd.port)
    flooder.send(b"".join(b"f%d\n" % i for i in range(50)))
    flooder.recv_until_eof()
    after = wait_moved(mport, before, "chatd_disconnects_total", 1, reason="flooding")
    assert value(after, "chatd_disconnects_total", reason="idle") - \
        value(before, "chatd_disconnects_total", reason="idle") == 1
    assert value(after, "chatd_disconnects_total", reason="too slow") == 0
    idle.close()
    flooder.close()


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_a_reader_dropped_as_too_slow_is_counted(chatd):
    """Chat, output_buffer 16384, rate 0: a client that never reads while another says 400 KB
    is dropped "too slow" (within the 3 s it is judged over), counted once."""
    mport = with_metrics(chatd, mode="chat", limits="rate = 0\noutput_buffer = 16384\n")
    before = scrape(mport)
    slow = LineClient(chatd.port, rcvbuf=4096)
    sender = join(chatd.port)
    for _ in range(400):
        sender.send(b"x" * 999 + b"\n")
    after = wait_moved(mport, before, "chatd_disconnects_total", 1, reason="too slow")
    assert value(after, "chatd_disconnects_total", reason="too slow") == 1
    slow.close()
    sender.close()


def test_restarts_are_counted_by_outcome(chatd):
    """chatd restart with a changed max_line (applied), then with a bad value (rejected):
    each outcome once, and the generation is 2."""
    mport = with_metrics(chatd)
    chatd.config.write_text(chatd.config.read_text() + "[limits]\nmax_line = 100\n")
    chatd.cmd("restart", check=0)
    chatd.config.write_text(chatd.config.read_text().replace("max_line = 100", "max_line = -1"))
    chatd.cmd("restart", check=6)
    samples = scrape(mport)
    assert value(samples, "chatd_restarts_total", outcome="applied") == 1
    assert value(samples, "chatd_restarts_total", outcome="rejected") == 1
    assert value(samples, "chatd_restarts_total", outcome="failed") == 0
    assert value(samples, "chatd_generation") == 2


def test_a_failing_log_target_is_counted(chatd, tmp_path):
    """chatd logs (level debug) to a "syslog" socket nobody reads; clients come and go until
    its queue is full. Writes to it then fail, their lines go to X.log, and both are counted:
    0 before, at least 1 after."""
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "log"
    sink.bind(str(path))
    try:
        mport = free_port()
        chatd.write_config(extra=f'[metrics]\nlisten = "127.0.0.1:{mport}"\n')
        chatd.config.write_text(chatd.config.read_text().replace(
            f'target = "{chatd.logfile}"', f'target = "syslog"\nsyslog_socket = "{path}"'))
        chatd.start()
        before = scrape(mport)
        assert value(before, "chatd_log_failures_total") == 0

        def failing():
            with LineClient(chatd.port) as c:
                c.send(b"x\n")
                c.recv_line()
            return value(scrape(mport), "chatd_log_failures_total") >= 1
        wait_for(failing, what="a failed write to the log target")
        assert value(scrape(mport), "chatd_log_fallback_lines_total") >= 1
    finally:
        sink.close()


def test_a_new_listen_address_needs_a_stop_and_start(chatd):
    """chatd restart with another [metrics] listen is rejected (exit 6); the old one serves on."""
    mport = with_metrics(chatd)
    chatd.config.write_text(chatd.config.read_text().replace(f":{mport}", f":{free_port()}"))
    proc = chatd.cmd("restart", check=6)
    assert b"metrics.listen changed" in proc.stdout + proc.stderr, proc
    assert value(scrape(mport), "chatd_restarts_total", outcome="rejected") == 1


# ------------------------------------------------------------------ the endpoint


def test_other_paths_and_methods_are_refused(chatd):
    mport = with_metrics(chatd)
    status, headers, _ = get(mport, "/")
    assert status == 404 and headers["Connection"] == "close"
    assert get(mport, "/metrics/x")[0] == 404
    status, headers, _ = get(mport, "/metrics", method="POST")
    assert status == 405 and headers["Allow"] == "GET"
    assert get(mport, "/metrics?x=1")[0] == 200


def raw(port: int, data: bytes) -> bytes:
    """Send `data` as a request, return all of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as s:
        s.sendall(data)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
        return got


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_oversized_slow_and_too_many_requests_are_cut_off(loop_chatd):
    chatd = loop_chatd
    """A request head over 8 KiB is answered 431; garbage 400; 8 connections that send nothing
    take every scrape slot, so a ninth is told 503; they are cut off after 5 s, and /metrics
    is served again. The daemon keeps echoing throughout."""
    mport = with_metrics(chatd)
    assert raw(mport, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 9000).startswith(b"HTTP/1.1 431 ")
    assert raw(mport, b"hello\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    silent = [socket.create_connection(("127.0.0.1", mport), timeout=10) for _ in range(8)]
    opened = time.monotonic()
    time.sleep(0.2)
    assert raw(mport, b"GET /metrics HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 503 ")
    with LineClient(chatd.port) as c:
        c.send(b"still here\n")
        assert c.recv_line() == b"still here\n"
    for s in silent:
        assert s.recv(100) == b""   # cut off: EOF or reset, never an answer
        s.close()
    assert 4.0 < time.monotonic() - opened < 8.0
    assert scrape(mport)


def test_a_metrics_port_in_use_fails_the_start(chatd):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    chatd.write_config(extra=f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    proc = chatd.cmd("start", check=1)
    assert proc.stderr.decode() == (f"chatd: [metrics] listen: cannot listen on 127.0.0.1:{port}: "
                                    f"address already in use (another program has port {port}; "
                                    f"stop it or choose another --port)\n"), proc.stderr
    assert not chatd.pidfile.exists() or not chatd.pidfile.read_text()
    busy.close()


def test_bad_listen_values_are_config_errors(chatd):
    chatd.write_config(extra='[metrics]\nlisten = "127.0.0.1"\n')
    proc = chatd.cmd("check-config", check=6)
    assert b'listen: expected "", "HOST:PORT" or "[IPV6]:PORT", got \'127.0.0.1\'' in proc.stderr, proc.stderr
    assert b"Traceback" not in proc.stderr
    chatd.write_config(extra='[metrics]\nlisten = "127.0.0.1:70000"\n')
    assert b"port must be between 1 and 65535" in chatd.cmd("check-config", check=6).stderr
    chatd.write_config(workers=2, extra='[cluster]\nbus = "redis://127.0.0.1:1"\n'
                                        '[metrics]\nlisten = "127.0.0.1:9777"\n')
    proc = chatd.cmd("check-config", check=6)
    assert b"[metrics] listen needs [server] workers = 1 (it is 2)" in proc.stderr, proc.stderr


def test_promtool_accepts_the_exposition(chatd):
    """`promtool check metrics` (Debian's prometheus package) finds no problem in a scrape."""
    beside = Path(sys.executable).parent / "promtool"    # where .ci/run unpacks it
    promtool = str(beside) if beside.exists() else shutil.which("promtool")
    if promtool is None:
        require_real("promtool (Debian package prometheus)")
    mport = with_metrics(chatd, mode="chat")
    with LineClient(chatd.port) as c:
        c.recv_line()
        _, _, body = get(mport)
    proc = subprocess.run([promtool, "check", "metrics"], input=body.encode(), capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, body)


def test_an_ipv6_listen_address_serves(chatd):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        require_real("IPv6 on the loopback interface (::1)")
    port = free_port(socket.AF_INET6)
    chatd.write_config(extra=f'[metrics]\nlisten = "[::1]:{port}"\n')
    chatd.start()
    conn = http.client.HTTPConnection("::1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert resp.status == 200 and b"chatd_build_info" in resp.read()
    finally:
        conn.close()
