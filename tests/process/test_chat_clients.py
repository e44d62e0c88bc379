"""Real clients in chat mode (README "Chat mode"): telnet through a pty and netcat-openbsd, together.

What inetutils telnet 2.4 sends to chatd (seen through the logging relay below): a typed line
as `line\\r\\n`; Ctrl-C, with the pty as its controlling terminal, `IAC IP IAC DO TIMING-MARK`,
after which it discards all output until `IAC WILL TIMING-MARK` comes back (a chat server that
never answers, like `ncat --chat`, freezes its screen for good). `mode character` sends
`IAC DO SGA IAC DO ECHO`; chatd refuses both and telnet stays in line mode. Only if nobody
answers (here: a relay that swallows chatd's refusals) does telnet go to character mode, where it
sends every key as typed and Enter as `CR NUL`, which ends a line in chatd too.

nc (netcat-openbsd) sees the raw stream: every line ends with CRLF, and no 0xFF byte ever
reaches it (what chatd sends is UTF-8, and telnet replies go only to the client that asked).

Every read has a deadline (select); every process started here is stopped by its pid in a
`finally` (TERM, wait, KILL, reap). Run with `-s` to see the example session's transcript.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time

import pytest

from telnet_pty import TELNET, connected_telnet, need
from support import kill_and_wait

pytestmark = pytest.mark.asyncio_twin_slow   # the default step runs these on uvloop

NC = "/usr/bin/nc"
HOST = "127.0.0.1"
TIMEOUT = 10.0
CHAT = "[limits]\nrate = 0\n"

IAC, DONT, DO, WONT, WILL, SB, SE, IP = 0xFF, 0xFE, 0xFD, 0xFC, 0xFB, 0xFA, 0xF0, 0xF4
ECHO, SGA, TIMING_MARK = 0x01, 0x03, 0x06
CTRL_C_BYTES = bytes([IAC, IP, IAC, DO, TIMING_MARK])


def start_chat(inst) -> None:
    inst.write_config(mode="chat", extra=CHAT)
    inst.start()


def welcome(n: int) -> bytes:
    return b"*** Welcome to chatd, guest%d. Type /help for commands.\r\n" % n


def assert_clean_stream(data: bytes) -> None:
    """What a raw client may receive: no IAC byte, every LF preceded by CR, ends with CRLF."""
    assert b"\xff" not in data, data
    assert data.count(b"\n") == data.count(b"\r\n"), f"a bare LF in {data!r}"
    assert data.count(b"\r") == data.count(b"\r\n"), f"a bare CR in {data!r}"
    assert not data or data.endswith(b"\r\n"), data


def stop_popen(proc: subprocess.Popen) -> None:
    """TERM, wait, KILL by pid; reap; close the pipes."""
    try:
        kill_and_wait(proc.pid)
        proc.wait(timeout=5)
    finally:
        for f in (proc.stdin, proc.stdout, proc.stderr):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


# ------------------------------------------------------------------ nc, long-lived

class NcClient:
    """`nc -N [ARGS] 127.0.0.1 PORT` with stdin/stdout pipes; closing stdin half-closes the
    socket. `args`: more options, such as `-s 127.0.0.2` (the source address)."""

    def __init__(self, port: int, *args: str) -> None:
        self.proc = subprocess.Popen([NC, "-N", *args, HOST, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.got = b""            # everything received, in order
        self.seen = 0             # how much of it `expect` has already matched

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def _read(self, deadline: float) -> bool:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return True
        fd = self.proc.stdout.fileno()
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.1))
        if not ready:
            return True
        chunk = os.read(fd, 65536)
        self.got += chunk
        return bool(chunk)

    def expect(self, want: bytes, timeout: float = TIMEOUT) -> bytes:
        """Wait until the bytes after the last match hold `want`; return what came up to its end."""
        deadline = time.monotonic() + timeout
        while want not in self.got[self.seen:]:
            if time.monotonic() > deadline:
                raise AssertionError(f"nc: timed out waiting for {want!r}; got {self.got[self.seen:]!r}")
            if not self._read(deadline) and want not in self.got[self.seen:]:
                raise AssertionError(f"nc: EOF waiting for {want!r}; got {self.got[self.seen:]!r}")
        end = self.got.index(want, self.seen) + len(want)
        new, self.seen = self.got[self.seen:end], end
        return new

    def settle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self._read(deadline):
            pass

    def close_and_wait(self, timeout: float = TIMEOUT) -> int:
        """Close stdin (nc -N half-closes), read to EOF, wait for nc to exit."""
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout
        while self._read(deadline):
            if time.monotonic() > deadline:
                raise AssertionError(f"nc: no EOF; got {self.got[self.seen:]!r}")
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def stop(self) -> None:
        stop_popen(self.proc)


# ------------------------------------------------------------------ telnet through a pty

# ------------------------------------------------------------------ a logging relay

class Relay:
    """A TCP relay in a thread between one client and chatd, recording both directions.

    `swallow`: byte strings removed from what chatd sends (to play a server that never answers).
    """

    def __init__(self, port: int, swallow: tuple[bytes, ...] = ()) -> None:
        self.target = port
        self.swallow = swallow
        self.listener = socket.create_server((HOST, 0))
        self.port = self.listener.getsockname()[1]
        self.to_server = b""
        self.to_client = b""
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        socks: list[socket.socket] = []
        try:
            self.listener.settimeout(0.1)
            while not self.stopping.is_set():
                try:
                    client, _ = self.listener.accept()
                    break
                except socket.timeout:
                    continue
            else:
                return
            socks.append(client)
            server = socket.create_connection((HOST, self.target), timeout=TIMEOUT)
            socks.append(server)
            while not self.stopping.is_set():
                ready, _, _ = select.select([client, server], [], [], 0.1)
                for s in ready:
                    data = s.recv(65536)
                    if s is client:
                        if not data:
                            server.shutdown(socket.SHUT_WR)
                            return
                        with self.lock:
                            self.to_server += data
                        server.sendall(data)
                    else:
                        if not data:
                            client.shutdown(socket.SHUT_WR)
                            return
                        with self.lock:
                            self.to_client += data
                        for cut in self.swallow:
                            data = data.replace(cut, b"")
                        if data:
                            client.sendall(data)
        except BaseException as exc:        # reported by the test, not lost in the thread
            self.error = exc
        finally:
            for s in socks:
                s.close()

    def sent(self) -> tuple[bytes, bytes]:
        with self.lock:
            return self.to_server, self.to_client

    def wait_sent(self, want: bytes, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while want not in self.sent()[0]:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay: telnet never sent {want!r}; sent {self.sent()[0]!r}")
            time.sleep(0.01)

    def wait_answered(self, want: bytes, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while want not in self.sent()[1]:
            if time.monotonic() > deadline:
                raise AssertionError(f"relay: chatd never sent {want!r}; sent {self.sent()[1]!r}")
            time.sleep(0.01)

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.listener.close()
        assert not self.thread.is_alive(), "relay thread did not stop"


# ------------------------------------------------------------------ 1. telnet and nc chat

def test_telnet_and_nc_chat_both_ways_and_ctrl_c_does_not_freeze_telnet(loop_chatd):
    """1. telnet (guest1) and nc (guest2) in #lobby, 2. each says a line, 3. Ctrl-C in telnet,
    4. nc says more, telnet says more. Result: every line reaches the other side; telnet's screen
    is not frozen by Ctrl-C; nc got only CRLF-terminated lines and no IAC byte."""
    need(TELNET, "telnet")
    need(NC, "nc")
    start_chat(loop_chatd)
    t = connected_telnet(loop_chatd.port)
    n = None
    try:
        t.expect(welcome(1).rstrip())
        t.expect(b"*** #lobby: nobody else here")
        n = NcClient(loop_chatd.port)
        assert n.expect(b"*** #lobby: guest1\r\n") == welcome(2) + b"*** #lobby: guest1\r\n"
        t.expect(b"*** guest2 joined #lobby")

        t.write(b"hello from telnet\r")
        assert n.expect(b"\r\n") == b"<guest1> hello from telnet\r\n"
        n.send(b"hello from nc\n")
        t.expect(b"<guest2> hello from nc")

        for round_ in (1, 2):             # not a one-off
            t.ctrl_c()
            n.send(b"nc after ctrl-c %d\n" % round_)
            t.expect(b"<guest2> nc after ctrl-c %d" % round_)
            t.write(b"telnet after ctrl-c %d\r" % round_)
            assert n.expect(b"\r\n") == b"<guest1> telnet after ctrl-c %d\r\n" % round_

        # Ctrl-\ (SIGQUIT): telnet sends IAC BRK IAC DO TIMING-MARK, and waits the same way
        t.write(b"\x1c")
        t.expect(b"^\\")
        t.settle(0.3)
        n.send(b"nc after ctrl-backslash\n")
        t.expect(b"<guest2> nc after ctrl-backslash")
        # a byte 0xFF typed in telnet goes out as IAC IAC; nc gets U+FFFD, never an IAC byte
        t.write("café \xff\r".encode("utf-8").replace(b"\xc3\xbf", b"\xff"))
        assert n.expect(b"\r\n") == "<guest1> café \ufffd\r\n".encode()

        # Ctrl-C with nothing typed after it, then the other side talks at once
        t.write(b"\x03")
        t.expect(b"^C")
        time.sleep(0.3)
        n.send(b"straight after\n")
        t.expect(b"<guest2> straight after")
        assert t.poll() is None, "telnet exited"

        assert n.close_and_wait() == 0, n.proc.stderr.read()
        t.expect(b"*** guest2 left #lobby (connection closed)")
        assert n.got == (welcome(2) + b"*** #lobby: guest1\r\n"
                         + b"<guest1> hello from telnet\r\n"
                         + b"<guest1> telnet after ctrl-c 1\r\n"
                         + b"<guest1> telnet after ctrl-c 2\r\n"
                         + "<guest1> café \ufffd\r\n".encode())
        assert_clean_stream(n.got)
    finally:
        t.stop()
        if n is not None:
            n.stop()


def test_what_telnet_sends_to_chatd_and_what_chatd_answers(loop_chatd):
    """Through a logging relay: Enter is CR LF; Ctrl-C is IAC IP IAC DO TIMING-MARK, answered
    with IAC WILL TIMING-MARK; `mode character` is IAC DO SGA IAC DO ECHO, refused with WONT, so
    telnet stays in line mode and Enter is still CR LF. The nc user gets every line, nothing else."""
    need(TELNET, "telnet")
    need(NC, "nc")
    start_chat(loop_chatd)
    relay = Relay(loop_chatd.port)
    t = n = None
    try:
        t = connected_telnet(relay.port)
        t.expect(b"*** #lobby: nobody else here")
        n = NcClient(loop_chatd.port)
        n.expect(b"*** #lobby: guest1\r\n")
        t.expect(b"*** guest2 joined #lobby")

        t.write(b"line mode\r")
        assert n.expect(b"\r\n") == b"<guest1> line mode\r\n"
        relay.wait_sent(b"line mode\r\n")

        t.ctrl_c()
        relay.wait_sent(CTRL_C_BYTES)
        relay.wait_answered(bytes([IAC, WILL, TIMING_MARK]))
        n.send(b"seen after ctrl-c\n")
        t.expect(b"<guest2> seen after ctrl-c")

        t.write(b"\x1d")
        t.expect(b"telnet>")
        t.write(b"mode character\r")
        relay.wait_sent(bytes([IAC, DO, SGA, IAC, DO, ECHO]))
        relay.wait_answered(bytes([IAC, WONT, SGA, IAC, WONT, ECHO]))
        t.settle(0.5)
        t.write(b"after mode character\r")
        assert n.expect(b"\r\n") == b"<guest1> after mode character\r\n"
        relay.wait_sent(b"after mode character\r\n")

        to_server, to_client = relay.sent()
        assert to_server == (b"line mode\r\n" + CTRL_C_BYTES + bytes([IAC, DO, SGA, IAC, DO, ECHO])
                             + b"after mode character\r\n")
        # telnet replies go to telnet only, each where it was asked for in the stream
        assert to_client.count(b"\xff") == 3
        assert bytes([IAC, WILL, TIMING_MARK]) + b"<guest2> seen after ctrl-c\r\n" in to_client
        assert_clean_stream(to_client.replace(bytes([IAC, WILL, TIMING_MARK]), b"")
                            .replace(bytes([IAC, WONT, SGA, IAC, WONT, ECHO]), b""))
        assert_clean_stream(n.got)
    finally:
        if t is not None:
            t.stop()
        if n is not None:
            n.stop()
        relay.stop()
    assert relay.error is None, relay.error


def test_telnet_character_mode_sends_cr_nul_and_chatd_ends_the_line_there(loop_chatd):
    """When nobody answers `mode character` (a relay swallows chatd's WONT SGA / WONT ECHO),
    telnet goes to character mode: every key is sent as typed, Enter as CR NUL. chatd ends the
    line at CR NUL (README "Chat mode") and drops the raw ^C byte telnet sends there; nc gets clean lines."""
    need(TELNET, "telnet")
    need(NC, "nc")
    start_chat(loop_chatd)
    relay = Relay(loop_chatd.port, swallow=(bytes([IAC, WONT, SGA]), bytes([IAC, WONT, ECHO])))
    t = n = None
    try:
        t = connected_telnet(relay.port)
        t.expect(b"*** #lobby: nobody else here")
        n = NcClient(loop_chatd.port)
        n.expect(b"*** #lobby: guest1\r\n")
        t.expect(b"*** guest2 joined #lobby")

        t.write(b"\x1d")
        t.expect(b"telnet>")
        t.write(b"mode character\r")
        relay.wait_sent(bytes([IAC, DO, SGA, IAC, DO, ECHO]))
        t.settle(0.5)
        for ch in b"char mode":              # one key at a time, as a person types
            t.write(bytes([ch]))
            time.sleep(0.01)
        t.write(b"\r")
        relay.wait_sent(b"char mode\r\0")
        assert n.expect(b"\r\n") == b"<guest1> char mode\r\n"
        t.write(b"second\r")
        assert n.expect(b"\r\n") == b"<guest1> second\r\n"
        t.write(b"\x03")                      # character mode: ^C goes out as the byte 0x03
        t.write(b"third\r")
        assert n.expect(b"\r\n") == b"<guest1> third\r\n"
        n.send(b"from nc in char mode\n")
        t.expect(b"<guest2> from nc in char mode")

        to_server, _ = relay.sent()
        assert to_server.endswith(bytes([IAC, DO, SGA, IAC, DO, ECHO])
                                  + b"char mode\r\0second\r\0\x03third\r\0")
        n.settle(0.2)
        assert n.got.endswith(b"<guest1> char mode\r\n<guest1> second\r\n<guest1> third\r\n")
        assert_clean_stream(n.got)
    finally:
        if t is not None:
            t.stop()
        if n is not None:
            n.stop()
        relay.stop()
    assert relay.error is None, relay.error


@pytest.mark.parametrize("how", ["send synch", "autosynch ctrl-c"])
def test_telnet_synch_leaves_no_stray_byte_in_the_next_line(loop_chatd, how):
    """telnet's Synch (`send synch`, or Ctrl-C after `toggle autosynch`) sends IAC DM with the
    IAC as TCP urgent data (RFC 854). Result wanted: IAC DM is a telnet command, dropped; the
    next line reaches nc as typed, with no U+FFFD (or 0xF2) in front of it."""
    need(TELNET, "telnet")
    need(NC, "nc")
    start_chat(loop_chatd)
    t = connected_telnet(loop_chatd.port)
    n = None
    try:
        t.expect(b"*** #lobby: nobody else here")
        n = NcClient(loop_chatd.port)
        n.expect(b"*** #lobby: guest1\r\n")
        t.expect(b"*** guest2 joined #lobby")
        t.write(b"\x1d")
        t.expect(b"telnet>")
        if how == "send synch":
            t.write(b"send synch\r")
        else:
            t.write(b"toggle autosynch\r")
            t.expect(b"Will send interrupt characters in urgent mode.")
            t.settle(0.2)
            t.ctrl_c()
        t.settle(0.3)
        t.write(b"after synch\r")
        assert n.expect(b"\r\n") == b"<guest1> after synch\r\n"
        n.send(b"nc still seen\n")
        t.expect(b"<guest2> nc still seen")
        assert_clean_stream(n.got)
    finally:
        t.stop()
        if n is not None:
            n.stop()


# ------------------------------------------------------------------ 2. two nc clients

@pytest.mark.parametrize("data, said", [(b"hello\n", b"hello"), (b"hello\r\n", b"hello"),
                                        (b"no newline", b"no newline")])
def test_one_shot_nc_sender_reaches_a_listening_nc(loop_chatd, data, said):
    """1. `nc -N` listens in #lobby, 2. `printf 'hello\\n' | nc -N 127.0.0.1 PORT`. Result: the
    listener gets the join, `<guest2> hello`, then `*** guest2 left #lobby (connection closed)`;
    the sender gets its welcome and roster and exits 0. A last line without newline counts."""
    need(NC, "nc")
    start_chat(loop_chatd)
    listener = NcClient(loop_chatd.port)
    sender = None
    try:
        listener.expect(b"*** #lobby: nobody else here\r\n")
        sender = subprocess.Popen([NC, "-N", HOST, str(loop_chatd.port)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  start_new_session=True)
        out, err = sender.communicate(data, timeout=TIMEOUT)
        assert sender.returncode == 0, err
        assert out == welcome(2) + b"*** #lobby: guest1\r\n"
        listener.expect(b"(connection closed)\r\n")
        assert listener.got == (welcome(1) + b"*** #lobby: nobody else here\r\n"
                                + b"*** guest2 joined #lobby\r\n"
                                + b"<guest2> " + said + b"\r\n"
                                + b"*** guest2 left #lobby (connection closed)\r\n")
        assert_clean_stream(listener.got)
        assert_clean_stream(out)
        listener.settle(0.2)
        assert listener.seen == len(listener.got), "more than expected"
        assert listener.close_and_wait() == 0
    finally:
        listener.stop()
        if sender is not None:
            stop_popen(sender)


# ------------------------------------------------------------------ 3. an example session

def test_example_session_nc_and_telnet(make_chatd, capsys):
    """A scripted two-terminal session for the README; `-s` prints its transcript."""
    need(TELNET, "telnet")
    need(NC, "nc")
    inst = make_chatd()
    inst.write_config(mode="chat", extra=CHAT + '[chat]\nmotd = "Be nice."\n')
    inst.start()
    nc_side: list[str] = []       # what the nc terminal shows: typed lines and received lines

    def nc_type(n: NcClient, text: str) -> None:
        nc_side.append(text)
        n.send(text.encode() + b"\n")

    def nc_sees(n: NcClient, want: bytes) -> None:
        got = n.expect(want)
        nc_side.extend(got.decode().splitlines())

    t = connected_telnet(inst.port)
    n = None
    try:
        start = t.out.index(b"Trying")
        t.expect(b"*** #lobby: nobody else here")
        n = NcClient(inst.port)
        nc_sees(n, b"*** #lobby: guest1\r\n")
        t.expect(b"*** guest2 joined #lobby")

        t.write(b"/nick alice\r")
        t.expect(b"*** guest1 is now known as alice")
        nc_sees(n, b"*** guest1 is now known as alice\r\n")
        nc_type(n, "/nick bob")
        nc_sees(n, b"*** guest2 is now known as bob\r\n")
        t.expect(b"*** guest2 is now known as bob")

        t.write(b"hi bob, I'm on telnet\r")
        nc_sees(n, b"<alice> hi bob, I'm on telnet\r\n")
        nc_type(n, "hi alice, nc here")
        t.expect(b"<bob> hi alice, nc here")
        nc_type(n, "/me waves")
        t.expect(b"* bob waves")
        t.write(b"/who\r")
        t.expect(b"*** #lobby: alice, bob")

        t.write(b"\x03")                                    # Ctrl-C in telnet: not frozen
        t.expect(b"^C")
        t.settle(0.3)
        nc_type(n, "still there?")
        t.expect(b"<bob> still there?")
        t.write(b"yes, Ctrl-C did not freeze me\r")
        nc_sees(n, b"<alice> yes, Ctrl-C did not freeze me\r\n")

        t.write(b"/msg bob psst\r")
        t.expect(b"-> *bob* psst")
        nc_sees(n, b"*alice* psst\r\n")
        nc_type(n, "/quit bye")
        assert n.close_and_wait() == 0
        nc_side.extend(n.got[n.seen:].decode().splitlines())
        t.expect(b'*** bob left #lobby (quit: "bye")')
        t.settle(0.2)

        screen = t.out[start:].decode().replace("\r", "")
        assert "^C<bob> still there?" in screen
        assert_clean_stream(n.got)
        with capsys.disabled():
            print("\n--- terminal 1: telnet 127.0.0.1 PORT ---")
            print("\n".join(line for line in screen.splitlines()))
            print("--- terminal 2: nc 127.0.0.1 PORT ---")
            print("\n".join(nc_side))
            print("--- end ---")
    finally:
        t.stop()
        if n is not None:
            n.stop()
