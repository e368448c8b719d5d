"""Re-pinning a backing URI with ``addcow rebase``, over a real nginx.

nginx derives its ETag from the file's modification time, so ``touch`` on the
server changes the pin while the bytes stay the same. ``rebase -u -b URL``
re-pins on the operator's word; a safe ``rebase -b URL`` re-pins only what it
checked: by comparing clusters while the old golden image can still be read,
or, once it cannot, by the SHA-256 recorded in the image. QEMU (qemu-io on a
qcow2 overlay of the same golden file, same writes) is the referee of content.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

from conftest import addcow as addcow_cli
from conftest import require_tool, run
from http_util import nginx_server

import addcow
from addcow.image import AddCowImage
from addcow.stores.remote import BackingURI

CLUSTER = 64 * 1024
SIZE = 2 << 20
WRITES = ("write -P 0xab 0 64k", "write -P 0xcd 1000000 5000")


def golden_bytes(seed: int = 9) -> bytes:
    return random.Random(seed).randbytes(SIZE)


def record(image: Path) -> BackingURI:
    with AddCowImage.open(image, readonly=True, with_backing=False) as img:
        assert img.header.backing_name is not None
        return BackingURI.decode(img.header.backing_name)


def touch(path: Path) -> None:
    """A new modification time (so a new nginx ETag), the same bytes."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 7_000_000_000))


def image_over(tmp_path: Path, url: str) -> Path:
    image = tmp_path / "d.add-cow"
    addcow_cli("create", "-q", "-b", url, "-F", "raw", "-o", "image_file=d.raw", image)
    addcow_cli("io", *[arg for w in WRITES for arg in ("-c", w)], image)
    return image


def same_as_qemu(tmp_path: Path, image: Path, golden: Path) -> None:
    """The image reads as a qcow2 overlay of ``golden`` given the same writes."""
    overlay = tmp_path / "overlay.qcow2"
    overlay.unlink(missing_ok=True)
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-b", str(golden), "-F",
         "raw", str(overlay)])  # fmt: skip
    run([require_tool("qemu-io"), "-f", "qcow2", *[a for w in WRITES for a in ("-c", w)],
         str(overlay)])  # fmt: skip
    full = tmp_path / "full.raw"
    full.unlink(missing_ok=True)
    addcow_cli("convert", image, full)
    compared = run([require_tool("qemu-img"), "compare", "-f", "raw", "-F", "qcow2", str(full),
                    str(overlay)])  # fmt: skip
    assert compared.stdout == "Images are identical.\n"


def refused(args: tuple[str | Path, ...], message: str) -> None:
    proc = addcow_cli(*args, check=False)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


def test_touched_golden_image_repinned_with_u(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    golden = www / "golden.raw"
    golden.write_bytes(golden_bytes())
    with nginx_server(www, tmp_path / "nginx") as web:
        url = f"{web.url}/golden.raw"
        image = image_over(tmp_path, url)
        before = record(image)
        touch(golden)
        refused(("convert", image, tmp_path / "x.raw"), "changed since this image was created")
        # the safe way cannot check it: no digest recorded, the old bytes are gone
        meta = image.read_bytes()
        refused(("rebase", "-b", url, image), "no sha256 of it is recorded")
        assert image.read_bytes() == meta
        addcow_cli("rebase", "-u", "-b", url, image)
        after = record(image)
        assert after.uri == url and after.size == SIZE
        assert after.etag is not None and after.etag != before.etag
        same_as_qemu(tmp_path, image, golden)


def test_safe_repin_checks_the_recorded_sha256(tmp_path: Path) -> None:
    www = tmp_path / "www"
    www.mkdir()
    golden = www / "golden.raw"
    data = golden_bytes()
    golden.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    with nginx_server(www, tmp_path / "nginx") as web:
        url = f"{web.url}/golden.raw"
        image = image_over(tmp_path, url)
        # a wrong digest is refused while the pin holds; the right one is recorded
        meta = image.read_bytes()
        refused(("rebase", "-b", url, "--backing-sha256", "0" * 64, image),
                f"expected the golden image's SHA-256 {'0' * 64}, found {digest}")  # fmt: skip
        assert image.read_bytes() == meta
        addcow_cli("rebase", "-b", url, "--backing-sha256", digest.upper(), image)
        assert record(image).sha256 == digest
        info = json.loads(addcow_cli("info", "--output=json", image).stdout)
        assert info["format-specific"]["data"]["backing-pin"]["sha256"] == digest
        # the bytes stay, the ETag changes: the safe rebase re-pins after reading them
        etag = record(image).etag
        touch(golden)
        addcow_cli("rebase", "-b", url, image)
        assert record(image).sha256 == digest and record(image).etag != etag
        same_as_qemu(tmp_path, image, golden)
        # a real change of content (same size): refused, the image left as it was
        other = bytearray(data)
        other[3 * CLUSTER : 3 * CLUSTER + 16] = b"another disk ..."
        (www / "golden.new").write_bytes(bytes(other))
        os.replace(www / "golden.new", golden)
        touch(golden)
        new_digest = hashlib.sha256(bytes(other)).hexdigest()
        meta = image.read_bytes()
        refused(("rebase", "-b", url, image),
                f"expected the golden image's SHA-256 {digest}, found {new_digest}")  # fmt: skip
        refused(("rebase", "-b", url, "--backing-sha256", new_digest, image),
                f"expected --backing-sha256 to be the recorded sha256 {digest}")  # fmt: skip
        assert image.read_bytes() == meta
        refused(("convert", image, tmp_path / "x.raw"), "changed since this image was created")


def test_safe_rebase_from_a_file_onto_a_url_copies_what_differs(tmp_path: Path) -> None:
    """The old backing can be read: clusters are compared, as for files."""
    old = tmp_path / "old.raw"
    data = golden_bytes()
    old.write_bytes(data)
    image = tmp_path / "d.add-cow"
    addcow_cli("create", "-q", "-b", old, "-F", "raw", "-o",
               f"image_file=d.raw,cluster_size={CLUSTER}", image)  # fmt: skip
    addcow_cli("io", *[arg for w in WRITES for arg in ("-c", w)], image)
    www = tmp_path / "www"
    www.mkdir()
    other = bytearray(data)
    other[5 * CLUSTER : 5 * CLUSTER + 10] = b"0123456789"
    (www / "golden.raw").write_bytes(bytes(other))
    with nginx_server(www, tmp_path / "nginx") as web:
        url = f"{web.url}/golden.raw"
        refused(("rebase", "-b", url, "--backing-root", tmp_path, image),
                "give --allow-backing-uri PREFIX")  # fmt: skip
        with addcow.open(image, readonly=True) as img:
            allocated = img.allocated_clusters
        addcow_cli("rebase", "-b", url, "--backing-root", tmp_path, "--allow-backing-uri",
                   web.url, image)  # fmt: skip
        assert record(image).uri == url
        with addcow.open(image, readonly=True) as img:
            assert img.allocated_clusters == allocated + 1  # cluster 5, copied from old.raw
        same_as_qemu(tmp_path, image, old)
