"""Several listeners (`[server] listen`), the dual-stack default, and a restart that adds and
removes listeners, through the real `chatd` command and real sockets (127.0.0.0/8 and ::1)."""

from __future__ import annotations

import json
import socket

import pytest

from support import LineClient, free_port, wait_for


def _echoes(port: int, host: str = "127.0.0.1") -> bool:
    with LineClient(port, host=host, timeout=5) as c:
        c.send(b"ping\n")
        return c.recv_line() == b"ping\n"


def _refused(port: int, host: str = "127.0.0.1") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        try:
            s.connect((host, port))
        except ConnectionRefusedError:
            return True
    return False


def _status(chatd) -> dict:
    return json.loads(chatd.cmd("status", "--json", check=0).stdout)


def test_the_default_serves_ipv4_and_ipv6_on_one_socket(chatd):
    """No host, no listen: one dual-stack [::] socket serves 127.0.0.1 and ::1, says so, and an
    IPv4 client is shown as IPv4 (not ::ffff:127.0.0.1) in the log."""
    chatd.port = free_port(socket.AF_INET6)
    chatd.write_config()
    chatd.config.write_text(chatd.config.read_text().replace('host = "127.0.0.1"\n', ""))
    out = chatd.cmd("start", check=0).stdout.decode()
    assert f"[::]:{chatd.port}" in out, out
    assert _status(chatd)["address"] == f"[::]:{chatd.port}"
    assert _echoes(chatd.port, "127.0.0.1") and _echoes(chatd.port, "::1")
    wait_for(lambda: "connect 127.0.0.1:" in chatd.log_text(), what="the IPv4 client logged")
    assert "::ffff:" not in chatd.log_text()


def test_every_listener_of_the_list_serves(chatd):
    ports = [free_port(), free_port(socket.AF_INET6), free_port()]
    chatd.write_config(listen=[f"127.0.0.1:{ports[0]}", f"[::1]:{ports[1]}", f"127.0.0.2:{ports[2]}"])
    out = chatd.cmd("start", check=0).stdout.decode()
    expected = f"127.0.0.1:{ports[0]}, [::1]:{ports[1]}, 127.0.0.2:{ports[2]}"
    assert expected in out, out
    assert _status(chatd)["address"] == expected
    assert _echoes(ports[0]) and _echoes(ports[1], "::1") and _echoes(ports[2], "127.0.0.2")
    assert _refused(ports[0], "127.0.0.3")    # 127.0.0.1's listener is not a wildcard


def test_the_command_line_takes_a_comma_separated_list(chatd):
    ports = [free_port(), free_port()]
    chatd.cmd("start", "--listen", f"127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]}", check=0)
    assert _echoes(ports[0]) and _echoes(ports[1])
    chatd.cmd("stop", check=0)


def test_a_restart_adds_and_removes_listeners_and_clients_stay(chatd):
    a, b, c = free_port(), free_port(), free_port()
    chatd.write_config(listen=[f"127.0.0.1:{a}", f"127.0.0.1:{b}"])
    pid = chatd.start()
    on_b = LineClient(b)
    on_b.send(b"before\n")
    assert on_b.recv_line() == b"before\n"
    chatd.write_config(listen=[f"127.0.0.1:{a}", f"127.0.0.1:{c}"])
    said = chatd.cmd("restart", check=0).stdout.decode()
    assert "server.listen" in said, said
    assert _echoes(a) and _echoes(c) and _refused(b)
    on_b.send(b"after\n")                       # its listener is gone; the client is not
    assert on_b.recv_line() == b"after\n"
    on_b.close()
    assert _status(chatd)["address"] == f"127.0.0.1:{a}, 127.0.0.1:{c}"
    assert chatd.pid() == pid


def test_a_restart_from_one_address_to_the_list_keeps_the_shared_socket(chatd):
    """host/port 127.0.0.1:P -> listen [P, Q]: the old socket is kept (no refused window)."""
    pid = chatd.start()
    q = free_port()
    chatd.write_config(listen=[f"127.0.0.1:{chatd.port}", f"127.0.0.1:{q}"])
    chatd.cmd("restart", check=0)
    assert _echoes(chatd.port) and _echoes(q)
    assert "overlap" not in chatd.log_text()
    assert chatd.pid() == pid


@pytest.mark.parametrize("entries, extra_server, message", [
    (["127.0.0.1:{p}", "127.0.0.1:{p}"], "", "both in [server] listen"),
    (["127.0.0.1:{p}", ":{p}"], "", "both in [server] listen"),
    (["127.0.0.1"], "", "HOST:PORT"),
    (["ftp://127.0.0.1:{p}"], "", "unknown scheme 'ftp'"),
    (["127.0.0.1:70000"], "", "between 1 and 65535"),
    (["[not-v6]:{p}"], "", "not an IPv6 address"),
    (["127.0.0.1:{p}"], 'host = "127.0.0.1"\n', "is set beside [server] listen"),
])
def test_a_bad_listen_list_is_a_config_error_with_its_line(chatd, entries, extra_server, message):
    p = chatd.port
    listed = ", ".join(json.dumps(e.format(p=p)) for e in entries)
    chatd.config.write_text(f"[server]\n{extra_server}listen = [{listed}]\n"
                            f"[daemon]\npidfile = \"{chatd.pidfile}\"\n")
    proc = chatd.cmd("check-config", check=6)
    err = proc.stderr.decode()
    assert message in err and f"{chatd.config}:" in err, err
    assert "Traceback" not in err
    chatd.cmd("start", check=6)


def test_a_listen_string_in_the_file_is_refused_not_split(chatd):
    chatd.config.write_text(f'[server]\nlisten = "127.0.0.1:{chatd.port}"\n')
    err = chatd.cmd("check-config", check=6).stderr.decode()
    assert f"{chatd.config}:2: [server] listen: expected an array, got a string" in err, err


def test_a_restart_to_a_bad_list_is_rejected_and_the_old_listeners_serve(chatd):
    chatd.start()
    chatd.config.write_text(chatd.config.read_text().replace(
        f'host = "127.0.0.1"\nport = {chatd.port}\n', f'listen = ["127.0.0.1:{chatd.port}", ":{chatd.port}"]\n'))
    said = chatd.cmd("restart", check=6)
    assert b"both in [server] listen" in said.stderr + said.stdout
    assert _echoes(chatd.port)
