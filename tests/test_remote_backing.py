"""Backing URIs end to end: an add-cow image over a golden image that an NBD server exports.

The golden image is served by qemu-nbd (and, for a chain across the network,
by ``addcow serve --read-only``); every command runs over it as a user would.
QEMU is the referee: a qcow2 overlay over the same URI, written by qemu-io
with the same writes, must read the same (``qemu-img compare``).

The disk: 4 MiB of random bytes with a hole at clusters 20-27.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import CLUSTER, require_tool, run
from conftest import addcow as addcow_cli
from http_util import nginx_server
from nbd_util import qemu_nbd, served, start_qemu_nbd, stop_qemu_nbd

import addcow
from addcow import lifecycle, sysio
from addcow.errors import PathPolicyError, RemoteBackingError, RemoteChangedError
from addcow.format import V2_INCOMPAT_BACKING_URI
from addcow.serve.loop_reader import REOPEN_AFTER
from addcow.stores.remote import BackingURI, shown
from addcow.stores.remote.uri import parse_nbd

SIZE = 64 * CLUSTER
# What addcow serve logs when it reads unallocated clusters on its event loop's own
# connection to an NBD golden server.
LOOP_READS = "reads of unallocated clusters go out from the event loop"


def golden_bytes() -> bytes:
    data = bytearray(random.Random(5).randbytes(SIZE))
    data[20 * CLUSTER : 28 * CLUSTER] = bytes(8 * CLUSTER)
    return bytes(data)


def write_golden(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data[: 20 * CLUSTER])
        f.seek(28 * CLUSTER)
        f.write(data[28 * CLUSTER :])


@pytest.fixture
def golden(tmp_path: Path) -> Iterator[tuple[str, bytes]]:
    data = golden_bytes()
    write_golden(tmp_path / "golden.raw", data)
    with qemu_nbd(tmp_path / "golden.raw", tmp_path / "golden.sock") as uri:
        yield uri, data


def image_over(tmp_path: Path, uri: str, name: str = "d") -> Path:
    addcow_cli("create", "-q", "-b", uri, "-F", "raw", "-o", f"image_file={name}.raw",
               tmp_path / f"{name}.add-cow")  # fmt: skip
    return tmp_path / f"{name}.add-cow"


WRITES = ("write -P 0xab 0 64k", "write -P 0xcd 1000000 5000", "write -z 2M 128k")


def test_create_records_the_uri_and_its_pin(tmp_path: Path, golden: tuple[str, bytes]) -> None:
    uri, _ = golden
    image = image_over(tmp_path, uri)
    with addcow.open(image, readonly=True) as img:
        header = img.header
        assert header.incompatible_features == V2_INCOMPAT_BACKING_URI
        assert header.backing_name == f"{uri}\nsize={SIZE}".encode()
        assert img.size == SIZE
    info = json.loads(addcow_cli("info", "--output=json", image).stdout)
    assert info["backing-filename"] == info["full-backing-filename"] == uri
    assert info["backing-filename-format"] == "raw"
    data = info["format-specific"]["data"]
    assert data["backing-pin"] == {"size": SIZE}
    assert data["incompatible-features"] == ["backing_uri"]
    chain = json.loads(addcow_cli("info", "--backing-chain", "--output=json", image).stdout)
    assert [(e["filename"], e["format"], e["virtual-size"]) for e in chain] == [
        (str(image), "add-cow", SIZE), (uri, "raw", SIZE),
    ]  # fmt: skip
    shown = addcow_cli("info", "--backing-chain", image).stdout
    assert f"image: {uri}\nfile format: raw\nvirtual size: 4 MiB ({SIZE} bytes)\n" in shown


def test_every_command_over_an_nbd_golden_image_with_qemu_as_referee(
    tmp_path: Path, golden: tuple[str, bytes]
) -> None:
    uri, data = golden
    image = image_over(tmp_path, uri)
    script = [arg for w in WRITES for arg in ("-c", w)]
    addcow_cli("io", *script, image)
    overlay = tmp_path / "overlay.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", uri, "-F", "raw",
         str(overlay)])  # fmt: skip
    run([require_tool("qemu-io"), "-f", "qcow2", *script, str(overlay)])
    full = tmp_path / "full.raw"
    addcow_cli("convert", image, full)
    assert run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(full),
                str(overlay)]).stdout == "Images are identical.\n"  # fmt: skip
    # map: the golden image's hole is reported as zero at depth 1, without reading it
    extents = json.loads(addcow_cli("map", "--output=json", image).stdout)
    hole = [e for e in extents if e["start"] == 20 * CLUSTER]
    assert hole and hole[0]["depth"] == 1 and hole[0]["zero"] and not hole[0]["data"]
    assert addcow_cli("check", image).returncode == 0
    # served: what NBD clients read is the same disk
    with served(tmp_path, image, args=("--read-only",)) as srv:
        assert run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", srv.uri,
                    str(overlay)]).stdout == "Images are identical.\n"  # fmt: skip
    # streamed and detached: a standalone raw disk with the same content
    addcow_cli("stream", image)
    addcow_cli("detach", image)
    assert not image.exists()
    assert (tmp_path / "d.raw").read_bytes() == full.read_bytes()
    # past the writes (the last zeroes clusters 32-33), the golden image's bytes
    assert full.read_bytes()[34 * CLUSTER :] == data[34 * CLUSTER :]


def test_serve_streams_from_the_golden_server_while_a_client_writes(
    tmp_path: Path, golden: tuple[str, bytes]
) -> None:
    uri, data = golden
    image = image_over(tmp_path, uri)
    args = ("--stream", "--stream-rate", "2M", "--detach-when-complete")
    with served(tmp_path, image, args=args) as srv:
        run([require_tool("qemu-io"), "-f", "raw", "-c", "write -P 0x5a 3M 64k", srv.uri])
        assert srv.logged("detached: removed the .add-cow file", timeout=60), srv.stderr()
    expected = bytearray(data)
    expected[3 << 20 : (3 << 20) + CLUSTER] = b"\x5a" * CLUSTER
    assert (tmp_path / "d.raw").read_bytes() == bytes(expected)


def test_a_chain_across_the_network(tmp_path: Path, golden: tuple[str, bytes]) -> None:
    """Host B serves its add-cow image read-only; host A's image names B's export."""
    uri, data = golden
    b = image_over(tmp_path, uri, "b")
    addcow_cli("io", "-c", "write -P 0x11 64k 64k", b)
    with served(tmp_path, b, args=("--read-only",), name="b.sock") as srv_b:
        a = image_over(tmp_path, srv_b.uri, "a")
        addcow_cli("io", "-c", "write -P 0x22 0 4k", a)
        expected = bytearray(data)
        expected[CLUSTER : 2 * CLUSTER] = b"\x11" * CLUSTER
        expected[:4096] = b"\x22" * 4096
        full = tmp_path / "a-full.raw"
        addcow_cli("convert", a, full)
        assert full.read_bytes() == bytes(expected)


def test_a_golden_image_that_changed_is_refused(tmp_path: Path) -> None:
    data = golden_bytes()
    golden = tmp_path / "golden.raw"
    write_golden(golden, data)
    sock = tmp_path / "golden.sock"
    with qemu_nbd(golden, sock) as uri:
        image = image_over(tmp_path, uri)
    with open(golden, "ab") as f:
        f.write(b"x" * CLUSTER)  # the golden image is replaced by a larger one
    with qemu_nbd(golden, sock):
        proc = addcow_cli("io", "-c", "read 0 4k", image, check=False)
        assert proc.returncode == 1
        assert proc.stderr == (
            f"addcow: {uri}: the golden image changed since this image was created: size "
            f"{SIZE} when pinned, now {SIZE + CLUSTER}\n"
        )
        with pytest.raises(RemoteChangedError):
            addcow.open(image, readonly=True)


def test_untrusted_images_may_name_only_allowed_uris(
    tmp_path: Path, golden: tuple[str, bytes]
) -> None:
    uri, _ = golden
    image = image_over(tmp_path, uri)
    root = str(tmp_path)
    with pytest.raises(PathPolicyError, match="--allow-backing-uri PREFIX"):
        addcow.open(image, readonly=True, backing_root=root)
    refused = addcow_cli("info", "--backing-root", root, image, check=False)
    assert refused.returncode == 1 and "refused" in refused.stderr
    for prefix, ok in (("nbd+unix:///", True), (uri, True), ("nbd+unix:///x", False),
                       ("nbd://", False), ("nbd+unix:///?socket=" + root, True),
                       ("nbd+unix:///?socket=" + root + "/gold", False)):  # fmt: skip
        if ok:
            with addcow.open(image, readonly=True, backing_root=root, allowed_uris=[prefix]):
                pass
        else:
            with pytest.raises(PathPolicyError):
                addcow.open(image, readonly=True, backing_root=root, allowed_uris=[prefix])
    out = addcow_cli("io", "--backing-root", root, "--allow-backing-uri", uri, "-c",
                     "read 0 4k", image)  # fmt: skip
    assert out.returncode == 0


def test_a_file_named_like_a_uri_stays_a_file(tmp_path: Path) -> None:
    (tmp_path / "nbd:").mkdir()
    (tmp_path / "nbd:" / "x").write_bytes(b"\x42" * SIZE)
    image = tmp_path / "d.add-cow"
    addcow_cli("create", "-q", "-b", "./nbd://x", "-F", "raw", "-o", "image_file=d.raw", image)
    with addcow.open(image, readonly=True) as img:
        assert img.header.incompatible_features == 0
        assert img.read(0, 4) == b"\x42" * 4
    # A header naming "nbd://x" without BACKING_URI means that file too.
    with addcow.open(image) as img:
        img.rewrite_header(img.header.with_changes(backing_name=b"nbd://x"))
    with addcow.open(image, readonly=True) as img:
        assert img.header.backing_name == b"nbd://x" and not img.header.backing_uri
        assert img.read(0, 4) == b"\x42" * 4


def test_uri_records_are_parsed_strictly() -> None:
    good = BackingURI("https://h.example/g.raw", 10, '"abc"')
    assert BackingURI.decode(good.encode()) == good
    digested = BackingURI("nbd://h/x", 10, sha256="0123456789abcdef" * 4)
    assert BackingURI.decode(digested.encode()) == digested
    for raw, problem in (
        (b"nbd://h/x", "size=BYTES"),
        (b"nbd://h/x\nsize=0", "size=BYTES"),
        (b"nbd://h/x\nsize=1\nsize=1", "once each"),
        (b"nbd://h/x\nsize=1\netag=\"a\"", "only size=, sha256= in the record of a nbd:// URI"),
        (b"nbd://h/x\nsize=1\nsha256=" + b"A" * 64, "sha256: expected 64 lower-case"),
        (b"nbd://h/x\nsize=1\nsha256=" + b"a" * 63, "sha256: expected 64 lower-case"),
        (b"nbd://h/x\nsize=1\ncolour=blue", "once each"),
        (b"file:///etc/passwd\nsize=1", "expected one of nbd://"),
        (b"nbd://h/x\tsize=1", "printable ASCII"),
        (b"http://h/x#frag\nsize=1", "no #fragment"),
        (b"nbd://h/" + b"x" * 9000 + b"\nsize=1", "at most 8192 bytes"),
    ):
        with pytest.raises(RemoteBackingError, match=problem):
            BackingURI.decode(raw)


@pytest.mark.parametrize(("uri", "printed"), [
    ("https://h.example/g.raw?X-Amz-Signature=5ecret", "https://h.example/g.raw?..."),
    ("https://u:5ecret@h.example/g.raw", "https://u:...@h.example/g.raw"),
    ("nbd://u:5ecret@h/x?token=5ecret#5ecret", "nbd://u:...@h/x?..."),
    ("nbd+unix:///x?socket=/run/g.sock", "nbd+unix:///x?socket=/run/g.sock"),
    ("nbd+unix:///x?socket=/s&tls-psk=5ecret", "nbd+unix:///x?..."),
    ("ftp://h/x?5ecret", "ftp://h/x?..."),
])  # fmt: skip
def test_one_redaction_rule_for_every_uri(uri: str, printed: str) -> None:
    """A password and a query never reach a message, whatever the scheme; an NBD
    socket path (its only query parameter) does."""
    assert shown(uri) == printed
    messages = []
    try:
        BackingURI.decode(f"{uri}\nsize=1".encode())
    except RemoteBackingError as exc:
        messages.append(str(exc))
    with pytest.raises(RemoteBackingError) as nbd:
        parse_nbd(uri if "5ecret" in uri else uri + "&x=1")
    messages.append(str(nbd.value))
    assert not any("5ecret" in message for message in messages), messages


def test_commands_that_cannot_take_a_uri_say_so(tmp_path: Path, golden: tuple[str, bytes]) -> None:
    uri, _ = golden
    image = image_over(tmp_path, uri)
    for args, message in (
        (("amend", "-o", "compat=1", image), "a backing URI (version 1 records file names only)"),
        (("commit", image), "the backing is a URI, which addcow only reads"),
        (("create", "-q", "-b", uri, "-F", "raw", "-o", "compat=1,image_file=v1.raw",
          tmp_path / "v1.add-cow"), "a backing URI needs a version 2 image"),
    ):  # fmt: skip
        proc = addcow_cli(*args, check=False)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert not (tmp_path / "v1.add-cow").exists()
    # the image is untouched by the refusals
    with addcow.open(image, readonly=True) as img:
        assert img.header.backing_name is not None
        assert img.header.backing_name.startswith(uri.encode())


# -- HTTP(S) golden images (nginx) ---------------------------------------------------------


def test_an_http_golden_image_pinned_streamed_and_replaced(tmp_path: Path) -> None:
    data = golden_bytes()
    www = tmp_path / "www"
    www.mkdir()
    write_golden(www / "golden.raw", data)
    with nginx_server(www, tmp_path / "nginx") as web:
        url = f"{web.url}/golden.raw"
        image = image_over(tmp_path, url)
        info = json.loads(addcow_cli("info", "--output=json", image).stdout)
        pin = info["format-specific"]["data"]["backing-pin"]
        assert pin["size"] == SIZE and pin["etag"].startswith('"')
        addcow_cli("io", "-c", "write -P 0x77 0 4k", image)
        full = tmp_path / "full.raw"
        addcow_cli("convert", image, full)
        expected = bytearray(data)
        expected[:4096] = b"\x77" * 4096
        assert full.read_bytes() == bytes(expected)
        # QEMU's curl driver reads the same golden image
        golden_json = json.dumps({"file.driver": "http", "file.url": url})
        compared = run([require_tool("qemu-img"), "compare", "-f", "raw", str(www / "golden.raw"),
                        f"json:{golden_json}"])  # fmt: skip
        assert compared.stdout == "Images are identical.\n"
        # the golden image is replaced on the server (same size, new content)
        time.sleep(1.1)  # a new Last-Modified, hence a new ETag
        replaced = www / "golden.new"
        replaced.write_bytes(bytes(reversed(data)))
        os.replace(replaced, www / "golden.raw")
        proc = addcow_cli("stream", image, check=False)
        assert proc.returncode == 1
        assert "the golden image at" in proc.stderr and "changed since this image was created" \
            in proc.stderr, proc.stderr  # fmt: skip
        info = json.loads(addcow_cli("info", "--output=json", image).stdout)
        assert info["format-specific"]["data"]["allocated-clusters"] == 1  # nothing copied
        with pytest.raises(RemoteChangedError, match="changed since this image was created"):
            addcow.open(image, readonly=True)


def test_serve_clients_wait_while_the_golden_server_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve_loop: str
) -> None:
    """The golden server goes away and comes back within the reconnect delay: a client
    of ``addcow serve`` sees its reads wait, not fail, and gets the right bytes.

    qemu-nbd advertises multi-conn, so the server reads unallocated clusters on
    its event loop's own connection; when that breaks, the reads go through the
    store, which reconnects, and the loop's connection is opened again after."""
    data = golden_bytes()
    golden = tmp_path / "golden.raw"
    write_golden(golden, data)
    sock = tmp_path / "golden.sock"
    store = start_qemu_nbd(golden, sock)
    try:
        image = image_over(tmp_path, f"nbd+unix:///?socket={sock}")
        monkeypatch.setenv("ADDCOW_RECONNECT_DELAY", "30")
        with served(tmp_path, image) as srv:
            assert srv.logged(LOOP_READS), srv.stderr()
            assert f"event loop: {serve_loop}" in srv.stderr()
            run([require_tool("qemu-io"), "-f", "raw", "-c", "read 0 4k", srv.uri])
            stop_qemu_nbd(store)
            copy = subprocess.Popen(
                [require_tool("nbdcopy"), srv.uri, str(tmp_path / "copy.raw")],
                stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            time.sleep(1.5)
            assert copy.poll() is None, "the client failed instead of waiting"
            store = start_qemu_nbd(golden, sock)
            _, err = copy.communicate(timeout=90)
            assert copy.returncode == 0, err
            assert (tmp_path / "copy.raw").read_bytes() == data
            assert srv.logged("the event loop's connection failed"), srv.stderr()
            time.sleep(REOPEN_AFTER)
            got = run([require_tool("qemu-io"), "-f", "raw", "-c", "read -v 0 16", "-c",
                       "read -v 128k 16", srv.uri]).stdout  # fmt: skip
            assert got.count("read 16/16 bytes") == 2
            deadline = time.monotonic() + 10  # the first read starts the reopening
            while srv.stderr().count(LOOP_READS) < 2:
                assert time.monotonic() < deadline, srv.stderr()
                time.sleep(0.05)
    finally:
        stop_qemu_nbd(store)


def test_a_stream_from_a_uri_leaves_its_copy_out_of_the_page_cache(tmp_path: Path) -> None:
    """``addcow stream`` from a backing URI settles the spans it wrote as it goes
    (written back, then dropped from the page cache, as nbdcopy does): most of the
    copy is not resident when the stream ends, and the disk is right."""
    data = random.Random(9).randbytes(96 << 20)
    golden = tmp_path / "golden96.raw"
    golden.write_bytes(data)
    with qemu_nbd(golden, tmp_path / "golden96.sock") as uri:
        image = image_over(tmp_path, uri, "s")
        addcow_cli("stream", image)
    raw = tmp_path / "s.raw"
    resident = int(run([require_tool("fincore"), "--bytes", "--noheadings", "--output", "RES",
                        str(raw)]).stdout)  # fmt: skip
    assert resident <= len(data) // 2, resident
    assert raw.read_bytes() == data


def test_settling_never_waits_on_the_descriptor_that_makes_data_durable(
    tmp_path: Path, golden: tuple[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waits of sync_file_range report a writeback error once per open file: on the
    image file's own descriptor they would hide it from the commit's fdatasync. The
    stream settles through a descriptor of its own, of the same file."""
    uri, data = golden
    image_path = image_over(tmp_path, uri)
    seen: list[tuple[int, int]] = []
    settle = sysio.settle_writeback

    def spy(fd: int, offset: int, length: int) -> None:
        seen.append((fd, offset))
        settle(fd, offset, length)

    monkeypatch.setattr(sysio, "settle_writeback", spy)
    monkeypatch.setattr(lifecycle, "STREAM_SPAN_REMOTE", 8 * CLUSTER)
    with addcow.open(image_path) as image:
        own = os.fstat(image.image_fd)
        opened: list[os.stat_result] = []
        reopen = sysio.reopen_for_settling

        def spy_reopen(fd: int) -> int:
            new = reopen(fd)
            opened.append(os.fstat(new))
            return new

        monkeypatch.setattr(sysio, "reopen_for_settling", spy_reopen)
        lifecycle.stream(image)
        assert seen, "nothing was settled"
        assert all(fd != image.image_fd for fd, _ in seen)
        assert [(s.st_dev, s.st_ino) for s in opened] == [(own.st_dev, own.st_ino)]
    assert (tmp_path / "d.raw").read_bytes() == data
