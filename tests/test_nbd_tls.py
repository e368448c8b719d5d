"""``addcow serve`` with TLS: real clients in, the wrong ones kept out.

Certificates are made with ``openssl`` (``tls_util.make_certs``): a CA, the
server's (CN and SAN localhost, 127.0.0.1), a client's, a client from another
CA, an expired client. Clients: nbdinfo, nbdcopy and nbdsh with ``nbds://`` URIs and
``tls-certificates=``; qemu-img and qemu-io with ``tls-creds-x509`` (QEMU
checks the server's certificate against the host name); and a raw socket for
what no well-behaved client does. After each refusal the same server must go
on serving a good client.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER, pattern, require_tool, run
from conftest import addcow as addcow_cli
from nbd_util import ADDCOW, IHAVEOPT, TCPRawClient, TCPServer, env_with_addcow, served_tcp
from tls_util import TLSRawClient, client_context, fingerprint, make_certs

import addcow
from addcow.nbd import wire

SIZE = 64 * CLUSTER
OPT_STARTTLS, OPT_GO, OPT_INFO, OPT_ABORT, OPT_EXPORT_NAME = 5, 7, 6, 2, 1
OPT_REPLY_MAGIC = 0x3E889045565A9


# -- certificates (made with openssl by tls_util) ----------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Credential directories: srv (the server), cli, other (another CA), expired, nocert."""
    return make_certs(tmp_path_factory.mktemp("certs"))


# -- the image ---------------------------------------------------------------------------


@pytest.fixture
def image(tmp_path: Path) -> Path:
    base = tmp_path / "base.raw"
    base.write_bytes(b"".join(pattern(0x30 + c, CLUSTER) for c in range(SIZE // CLUSTER)))
    path = tmp_path / "d.add-cow"
    addcow.create(path, image_file="d.raw", backing_file="base.raw", backing_format="raw")
    with addcow.open(path) as img:
        img.write(pattern(0xA5, CLUSTER), 2 * CLUSTER)
    return path


def content(path: Path) -> bytes:
    with addcow.open(path, readonly=True, force_share=True) as img:
        return img.read(0, img.size)


def tls_uri(srv: TCPServer, creds: Path) -> str:
    return f"nbds://localhost:{srv.port}/?tls-certificates={creds}"


@pytest.fixture
def tls_server(
    tmp_path: Path, image: Path, certs: dict[str, Path], request: pytest.FixtureRequest
) -> Iterator[TCPServer]:
    extra = tuple(getattr(request, "param", ()))
    with served_tcp(tmp_path, image, args=("--tls-creds", str(certs["srv"]), *extra)) as srv:
        yield srv


def nbdinfo_size(uri: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("nbdinfo"), "--size", uri], capture_output=True,
                          text=True, timeout=60)  # fmt: skip


def a_good_client_is_still_served(srv: TCPServer, certs: dict[str, Path]) -> None:
    proc = nbdinfo_size(tls_uri(srv, certs["client"]))
    assert proc.returncode == 0 and proc.stdout.strip() == str(SIZE), proc.stderr


# -- real clients through TLS ------------------------------------------------------------


@pytest.mark.parametrize("tls_server", [("--tls-verify-peer",)], indirect=True)
def test_libnbd_clients_read_and_write_through_tls(
    serve_loop: str, tls_server: TCPServer, certs: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    uri = tls_uri(tls_server, certs["client"])
    assert tls_server.uri == f"nbds://127.0.0.1:{tls_server.port}/"
    a_good_client_is_still_served(tls_server, certs)
    out = run([require_tool("nbdinfo"), "--map", uri]).stdout
    assert out.strip(), "nbdinfo --map answered through TLS"
    copy = tmp_path / "copy.raw"
    run([require_tool("nbdcopy"), uri, str(copy)])
    assert copy.read_bytes() == content(image)
    nbdsh = require_tool("nbdsh")
    script = (
        f"h.set_uri_allow_local_file(True); h.connect_uri({uri!r}); "
        f"h.pwrite(b'\\x5e' * 8192, 5 * {CLUSTER} + 100); h.flush(); "
        f"print(h.pread(8192, 5 * {CLUSTER} + 100) == b'\\x5e' * 8192, h.get_size())"
    )
    env = env_with_addcow()
    env["PATH"] = f"{os.path.dirname(nbdsh)}{os.pathsep}{env['PATH']}"
    proc = subprocess.run([nbdsh, "-c", script], capture_output=True, text=True, timeout=60,
                          env=env)  # fmt: skip
    assert proc.stdout.split() == ["True", str(SIZE)], proc.stderr
    assert content(image)[5 * CLUSTER + 100 : 5 * CLUSTER + 8292] == b"\x5e" * 8192
    log = tls_server.stderr()
    assert "TLS started (TLSv1.3), client CN=client.example.com,O=Example Org" in log
    assert f"event loop: {serve_loop}" in log  # serve_loop is set up before the server


@pytest.mark.parametrize("tls_server", [("--tls-verify-peer",)], indirect=True)
def test_qemu_reads_and_writes_through_tls(
    tls_server: TCPServer, certs: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    obj = f"tls-creds-x509,id=tls0,dir={certs['client']},endpoint=client"
    opts = f"driver=raw,file.driver=nbd,file.host=localhost,file.port={tls_server.port}," \
           "file.tls-creds=tls0"  # fmt: skip
    run([require_tool("qemu-io"), "--object", obj, "--image-opts", opts,
         "-c", f"write -P 0x6b {7 * CLUSTER + 512} 4096", "-c", "flush"])  # fmt: skip
    expected = bytearray(content(image))
    assert expected[7 * CLUSTER + 512 : 7 * CLUSTER + 4608] == b"\x6b" * 4096
    out = tmp_path / "out.raw"
    run([require_tool("qemu-img"), "convert", "--object", obj, "--image-opts", opts,
         "-O", "raw", str(out)])  # fmt: skip
    assert out.read_bytes() == bytes(expected)


def test_tls_on_serves_plain_and_tls_clients(
    tmp_path: Path, image: Path, certs: dict[str, Path]
) -> None:
    with served_tcp(tmp_path, image, args=("--tls", "on", "--tls-creds", str(certs["srv"]))) as srv:
        assert srv.uri.startswith("nbd://")
        plain = nbdinfo_size(f"nbd://127.0.0.1:{srv.port}/")
        assert plain.returncode == 0 and plain.stdout.strip() == str(SIZE), plain.stderr
        a_good_client_is_still_served(srv, certs)


@pytest.mark.parametrize("mode", ["require", "on"])
def test_status_names_the_uri_of_the_ready_line(
    tmp_path: Path, image: Path, certs: dict[str, Path], mode: str
) -> None:
    """A client must use nbds:// when TLS is required, nbd:// when it is only offered:
    the ready line, ``addcow status`` and its JSON ``uris`` say the same, on TCP and
    on a Unix socket."""
    control, sock = tmp_path / "ctl", tmp_path / "nbd.sock"
    tls = ("--tls", mode, "--tls-creds", str(certs["srv"]), "--control", str(control))
    scheme = "nbds" if mode == "require" else "nbd"
    with served_tcp(tmp_path, image, args=tls) as srv:
        assert srv.uri == f"{scheme}://127.0.0.1:{srv.port}/"
        status = json.loads(addcow_cli("status", "--output=json", control).stdout)
        assert status["server"]["uris"] == [srv.uri]
        assert f" on {srv.uri}, TLS {mode}," in addcow_cli("status", control).stdout
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--socket", str(sock), *tls, str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_addcow(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip().rsplit(" on ", 1)[1]
        assert uri == f"{scheme}+unix:///?socket={sock}"
        status = json.loads(addcow_cli("status", "--output=json", control).stdout)
        assert status["server"]["uris"] == [uri]
        assert f" on {uri}, TLS {mode}," in addcow_cli("status", control).stdout
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err


# -- refusals ----------------------------------------------------------------------------


def test_a_plain_client_gets_tls_required_and_nothing_is_served(
    tls_server: TCPServer, certs: dict[str, Path]
) -> None:
    proc = nbdinfo_size(f"nbd://127.0.0.1:{tls_server.port}/")
    assert proc.returncode != 0
    assert "requires TLS" in proc.stderr
    with TCPRawClient(tls_server.port) as c:
        c.greeting()
        c.client_flags()
        # "If the server receives any other option, including NBD_OPT_INFO and
        # unsupported options, it MUST reply with NBD_REP_ERR_TLS_REQD"
        for option in (OPT_INFO, OPT_GO, 8, 9, 4242):
            payload = struct.pack(">I", 0) + struct.pack(">H", 0)
            c.option(option, payload if option in (OPT_INFO, OPT_GO) else b"")
            got, reply, data = c.option_reply()
            assert (got, reply) == (option, wire.REP_ERR_TLS_REQD), (option, reply, data)
        # "it MUST terminate the session" on EXPORT_NAME before TLS
        c.option(OPT_EXPORT_NAME, b"")
        assert c.closed_by_server()
    with TCPRawClient(tls_server.port) as c:
        c.greeting()
        c.client_flags()
        c.option(OPT_ABORT)  # ABORT is honoured before TLS
        assert c.option_reply()[:2] == (OPT_ABORT, wire.REP_ACK)
    a_good_client_is_still_served(tls_server, certs)


@pytest.mark.parametrize("tls_server", [("--tls-verify-peer",)], indirect=True)
@pytest.mark.parametrize("who", ["other", "expired", "nocert"])
def test_a_client_the_ca_does_not_vouch_for_is_refused(
    tls_server: TCPServer, certs: dict[str, Path], who: str
) -> None:
    proc = nbdinfo_size(tls_uri(tls_server, certs[who]))
    assert proc.returncode != 0, proc.stdout
    assert tls_server.logged("TLS handshake failed"), tls_server.stderr()
    a_good_client_is_still_served(tls_server, certs)


def test_the_allow_list_by_name_and_by_fingerprint(
    tmp_path: Path, image: Path, certs: dict[str, Path]
) -> None:
    client_fp = fingerprint(certs["client"] / "client-cert.pem")
    colons = ":".join(client_fp[i : i + 2] for i in range(0, 64, 2)).upper()
    for allowed, ok in (("CN=client.example.com,O=Example Org", True),
                        (f"sha256:{colons}", True),
                        ("CN=someone.else,O=Example Org", False),
                        (f"sha256:{'00' * 32}", False)):  # fmt: skip
        args = ("--tls-creds", str(certs["srv"]), "--tls-authz", allowed)
        with served_tcp(tmp_path, image, args=args) as srv:
            proc = nbdinfo_size(tls_uri(srv, certs["client"]))
            assert (proc.returncode == 0) is ok, (allowed, proc.stderr)
            if not ok:
                assert srv.logged("is not on the --tls-authz list"), srv.stderr()


def test_garbage_instead_of_a_handshake_and_data_after_starttls(
    tls_server: TCPServer, certs: dict[str, Path]
) -> None:
    with TCPRawClient(tls_server.port) as c:
        c.greeting()
        c.client_flags()
        c.option(OPT_STARTTLS)
        assert c.option_reply()[:2] == (OPT_STARTTLS, wire.REP_ACK)
        c.sock.sendall(b"this is not a TLS ClientHello" * 10)
        assert c.closed_by_server()
    with TCPRawClient(tls_server.port) as c:
        c.greeting()
        c.client_flags()
        # STARTTLS and, before its ACK, another option in clear: refused, closed.
        header = struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0)
        c.sock.sendall(header + struct.pack(">QII", IHAVEOPT, 8, 0))
        assert c.closed_by_server()
    assert tls_server.logged("data after NBD_OPT_STARTTLS before the TLS handshake")
    a_good_client_is_still_served(tls_server, certs)


def test_negotiation_before_tls_is_forgotten(tls_server: TCPServer, certs: dict[str, Path]) -> None:
    """A TLS client that asks for structured replies after the handshake gets them; the
    server's protocol state from before STARTTLS is not kept (protocol tests check
    that it is cleared); here a real TLS session runs through, python's ssl as client."""
    context = ssl.create_default_context(cafile=str(certs["client"] / "ca-cert.pem"))
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        raw.recv(18)
        raw.sendall(struct.pack(">I", 3))
        raw.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
        _magic, option, reply, length = struct.unpack(">QIII", raw.recv(20))
        assert (option, reply, length) == (OPT_STARTTLS, wire.REP_ACK, 0)
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
            _m, option, reply, length = struct.unpack(">QIII", tls.recv(20))
            message = tls.recv(length) if length else b""
            # "If the server receives NBD_OPT_STARTTLS when TLS has already been
            # negotiated, it MUST reply with NBD_REP_ERR_INVALID."
            assert (option, reply) == (OPT_STARTTLS, wire.REP_ERR_INVALID), message
    a_good_client_is_still_served(tls_server, certs)


# -- configuration -----------------------------------------------------------------------


def test_tls_configuration_mistakes_are_one_line(
    tmp_path: Path, image: Path, certs: dict[str, Path]
) -> None:
    a_file = tmp_path / "creds.pem"
    a_file.write_text("")
    cases = [
        (("--tls", "require"), "--tls=require needs --tls-creds DIR"),
        (("--tls-creds", str(tmp_path / "nowhere")), "TLS credentials directory not found"),
        (("--tls-creds", str(a_file)), f"{a_file}: is a regular file, not a directory"),
        (("--tls-creds", str(certs["client"])), "server-cert.pem: not found"),
        (("--tls-creds", str(certs["srv"]), "--tls-authz", "nobody"),
         "invalid --tls-authz 'nobody'"),
        (("--tls", "off", "--tls-creds", str(certs["srv"])), "--tls=off cannot be combined"),
        (("--allow-readable-key",), "--tls=off cannot be combined"),
        (("--tls-psk", str(tmp_path / "keys.psk")), "--tls-psk needs Python 3.13 or later"),
    ]  # fmt: skip
    for args, message in cases:
        proc = addcow_cli("serve", "--foreground", "--port", "0", *args, image, check=False)
        assert proc.returncode == 1, (args, proc.stderr)
        lines = proc.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("addcow: ") and message in lines[0], args


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_a_private_key_others_may_read_is_refused_unless_allowed(
    tmp_path: Path, image: Path, certs: dict[str, Path], mode: int
) -> None:
    """As ssh and PostgreSQL treat a private key: group or other bits refuse the start,
    with one line naming the key, its mode and the fix; --allow-readable-key serves."""
    creds = tmp_path / "creds"
    creds.mkdir()
    for name in ("server-cert.pem", "server-key.pem", "ca-cert.pem"):
        (creds / name).write_bytes((certs["srv"] / name).read_bytes())
    key = creds / "server-key.pem"
    key.chmod(mode)
    proc = subprocess.run(
        [ADDCOW, "serve", "--foreground", "--port", "0", "--tls-creds", str(creds), str(image)],
        capture_output=True, text=True, timeout=30, env=env_with_addcow(),
    )  # fmt: skip
    assert (proc.returncode, proc.stderr, proc.stdout) == (
        1, f"addcow: {key}: the private key has mode {mode:04o}, open to group or others: "
        f"chmod 600 {key} (or give --allow-readable-key)\n", "",
    )  # fmt: skip
    assert key.stat().st_mode & 0o777 == mode  # told, not changed
    args = ("--tls-creds", str(creds), "--allow-readable-key")
    with served_tcp(tmp_path, image, args=args) as srv:
        a_good_client_is_still_served(srv, certs)
    key.chmod(0o600)
    with served_tcp(tmp_path, image, args=("--tls-creds", str(creds))) as srv:
        a_good_client_is_still_served(srv, certs)


def test_a_writable_export_on_every_address_is_served_with_tls(
    image: Path, certs: dict[str, Path]
) -> None:
    proc = subprocess.Popen(
        [ADDCOW, "serve", "--foreground", "--bind", "0.0.0.0", "--port", "0",
         "--tls-creds", str(certs["srv"]), "--tls-verify-peer", str(image)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_addcow(),
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("addcow: serving ") and " on nbds://0.0.0.0:" in line, line
    finally:
        proc.terminate()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "INSECURE" not in err and "without TLS" not in err, err


# -- connection limits and closing -------------------------------------------------------


def server_sockets(pid: int) -> int:
    count = 0
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed while listing
            count += os.readlink(f"/proc/{pid}/fd/{name}").startswith("socket:")
    return count


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_shared_1_makes_the_second_client_wait_for_the_first(
    tmp_path: Path, image: Path, certs: dict[str, Path], tls: bool
) -> None:
    """With ``--shared 1`` a second client is not refused: it waits for its turn."""
    args = ("--shared", "1", *(("--tls-creds", str(certs["srv"])) if tls else ()))
    with served_tcp(tmp_path, image, args=args) as srv:
        if tls:
            first: TCPRawClient | TLSRawClient = TLSRawClient(srv.port, client_context(
                certs["client"]), timeout=30)
            uri = tls_uri(srv, certs["client"])
        else:
            first = TCPRawClient(srv.port, timeout=30)
            uri = f"nbd://127.0.0.1:{srv.port}/"
        with first:
            first.start()
            assert first.read(0, CLUSTER, cookie=1) == content(image)[:CLUSTER]
            second = subprocess.Popen([require_tool("nbdinfo"), "--size", uri],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                assert srv.logged("waits: already 1 connections (--shared)", timeout=30), \
                    srv.stderr()
                # It waits (no greeting yet, so it cannot fail) while the first is served.
                deadline = time.monotonic() + 1.0
                while time.monotonic() < deadline:
                    assert second.poll() is None, second.communicate()
                    time.sleep(0.05)
                assert first.read(3 * CLUSTER, CLUSTER, cookie=2) == \
                    content(image)[3 * CLUSTER : 4 * CLUSTER]
                assert second.poll() is None, second.communicate()
                first.request(2, cookie=3)  # NBD_CMD_DISC: the first one leaves
                out, err = second.communicate(timeout=30)
            finally:
                if second.poll() is None:
                    second.kill()
                    second.communicate()
        assert second.returncode == 0 and out.strip() == str(SIZE), err
        log = srv.stderr()
        assert log.count("waits: already 1 connections (--shared)") == 1, log
        assert "refused: still" not in log, log


def test_a_tls_client_that_aborts_with_data_in_flight_is_closed_promptly(
    tls_server: TCPServer, certs: dict[str, Path]
) -> None:
    """NBD_OPT_ABORT inside TLS followed by more data than the server reads: the
    server acknowledges, then closes the connection and releases its socket
    promptly, as it does without TLS, though the client sends no close_notify."""
    pid = tls_server.proc.pid
    quiet = server_sockets(pid)
    context = client_context(certs["client"])
    with socket.create_connection(("127.0.0.1", tls_server.port), timeout=10) as raw:
        raw.recv(18)
        raw.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, OPT_STARTTLS, 0))
        assert struct.unpack(">QIII", raw.recv(20))[1:3] == (OPT_STARTTLS, wire.REP_ACK)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(1 << 16))
        raw.sendall(outgoing.read())
        tls.write(struct.pack(">QII", IHAVEOPT, OPT_ABORT, 0) + bytes(1 << 20))
        raw.setblocking(False)
        data = outgoing.read()
        try:
            while data:
                data = data[raw.send(data) :]
        except BlockingIOError:
            pass  # the server stopped reading: the rest stays unsent
        raw.setblocking(True)
        raw.settimeout(5)
        closed = True
        try:
            while chunk := raw.recv(1 << 16):  # the ACK, then the end of the connection
                incoming.write(chunk)
        except ConnectionResetError:
            pass  # closed with the client's data unread: a reset ends it too
        except TimeoutError:
            closed = False
        reply = b""
        with contextlib.suppress(ssl.SSLError):  # the reply, then possibly a cut record
            reply = tls.read(20)
    assert struct.unpack(">QIII", reply) == (OPT_REPLY_MAGIC, OPT_ABORT, wire.REP_ACK, 0), reply
    deadline = time.monotonic() + 5
    while server_sockets(pid) > quiet and time.monotonic() < deadline:
        time.sleep(0.05)
    released = server_sockets(pid) <= quiet
    assert closed and released, (
        f"after NBD_OPT_ABORT with data in flight: connection closed by the server "
        f"within 5 s: {closed}; socket released within 5 s of the client closing: {released}"
    )
    a_good_client_is_still_served(tls_server, certs)
