"""How commands choose the format of a file named on the command line, and the
messages and qemu-img habits around formats and options.

* convert / compare: ``-f`` (``-F`` for compare's second image) decides; without
  it a name ending in ``.add-cow`` is add-cow and anything else raw, and a raw
  file that starts with a known image header is refused until ``-f`` says which
  it is. The content never chooses: a guest can write any header into its disk.
* ``raw`` is never recorded for a backing file that starts with a known image
  header, even with ``-F raw``.
* info / map / check name the real format of a non-add-cow image.
* ``resize FILE -16M``, ``,,`` in ``-o`` values and ``-o help`` work as in qemu-img.

qemu-img makes the foreign images (its real magics) and referees content.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLUSTER, require_tool, run
from conftest import addcow as addcow_cli

import addcow
from addcow.cli.common import split_options
from addcow.copy import open_source
from addcow.errors import AddCowError, ForeignFormatError, FormatChoiceError, HeaderError
from addcow.format import Header
from addcow.image import AddCowImage
from addcow.stores.raw import RawFile

MiB = 1 << 20
SECRET = b"host secret " * 5000


def fails(*args: str | os.PathLike[str], status: int = 1) -> str:
    """Run addcow expecting ``status`` and one 'addcow: ...' line; return that line."""
    proc = addcow_cli(*args, check=False)
    assert proc.returncode == status, f"{args}: exit {proc.returncode}\n{proc.stderr}"
    assert proc.stderr.startswith("addcow: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr.strip()


def qemu_img(*args: str | os.PathLike[str], check: bool = True) -> str:
    return run([require_tool("qemu-img"), *map(str, args)], check=check).stdout


def same_raw(a: Path, b: Path) -> None:
    """qemu-img compares the two files as raw disks."""
    out = qemu_img("compare", "-f", "raw", "-F", "raw", a, b)
    assert "Images are identical." in out


@pytest.fixture
def guest_disk(tmp_path: Path) -> Path:
    """The raw disk ``detach`` leaves, whose guest wrote an add-cow header into sector 0
    naming a host file (``secret.raw``) as its image file, with every bit set."""
    (tmp_path / "secret.raw").write_bytes(SECRET)
    evil = Header(version=2, image_name=b"secret.raw", image_size=len(SECRET)).pack()
    evil += b"\xff" * ((len(SECRET) // CLUSTER + 1) // 8 + 1)
    image = tmp_path / "vm.add-cow"
    addcow.create(image, image_file="vm.raw", size=MiB)
    with addcow.open(image) as img:
        img.write(evil, 0)  # the guest writes its own disk
    addcow_cli("stream", image)
    addcow_cli("detach", image)
    disk = tmp_path / "vm.raw"
    assert disk.read_bytes()[: len(evil)] == evil
    return disk


# -- convert / compare: the format comes from -f or the name, never the content --------


def test_convert_refuses_a_raw_disk_that_starts_with_an_add_cow_header(
    guest_disk: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out.raw"
    err = fails("convert", guest_disk, out)
    assert err == (
        f"addcow: {guest_disk} starts with an add-cow header: give -f raw to copy it as a "
        "raw disk, or -f add-cow to open it as an image"
    )
    assert not out.exists()
    # -f raw: the disk as it is, byte for byte
    addcow_cli("convert", "-f", "raw", guest_disk, out)
    assert out.read_bytes() == guest_disk.read_bytes()
    same_raw(out, guest_disk)
    # the header is a working one: asked for explicitly, it opens the host file it names
    addcow_cli("convert", "-f", "add-cow", guest_disk, tmp_path / "as-image.raw")
    assert (tmp_path / "as-image.raw").read_bytes() == SECRET


def test_compare_refuses_either_image_without_its_format(guest_disk: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.raw"
    copy.write_bytes(guest_disk.read_bytes())
    for args in ((guest_disk, copy), (copy, guest_disk)):
        err = fails("compare", *args, status=2)
        assert "starts with an add-cow header: give -f raw" in err
    assert fails("compare", "-f", "raw", guest_disk, copy, status=2).endswith(
        f"{copy} starts with an add-cow header: give -f raw to copy it as a raw disk, "
        "or -f add-cow to open it as an image"
    )
    proc = addcow_cli("compare", "-f", "raw", "-F", "raw", guest_disk, copy)
    assert proc.stdout == "Images are identical.\n"


def test_open_source_decides_by_name_or_by_the_format_given(
    guest_disk: Path, tmp_path: Path
) -> None:
    with pytest.raises(FormatChoiceError, match="starts with an add-cow header"):
        open_source(str(guest_disk))
    raw = open_source(str(guest_disk), "raw")
    try:
        assert isinstance(raw, RawFile) and raw.size == guest_disk.stat().st_size
    finally:
        raw.close()
    named = tmp_path / "named.add-cow"
    addcow.create(named, image_file="named.raw", size=MiB)
    image = open_source(str(named))
    try:
        assert isinstance(image, AddCowImage) and image.size == MiB
    finally:
        image.close()


def test_a_damaged_add_cow_image_is_refused_not_copied_as_raw(tmp_path: Path) -> None:
    image = tmp_path / "d.add-cow"
    addcow.create(image, image_file="d.raw", size=MiB)
    with open(image, "r+b") as f:
        f.write(b"X")
    out = tmp_path / "out.raw"
    err = fails("convert", image, out)
    assert err == (
        f"addcow: {image}: invalid header field magic: expected b'ADD_COW\\xff', "
        "found b'XDD_COW\\xff'"
    )
    assert not out.exists()
    assert "invalid header field magic" in fails("compare", image, image, status=2)
    with pytest.raises(HeaderError):
        open_source(str(image))


def test_a_qcow2_source_needs_f(tmp_path: Path) -> None:
    q = tmp_path / "x.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", q, "1M")
    out = tmp_path / "out.raw"
    err = fails("convert", q, out)
    assert err == (
        f"addcow: {q} starts with a qcow2 header: give -f raw to copy it as a raw disk, "
        "or -f qcow2 to open it as an image"
    )
    assert not out.exists()
    # convert -O add-cow is refused the same way, and with -f raw records no format
    dst = tmp_path / "n.add-cow"
    assert "starts with a qcow2 header" in fails(
        "convert", "-O", "add-cow", "-o", "image_file=n.raw", q, dst
    )
    assert not dst.exists() and not (tmp_path / "n.raw").exists()
    addcow_cli("convert", "-f", "raw", "-O", "add-cow", "-o", "image_file=n.raw", q, dst)
    info = json.loads(addcow_cli("info", "--output=json", dst).stdout)
    assert "backing-filename" not in info and "backing-filename-format" not in info
    assert info["format-specific"]["data"]["image-file"] == "n.raw"
    addcow_cli("convert", dst, out)
    same_raw(out, q)


def test_a_missing_source_says_it_cannot_be_opened(tmp_path: Path) -> None:
    for name in ("nonexist", "nonexist.add-cow"):
        err = fails("convert", tmp_path / name, tmp_path / "out.raw")
        assert err == f"addcow: {tmp_path / name}: cannot open: No such file or directory"
        err = fails("compare", tmp_path / name, tmp_path / name, status=2)
        assert err == f"addcow: {tmp_path / name}: cannot open: No such file or directory"
    assert not (tmp_path / "out.raw").exists()


# -- a non-add-cow image given where an add-cow image is expected ----------------------

FOREIGN = ("qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx", "parallels")


@pytest.mark.parametrize("fmt", FOREIGN)
def test_info_map_check_name_the_real_format(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"x.{fmt}"
    qemu_img("create", "-q", "-f", fmt, path, "4M")
    article = "an" if fmt[0] in "aeiou" else "a"
    want = f"addcow: {path}: this is {article} {fmt} image, not an add-cow image"
    for command in ("info", "map", "check"):
        assert fails(command, path) == want
    with pytest.raises(ForeignFormatError) as exc:
        addcow.open(path, readonly=True)
    assert exc.value.format == fmt and exc.value.field == "magic"
    assert isinstance(exc.value, HeaderError)


@pytest.mark.parametrize("fmt", FOREIGN)
def test_raw_is_never_recorded_for_an_image_file(tmp_path: Path, fmt: str) -> None:
    base = tmp_path / "base.img"
    qemu_img("create", "-q", "-f", fmt, base, "4M")
    made = (tmp_path / "t.add-cow", tmp_path / "t.raw")
    err = fails("create", "-b", "base.img", "-F", "raw", "-o", "image_file=t.raw", made[0])
    assert err == (
        f"addcow: {base} starts with a{'n' if fmt[0] in 'aeiou' else ''} {fmt} header; "
        "refusing to record it as raw (a raw disk must not start with an image header)"
    )
    err = fails("create", "-b", "base.img", "-o", "image_file=t.raw", made[0])
    assert "refusing to guess its format" in err
    if fmt == "qcow2":
        assert err.endswith("if it is a qcow2 image, give -F qcow2")
    else:
        assert err.endswith(f"addcow reads raw, add-cow, qcow2 backing files, not {fmt}")
    assert not any(p.exists() for p in made)
    with pytest.raises(AddCowError, match="refusing to record it as raw"):
        addcow.create(made[0], image_file="t.raw", backing_file="base.img", backing_format="raw")
    assert not any(p.exists() for p in made)


def test_create_over_an_add_cow_backing_uses_the_article_an(tmp_path: Path) -> None:
    addcow.create(tmp_path / "mid.add-cow", image_file="mid.raw", size=MiB)
    err = fails("create", "-b", "mid.add-cow", "-o", "image_file=x.raw", tmp_path / "x.add-cow")
    assert "the backing file starts with an add-cow header; refusing to guess" in err
    err = fails("create", "-b", "mid.add-cow", "-F", "raw", "-o", "image_file=x.raw",
                tmp_path / "x.add-cow")
    assert err.endswith("mid.add-cow starts with an add-cow header; refusing to record it as "
                        "raw (a raw disk must not start with an image header)")
    assert not (tmp_path / "x.add-cow").exists() and not (tmp_path / "x.raw").exists()


# -- qemu-img habits -------------------------------------------------------------------


def test_resize_takes_a_negative_size_like_qemu_img(tmp_path: Path) -> None:
    image, ref = tmp_path / "d.add-cow", tmp_path / "ref.raw"
    addcow_cli("create", "-q", "-o", "image_file=d.raw", image, "64M")
    qemu_img("create", "-q", "-f", "raw", ref, "64M")
    err = fails("resize", image, "-16M")
    assert "use --shrink" in err
    addcow_cli("resize", "--shrink", image, "-16M")
    qemu_img("resize", "-q", "-f", "raw", "--shrink", ref, "-16M")
    ours = json.loads(addcow_cli("info", "--output=json", image).stdout)["virtual-size"]
    theirs = json.loads(qemu_img("info", "--output=json", "-f", "raw", ref))["virtual-size"]
    assert ours == theirs == 48 * MiB
    addcow_cli("resize", "--shrink", image, "--", "-16M")  # the explicit form still works
    assert json.loads(addcow_cli("info", "--output=json", image).stdout)["virtual-size"] == 32 * MiB


def test_double_comma_is_a_comma_in_an_option_value(tmp_path: Path) -> None:
    addcow_cli("create", "-q", "-o", "image_file=a,,b.raw,cluster_size=4k", tmp_path / "c.add-cow",
               "1M")
    info = json.loads(addcow_cli("info", "--output=json", tmp_path / "c.add-cow").stdout)
    assert info["format-specific"]["data"]["image-file"] == "a,b.raw"
    assert info["cluster-size"] == 4096
    # qemu-img reads the same option text the same way (qcow2's data_file)
    data_file = str(tmp_path / "q,,d.raw")
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"data_file={data_file},data_file_raw=on",
             tmp_path / "q.qcow2", "1M")
    assert sorted(p.name for p in tmp_path.glob("*,*")) == ["a,b.raw", "q,d.raw"]


@pytest.mark.parametrize(
    ("text", "items"),
    [
        ("a=1,b=2", ["a=1", "b=2"]),
        ("image_file=a,,b.raw", ["image_file=a,b.raw"]),
        ("x=a,,,,b", ["x=a,,b"]),
        ("x=a,,,b=2", ["x=a,", "b=2"]),
        ("x=end,,", ["x=end,"]),
        ("x=1,", ["x=1", ""]),
    ],
)
def test_split_options_follows_qemu(text: str, items: list[str]) -> None:
    assert split_options(text) == items


def test_o_help_lists_the_options_and_exits_0(tmp_path: Path) -> None:
    proc = run([require_tool("qemu-img"), "create", "-f", "qcow2", "-o", "help"])
    assert proc.stdout.startswith("Supported qcow2 options:")  # the habit being matched
    create = ["image_file", "image_file_raw", "backing_file", "backing_fmt", "cluster_size",
              "compat"]
    for args, names in (
        (["create", "-o", "help"], create),
        (["create", "-o", "?", tmp_path / "x.add-cow"], create),
        (["convert", "-O", "add-cow", "-o", "help"], ["image_file", "cluster_size", "compat"]),
        (["amend", "-o", "help"], ["compat"]),
    ):
        proc = addcow_cli(*args)
        assert proc.returncode == 0 and proc.stderr == ""
        lines = proc.stdout.splitlines()
        assert lines[0] == "Supported add-cow options:"
        assert sorted(line.split()[0] for line in lines[1:]) == sorted(names)
    assert not (tmp_path / "x.add-cow").exists()


def test_help_into_a_closed_pipe_is_quiet(tmp_path: Path) -> None:
    """``addcow create -o help | head -1``: a reader that went away is not an error,
    for the help texts printed while parsing as for any command's output."""
    image = tmp_path / "x.add-cow"
    addcow.create(image, image_file="x.raw", size=1 << 20)
    for args in (
        ["create", "-o", "help"], ["convert", "-O", "add-cow", "-o", "help"],
        ["amend", "-o", "help"], ["create", "--help"], ["--help"], ["--version"],
        ["io", "-c", "help", str(image)], ["map", str(image)],
    ):  # fmt: skip
        reader, writer = os.pipe()
        os.close(reader)  # closed before the command writes a byte
        try:
            proc = subprocess.run([sys.executable, "-m", "addcow", *args], stdout=writer,
                                  stderr=subprocess.PIPE, text=True, timeout=60)  # fmt: skip
        finally:
            os.close(writer)
        assert (proc.returncode, proc.stderr) == (0, ""), args
    proc = subprocess.run(["sh", "-c", f"{sys.executable} -m addcow create -o help | true"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "Traceback" not in proc.stderr and proc.stderr == ""


def test_a_convert_target_that_is_a_fifo_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "src.raw"
    src.write_bytes(b"\x12" * 65536)
    fifo = tmp_path / "out.raw"
    os.mkfifo(fifo)
    err = fails("convert", "-f", "raw", src, fifo)
    assert err == f"addcow: {fifo}: the target is a named pipe, not a regular file or block device"


@pytest.mark.parametrize(
    "argv",
    [
        ("info", "--force", "x.add-cow"),
        ("map", "--force", "x.add-cow"),
        ("check", "--force", "x.add-cow"),
        ("compare", "--force", "x.raw", "y.raw"),
        ("io", "--force", "-c", "read 0 1", "x.add-cow"),
    ],
    ids=lambda argv: argv[0],
)
def test_options_are_never_abbreviated(argv: tuple[str, ...]) -> None:
    """``--force`` is not taken for ``--force-share`` (-U) where only that exists."""
    proc = addcow_cli(*argv, check=False)
    assert proc.returncode == 1
    assert proc.stderr == "addcow: unrecognized arguments: --force (try 'addcow --help')\n"
