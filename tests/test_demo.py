"""`make demo` end to end: scripts/demo.sh in a scratch directory, its checks and its result.

The demo starts from a golden image built as cloud images are built (ext4 made
by ``mke2fs -d`` from a tree of files, then ``qemu-img convert -c -O qcow2``),
writes into the blocks of some of its files through an add-cow image over it,
and ends with a standalone raw disk. Here that disk is held to everything the
demo claims: QEMU's overlay's content (the demo's own ``qemu-img compare``), a
clean file system (``e2fsck -fn``), and every file of the tree as the writes
left it (read back by ``debugfs``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

from conftest import require_tool, run

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"
KiB = 1024


def tree_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}  # fmt: skip


def test_demo_runs_the_whole_job_and_leaves_a_standalone_raw_disk(tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io", "nbdinfo", "mke2fs", "e2fsck", "debugfs"):
        require_tool(tool)
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "addcow").exists(), "the addcow command is installed beside the interpreter"
    env_path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    start = time.monotonic()
    proc = run(["env", f"PATH={env_path}", "bash", str(DEMO)], cwd=tmp_path)
    assert time.monotonic() - start < 60, "the demo stays under a minute"
    out = proc.stdout
    done = tmp_path / "demo-out"

    # the golden image: a compressed qcow2, the only source once built
    assert not (done / "rootfs.raw").exists()
    golden = done / "golden.qcow2"
    info = json.loads(run([require_tool("qemu-img"), "info", "--output=json", str(golden)]).stdout)
    assert info["format"] == "qcow2"
    assert info["format-specific"]["data"]["compression-type"] == "zlib"
    golden_map = json.loads(run([require_tool("qemu-img"), "map", "--output=json",
                                 str(golden)]).stdout)  # fmt: skip
    assert any(e["data"] and "offset" not in e for e in golden_map), "compressed clusters"
    # the format is never guessed: the refusal is announced, happens, and is said to
    # have been expected; with -F qcow2 (backing_fmt) the format is recorded
    refusal = (
        "The next command is expected to be refused: it names golden.qcow2 without -F qcow2,\n"
        "and addcow never guesses a backing file's format.\n"
        "$ addcow create -b golden.qcow2 disk.add-cow\n"
        "Refused, as expected. Now with the format given (backing_fmt=qcow2):\n"
    )
    assert refusal in out, out
    assert "if it is a qcow2 image, give -F qcow2" in proc.stderr
    assert "backing file format: qcow2" in out
    # the detached server logs to a file in the demo's folder, shown once it stopped;
    # nothing on stderr looks like trouble
    assert "warning" not in proc.stderr and "no syslog socket" not in proc.stderr, proc.stderr
    log = (done / "serve-detached.log").read_text()
    assert "connection 3 closed: 0 reads (0 bytes), 1 writes (65536 bytes)" in log, log
    assert log.rstrip().endswith("stopped"), log
    assert f"$ cat serve-detached.log\n{log}" in out, out
    # every comparison with QEMU's overlay: addcow compare of the convert, the
    # file, the export before and after the detach, the standalone raw file
    assert out.count("Images are identical.") == 5, out
    assert "No errors were found on the image." in out
    assert "detached: removed the .add-cow file; serving disk.raw" in out
    assert "Pass 5: Checking group summary information" in out  # e2fsck ran to the end
    assert not (done / "disk.add-cow").exists()
    assert not (done / "serve.pid").exists(), "the server was stopped cleanly"

    raw = done / "disk.raw"
    assert raw.stat().st_size == 64 << 20
    fsck = run([require_tool("e2fsck"), "-fn", str(raw)], check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    # the disk before serving (full.raw) plus the write made over NBD
    where = re.search(r"served\.bin at (\d+)\n", out)
    assert where, out
    served = int(where.group(1))
    expected = bytearray((done / "full.raw").read_bytes())
    expected[served : served + 64 * KiB] = b"\xef" * (64 * KiB)
    assert raw.read_bytes() == expected

    # the files, read back from the file system of disk.raw
    dumped = tmp_path / "dumped"
    dumped.mkdir()
    run([require_tool("debugfs"), "-R", f"rdump / {dumped}", str(raw)])
    before = tree_files(done / "tree")
    after = tree_files(dumped)
    assert sorted(after) == sorted(before)
    changed = {"data/pattern.bin", "data/notes.txt", "data/zeroed.bin", "data/discarded.bin",
               "data/served.bin"}  # fmt: skip
    for name in set(before) - changed:
        assert after[name] == before[name], name
    assert after["data/pattern.bin"] == b"\xab" * (64 * KiB)
    assert after["data/served.bin"] == b"\xef" * (64 * KiB)
    assert after["data/zeroed.bin"] == bytes(128 * KiB)
    notes = bytearray(before["data/notes.txt"])
    notes[3000:8000] = b"\xcd" * 5000
    assert after["data/notes.txt"] == notes
    # discarded.bin: one whole 64 KiB cluster inside it reads zero, the rest is unchanged
    old, new = before["data/discarded.bin"], after["data/discarded.bin"]
    block = 4 * KiB
    differ = [i for i in range(0, len(old), block) if new[i : i + block] != old[i : i + block]]
    assert differ == list(range(differ[0], differ[0] + 64 * KiB, block)), differ
    assert new[differ[0] : differ[0] + 64 * KiB] == bytes(64 * KiB)
