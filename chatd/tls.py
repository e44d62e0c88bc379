"""TLS listeners (README "Running it on the internet", "TLS"): the server's SSLContext, and
the nick a client's certificate names.

The context is built when the config is loaded (`config.load`), so `check-config`,
`start` and `restart` all report a missing, unreadable or malformed certificate or key,
a key that does not match its certificate, or a key every user may read, with the path
and OpenSSL's reason. At start that happens before the privilege drop (`[daemon] user`),
as whoever starts chatd; a restart runs as the dropped user and reads the files again.
The server hands the context of the config it serves to new connections; a TLS
connection keeps the context it was accepted with, so a restart that loads new files
changes nothing for those already connected.

Tests: tests/process/test_tls.py
"""

from __future__ import annotations

import asyncio.sslproto
import os
import re
import ssl
import stat
from typing import Any

from . import files
from .rooms import NICK_RE


# What asyncio's TLS layer reads at once, into a buffer of its own per connection: its default,
# 256 KiB, made an idle TLS client cost 280 KB on asyncio's loop (23 KB on uvloop). A socket
# holds little more than the 64 KiB receive buffer chatd asks for (connection.KERNEL_BUFFER).
ASYNCIO_READ_BYTES = 65536
# A certificate, key or CA file is read whole, in the event loop at a restart: a chain is a few
# KB, a CA bundle a few hundred; a 400 MB file stalled the loop 3.5 s and took 800 MB of RSS.
PEM_MAX = 16 << 20


class TlsError(ValueError):
    """A certificate, key or CA file chatd cannot use; `key` names the `[tls]` key at fault."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _read(key: str, path: str, marker: bytes, what: str) -> None:
    """Check that `path` is a readable regular file holding a PEM `what` (a FIFO there must
    not hang a restart, and OpenSSL's own "PEM lib" says neither which file nor what)."""
    try:
        text = files.read_regular(path, PEM_MAX)
    except OSError as e:
        raise TlsError(key, f"cannot read {path}: {e.strerror}") from None
    if marker not in text:
        raise TlsError(key, f"{path} holds no PEM {what} (no '-----BEGIN ...{marker.decode()}-----' line)")


def _why(e: OSError) -> str:
    """OpenSSL's reason for `e`, without the line of CPython's source it came from."""
    text = getattr(e, "reason", None) or e.strerror or str(e)
    return re.sub(r" \(_ssl\.c:\d+\)$", "", text)


def server_context(certificate: str, key: str, client_ca: str = "") -> ssl.SSLContext:
    """The context of a TLS listener: TLS 1.2 at least, no compression, no renegotiation;
    with `client_ca`, a certificate that CA signed is required of every client."""
    _read("key", key, b"PRIVATE KEY", "private key")
    mode = os.stat(key).st_mode
    if mode & stat.S_IROTH:
        raise TlsError("key", f"{key} may be read by every user (mode {stat.S_IMODE(mode):04o}); "
                              f"chmod o-r it")
    _read("certificate", certificate, b"CERTIFICATE", "certificate")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        ctx.load_cert_chain(certificate, key)
    except ssl.SSLError as e:
        raise TlsError("key", f"certificate {certificate} and key {key}: {_why(e)}") from None
    except OSError as e:
        raise TlsError("certificate", f"cannot load {e.filename or certificate}: {_why(e)}") from None
    if client_ca:
        _read("client_ca", client_ca, b"CERTIFICATE", "CA certificate")
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as e:
            raise TlsError("client_ca", f"cannot load {client_ca}: {_why(e)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def bound_asyncio_reads() -> None:
    """Make asyncio's TLS connections read into ASYNCIO_READ_BYTES (its class default, in this
    process: chatd makes every SSLProtocol there is); uvloop's TLS layer has its own."""
    asyncio.sslproto.SSLProtocol.max_size = ASYNCIO_READ_BYTES


def certificate_nick(transport: Any) -> str:
    """The subject CN of the client's verified certificate when it is a valid nick, else ""
    (no client certificate was asked for, or its CN cannot be a nick)."""
    cert = transport.get_extra_info("peercert")
    if not cert:
        return ""
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            if name == "commonName" and NICK_RE.fullmatch(value):
                return value
    return ""
