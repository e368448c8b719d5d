"""The README's library example runs as written, and leaks nothing."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import addcow
from addcow import Extent

README = Path(__file__).parent.parent / "README.md"
DEMO = Path(__file__).parent.parent / "scripts" / "demo.sh"


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


def library_example() -> str:
    text = README.read_text()
    match = re.search(r"```python\n(.*?)```", text[text.index("## Library") :], re.S)
    assert match is not None, "the README has a library example"
    return match.group(1)


def test_the_block_status_comment_names_every_field_of_an_extent() -> None:
    lines = library_example().splitlines()
    at = next(i for i, line in enumerate(lines) if "block_status()" in line)
    comment = ""
    for line in lines[at:]:  # the comment goes on over the lines that follow
        if "#" not in line or (comment and not line.split("#")[0].strip().startswith("print")):
            break
        comment += line.split("#", 1)[1]
    assert "host_offset" in comment
    for name in Extent._fields:
        assert re.search(rf"\b{name}\b", comment), f"the comment names {name}"


def demo_run_function() -> str:
    """The demo's ``run``: it echoes a command, then runs it."""
    definitions = [line for line in DEMO.read_text().splitlines() if line.startswith("run()")]
    assert len(definitions) == 1, "scripts/demo.sh defines run() on one line"
    return definitions[0]


def test_the_demo_echoes_commands_that_can_be_pasted(tmp_path: Path) -> None:
    """Each command the demo runs is echoed as ``$ CMD``, quoted so that a shell
    splits it back into the very arguments that were run."""
    show_args = "import json, sys; print(json.dumps(sys.argv[1:]))"
    args = ["write -P 0xab 4096 64k", "it's", 'say "hi"', "a;b", "$HOME", "*", "back\\slash",
            "", "nbd+unix:///?socket=/tmp/a b/nbd.sock", "été"]  # fmt: skip
    script = f'{demo_run_function()}\nrun "$@"\n'
    proc = subprocess.run(["bash", "-c", script, "demo", sys.executable, "-c", show_args, *args],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    echoed, ran = proc.stdout.splitlines()
    assert echoed.startswith("$ ")
    assert shlex.split(echoed[2:]) == [sys.executable, "-c", show_args, *args]
    assert json.loads(ran) == args
    # a command echoed by hand (one run in the background) quotes what it fills in
    # with %q too, and nothing echoes a "$ " line with echo (which cannot quote)
    script_text = DEMO.read_text()
    assert not re.search(r"echo\s+['\"]?\$ ", script_text)
    by_hand = re.findall(r"^\s*printf '(\$ [^']*)'", script_text, re.M)
    for line in by_hand:
        assert not re.search(r"%[^q%]|\$\w|\$\{", line[2:]), line
    assert len(re.findall(r"^(?:if )?run addcow ", DEMO.read_text(), re.M)) >= 10


def test_the_readme_warns_against_using_the_raw_file_of_an_incomplete_image(
    tmp_path: Path,
) -> None:
    text = README.read_text()
    paragraph = next(p for p in text.split("\n\n") if "Never boot" in p)
    for words in ("mount", "`.raw` file", "incomplete", "QEMU knows nothing of add-cow",
                  "`addcow info disk.add-cow`", "`complete: true`"):  # fmt: skip
        assert words in paragraph, words
    # the check it names says so: complete: false, then true once streamed
    (tmp_path / "base.raw").write_bytes(b"\x5a" * (1 << 20))
    image = tmp_path / "disk.add-cow"
    addcow.create(image, image_file="disk.raw", backing_file="base.raw", backing_format="raw")
    info = [sys.executable, "-m", "addcow", "info", str(image)]
    before = subprocess.run(info, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "    complete: false" in before.splitlines()
    subprocess.run([sys.executable, "-m", "addcow", "stream", "-q", str(image)], check=True,
                   timeout=60)  # fmt: skip
    after = subprocess.run(info, capture_output=True, text=True, timeout=60, check=True).stdout
    assert "    complete: true" in after.splitlines()


def test_the_readme_states_what_serve_stdio_and_socket_activation_accept(tmp_path: Path) -> None:
    """The README, where serve is described, says which descriptors ``serve --stdio``
    and socket activation accept and which they refuse (the behaviour itself is
    tested in test_nbd_activation.py)."""
    text = README.read_text()
    commands = text[text.index("## Commands") : text.index("## From add-cow")]
    paragraph = next((p for p in commands.split("\n\n") if "`serve --stdio`" in p), "")
    for words in ("socket", "pipes", "socketpair", "regular file", "terminal",
                  "listening socket", "refused", "socket activation", "`LISTEN_PID`",
                  "`LISTEN_FDS", "fd 3", "qemu-nbd", "nbdkit", "docs/serving.md"):  # fmt: skip
        assert words in paragraph, words
    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", size=1 << 20)
    with open(tmp_path / "out", "wb") as out:
        proc = subprocess.run([sys.executable, "-m", "addcow", "serve", "--stdio", str(image)],
                              stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                              text=True, timeout=60)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (
        1, "addcow: --stdio needs a socket or pipe on stdin/stdout, found a regular file\n"
    )  # fmt: skip
