"""The README's library example runs as written, and leaks nothing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_the_library_example_runs_without_leaking(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Library") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README has a library example"
    (tmp_path / "base.raw").write_bytes(bytes(range(256)) * 8192)  # 2 MiB
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", match.group(1)],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "ResourceWarning" not in proc.stderr
    copy = tmp_path / "copy.raw"
    assert copy.stat().st_size == 2 << 20
    assert copy.stat().st_blocks * 512 < 2 << 20, "the copy is sparse (the zeroed MiB is a hole)"
    with open(copy, "rb") as f:
        assert f.read(5) == b"hello"
