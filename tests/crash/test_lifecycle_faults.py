"""Faults in every call that changes an image: create, stream, detach, commit,
rebase (safe and unsafe), resize (grow and shrink), amend (both ways), and view
and fold (:mod:`addcow.view`).

For each call a run without faults counts every I/O call it makes on the files
of its directory (the .add-cow file, the image file, the backing files and any
temporary file; ``rename`` and ``unlink`` of names there too). Then, for every
call number N and every fault that call can suffer, the call runs again on fresh
files with call N failing. Required, and checked:

* only an :class:`addcow.AddCowError` escapes, in one line, saying the injected
  error (a short transfer must not make it fail at all);
* the files are left as a crash could leave them: the image opens, check finds
  no corruption and the content is what it was before the call (each case's
  ``judge`` says which states are allowed, e.g. old or new size for resize; a
  failed view leaves no record and no view file; a failed fold leaves the view
  in force reading as QEMU left it, or pending, and the next fold finishes it);
* the call, run again without the fault, succeeds and leaves the expected result.

``make test`` runs every 3rd call number; ``make campaign`` (ADDCOW_CAMPAIGN=1)
and ``make campaign-sites`` (ADDCOW_CAMPAIGN=sites) run all of them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from qcow2_util import convert_raw, qemu_img, qemu_io
from storage import ERRNO, FAULT_KINDS, SHORT, Fault, Layer
from workload import CLUSTER, SIZE, build

import addcow
from addcow import AddCowError, AddCowIOError, lifecycle, streaming
from addcow.check import check_image
from addcow.format import Header
from addcow.view import fold_view, make_view

EVERY_SITE = os.environ.get("ADDCOW_CAMPAIGN") in ("1", "sites")
STRIDE = 1 if EVERY_SITE else 3
BIG = 65536  # cluster size of the images amend converts (version 1 has no other)


@dataclass
class Case:
    """One call: how to set it up, run it, and judge what a failure may leave."""

    name: str
    run: Callable[[Path], None]
    judge: Callable[[Path, bytes], list[str]]
    prepare: Callable[[Path], bytes]
    done: Callable[[Path], bool]
    """True once the call's effect is in place (a retry then has nothing to do)."""


def _prepare(d: Path) -> bytes:
    """The workload's image with clusters 0-3 written: the content a reader sees."""
    content = bytearray(build(d))
    with addcow.open(d / "d.add-cow") as img:
        img.write(b"\x51" * 4 * CLUSTER, 0)
    content[: 4 * CLUSTER] = b"\x51" * 4 * CLUSTER
    return bytes(content)


def _content(path: Path, **kwargs: object) -> bytes:
    with addcow.open(path, readonly=True, **kwargs) as img:  # type: ignore[arg-type]
        return img.read(0, img.size)


def _sound(path: Path) -> list[str]:
    result = check_image(path)
    if result.corruptions or result.check_errors:
        return [f"check: {result.messages}"]
    return []


def _unchanged(d: Path, content: bytes) -> list[str]:
    path = d / "d.add-cow"
    problems = _sound(path)
    if _content(path) != content:
        problems.append("the content changed")
    return problems


# -- the cases ---------------------------------------------------------------------------


def _create(d: Path) -> None:
    target = d / "n.add-cow"
    addcow.create(target, image_file="n.raw", backing_file="d.add-cow",
                  backing_format="add-cow", force=target.exists())


def _judge_create(d: Path, content: bytes) -> list[str]:
    target = d / "n.add-cow"
    if target.exists():
        problems = _sound(target)
        if _content(target) != content:
            problems.append("the new image does not show its backing's content")
        return problems
    left = [p.name for p in d.iterdir() if p.name.startswith(".n.add-cow")]
    return [f"a failed create left {left}"] if left else []


def _stream(d: Path) -> None:
    saved = lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES
    lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES = 3 * CLUSTER, 5 * CLUSTER
    try:
        with addcow.open(d / "d.add-cow") as img:
            lifecycle.stream(img, threads=1)  # one thread: call numbers repeat run to run
    finally:
        lifecycle.STREAM_SPAN, streaming.COMMIT_BYTES = saved


def _prepare_complete(d: Path) -> bytes:
    content = _prepare(d)
    _stream(d)
    return content


def _detach(d: Path) -> None:
    image = addcow.open(d / "d.add-cow")
    try:
        lifecycle.detach(image)
    finally:
        image.close()


def _judge_detach(d: Path, content: bytes) -> list[str]:
    if (d / "d.add-cow").exists():
        return _unchanged(d, content)
    raw = (d / "d.raw").read_bytes()
    return [] if raw == content else ["the raw disk left is not the image's content"]


def _commit(d: Path) -> None:
    with addcow.AddCowImage.open(d / "d.add-cow", readonly=True, with_backing=False) as img:
        lifecycle.commit(img)


def _rebase(d: Path) -> None:
    with addcow.open(d / "d.add-cow") as img:
        lifecycle.rebase(img, "other.raw", "raw")


def _prepare_other(d: Path) -> bytes:
    content = _prepare(d)
    other = bytearray((d / "base.raw").read_bytes())
    other[6 * CLUSTER : 10 * CLUSTER] = b"\x77" * 4 * CLUSTER
    (d / "other.raw").write_bytes(other)
    return content


def _rebase_unsafe(d: Path) -> None:
    with addcow.AddCowImage.open(d / "d.add-cow", with_backing=False) as img:
        img.set_backing("other.raw", "raw")


def _judge_rebase_unsafe(d: Path, content: bytes) -> list[str]:
    path = d / "d.add-cow"
    problems = _sound(path)
    with addcow.AddCowImage.open(path, readonly=True, with_backing=False) as img:
        name = img.header.backing_name
    if name not in (b"base.raw", b"other.raw"):
        problems.append(f"backing name {name!r}")
    return problems


def _grow(d: Path) -> None:
    with addcow.open(d / "d.add-cow") as img:
        img.resize(SIZE + 5 * CLUSTER)


def _judge_grow(d: Path, content: bytes) -> list[str]:
    path = d / "d.add-cow"
    problems = _sound(path)
    shown = _content(path)
    if shown not in (content, content + bytes(5 * CLUSTER)):
        problems.append(f"content of {len(shown)} bytes is neither the old nor the grown disk")
    return problems


NEW_SMALL = SIZE - 3 * CLUSTER - 100


def _shrink(d: Path) -> None:
    with addcow.open(d / "d.add-cow") as img:
        img.resize(NEW_SMALL, shrink=True)


def _judge_shrink(d: Path, content: bytes) -> list[str]:
    path = d / "d.add-cow"
    problems = _sound(path)
    shown = _content(path)
    if shown not in (content, content[:NEW_SMALL]):
        problems.append(f"content of {len(shown)} bytes is neither the old nor the shrunk disk")
    return problems


def _prepare_amend(d: Path, version: int) -> bytes:
    d.mkdir(parents=True, exist_ok=True)
    for p in d.iterdir():
        p.unlink()
    base = bytes(range(1, 256)) * (4 * BIG // 255) + b"\x01" * (4 * BIG % 255)
    (d / "base.raw").write_bytes(base)
    addcow.create(d / "d.add-cow", image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", version=version)
    with addcow.open(d / "d.add-cow") as img:
        img.write(b"\x52" * 100, BIG + 7)
    return base[: BIG + 7] + b"\x52" * 100 + base[BIG + 107 :]


def _amend_to(version: int) -> Callable[[Path], None]:
    def amend(d: Path) -> None:
        with addcow.AddCowImage.open(d / "d.add-cow", with_backing=False) as img:
            lifecycle.amend(img, version)

    return amend


def _header(d: Path) -> addcow.Header:
    with addcow.AddCowImage.open(d / "d.add-cow", readonly=True, with_backing=False) as img:
        return img.header


def _committed(d: Path) -> bool:
    with open(d / "base.raw", "rb") as f:
        return f.read(4 * CLUSTER) == b"\x51" * 4 * CLUSTER


def _size(d: Path) -> int:
    with addcow.open(d / "d.add-cow", readonly=True) as img:
        return img.size


VIEW_SIZE = 24 * CLUSTER - 1536  # whole 512-byte sectors, as QEMU needs; the last cluster partial
THROUGH_VIEW = ("write -P 0x61 4096 512", "write -P 0x62 0x5000 0x3000",
                "write -P 0x63 0xa100 100", "write -z 0 0x1000", "discard 0x9000 0x1000",
                "write -z 0x2000 0x2000")  # fmt: skip


def _prepare_view(d: Path) -> bytes:
    """An image with clusters 1-3 and the partial last one written, for a view."""
    base = b"".join(bytes([0x30 + c]) * CLUSTER for c in range(24))[:VIEW_SIZE]
    (d / "base.raw").write_bytes(base)
    addcow.create(d / "d.add-cow", image_file="d.raw", backing_file="base.raw",
                  backing_format="raw", size=VIEW_SIZE, cluster_size=CLUSTER)  # fmt: skip
    with addcow.open(d / "d.add-cow") as img:
        img.write(b"\x51" * 3 * CLUSTER, CLUSTER)
        img.write(b"\x52" * 100, VIEW_SIZE - 100)
    return _content(d / "d.add-cow")


def _prepare_fold(d: Path) -> bytes:
    """The view of :func:`_prepare_view`'s image, written through by qemu-io (data over
    allocated and unallocated clusters, zero clusters, a discard over the backing):
    what the image must read as once folded."""
    _prepare_view(d)
    make_view(d / "d.add-cow", d / "v.qcow2")
    qemu_io(d / "v.qcow2", *THROUGH_VIEW)
    return convert_raw(d / "v.qcow2")


def _view(d: Path) -> None:
    make_view(d / "d.add-cow", d / "v.qcow2")


def _fold(d: Path) -> None:
    fold_view(d / "d.add-cow")


def _record(d: Path) -> Header:
    """The header as it is on disk (no reader opens an image with a view record)."""
    with open(d / "d.add-cow", "rb") as f:
        return Header.unpack(f.read(4096))


def _judge_view(d: Path, content: bytes) -> list[str]:
    header, view = _record(d), d / "v.qcow2"
    if header.view:
        if not view.exists():
            return ["the view is in force but its file is missing"]
        problems = [] if "No errors were found" in qemu_img("check", view) else ["qemu-img check"]
        if convert_raw(view) != content:
            problems.append("the view does not read as the image")
        return problems
    problems = []
    if header.view_name is not None:
        problems.append("a failed view left its record (the image pending)")
        fold_view(d / "d.add-cow")  # what the user runs; then judge what is left
    if view.exists():
        problems.append("a failed view left its file")
    return problems + _unchanged(d, content)


def _judge_fold(d: Path, content: bytes) -> list[str]:
    header, view = _record(d), d / "v.qcow2"
    if header.view:
        if not view.exists():
            return ["the view is still in force but its file is gone"]
        return [] if convert_raw(view) == content else ["the view no longer reads as QEMU left it"]
    if header.view_name is not None:
        return []  # pending: the bitmap holds the view's clusters; the next fold retires it
    problems = ["the view file outlived its record"] if view.exists() else []
    return problems + _unchanged(d, content)


CASES = [
    Case("create", _create, _judge_create, _prepare, lambda d: (d / "n.add-cow").exists()),
    Case("stream", _stream, _unchanged, _prepare,
         lambda d: bool(_header(d).all_allocated)),
    Case("detach", _detach, _judge_detach, _prepare_complete,
         lambda d: not (d / "d.add-cow").exists()),
    Case("commit", _commit, _unchanged, _prepare, _committed),
    Case("rebase", _rebase, _unchanged, _prepare_other,
         lambda d: _header(d).backing_name == b"other.raw"),
    Case("rebase -u", _rebase_unsafe, _judge_rebase_unsafe, _prepare_other,
         lambda d: _header(d).backing_name == b"other.raw"),
    Case("resize grow", _grow, _judge_grow, _prepare, lambda d: _size(d) > SIZE),
    Case("resize shrink", _shrink, _judge_shrink, _prepare, lambda d: _size(d) < SIZE),
    Case("amend 2 to 1", _amend_to(1), _unchanged, lambda d: _prepare_amend(d, 2),
         lambda d: _header(d).version == 1),
    Case("amend 1 to 2", _amend_to(2), _unchanged, lambda d: _prepare_amend(d, 1),
         lambda d: _header(d).version == 2),
    Case("view", _view, _judge_view, _prepare_view,
         lambda d: _record(d).view and (d / "v.qcow2").exists()),
    Case("fold", _fold, _judge_fold, _prepare_fold, lambda d: _record(d).view_name is None),
]


# -- the runs ----------------------------------------------------------------------------


def _fresh(d: Path, case: Case) -> bytes:
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    return case.prepare(d)


def _attempt(d: Path, case: Case, fault: Fault | None) -> tuple[Exception | None, Layer]:
    layer = Layer({}, fault=fault, record=False, directory=d)
    with layer.active():
        try:
            case.run(d)
        except Exception as exc:
            return exc, layer
    return None, layer


def _judge_error(exc: Exception | None, fault: Fault) -> list[str]:
    if exc is None:
        if fault.kind != SHORT and fault.call != "lseek":
            return [f"{fault} was absorbed without an error"]
        return []
    if not isinstance(exc, AddCowError):
        return [f"raised {type(exc).__name__}: {exc}"]
    if fault.kind == SHORT:
        return [f"a short transfer made it fail: {exc}"]
    code = ERRNO[fault.kind]
    kept = isinstance(exc, AddCowIOError) and exc.errno == code
    problems = []
    if not kept and os.strerror(code) not in str(exc):
        problems.append(f"the error does not say {os.strerror(code)}: {exc!r}")
    if "\n" in str(exc):
        problems.append(f"message is not one line: {exc!r}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_lifecycle_call_fails_cleanly(tmp_path: Path, case: Case) -> None:
    d = tmp_path / "run"
    content = _fresh(d, case)
    assert not case.done(d), "the control starts before the call"
    exc, counted = _attempt(d, case, None)
    assert exc is None, exc
    assert case.judge(d, content) == [], "the control run"
    assert case.done(d), "the control run did the call"
    calls = counted.calls
    assert calls, "no I/O call was seen"
    problems: list[str] = []
    injected = 0
    for n in range(0, len(calls), STRIDE):
        call, _ = calls[n]
        for kind in FAULT_KINDS[call]:
            content = _fresh(d, case)
            fault = Fault(n, kind)
            exc, _layer = _attempt(d, case, fault)
            assert fault.fired, (case.name, n, calls[n], fault)
            injected += 1
            where = f"{case.name}: call {n} {fault.call} on {fault.file}, {kind}"
            found = _judge_error(exc, fault)
            found += case.judge(d, content)
            if not case.done(d):
                retry, _ = _attempt(d, case, None)
                if retry is not None:
                    found.append(f"the retry failed: {type(retry).__name__}: {retry}")
                found += case.judge(d, content)
            if not case.done(d):
                found.append("after the retry the call's effect is not there")
            problems += [f"{where}: {p}" for p in found]
    print(f"\n{case.name}: {len(calls)} calls, {injected} faults injected")
    assert injected > 0
    assert problems == [], "\n".join(problems[:20])
