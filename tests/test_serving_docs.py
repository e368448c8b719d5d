"""docs/serving.md as written: its systemd units and its openssl recipe.

The socket-activated ``.service``'s ``ExecStart`` line is taken from the
document, its paths pointed at a temporary folder, and started the way
systemd would start it: with the listening socket of the ``.socket`` unit on
fd 3. nbdinfo and qemu-io use the disk, ``addcow status`` reads the control
socket the unit names, and SIGTERM (the unit's ``KillSignal``) stops it cleanly.

The TLS credentials recipe runs in a temporary folder; addcow serves with the
server's directory it makes, and nbdinfo and qemu-img connect with its
client's, let in by ``--tls-authz``.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from conftest import addcow as addcow_cli
from conftest import require_tool
from nbd_util import BIN, env_with_addcow, served_tcp

import addcow

DOC = Path(__file__).parent.parent / "docs" / "serving.md"
MiB = 1 << 20


def unit(name: str) -> dict[str, str]:
    """The ``Key=value`` lines of the unit whose block starts with ``# .../name``."""
    for block in re.findall(r"```ini\n(.*?)```", DOC.read_text(), re.S):
        first, _, body = block.partition("\n")
        if first.endswith(f"/{name}"):
            return dict(
                line.split("=", 1) for line in body.splitlines() if "=" in line and line[0] != "#"
            )
    raise AssertionError(f"{name} is not in {DOC}")


def test_the_socket_activated_unit_of_the_docs(tmp_path: Path) -> None:
    socket_unit = unit("addcow-vm1.socket")
    service = unit("addcow-vm1.service")
    assert socket_unit["ListenStream"] == "/run/addcow/vm1.sock"
    assert service["KillSignal"] == "SIGTERM" and service["Requires"] == "addcow-vm1.socket"
    base = tmp_path / "golden.raw"
    base.write_bytes(bytes(range(256)) * (16 * MiB // 256))
    image = tmp_path / "vm1.add-cow"
    addcow.create(image, image_file="vm1.raw", backing_file=base, backing_format="raw")
    argv = [
        arg.replace("/var/lib/addcow", str(tmp_path)).replace("/run/addcow", str(tmp_path))
        for arg in shlex.split(service["ExecStart"])
    ]
    assert argv[0] == "/usr/local/bin/addcow"
    argv[0] = str(BIN / "addcow")
    sock, control = tmp_path / "vm1.sock", tmp_path / "vm1.control"
    proc = subprocess.Popen(
        [require_tool("systemd-socket-activate"), "-l", str(sock), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env_with_addcow(),
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():
            assert time.monotonic() < deadline, "the socket never appeared"
            time.sleep(0.02)
        uri = f"nbd+unix:///?socket={sock}"
        size = subprocess.run([require_tool("nbdinfo"), "--size", uri], capture_output=True,
                              text=True, timeout=60)  # fmt: skip
        assert size.stdout.strip() == str(16 * MiB), size.stderr
        qemu_io = subprocess.run(
            [require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x61 0 64k", "-c",
             "read -P 0x61 0 64k", uri], capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert qemu_io.returncode == 0 and "failed" not in qemu_io.stdout, qemu_io.stdout
        # The unit streams and detaches: the control socket it names shows it finish.
        deadline = time.monotonic() + 60
        while True:
            status = json.loads(addcow_cli("status", "--output=json", control).stdout)
            if status["exports"][0]["detached"]:
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.1)
        assert not image.exists()
        assert (tmp_path / "vm1.raw").read_bytes()[: 64 << 10] == b"\x61" * (64 << 10)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "serving export 'vm1.add-cow'" in err and "detached: removed the .add-cow file" in err


def test_the_openssl_recipe_of_the_docs_makes_credentials_real_clients_accept(
    tmp_path: Path,
) -> None:
    """The recipe runs as written, with the server's names set to those the clients
    below connect to; addcow serves with its tls/ and lets in its client/, named by
    --tls-authz as the recipe prints it; QEMU and libnbd check the server's names."""
    text = DOC.read_text()
    section = text[text.index("### Making the credentials with openssl") :]
    section = section[: section.index("\n## ")]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, "the section has a recipe"
    recipe = match.group(1)
    for line, local in (("host=server.example.com", "host=localhost"),
                        ("addr=192.0.2.10", "addr=127.0.0.1")):  # fmt: skip
        assert re.search(rf"^{line} ", recipe, re.M), f"the recipe starts with {line}"
        recipe = re.sub(rf"^{line} ", f"{local} ", recipe, flags=re.M)
    work = tmp_path / "creds"
    work.mkdir()
    made = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=work,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert made.returncode == 0, made.stderr
    subject = made.stdout.strip()
    assert f"The last command prints `{subject}`" in section
    identity = subject.removeprefix("subject=")
    assert f"--tls-authz '{identity}'" in section
    tls, client = work / "tls", work / "client"
    assert sorted(p.name for p in tls.iterdir()) == ["ca-cert.pem", "server-cert.pem",
                                                     "server-key.pem"]  # fmt: skip
    assert (tls / "server-key.pem").stat().st_mode & 0o777 == 0o600
    assert (client / "client-key.pem").stat().st_mode & 0o777 == 0o600
    nocert = tmp_path / "nocert"
    nocert.mkdir()
    (nocert / "ca-cert.pem").write_bytes((client / "ca-cert.pem").read_bytes())

    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", size=4 * MiB)
    args = ("--tls-creds", str(tls), "--tls-authz", identity)
    with served_tcp(tmp_path, image, args=args) as srv:
        assert srv.uri == f"nbds://127.0.0.1:{srv.port}/"

        def nbdinfo(creds: Path) -> subprocess.CompletedProcess[str]:
            uri = f"nbds://localhost:{srv.port}/?tls-certificates={creds}"
            return subprocess.run([require_tool("nbdinfo"), "--size", uri],
                                  capture_output=True, text=True, timeout=60)  # fmt: skip

        def qemu_img(host: str, *opts: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [require_tool("qemu-img"), "info", "--output=json", "--object",
                 f"tls-creds-x509,id=tls0,dir={client},endpoint=client", "--image-opts",
                 ",".join((f"driver=nbd,host={host},port={srv.port},tls-creds=tls0", *opts))],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        size = nbdinfo(client)  # localhost: the DNS name in subjectAltName
        assert (size.returncode, size.stdout.strip()) == (0, str(4 * MiB)), size.stderr
        info = qemu_img("127.0.0.1")  # the address in subjectAltName
        assert info.returncode == 0, info.stderr
        assert json.loads(info.stdout)["virtual-size"] == 4 * MiB
        assert srv.logged(f"TLS started (TLSv1.3), client {identity} (sha256:")
        # a name the certificate does not carry, and a client without a certificate
        other = qemu_img("127.0.0.1", "tls-hostname=other.example.com")
        assert other.returncode != 0 and "other.example.com" in other.stderr, other.stderr
        assert nbdinfo(nocert).returncode != 0
        assert srv.logged("TLS handshake failed")
