"""TLS for ``addcow serve``: credentials, the client's identity, who may connect.

Credentials
    A directory laid out as qemu-nbd's ``tls-creds-x509`` and nbdkit's
    ``--tls-certificates`` expect: ``server-cert.pem`` and ``server-key.pem``
    (required), ``ca-cert.pem`` (required to check clients), ``ca-crl.pem``
    (optional: certificates it revokes are refused). :func:`load_credentials`
    turns it into a server :class:`ssl.SSLContext` offering TLS 1.2 and 1.3
    only ("Implementations MUST support TLS 1.2", proto.md; older versions are
    not enabled). A private key that users other than its owner may access
    (any group or other bit in its mode, as ssh and PostgreSQL judge a key)
    is refused unless the caller allows it (``--allow-readable-key``).

Modes (proto.md, "Server-side requirements")
    ``require`` is FORCEDTLS: every option but STARTTLS and ABORT is refused
    with ``NBD_REP_ERR_TLS_REQD`` until TLS is up, so nothing is served in
    clear. ``on`` offers STARTTLS to clients that ask and serves others in
    clear (SELECTIVETLS with no TLS-only export). The protocol side is
    :class:`~addcow.nbd.connection.ServerConnection`; the handshake itself runs in
    :mod:`addcow.serve.server` on the connection's stream.

Who may connect
    With ``verify_peer`` the client must present a certificate signed by the
    CA. With an allow list (``--tls-authz``) its identity must also be on it,
    as one of: its subject distinguished name in RFC 4514 order (most specific
    first, ``CN=client.example.com,O=Example Org,C=GB``: the order of QEMU's
    ``authz-simple`` identities), or the SHA-256 fingerprint of its
    certificate (``sha256:`` and 64 hex digits, colons allowed). A client not
    on the list is disconnected after the handshake, with one log line naming
    it; the server goes on serving everyone else.
"""

from __future__ import annotations

import hashlib
import os
import re
import ssl
import stat
from dataclasses import dataclass, field

from .. import sysio
from ..errors import AddCowError

SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CA_CERT = "ca-cert.pem"
CA_CRL = "ca-crl.pem"

HANDSHAKE_TIMEOUT = 10.0
"""Seconds a client has to finish the TLS handshake after STARTTLS."""

_SHORT_NAMES = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
    "emailAddress": "EMAIL",
}
"""Attribute names as RFC 4514 (and GnuTLS, for emailAddress) spell them."""

_FINGERPRINT = re.compile(r"sha256:([0-9a-f]{2}(?::?[0-9a-f]{2}){31})", re.I)


class TLSConfigError(AddCowError):
    """The TLS credentials or the allow list cannot be used."""


@dataclass(frozen=True)
class Identity:
    """Who a client's certificate says it is (empty when it sent none)."""

    dn: str = ""
    fingerprint: str = ""

    def __str__(self) -> str:
        if not self.fingerprint:
            return "no client certificate"
        return f"{self.dn or '(empty subject)'} (sha256:{self.fingerprint})"


@dataclass(frozen=True)
class TLSConfig:
    """What the server needs to run TLS: the mode, the context, the allow list."""

    mode: str
    context: ssl.SSLContext
    verify_peer: bool = False
    allowed: frozenset[str] = field(default_factory=frozenset)
    handshake_timeout: float = HANDSHAKE_TIMEOUT

    def allows(self, identity: Identity) -> bool:
        """Whether a client with ``identity`` may go on (after a good handshake)."""
        if not self.allowed:
            return True
        return identity.dn in self.allowed or f"sha256:{identity.fingerprint}" in self.allowed


def load_credentials(
    directory: str, *, verify_peer: bool, allow_readable_key: bool = False
) -> ssl.SSLContext:
    """A server context from a qemu-nbd style credentials directory.

    ``server-key.pem`` must be private to its owner (mode 0600 or less)
    unless ``allow_readable_key``.
    """
    try:
        kind = sysio.file_kind(os.stat(directory).st_mode)
    except OSError:
        raise TLSConfigError(f"{directory}: TLS credentials directory not found") from None
    if kind != "a directory":
        raise TLSConfigError(
            f"{directory}: is {kind}, not a directory (the TLS credentials directory)"
        )
    cert, key = os.path.join(directory, SERVER_CERT), os.path.join(directory, SERVER_KEY)
    for path in (cert, key):
        if not os.path.isfile(path):
            raise TLSConfigError(f"{path}: not found (the TLS credentials need it)")
    mode = stat.S_IMODE(os.stat(key).st_mode)
    if mode & 0o077 and not allow_readable_key:
        raise TLSConfigError(
            f"{key}: the private key has mode {mode:04o}, open to group or others: "
            f"chmod 600 {key} (or give --allow-readable-key)"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # qemu-nbd and other clients may close without a TLS close_notify after
    # NBD_CMD_DISC: that is an end of stream, not an attack on this server.
    context.options |= getattr(ssl, "OP_IGNORE_UNEXPECTED_EOF", 0)
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError) as exc:
        raise TLSConfigError(f"{cert}, {key}: cannot load the server certificate: {exc}") from exc
    if verify_peer:
        ca = os.path.join(directory, CA_CERT)
        if not os.path.isfile(ca):
            raise TLSConfigError(f"{ca}: not found (checking client certificates needs it)")
        try:
            context.load_verify_locations(cafile=ca)
            crl = os.path.join(directory, CA_CRL)
            if os.path.isfile(crl):
                context.load_verify_locations(cafile=crl)
                context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        except (ssl.SSLError, OSError) as exc:
            raise TLSConfigError(f"{ca}: cannot load the CA: {exc}") from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def parse_allowed(entries: list[str]) -> frozenset[str]:
    """The allow list: distinguished names as given, fingerprints normalised."""
    allowed: set[str] = set()
    for entry in entries:
        text = entry.strip()
        match = _FINGERPRINT.fullmatch(text)
        if match:
            allowed.add("sha256:" + match.group(1).replace(":", "").lower())
        elif text.lower().startswith("sha256:"):
            raise TLSConfigError(
                f"invalid --tls-authz {entry!r}: expected sha256: and 64 hex digits"
            )
        elif "=" not in text:
            raise TLSConfigError(
                f"invalid --tls-authz {entry!r}: expected a distinguished name (CN=...,O=...) "
                "or sha256:FINGERPRINT"
            )
        else:
            allowed.add(text)
    return frozenset(allowed)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> Identity:
    """The identity of the client at the other end of ``ssl_object``."""
    if ssl_object is None:
        return Identity()
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return Identity()
    decoded = ssl_object.getpeercert()
    subject = decoded.get("subject", ()) if decoded else ()
    return Identity(rfc4514(subject), hashlib.sha256(der).hexdigest())


def rfc4514(subject: object) -> str:
    """A subject from :meth:`ssl.SSLSocket.getpeercert` as an RFC 4514 string.

    The subject is a tuple of RDNs, each a tuple of (attribute, value) pairs,
    in the certificate's order; RFC 4514 writes them the other way round.
    """
    if not isinstance(subject, tuple):
        return ""
    rdns = []
    for rdn in reversed(subject):
        rdns.append(
            "+".join(f"{_SHORT_NAMES.get(str(k), str(k))}={_escape(str(v))}" for k, v in rdn)
        )
    return ",".join(rdns)


def _escape(value: str) -> str:
    out = re.sub(r'([,+"\\<>;])', r"\\\1", value)
    if out.startswith(("#", " ")):
        out = "\\" + out
    if out.endswith(" "):
        out = out[:-1] + "\\ "
    return out
