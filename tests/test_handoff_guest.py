"""A Linux guest writes and reads its disk in a loop while ``addcow serve`` hands it over.

The disk: the golden tree of ``test_guest.py`` as ext4 (24 MiB) in a compressed
qcow2, an add-cow image over it, streamed complete before the guest starts.
QEMU (TCG) boots the busybox initramfs with that export as its virtio disk,
given either way (``-blockdev`` nbd + raw nodes, or ``-drive file=nbd+unix://``).
The guest's init, round after round::

    file f/N   "file N\\n" + 32 KiB of /payload/blob from offset (N % 8) * 4 KiB
    log        one more line, "round N\\n" (appended: rewrites the same block)
    sync, drop the page cache, compare f/N with what it wrote, print "GUEST round N"

While it loops the test runs ``addcow control SOCKET handoff QMP``; once a few
more rounds have run on the raw file it tells the guest to stop (a line on the
serial console). The guest then drops its cache, compares every file it wrote,
unmounts and powers off. Afterwards: no I/O or ext4 error on the console, no
mismatch, the server exited 0 on its own, the .add-cow file is gone, ``e2fsck
-fn`` finds the raw file clean and every file ``debugfs`` dumps from it (the
golden tree, f/*, log) is byte for byte what was written.
"""

from __future__ import annotations

import hashlib
import random
import re
import subprocess
import time
from pathlib import Path

import pytest
from conftest import addcow, require_tool, run
from nbd_util import served
from test_guest import build_initramfs, find_kernel, guest_says, make_tree
from test_handoff import Monitor

MiB = 1 << 20
FS_SIZE = 24 * MiB
BLOB = 64 * 1024
CHUNK = 32 * 1024
ROUNDS_AFTER = 4  # whole rounds the guest must run on the raw file before it stops
MAX_ROUNDS = 2000  # the guest stops by itself after this many (the test then fails)

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod "/lib/modules/$m" || echo "GUEST insmod $m failed"; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i + 1)); done
(read line < /dev/ttyS0; touch /tmp/stop) &
expected() {
    echo "file $1"
    dd if=/payload/blob bs=4096 skip=$(($1 % 8)) count=8 2> /dev/null
}
if mount -t ext4 /dev/vda /mnt; then
    mkdir -p /mnt/f
    errors=0
    i=0
    while [ ! -e /tmp/stop ] && [ $i -lt MAX_ROUNDS ]; do
        expected $i > /tmp/expected
        cp /tmp/expected /mnt/f/$i || errors=$((errors + 1))
        echo "round $i" >> /mnt/log || errors=$((errors + 1))
        sync
        echo 3 > /proc/sys/vm/drop_caches
        cmp -s /tmp/expected /mnt/f/$i || { echo "GUEST mismatch f/$i"; errors=$((errors + 1)); }
        echo "GUEST round $i"
        i=$((i + 1))
    done
    echo "GUEST rounds $i"
    echo 3 > /proc/sys/vm/drop_caches
    j=0
    while [ $j -lt $i ]; do
        expected $j > /tmp/expected
        cmp -s /tmp/expected /mnt/f/$j || { echo "GUEST mismatch f/$j"; errors=$((errors + 1)); }
        j=$((j + 1))
    done
    echo "GUEST errors $errors"
    umount /mnt
    echo "GUEST umount $?"
else
    echo "GUEST mount failed"
fi
poweroff -f
""".replace("MAX_ROUNDS", str(MAX_ROUNDS))


def expected_file(n: int, blob: bytes) -> bytes:
    start = (n % 8) * 4096
    return f"file {n}\n".encode() + blob[start : start + CHUNK]


def drive_args(form: str, sock: str) -> tuple[str, ...]:
    if form == "blockdev":
        return ("-blockdev", f"driver=nbd,server.type=unix,server.path={sock},node-name=proto",
                "-blockdev", "driver=raw,file=proto,node-name=fmt",
                "-device", "virtio-blk-pci,drive=fmt")  # fmt: skip
    return ("-drive", f"file=nbd+unix:///?socket={sock},format=raw,if=virtio,cache=writeback")


def rounds(console: Path) -> int:
    """The guest's last completed round (-1 before the first)."""
    found = re.findall(rb"GUEST round (\d+)", console.read_bytes())
    return int(found[-1]) if found else -1


def wait_for_round(console: Path, qemu: subprocess.Popen[bytes], n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while rounds(console) < n:
        if qemu.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"the guest did not reach round {n}:\n"
                                 f"{console.read_text(errors='replace')}")  # fmt: skip
        time.sleep(0.05)


@pytest.mark.parametrize("form", ["blockdev", "drive"])
def test_guest_io_goes_on_across_the_handoff(tmp_path: Path, form: str) -> None:
    for tool in ("mke2fs", "e2fsck", "debugfs", "qemu-img", "busybox"):
        require_tool(tool)
    kernel = find_kernel()
    files = make_tree(tmp_path / "tree")
    fs = tmp_path / "rootfs.raw"
    run([require_tool("mke2fs"), "-q", "-F", "-t", "ext4", "-d", str(tmp_path / "tree"),
         str(fs), f"{FS_SIZE // 1024}k"])  # fmt: skip
    run([require_tool("qemu-img"), "convert", "-c", "-f", "raw", "-O", "qcow2", str(fs),
         str(tmp_path / "golden.qcow2")])  # fmt: skip
    fs.unlink()
    blob = random.Random(11).randbytes(BLOB)
    initramfs = build_initramfs(tmp_path / "initramfs.cpio", kernel, {"payload/blob": blob},
                                init=INIT)  # fmt: skip
    image, raw = tmp_path / "disk.add-cow", tmp_path / "disk.raw"
    addcow("create", "-q", "-b", "golden.qcow2", "-F", "qcow2", "-o", "image_file=disk.raw",
           image, cwd=tmp_path)  # fmt: skip
    addcow("stream", image)

    ctl, qmp, watch = tmp_path / "ctl.sock", tmp_path / "qmp.sock", tmp_path / "watch.sock"
    console = tmp_path / "console.log"
    with served(tmp_path, image, args=("--control", str(ctl))) as srv:
        cmd = [require_tool("qemu-system-x86_64"), "-nodefaults", "-no-user-config",
               "-display", "none", "-no-reboot", "-accel", "tcg", "-m", "256", "-smp", "1",
               "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
               "-append", "console=ttyS0 panic=-1 loglevel=4",
               "-serial", "stdio", "-monitor", "none",
               "-qmp", f"unix:{qmp},server=on,wait=off",
               "-qmp", f"unix:{watch},server=on,wait=off",
               *drive_args(form, srv.socket)]  # fmt: skip
        with open(console, "wb") as out:
            vm = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=out)
        assert vm.stdin is not None
        try:
            wait_for_round(console, vm, 2, timeout=120)
            done = addcow("control", ctl, "handoff", str(qmp))
            assert f"({raw})" in done.stdout, done.stdout
            handed_at = rounds(console)
            assert srv.proc.wait(timeout=30) == 0
            wait_for_round(console, vm, handed_at + 1 + ROUNDS_AFTER, timeout=60)
            node = Monitor(watch).device_node()
            assert node["file"] == str(raw), node
            vm.stdin.write(b"stop\n")
            vm.stdin.flush()
            assert vm.wait(timeout=120) == 0
        finally:
            if vm.poll() is None:
                vm.kill()
                vm.wait()
            vm.stdin.close()
        log = srv.stderr()
    text = console.read_text(errors="replace")
    said = guest_says(text)
    assert "handed over to QEMU: device" in log, log
    assert "insmod" not in said and "mount" not in said, text
    assert not re.search(r"I/O error|EXT4-fs error|EXT4-fs warning|mismatch", text), text
    n = int(said["rounds"])
    assert n > handed_at + ROUNDS_AFTER, text
    assert said.get("errors") == "0", text
    assert said.get("umount") == "0", text

    assert not image.exists()
    assert raw.stat().st_size == FS_SIZE
    fsck = run([require_tool("e2fsck"), "-fn", str(raw)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    dump = tmp_path / "dump"
    dump.mkdir()
    for top in ("etc", "usr", "data", "f", "log"):
        run([require_tool("debugfs"), "-R", f"rdump /{top} {dump}", str(raw)])
    want = dict(files)
    want |= {f"f/{k}": expected_file(k, blob) for k in range(n)}
    want["log"] = "".join(f"round {k}\n" for k in range(n)).encode()
    found = {str(p.relative_to(dump)): p.read_bytes()
             for p in dump.rglob("*") if p.is_file() and not p.is_symlink()}  # fmt: skip
    assert sorted(found) == sorted(want)
    for rel, data in want.items():
        assert hashlib.sha256(found[rel]).digest() == hashlib.sha256(data).digest(), rel
