"""TLS helpers shared by the NBD tests: certificates made with ``openssl``, TLS clients.

``make_certs(work)`` builds, under ``work``, a CA, the server's certificate (CN
and SAN localhost, 127.0.0.1), a client's, a client of another CA and an
expired client, and returns credential directories laid out as qemu's
``tls-creds-x509`` and libnbd's ``tls-certificates=`` expect: ``srv`` (for
``addcow serve --tls-creds``), ``client``, ``other``, ``expired`` and
``nocert`` (the CA only); the private keys in them are mode 0600, as
``addcow serve`` wants its own. ``openssl`` missing is a failure (``require_tool``).

``client_context`` is a Python client context trusting the test CA;
``starttls`` does NBD's STARTTLS in clear on a TCP socket; ``TLSRawClient``
is :class:`nbd_util.RawClient` inside a TLS session.
"""

from __future__ import annotations

import hashlib
import socket
import ssl
import struct
from pathlib import Path

from conftest import require_tool, run
from nbd_util import IHAVEOPT, NBDMAGIC, OPT_REPLY_MAGIC, RawClient

OPT_STARTTLS = 5
REP_ACK = 1


def _openssl(*args: str | Path, cwd: Path) -> None:
    run([require_tool("openssl"), *map(str, args)], cwd=cwd)


def _key_and_csr(where: Path, name: str, subject: str) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-subj", subject, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", cwd=where)


def _ca(where: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-days", "30", "-subj", f"/CN={name}", "-keyout", f"{name}-key.pem",
             "-out", f"{name}.pem", cwd=where)  # fmt: skip


def _sign(where: Path, ca: str, name: str, ext: str, *, expired: bool = False) -> None:
    (where / f"{name}.ext").write_text(ext)
    if not expired:
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey",
                 f"{ca}-key.pem", "-CAcreateserial", "-days", "30", "-extfile", f"{name}.ext",
                 "-out", f"{name}-cert.pem", cwd=where)  # fmt: skip
        return
    # openssl ca can give a certificate validity in the past.
    db = where / f"{ca}-db"
    db.mkdir(exist_ok=True)
    (db / "index.txt").write_text("")
    (db / "serial").write_text("1000\n")
    (where / f"{ca}.cnf").write_text(
        f"[ca]\ndefault_ca=d\n[d]\ndir={db}\ndatabase=$dir/index.txt\nserial=$dir/serial\n"
        f"new_certs_dir=$dir\ndefault_md=sha256\npolicy=p\nunique_subject=no\n"
        f"[p]\ncommonName=supplied\norganizationName=optional\n"
    )
    _openssl("ca", "-batch", "-config", f"{ca}.cnf", "-cert", f"{ca}.pem", "-keyfile",
             f"{ca}-key.pem", "-in", f"{name}.csr", "-startdate", "20200101000000Z",
             "-enddate", "20200201000000Z", "-extfile", f"{name}.ext",
             "-out", f"{name}-cert.pem", cwd=where)  # fmt: skip


def make_certs(work: Path) -> dict[str, Path]:
    """Credential directories: srv (the server), cli, other (another CA), expired, nocert."""
    _ca(work, "ca")
    _ca(work, "otherca")
    _key_and_csr(work, "server", "/O=Example Org/CN=localhost")
    _sign(work, "ca", "server", "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                               "extendedKeyUsage=serverAuth\n")  # fmt: skip
    for name, ca, cn, expired in (("client", "ca", "client.example.com", False),
                                  ("other", "otherca", "client.example.com", False),
                                  ("expired", "ca", "old.example.com", True)):  # fmt: skip
        _key_and_csr(work, name, f"/O=Example Org/CN={cn}")
        _sign(work, ca, name, "extendedKeyUsage=clientAuth\n", expired=expired)
    dirs: dict[str, Path] = {}
    srv = work / "srv"
    srv.mkdir()
    for src, dst in (("ca.pem", "ca-cert.pem"), ("server-cert.pem", "server-cert.pem"),
                     ("server-key.pem", "server-key.pem")):  # fmt: skip
        _copy(work / src, srv / dst)
    dirs["srv"] = srv
    for name in ("client", "other", "expired", "nocert"):
        d = work / name
        d.mkdir()
        _copy(work / "ca.pem", d / "ca-cert.pem")
        if name != "nocert":
            _copy(work / f"{name}-cert.pem", d / "client-cert.pem")
            _copy(work / f"{name}-key.pem", d / "client-key.pem")
        dirs[name] = d
    return dirs


def _copy(src: Path, dst: Path) -> None:
    """Copy a credential; a private key (``*-key.pem``) is made private to its owner."""
    dst.write_bytes(src.read_bytes())
    if dst.name.endswith("-key.pem"):
        dst.chmod(0o600)


def fingerprint(cert: Path) -> str:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()


def client_context(creds: Path) -> ssl.SSLContext:
    """A client context trusting the CA of ``creds``, presenting its certificate if any."""
    context = ssl.create_default_context(cafile=str(creds / "ca-cert.pem"))
    if (creds / "client-cert.pem").exists():
        context.load_cert_chain(creds / "client-cert.pem", creds / "client-key.pem")
    return context


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def starttls(sock: socket.socket, flags: int = 3) -> None:
    """Greeting, client flags and NBD_OPT_STARTTLS in clear, up to the server's ACK."""
    magic, opt, _flags = struct.unpack(">QQH", recv_exact(sock, 18))
    if (magic, opt) != (NBDMAGIC, IHAVEOPT):
        raise AssertionError(f"bad greeting {magic:#x} {opt:#x}")
    sock.sendall(struct.pack(">I", flags) + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
    magic, option, reply, length = struct.unpack(">QIII", recv_exact(sock, 20))
    data = recv_exact(sock, length)
    if (magic, option, reply) != (OPT_REPLY_MAGIC, OPT_STARTTLS, REP_ACK):
        raise AssertionError(f"STARTTLS not acknowledged: {option} {reply:#x} {data!r}")


class TLSRawClient(RawClient):
    """:class:`RawClient` over TLS to 127.0.0.1: STARTTLS, then the handshake.

    The greeting and the client flags were exchanged in clear, so
    :meth:`start` goes straight to the options, inside TLS.
    """

    def __init__(self, port: int, context: ssl.SSLContext, timeout: float = 10) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        try:
            starttls(raw)
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    def greeting(self) -> int:
        """Nothing: the greeting came in clear, before STARTTLS."""
        return 0

    def client_flags(self, flags: int = 3) -> None:
        """Nothing: the client flags went in clear, before STARTTLS."""
