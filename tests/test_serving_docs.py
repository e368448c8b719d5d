"""The systemd units of docs/serving.md, run as written under ``systemd-socket-activate``.

The socket-activated ``.service``'s ``ExecStart`` line is taken from the
document, its paths pointed at a temporary folder, and started the way
systemd would start it: with the listening socket of the ``.socket`` unit on
fd 3. nbdinfo and qemu-io use the disk, ``addcow status`` reads the control
socket the unit names, and SIGTERM (the unit's ``KillSignal``) stops it cleanly.
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
from nbd_util import BIN, env_with_addcow

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
