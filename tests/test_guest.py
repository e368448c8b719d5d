"""A Linux guest boots from ``addcow serve``, over a compressed qcow2 golden image.

The golden image is built the way cloud images are built: ``mke2fs -t ext4 -d
TREE`` of a generated tree of files into a raw file, then ``qemu-img convert -c
-O qcow2``. An add-cow image over it (``-F qcow2``) is served over NBD and
QEMU boots Debian's cloud kernel (``linux-image-cloud-amd64``) with a busybox
initramfs (``busybox-static``) built here, with the export as its virtio disk::

    qemu-system-x86_64 -kernel vmlinuz -initrd initramfs.cpio
        -drive file=nbd+unix:///?socket=S,format=raw,if=virtio

The guest mounts the ext4 file system, checks every file of the tree against
its checksum, writes new files, rewrites part of one, deletes another, checks
the result and unmounts. Then ``addcow stream`` and ``addcow detach`` (or, in
the second test, ``addcow serve --stream --detach-when-complete`` while the
guest runs, over TCP with TLS and the guest's client certificate checked, QEMU
connecting with its ``tls-creds-x509`` object) leave a plain raw disk, which
``e2fsck -fn`` finds clean, whose files ``debugfs`` reads back, and from which
a second boot (the raw file as the guest's disk, no addcow involved) finds every
file as the first boot left it.

In the third test no addcow process runs while the guest does: ``addcow view``
writes a qcow2 view of the image (its tables over the image file as external
data file, the golden image as backing), QEMU boots from it natively::

    qemu-system-x86_64 ... -drive file=disk.qcow2,format=qcow2,if=virtio

and ``addcow fold`` takes the guest's writes back into the bitmap. The disk as
QEMU left it (the view converted to raw while QEMU is stopped) is the referee:
``e2fsck -fn`` finds it clean and ``debugfs rdump`` reads every file the guest
wrote or kept, byte for byte; the folded image must compare identical to it,
and so must the raw disk ``stream`` and ``detach`` leave, byte for byte.

QEMU emulates the CPU (TCG): no KVM needed, and the boot takes seconds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os
import random
import re
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import addcow as addcow_cli
from conftest import require_tool, run
from nbd_util import served, served_tcp
from tls_util import make_certs

MiB = 1 << 20
FS_SIZE = 48 * MiB
MODULES = ("virtio_pci", "virtio_blk")  # with their dependencies, from modules.dep
QEMU_TIMEOUT = 180  # seconds for one boot under TCG on a busy machine (a few when idle)

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m" || echo "GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
mode=$(sed -n 's/.*addcow_mode=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "GUEST mode $mode"
if mount -t ext4 /dev/vda /mnt; then
    cd /mnt
    if [ "$mode" = write ]; then
        sha256sum -c /manifest.golden > /tmp/golden.out 2>&1
        echo "GUEST golden-check $? $(grep -c ': OK$' /tmp/golden.out)"
        mkdir -p new/deeper
        cp /payload/small new/small
        cp /payload/big new/deeper/big
        dd if=/payload/patch of=data/rewritten bs=1 seek=5000 conv=notrunc 2> /dev/null
        rm data/deleted
        sync
    fi
    sha256sum -c /manifest.after > /tmp/after.out 2>&1
    echo "GUEST after-check $? $(grep -c ': OK$' /tmp/after.out)"
    grep -v ': OK$' /tmp/after.out | head -5
    test -e data/deleted
    echo "GUEST deleted-present $?"
    echo "GUEST files $(find . -type f | wc -l)"
    cd /
    umount /mnt
    echo "GUEST umount $?"
else
    echo "GUEST mount failed"
fi
poweroff -f
"""


# -- the guest: kernel, modules, busybox, initramfs --------------------------------------


@dataclass
class Kernel:
    vmlinuz: Path
    modules: Path  # /lib/modules/VERSION


def find_kernel() -> Kernel:
    found = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not found:
        pytest.fail("linux-image-cloud-amd64 is not installed (make test installs it)")
    vmlinuz = Path(found[-1])
    modules = Path("/lib/modules") / vmlinuz.name.removeprefix("vmlinuz-")
    if not (modules / "modules.dep").exists():
        pytest.fail(f"{modules}/modules.dep is missing (reinstall linux-image-cloud-amd64)")
    return Kernel(vmlinuz, modules)


def require_static(path: str) -> str:
    """``path`` if it is an ELF executable without a program interpreter (static)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            pytest.fail(f"{path} is not a 64-bit ELF executable")
        phoff, = struct.unpack_from("<Q", head, 32)
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    for i in range(phnum):
        if struct.unpack_from("<I", table, i * phentsize)[0] == 3:  # PT_INTERP
            pytest.fail(f"{path} is dynamically linked: install busybox-static")
    return path


def module_files(kernel: Kernel, names: tuple[str, ...]) -> list[Path]:
    """The module files for ``names`` and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        deps[target] = rest.split()
    builtin = (kernel.modules / "modules.builtin").read_text().split()

    def stem(path: str) -> str:
        return os.path.basename(path).split(".ko")[0].replace("-", "_")

    by_name = {stem(p): p for p in deps}
    order: list[str] = []

    def visit(path: str) -> None:
        for dep in reversed(deps[path]):  # modules.dep lists the deepest last
            visit(dep)
        if path not in order:
            order.append(path)

    for name in names:
        if name in by_name:
            visit(by_name[name])
        elif not any(stem(b) == name for b in builtin):
            pytest.fail(f"kernel module {name} not found in {kernel.modules}")
    return [kernel.modules / p for p in order]


def module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if path.suffix == ".xz":
        return lzma.decompress(data)
    if path.suffix == ".zst":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(data)
    return data


def cpio_newc(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed initramfs: (name, mode, content) in cpio newc format."""
    out = bytearray()
    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        encoded = name.encode() + b"\0"
        fields = (ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0)
        out += b"070701" + b"".join(b"%08X" % v for v in fields) + encoded
        out += bytes(-len(out) % 4)
        out += data
        out += bytes(-len(out) % 4)
    return bytes(out)


@dataclass
class Guest:
    kernel: Kernel
    initramfs: Path


def build_initramfs(path: Path, kernel: Kernel, files: dict[str, bytes], init: str = INIT) -> Path:
    """The initramfs: busybox, the virtio modules, ``init`` as /init, and ``files``."""
    busybox = require_static(require_tool("busybox"))
    d, f, x = stat.S_IFDIR | 0o755, stat.S_IFREG | 0o644, stat.S_IFREG | 0o755
    entries = [(n, d, b"") for n in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib",
                                     "lib/modules", "payload")]  # fmt: skip
    entries += [("bin/busybox", x, Path(busybox).read_bytes()),
                ("bin/sh", stat.S_IFLNK | 0o777, b"busybox"), ("init", x, init.encode())]
    order = []
    for mod in module_files(kernel, MODULES):
        name = mod.name.split(".ko")[0] + ".ko"
        entries.append((f"lib/modules/{name}", f, module_bytes(mod)))
        order.append(name)
    entries.append(("modules.order", f, "\n".join(order).encode() + b"\n"))
    entries += [(name, f, data) for name, data in files.items()]
    path.write_bytes(cpio_newc(entries))
    return path


def boot(guest: Guest, drive: str, mode: str, log: Path, extra: tuple[str, ...] = ()) -> str:
    """Boot the guest on ``drive`` (a -drive value) and return its console output.

    ``extra``: more QEMU arguments (the ``tls-creds-x509`` object of a TLS drive).
    """
    qemu = require_tool("qemu-system-x86_64")
    cmd = [
        qemu, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-accel", "tcg", "-m", "256", "-smp", "1",
        "-kernel", str(guest.kernel.vmlinuz), "-initrd", str(guest.initramfs),
        "-append", f"console=ttyS0 panic=-1 loglevel=4 addcow_mode={mode}",
        "-serial", f"file:{log}", "-monitor", "none",
        "-drive", f"{drive},if=virtio,cache=writeback", *extra,
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=QEMU_TIMEOUT,
                              stdin=subprocess.DEVNULL)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the guest did not power off within {QEMU_TIMEOUT}s:\n"
                             f"{log.read_text(errors='replace')}") from None
    console = log.read_text(errors="replace")
    assert proc.returncode == 0, f"qemu exited {proc.returncode}: {proc.stderr}\n{console}"
    return console + (f"\nqemu-system-x86_64 stderr:\n{proc.stderr}" if proc.stderr else "")


def guest_says(console: str) -> dict[str, str]:
    said = {}
    for line in console.splitlines():
        m = re.match(r"GUEST (\S+) ?(.*)$", line.strip())
        if m:
            said[m.group(1)] = m.group(2).strip()
    return said


# -- the golden image and what the guest writes ------------------------------------------------


def make_tree(root: Path) -> dict[str, bytes]:
    """A small root file system: text files that compress, random ones that do not,
    an empty file, a symlink; returns every regular file's content by relative path."""
    rng = random.Random(20240601)
    files: dict[str, bytes] = {
        "etc/hostname": b"golden\n",
        "etc/os-release": b'PRETTY_NAME="addcow golden image"\nID=golden\n',
        "etc/empty": b"",
    }
    for i in range(24):
        words = [rng.choice([b"block", b"image", b"cloud", b"ext4", b"qcow2", b"cluster"])
                 for _ in range(rng.randrange(100, 20000))]  # fmt: skip
        files[f"usr/share/doc/pkg{i:02d}/README"] = b" ".join(words) + b"\n"
    for i in range(12):
        files[f"usr/lib/blob{i:02d}.bin"] = rng.randbytes(rng.choice([1, 4095, 65537, 300000]))
    files["data/rewritten"] = rng.randbytes(100000)
    files["data/deleted"] = b"this file is deleted by the guest\n" * 100
    files["data/big.bin"] = rng.randbytes(3 * MiB)
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "etc/alias").symlink_to("hostname")
    return files


def manifest(files: dict[str, bytes]) -> bytes:
    return b"".join(b"%s  ./%s\n" % (hashlib.sha256(data).hexdigest().encode(), rel.encode())
                    for rel, data in sorted(files.items()))  # fmt: skip


@dataclass
class Disk:
    dir: Path
    golden: Path
    golden_digest: str
    image: Path
    raw: Path
    golden_files: int  # regular files in the golden tree
    after: dict[str, bytes]  # every regular file once the guest has written
    guest: Guest


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Disk]:
    for tool in ("mke2fs", "qemu-img", "busybox", "qemu-system-x86_64"):
        require_tool(tool)
    kernel = find_kernel()
    tree = tmp_path / "tree"
    files = make_tree(tree)
    fs = tmp_path / "rootfs.raw"
    run([require_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-L", "golden", "-d", str(tree),
         str(fs), f"{FS_SIZE // 1024}k"])  # fmt: skip
    golden = tmp_path / "golden.qcow2"
    run([require_tool("qemu-img"), "convert", "-c", "-f", "raw", "-O", "qcow2", str(fs),
         str(golden)])  # fmt: skip
    fs.unlink()
    rng = random.Random(7)
    payload = {"small": b"written by the guest\n", "big": rng.randbytes(2 * MiB + 123),
               "patch": b"\xee" * 3000}  # fmt: skip
    after = dict(files)
    del after["data/deleted"]
    patched = bytearray(after["data/rewritten"])
    patched[5000:8000] = payload["patch"]
    after["data/rewritten"] = bytes(patched)
    after["new/small"], after["new/deeper/big"] = payload["small"], payload["big"]
    initramfs = build_initramfs(tmp_path / "initramfs.cpio", kernel, {
        "manifest.golden": manifest(files), "manifest.after": manifest(after),
        **{f"payload/{k}": v for k, v in payload.items()},
    })  # fmt: skip
    image = tmp_path / "disk.add-cow"
    addcow_cli("create", "-q", "-b", "golden.qcow2", "-F", "qcow2", "-o", "image_file=disk.raw",
               image, cwd=tmp_path)  # fmt: skip
    yield Disk(tmp_path, golden, hashlib.sha256(golden.read_bytes()).hexdigest(), image,
               tmp_path / "disk.raw", len(files), after, Guest(kernel, initramfs))  # fmt: skip


def check_first_boot(console: str, d: Disk) -> None:
    said = guest_says(console)
    assert said.get("mode") == "write", console
    assert "insmod" not in said, console
    assert said.get("golden-check") == f"0 {d.golden_files}", console
    assert said.get("after-check") == f"0 {len(d.after)}", console
    assert said.get("deleted-present") == "1", console
    assert said.get("files") == str(len(d.after)), console
    assert said.get("umount") == "0", console


def check_standalone_raw(d: Disk) -> None:
    """The raw disk left by detach: e2fsck clean, debugfs reads the files, a second boot
    from it alone finds every file as the guest left it; the golden image untouched."""
    assert not d.image.exists()
    assert d.raw.stat().st_size == FS_SIZE
    fsck = run([require_tool("e2fsck"), "-fn", str(d.raw)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for rel in ("new/deeper/big", "data/rewritten", "etc/os-release"):
        out = subprocess.run([require_tool("debugfs"), "-R", f"cat /{rel}", str(d.raw)],
                             capture_output=True, timeout=60, check=True)  # fmt: skip
        assert out.stdout == d.after[rel], rel
    gone = run([require_tool("debugfs"), "-R", "stat /data/deleted", str(d.raw)])
    assert "File not found by ext2_lookup" in gone.stderr
    console = boot(d.guest, f"file={d.raw},format=raw", "verify", d.dir / "console2.log")
    said = guest_says(console)
    assert said.get("mode") == "verify", console
    assert said.get("after-check") == f"0 {len(d.after)}", console
    assert said.get("deleted-present") == "1", console
    assert said.get("files") == str(len(d.after)), console
    assert said.get("umount") == "0", console
    assert hashlib.sha256(d.golden.read_bytes()).hexdigest() == d.golden_digest


def read_tree(raw: Path, into: Path) -> dict[str, bytes]:
    """Every regular file of the ext4 file system in ``raw`` (``debugfs rdump``), by path."""
    into.mkdir()
    run([require_tool("debugfs"), "-R", f"rdump / {into}", str(raw)])
    return {str(p.relative_to(into)): p.read_bytes() for p in sorted(into.rglob("*"))
            if p.is_file() and not p.is_symlink()}  # fmt: skip


def test_guest_boots_from_addcow_over_a_compressed_qcow2_then_stream_and_detach(
    disk: Disk,
) -> None:
    d = disk
    golden_map = json.loads(
        run([require_tool("qemu-img"), "map", "--output=json", str(d.golden)]).stdout
    )
    assert any(e["data"] and "offset" not in e for e in golden_map), "compressed clusters"
    with served(d.dir, d.image) as srv:
        compared = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2",
                        srv.uri, str(d.golden)])  # fmt: skip
        assert compared.stdout == "Images are identical.\n"
        console = boot(d.guest, f"file={srv.uri},format=raw", "write", d.dir / "console1.log")
    check_first_boot(console, d)
    # the guest's writes are in disk.raw; the rest of the disk still comes from the golden image
    info = json.loads(addcow_cli("info", "--output=json", d.image).stdout)["format-specific"]
    assert info["data"]["complete"] is False
    assert 0 < info["data"]["allocated-clusters"] < info["data"]["total-clusters"] // 2
    assert addcow_cli("check", d.image).returncode == 0
    addcow_cli("stream", d.image)
    info = json.loads(addcow_cli("info", "--output=json", d.image).stdout)["format-specific"]
    assert info["data"]["complete"] is True
    detach = addcow_cli("detach", d.image)
    assert "disk.raw" in detach.stdout
    check_standalone_raw(d)


def test_guest_runs_over_tls_while_the_server_streams_and_detaches(disk: Disk) -> None:
    """serve --stream --detach-when-complete on TCP with TLS, the client's certificate
    checked: the copy runs under the guest's own I/O (rate limited so the guest boots
    while it runs), and the server then serves the raw file alone. The rate counts
    the bytes read from the golden image, so it is set from the golden image's data:
    about 20 s of streaming, longer than the guest's run."""
    d = disk
    (d.dir / "certs").mkdir()
    certs = make_certs(d.dir / "certs")
    extents = json.loads(run([require_tool("qemu-img"), "map", "--output=json",
                              str(d.golden)]).stdout)  # fmt: skip
    rate = max(4096, sum(e["length"] for e in extents if e["data"]) // 20)
    args = ("--stream", "--stream-rate", str(rate), "--detach-when-complete",
            "--tls-creds", str(certs["srv"]), "--tls-verify-peer")  # fmt: skip
    with served_tcp(d.dir, d.image, args=args) as srv:
        tls = f"tls-creds-x509,id=tls0,dir={certs['client']},endpoint=client"
        drive = (f"driver=raw,file.driver=nbd,file.server.type=inet,file.server.host=localhost,"
                 f"file.server.port={srv.port},file.tls-creds=tls0")  # fmt: skip
        console = boot(d.guest, drive, "write", d.dir / "console1.log", ("-object", tls))
        assert "TLS started (TLSv1.3), client CN=client.example.com" in srv.stderr()
        streaming_during_boot = d.image.exists()
        for _ in range(1200):
            if "detached: removed the .add-cow file" in srv.stderr():
                break
            time.sleep(0.05)
        log = srv.stderr()
    assert "detached: removed the .add-cow file" in log, log
    assert streaming_during_boot, "the guest's boot overlapped the stream"
    check_first_boot(console, d)
    check_standalone_raw(d)


def test_guest_boots_from_a_qcow2_view_with_no_addcow_then_fold_stream_and_detach(
    disk: Disk,
) -> None:
    d = disk
    qemu_img = require_tool("qemu-img")
    view = d.dir / "disk.qcow2"
    addcow_cli("view", d.image, view)
    compared = run([qemu_img, "compare", "-f", "qcow2", "-F", "qcow2", str(view), str(d.golden)])
    assert compared.stdout == "Images are identical.\n"
    console = boot(d.guest, f"file={view},format=qcow2", "write", d.dir / "console1.log")
    check_first_boot(console, d)
    assert "No errors were found" in run([qemu_img, "check", str(view)]).stdout
    seen = d.dir / "seen.raw"  # the disk as QEMU left it, read through the view
    run([qemu_img, "convert", "-f", "qcow2", "-O", "raw", str(view), str(seen)])
    fsck = run([require_tool("e2fsck"), "-fn", str(seen)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    assert read_tree(seen, d.dir / "seen") == d.after
    fold = addcow_cli("fold", d.image)
    assert re.match(rf"folded {re.escape(str(view))} into .*: [1-9]\d* clusters written",
                    fold.stderr), fold.stderr  # fmt: skip
    assert not view.exists()
    assert addcow_cli("check", d.image).returncode == 0
    assert addcow_cli("compare", d.image, seen).stdout == "Images are identical.\n"
    # the guest's writes are in disk.raw; the rest of the disk still comes from the golden image
    info = json.loads(addcow_cli("info", "--output=json", d.image).stdout)["format-specific"]
    assert 0 < info["data"]["allocated-clusters"] < info["data"]["total-clusters"] // 2
    addcow_cli("stream", d.image)
    addcow_cli("detach", d.image)
    assert not d.image.exists()
    assert d.raw.read_bytes() == seen.read_bytes()
    assert hashlib.sha256(d.golden.read_bytes()).hexdigest() == d.golden_digest
