"""TLS listeners (`tls://` in [server] listen, [tls]) through the real `chatd` command: echo and
chat over `ncat --ssl`, `openssl s_client` and Python's ssl, byte for byte; certificates made
in the test with `openssl req -x509`; a certificate swapped by a restart; bad files refused
with their reason; old protocol versions refused; the handshake bounded and counted against
the per-address limit; refusals as a line after the handshake; client certificates."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from support import LineClient, chatd_command, dup_onto_3, figures, free_port, rss_kib, wait_for

pytestmark = [pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command"),
              pytest.mark.asyncio_twin_slow]


# ------------------------------------------------------------------ certificates and clients

def openssl(*args: str, cwd: Path) -> str:
    return subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                          timeout=30).stdout.decode()


def self_signed(directory: Path, name: str = "server", cn: str = "localhost") -> tuple[Path, Path]:
    """A fresh EC certificate and its key (mode 0600, as openssl writes it)."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={cn}", "-days", "2", "-keyout", str(key), "-out", str(cert), cwd=directory)
    return cert, key


def signed_by(ca: tuple[Path, Path], directory: Path, cn: str) -> tuple[Path, Path]:
    """A client certificate with subject CN `cn`, signed by the CA `ca`."""
    csr, cert, key = directory / f"{cn}.csr", directory / f"{cn}.pem", directory / f"{cn}.key"
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr), cwd=directory)
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
            "-CAcreateserial", "-days", "2", "-out", str(cert), cwd=directory)
    return cert, key


def serial_of(cert: Path) -> int:
    """The serial `openssl x509 -serial` shows."""
    text = openssl("x509", "-in", str(cert), "-noout", "-serial", cwd=cert.parent)
    return int(text.strip().partition("=")[2], 16)


def client_context(cert: tuple[Path, Path] | None = None, **versions: ssl.TLSVersion) -> ssl.SSLContext:
    """A client that trusts anything (the server's certificate is self-signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for name, version in versions.items():
        setattr(ctx, name, version)
    if cert:
        ctx.load_cert_chain(*cert)
    return ctx


class TlsClient(LineClient):
    """LineClient over TLS (Python's ssl), from `source` if given."""

    def __init__(self, port: int, host: str = "127.0.0.1", source: str = "",
                 context: ssl.SSLContext | None = None, timeout: float = 10.0, rcvbuf: int = 0) -> None:
        raw = socket.socket()
        if rcvbuf:
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        raw.settimeout(timeout)
        if source:
            raw.bind((source, 0))
        raw.connect((host, port))
        try:
            self.sock = (context or client_context()).wrap_socket(raw)
        except BaseException:
            raw.close()
            raise
        self.timeout = timeout
        self.buf = b""

    def serial(self) -> int:
        return _serial_der(self.sock.getpeercert(binary_form=True))


def _serial_der(der: bytes) -> int:
    """A certificate's serial from its DER form, by `openssl x509 -serial` (Python's ssl
    parses only a certificate it verified)."""
    pem = ssl.DER_cert_to_PEM_cert(der)
    out = subprocess.run(["openssl", "x509", "-noout", "-serial"], input=pem.encode(), check=True,
                         capture_output=True, timeout=30).stdout.decode()
    return int(out.strip().partition("=")[2], 16)


def tls_config(inst, certs: tuple[Path, Path], tls_port: int, plain_port: int | None = None,
               mode: str = "echo", extra: str = "", client_ca: Path | None = None) -> None:
    listen = [f"tls://127.0.0.1:{tls_port}"] + ([f"127.0.0.1:{plain_port}"] if plain_port else [])
    section = f'[tls]\ncertificate = "{certs[0]}"\nkey = "{certs[1]}"\n'
    if client_ca:
        section += f'client_ca = "{client_ca}"\n'
    inst.write_config(listen=listen, mode=mode, extra=section + extra)


@pytest.fixture
def certs(tmp_path) -> tuple[Path, Path]:
    return self_signed(tmp_path / "certs")


# ------------------------------------------------------------------ echo and chat over TLS

def test_echo_over_ncat_openssl_and_python_beside_plaintext(loop_chatd, certs):
    """A TLS and a plaintext listener side by side: `ncat --ssl`, `openssl s_client -quiet`
    and Python's ssl get every line back byte for byte, as a plaintext client does."""
    inst = loop_chatd
    tls_port, plain_port = free_port(), free_port()
    tls_config(inst, certs, tls_port, plain_port)
    out = inst.cmd("start", check=0).stdout.decode()
    assert f"tls://127.0.0.1:{tls_port}, 127.0.0.1:{plain_port}" in out, out
    text = b"hello\r\nworld \xff\xff (IAC IAC) \xc3\xa9\n" * 100
    if shutil.which("ncat"):
        got = subprocess.run(["ncat", "--ssl", "127.0.0.1", str(tls_port)], input=text,
                             capture_output=True, timeout=20).stdout
        assert got == text, got
    proc = subprocess.Popen(["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{tls_port}"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        proc.stdin.write(b"from openssl\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"from openssl\n"
    finally:
        proc.kill()
        proc.wait(timeout=10)
    lines = b"".join(b"line %d %s\n" % (i, b"x" * (i % 300)) for i in range(2000))
    with TlsClient(tls_port) as c:
        assert c.sock.version() in ("TLSv1.2", "TLSv1.3")
        c.send(lines)
        assert c.recv_exact(len(lines)) == lines
    with LineClient(plain_port) as c:
        c.send(b"plain\n")
        assert c.recv_line() == b"plain\n"


def test_a_graceful_stop_answers_what_arrived_over_tls(loop_chatd, certs):
    """`chatd stop` (SIGUSR1) with lines in flight: every one comes back, then the close."""
    inst = loop_chatd
    tls_port = free_port()
    tls_config(inst, certs, tls_port)
    inst.start()
    lines = b"".join(b"line %05d\n" % i for i in range(5000))
    with TlsClient(tls_port) as c:
        c.send(lines)
        began = time.monotonic()
        inst.cmd("stop", check=0)
        took = time.monotonic() - began
        assert c.recv_until_eof() == lines
    figures("graceful stop over TLS", loop=inst.loop, seconds=f"{took:.2f}")
    assert took < 5, took      # drain_timeout is 10 s: nothing waited for it


def test_a_graceful_stop_answers_lines_that_came_while_the_daemon_was_stopped(loop_chatd, certs):
    """Lines arrive while the daemon is SIGSTOPped, then SIGUSR1 and SIGCONT: every one is
    answered over TLS and the close follows within about LINGER_S, not drain_timeout (10 s)."""
    inst = loop_chatd
    tls_port = free_port()
    tls_config(inst, certs, tls_port)
    pid = inst.start()
    lines = b"".join(b"line %03d\n" % i for i in range(100))
    with TlsClient(tls_port) as c:
        c.send(b"first\n")
        assert c.recv_line() == b"first\n"
        os.kill(pid, signal.SIGSTOP)
        try:
            c.send(lines)
            time.sleep(0.2)
            os.kill(pid, signal.SIGUSR1)
        finally:
            os.kill(pid, signal.SIGCONT)
        began = time.monotonic()
        assert c.recv_until_eof(timeout=15) == lines
        took = time.monotonic() - began
    figures("graceful stop over TLS, lines in the kernel", loop=inst.loop, seconds=f"{took:.2f}")
    assert took < 6, took


def test_chat_over_tls_and_plaintext_in_one_room(make_chatd, certs):
    inst = make_chatd()
    tls_port, plain_port = free_port(), free_port()
    tls_config(inst, certs, tls_port, plain_port, mode="chat")
    inst.start()
    with TlsClient(tls_port) as a, LineClient(plain_port) as b:
        assert a.recv_line() == b"*** Welcome to chatd, guest1. Type /help for commands.\r\n"
        a.recv_line()                                  # the roster
        b.recv_line(), b.recv_line()
        assert a.recv_line() == b"*** guest2 joined #lobby\r\n"
        a.send(b"over tls\n")
        assert b.recv_line() == b"<guest1> over tls\r\n"
        b.send(b"in plain\n")
        assert a.recv_line() == b"<guest2> in plain\r\n"
        inst.cmd("stop", check=0)
        assert a.recv_until_eof() == b"*** server shutting down\r\n"


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_a_chat_client_over_tls_that_never_reads_is_dropped_as_too_slow(loop_chatd, certs):
    """Chat's bounded output holds over TLS: a TLS member that never reads is dropped as
    `too slow` while the room flows, and a reading member gets every line."""
    inst = loop_chatd
    tls_port, plain_port = free_port(), free_port()
    tls_config(inst, certs, tls_port, plain_port, mode="chat", extra="[limits]\nrate = 0\n")
    inst.start()
    with TlsClient(tls_port, rcvbuf=4096) as slow, LineClient(plain_port) as reader, \
            LineClient(plain_port) as sender:
        slow.recv_line()                                 # guest1, then never reads again
        for _ in range(3):
            reader.recv_line()                           # welcome, roster, guest3 joined
        pad = b"z" * 1000
        left, got, began = b"", 0, time.monotonic()
        while not left and time.monotonic() - began < 20:
            sender.send(b"".join(b"%06d %s\n" % (got + i, pad) for i in range(64)))
            for i in range(64):
                line = reader.recv_line()
                while line.startswith(b"*** "):
                    left = left or line
                    line = reader.recv_line()
                assert line == b"<guest3> %06d %s\r\n" % (got, pad), line[:40]
                got += 1
        assert left == b"*** guest1 left #lobby (too slow)\r\n", (left, got)
    figures("TLS non-reader dropped", loop=inst.loop, after_s=f"{time.monotonic() - began:.1f}",
            lines=got)


# ------------------------------------------------------------------ certificates and restarts

def test_a_restart_loads_a_new_certificate_for_new_connections(chatd, certs, tmp_path):
    """The files swapped, then `chatd restart`: a new connection sees the new serial, the old
    one keeps talking over the old session."""
    tls_port = free_port()
    tls_config(chatd, certs, tls_port)
    chatd.start()
    old_serial = serial_of(certs[0])
    with TlsClient(tls_port) as old:
        assert old.serial() == old_serial
        new_cert, new_key = self_signed(tmp_path / "new")
        os.replace(new_cert, certs[0])
        os.replace(new_key, certs[1])
        out = chatd.cmd("restart", check=0).stdout.decode()
        assert "certificate and key read again" in out, out
        with TlsClient(tls_port) as new:
            assert new.serial() == serial_of(certs[0]) != old_serial
            new.send(b"new\n")
            assert new.recv_line() == b"new\n"
        old.send(b"still here\n")
        assert old.recv_line() == b"still here\n"


@pytest.mark.parametrize("damage", ["missing", "garbage", "mismatched", "world-readable", "fifo", "huge"])
def test_bad_files_are_refused_with_the_reason(chatd, certs, tmp_path, damage):
    """`chatd restart` exits 6 naming the file and why, and the old certificate keeps serving;
    `check-config` and `start` exit 6 the same way; never a traceback."""
    tls_port = free_port()
    tls_config(chatd, certs, tls_port)
    chatd.start()
    serial = serial_of(certs[0])
    if damage == "missing":
        certs[0].unlink()
        reason = f"cannot read {certs[0]}: No such file or directory"
    elif damage == "garbage":
        certs[0].write_text("not a certificate\n")
        reason = f"{certs[0]} holds no PEM certificate"
    elif damage == "mismatched":
        other = self_signed(tmp_path / "other")
        os.replace(other[1], certs[1])
        reason = "KEY_VALUES_MISMATCH"
    elif damage == "world-readable":
        certs[1].chmod(0o644)
        reason = f"{certs[1]} may be read by every user (mode 0644); chmod o-r it"
    elif damage == "fifo":
        certs[0].unlink()
        os.mkfifo(certs[0])
        reason = "it is a FIFO"
    else:   # the certificate, then 16 MiB of padding OpenSSL would ignore
        with open(certs[0], "ab") as f:
            f.truncate(f.tell() + (16 << 20))
        reason = f"cannot read {certs[0]}: it holds more than 16 MiB; refusing it"
    for command in ("restart", "check-config"):
        proc = chatd.cmd(command, check=6)
        assert reason in proc.stderr.decode(), proc.stderr
        assert f"{chatd.config}:" in proc.stderr.decode() and "[tls]" in proc.stderr.decode()
    with TlsClient(tls_port) as c:
        assert c.serial() == serial
        c.send(b"old\n")
        assert c.recv_line() == b"old\n"
    chatd.cmd("stop", check=0)
    proc = chatd.cmd("start", check=6)
    assert reason in proc.stderr.decode(), proc.stderr


def test_a_tls_listener_needs_a_certificate_and_key(chatd, certs):
    port = free_port()
    chatd.write_config(listen=[f"tls://127.0.0.1:{port}"])
    proc = chatd.cmd("check-config", check=6)
    assert f"tls://127.0.0.1:{port} needs [tls] certificate and key" in proc.stderr.decode()
    line = chatd.config.read_text().splitlines().index(f'listen = [\'tls://127.0.0.1:{port}\']') + 1
    assert f"{chatd.config}:{line}:" in proc.stderr.decode(), proc.stderr
    chatd.write_config(listen=[f"tls://127.0.0.1:{port}"], extra=f'[tls]\ncertificate = "{certs[0]}"\n')
    proc = chatd.cmd("start", check=6)
    assert "[tls] certificate is set, but not [tls] key" in proc.stderr.decode(), proc.stderr
    assert b"Traceback" not in proc.stderr


def test_a_bad_client_ca_is_refused_with_the_reason(chatd, certs, tmp_path):
    garbage = tmp_path / "ca.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    tls_config(chatd, certs, free_port(), client_ca=garbage)
    proc = chatd.cmd("check-config", check=6)
    assert f"[tls] client_ca: cannot load {garbage}: [X509] PEM lib\n" in proc.stderr.decode(), proc.stderr
    assert b"Traceback" not in proc.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
def test_a_restart_after_the_privilege_drop_reads_the_files_as_that_user(make_chatd):
    """Started as root with user nobody: the root-only key is read before the drop; a restart,
    running as nobody, cannot read it (rejected, with the reason) until nobody may."""
    inst = make_chatd(public=True)
    certs = self_signed(inst.dir / "certs")
    (inst.dir / "certs").chmod(0o755)
    tls_port = free_port()
    inst.write_config(listen=[f"tls://127.0.0.1:{tls_port}"], daemon={"user": "nobody"},
                      extra=f'[tls]\ncertificate = "{certs[0]}"\nkey = "{certs[1]}"\n')
    inst.start()
    with TlsClient(tls_port) as c:
        c.send(b"as nobody\n")
        assert c.recv_line() == b"as nobody\n"
    proc = inst.cmd("restart", check=6)
    assert f"cannot read {certs[1]}: Permission denied" in proc.stderr.decode(), proc.stderr
    os.chown(certs[1], 0, 65534)
    certs[1].chmod(0o640)
    inst.cmd("restart", check=0)
    with TlsClient(tls_port) as c:
        c.send(b"again\n")
        assert c.recv_line() == b"again\n"


def test_a_restart_turns_a_plain_listener_into_a_tls_one(chatd, certs):
    """The same address, `tcp` then `tls://` by a restart: the socket is kept, a connected
    plaintext client keeps talking, newcomers must speak TLS."""
    port = free_port()
    chatd.write_config(listen=[f"127.0.0.1:{port}"],
                       extra=f'[tls]\ncertificate = "{certs[0]}"\nkey = "{certs[1]}"\n')
    chatd.start()
    with LineClient(port) as old:
        old.send(b"plain\n")
        assert old.recv_line() == b"plain\n"
        tls_config(chatd, certs, port)
        chatd.cmd("restart", check=0)
        with TlsClient(port) as new:
            new.send(b"now tls\n")
            assert new.recv_line() == b"now tls\n"
        old.send(b"still plain\n")
        assert old.recv_line() == b"still plain\n"


# ------------------------------------------------------------------ versions and handshakes

def test_tls_below_1_2_is_refused(chatd, certs):
    tls_port = free_port()
    tls_config(chatd, certs, tls_port)
    chatd.start()
    with TlsClient(tls_port, context=client_context(minimum_version=ssl.TLSVersion.TLSv1_2,
                                                    maximum_version=ssl.TLSVersion.TLSv1_2)) as c:
        assert c.sock.version() == "TLSv1.2"
        c.send(b"1.2\n")
        assert c.recv_line() == b"1.2\n"
    old = client_context()
    with pytest.warns(DeprecationWarning):
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        TlsClient(tls_port, context=old).close()
    proc = subprocess.run(["openssl", "s_client", "-tls1_1", "-connect", f"127.0.0.1:{tls_port}"],
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    assert proc.returncode != 0 and b"Cipher is (NONE)" in proc.stdout + proc.stderr, proc.stdout
    wait_for(lambda: "TLS handshake with 127.0.0.1:" in chatd.log_text(), what="the failure logged")


def test_failed_handshakes_are_logged_at_the_rate_of_connect_lines(chatd, certs):
    """Past logged_per_ip newcomers, a failed handshake is counted, not logged: the churn
    line says how many."""
    tls_port = free_port()
    tls_config(chatd, certs, tls_port, extra="[limits]\nlogged_per_ip = 3\n")
    chatd.start()
    for _ in range(10):
        with LineClient(tls_port) as c:
            c.send(b"GET / HTTP/1.0\r\n\r\n")      # no ClientHello: the handshake fails
            c.recv_until_eof()                         # closed, after an alert at most
    chatd.cmd("stop", check=0)
    log = chatd.log_text()
    assert log.count("TLS handshake with 127.0.0.1:") == 3, log
    assert "churn from 127.0.0.1 in 10 s: 0 connects, 0 disconnects, 7 refused" in log, log


def test_idle_handshakes_hold_slots_only_for_their_address_and_their_timeout(loop_chatd, certs):
    """A slowloris of handshakes: clients that connect and never send a ClientHello take the
    address's max_clients_per_ip slots; a TLS client from that address is told "server
    full" as a line after its handshake, one from 127.0.0.2 is served; after
    handshake_timeout the idle ones are closed and their slots freed."""
    inst = loop_chatd
    tls_port = free_port()
    tls_config(inst, certs, tls_port,
               extra="handshake_timeout = 1.5\n[limits]\nmax_clients_per_ip = 3\n")
    inst.start()
    idle = [LineClient(tls_port) for _ in range(3)]
    try:
        time.sleep(0.3)
        with TlsClient(tls_port) as c:
            assert c.recv_until_eof() == b"ERR server full\r\n"
        with TlsClient(tls_port, source="127.0.0.2") as c:
            c.send(b"other address\n")
            assert c.recv_line() == b"other address\n"
        began = time.monotonic()
        for client in idle:
            assert client.recv_until_eof(timeout=5) == b""
        waited = time.monotonic() - began
        assert waited < 3, waited

        def served() -> bool:   # the slot is given back just after the close the client saw
            with TlsClient(tls_port) as c:
                c.send(b"slot freed\n")
                return c.recv_line() == b"slot freed\n"
        wait_for(served, timeout=2, interval=0.05, what="a slot freed by the handshake timeout")
    finally:
        for client in idle:
            client.close()
    figures("idle handshakes closed after", seconds=f"{waited + 0.3:.2f}", timeout=1.5)


def test_server_full_reaches_a_chat_client_as_a_line_after_the_handshake(make_chatd, certs):
    inst = make_chatd()
    tls_port = free_port()
    tls_config(inst, certs, tls_port, mode="chat", extra="[limits]\nmax_clients = 1\n")
    inst.start()
    with TlsClient(tls_port) as first:
        first.recv_line()
        with TlsClient(tls_port) as second:
            assert second.recv_until_eof() == b"*** server full\r\n"


@pytest.mark.slow   # seconds of waiting for a timeout, on both loops
def test_a_tls_client_that_never_reads_is_bounded(loop_chatd, certs):
    """Echo's flow control holds over TLS: clients that send and never read stop being
    read; chatd's memory stays within their budgets; each still gets every byte back."""
    inst = loop_chatd
    tls_port = free_port()
    tls_config(inst, certs, tls_port)
    pid = inst.start()
    with TlsClient(tls_port) as warm:      # the first TLS connection's allocations
        warm.send(b"warm\n")
        warm.recv_line()
    base = rss_kib(pid)
    clients, sent = [], []
    try:
        for _ in range(5):
            c = TlsClient(tls_port)
            clients.append(c)
            c.sock.settimeout(0.5)
            total, line = 0, b"y" * 1000 + b"\n"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    total += c.sock.send(line * 16)
                except (TimeoutError, socket.timeout, ssl.SSLWantWriteError):
                    break
            sent.append(total)
        growth = rss_kib(pid) - base
        for c, total in zip(clients, sent):
            c.sock.settimeout(10)
            assert len(c.recv_exact(total, timeout=20)) == total
    finally:
        for c in clients:
            c.close()
    figures("TLS non-readers", clients=5, sent_each_kib=min(sent) // 1024, rss_growth_kib=growth)
    assert growth <= 5 * (256 + 512) + 4096, growth


def test_an_idle_tls_client_costs_less_than_128_kb(loop_chatd, certs):
    """asyncio's TLS layer kept a 256 KiB read buffer per connection (280 KB each); chatd
    makes it 64 KiB. 200 idle TLS clients, each having echoed one line."""
    inst = loop_chatd
    tls_port = free_port()
    tls_config(inst, certs, tls_port, extra="[limits]\nmax_clients_per_ip = 0\n")
    pid = inst.start()

    def connect() -> TlsClient:
        c = TlsClient(tls_port)
        c.send(b"x\n")
        assert c.recv_line() == b"x\n"
        return c

    connect().close()                      # the first TLS connection's allocations
    base = rss_kib(pid)
    clients = []
    try:
        for _ in range(200):
            clients.append(connect())
        each = (rss_kib(pid) - base) * 1024 // len(clients)
    finally:
        for c in clients:
            c.close()
    figures("idle TLS client", loop=inst.loop, bytes_each=each)
    assert each < 128_000, each


# ------------------------------------------------------------------ client certificates

def test_client_certificates_are_required_and_name_the_chat_nick(make_chatd, certs, tmp_path):
    """With client_ca: no certificate, or one another CA signed, is refused in the handshake;
    a client's CN becomes its nick when it is a valid one and free."""
    ca = self_signed(tmp_path / "ca", "ca", cn="test CA")
    alice = signed_by(ca, tmp_path / "ca", "alice")
    bad = signed_by(ca, tmp_path / "ca", "not a nick")
    stranger = self_signed(tmp_path / "stranger", "bob", cn="bob")
    inst = make_chatd()
    tls_port = free_port()
    tls_config(inst, certs, tls_port, mode="chat", client_ca=ca[0])
    inst.start()
    for cert in (None, stranger):
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            with TlsClient(tls_port, context=client_context(cert)) as c:
                c.recv_line()   # TLS 1.3 reports the refusal after the handshake, at the first read
    with TlsClient(tls_port, context=client_context(alice)) as a:
        assert a.recv_line() == b"*** Welcome to chatd, guest1. Type /help for commands.\r\n"
        assert a.recv_line() == b"*** #lobby: nobody else here\r\n"
        assert a.recv_line() == b"*** guest1 is now known as alice\r\n"
        with TlsClient(tls_port, context=client_context(alice)) as twin:
            assert twin.recv_line().startswith(b"*** Welcome to chatd, guest2.")
            twin.recv_line()
            assert twin.recv_line() == b"*** error: nick taken: alice\r\n"
        with TlsClient(tls_port, context=client_context(bad)) as b:
            assert b.recv_line().startswith(b"*** Welcome to chatd, guest3.")
            assert b.recv_line() == b"*** #lobby: alice\r\n"
            b.send(b"/who\n")
            assert b.recv_line() == b"*** #lobby: alice, guest3\r\n"


# ------------------------------------------------------------------ socket activation

def test_an_activated_socket_of_a_tls_entry_is_served_with_tls(chatd, certs):
    """LISTEN_FDS hands over a socket whose address is a `tls://` entry of listen: TLS."""
    handed = socket.socket()
    handed.bind(("127.0.0.1", 0))
    handed.listen(8)
    port = handed.getsockname()[1]
    tls_config(chatd, certs, port)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LISTEN_", "NOTIFY_"))}
    env |= {"LISTEN_FDS": "1", "LISTEN_FDNAMES": "tls"}
    argv = ["sh", "-c", 'LISTEN_PID=$$ exec "$@"', "sh", *chatd_command(), "run", "-c", str(chatd.config)]
    with handed, open(chatd.run_stderr, "wb") as err:
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                pass_fds=(3,), preexec_fn=dup_onto_3(handed.fileno()),
                                start_new_session=True)
    chatd.pids.add(proc.pid)
    try:
        wait_for(lambda: "ready:" in chatd.log_text() or proc.poll() is not None, what="ready")
        assert f"tls://127.0.0.1:{port} (systemd: tls)" in chatd.log_text()
        with TlsClient(port) as c:
            c.send(b"activated\n")
            assert c.recv_line() == b"activated\n"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=10) == 0


def test_a_tls_proxy_listener_reads_the_header_then_shakes_hands(loop_chatd, certs):
    """tls+proxy://: a trusted proxy's PROXY v1 header in clear, then TLS on the same stream;
    the log shows the client the header names, and deny applies to it."""
    inst = loop_chatd
    inst.write_config(listen=[f"tls+proxy://127.0.0.1:{inst.port}"],
                      extra=f'[tls]\ncertificate = "{certs[0]}"\nkey = "{certs[1]}"\n'
                            f'[access]\nproxy_from = ["127.0.0.1"]\ndeny = ["192.0.2.66"]\n')
    inst.start()

    def through_proxy(client: str) -> ssl.SSLSocket:
        raw = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
        raw.sendall(f"PROXY TCP4 {client} 127.0.0.1 4242 {inst.port}\r\n".encode())
        return client_context().wrap_socket(raw)

    with through_proxy("192.0.2.7") as tls:
        tls.sendall(b"behind a proxy\n")
        assert tls.recv(100) == b"behind a proxy\n"
    wait_for(lambda: "connect 192.0.2.7:4242" in inst.log_text(), what="the real client logged")
    raw = socket.create_connection(("127.0.0.1", inst.port), timeout=10)
    raw.sendall(b"PROXY TCP4 192.0.2.66 127.0.0.1 4242 7777\r\n")
    assert raw.recv(100) == b""              # denied: closed before any TLS byte
    raw.close()
