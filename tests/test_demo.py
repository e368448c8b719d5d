"""`make demo` end to end: scripts/demo.sh in a scratch directory, its checks and its result."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from conftest import require_tool, run

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.sh"


def test_demo_runs_the_whole_job_and_leaves_a_standalone_raw_disk(tmp_path: Path) -> None:
    for tool in ("qemu-img", "qemu-io", "nbdinfo"):
        require_tool(tool)
    bin_dir = Path(sys.executable).parent
    assert (bin_dir / "addcow").exists(), "the addcow command is installed beside the interpreter"
    env_path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    proc = run(["env", f"PATH={env_path}", "bash", str(DEMO)], cwd=tmp_path)
    out = proc.stdout
    # every comparison with QEMU's overlay: the file, the export before and after
    # the detach, the standalone raw file
    assert out.count("Images are identical.") == 5, out
    assert "No errors were found on the image." in out
    assert "detached: removed the .add-cow file; serving disk.raw" in out
    done = tmp_path / "demo-out"
    assert not (done / "disk.add-cow").exists()
    assert not (done / "serve.pid").exists(), "the server was stopped cleanly"
    assert (done / "disk.raw").stat().st_size == 64 << 20
    # the disk before serving (full.raw) plus the write made over NBD
    expected = bytearray((done / "full.raw").read_bytes())
    expected[40 << 20 : (40 << 20) + 65536] = b"\xef" * 65536
    assert (done / "disk.raw").read_bytes() == expected
