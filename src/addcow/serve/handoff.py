"""Handing a complete export over to the QEMU that uses it: QEMU runs the raw file itself.

Once every cluster is in the image file the server adds nothing a plain
``file`` node in QEMU cannot do. The handoff switches QEMU's disk, through its
QMP monitor, from the NBD node that reaches this server to a ``file`` node on
the raw image file, with no pause the guest can see; then the NBD connection
closes and the .add-cow file is detached.

Finding QEMU's node (nothing is changed before this is settled)
    ``query-block`` maps each device to its inserted node, and
    ``query-named-block-nodes`` (``flat: true``) lists every node with its
    driver and file name. The device's node is a ``raw`` format node over an
    ``nbd`` protocol node (``-blockdev driver=nbd ... -blockdev driver=raw``,
    or ``-drive file=nbd+unix://...,format=raw`` with generated ``#block``
    names), or the ``nbd`` node itself. The NBD node must name THIS server
    (the same Unix socket file, or the same TCP port and an address of the
    same host) and this export (an empty name is the default, first export);
    otherwise the handoff is refused: "QEMU's node is not ours".

The steps, and what a failure at each does
    1. Hold the export's writes (new ones wait in the server, they do not
       fail), wait for the calls in the pool, flush, cut the image file to the
       virtual size. A failure: writes go on; nothing else changed.
    2. Release the QEMU byte-range locks on the raw file
       (:func:`~addcow.locking.unlock_raw`; the .add-cow file keeps its own
       lock): QEMU cannot take its write permission while they are held.
    3. ``blockdev-add`` a ``file`` node on the raw file (``aio: threads``,
       ``cache.direct`` and ``cache.no-flush`` and ``read-only`` as the old
       nodes had them), then let the writes go again (see below why).
    4. Switch the device: a named format node is reopened with the new
       ``file`` child (``blockdev-reopen`` resets every option not given, so
       its ``read-only``, ``detect-zeroes`` and ``cache`` are given back); a
       generated one (``-drive``) cannot be reopened (its name is not among
       its options), so a new ``raw`` node goes over the file node and the
       device's ``drive`` property is set to it (``qom-set``; QEMU then frees
       the old nodes); a device on the NBD node itself gets the file node so.
    5. ``blockdev-del`` the NBD node if the monitor owns it (a named one): the
       NBD connection closes.
    A failure in 3 or 4 (QEMU answers an error, or does not answer): the nodes
    this handoff added are deleted again, the writes go on, the server takes
    its locks back and serves as before; the guest never sees an error, and
    the failure is one log line (and the control command's error). After 4
    QEMU runs on the raw file: a failure in 5 leaves an unused NBD node in
    QEMU (logged), and the handoff counts as done.

Why no write is lost
    QEMU drains the device's nodes while it switches them (every request in
    flight on the NBD node gets its reply first) and sends nothing over NBD
    after the switch. Every write the server completed went into the raw
    file with ``pwrite`` before its reply, so it is in the page cache QEMU's
    ``file`` node reads through (and a ``cache.direct`` read writes dirty
    pages back first). Writes are held only until the file node is added, not
    during the switch: QEMU's drain waits for the replies to the writes in
    flight, so a write held then would never be answered and the switch would
    never end. The requests the server answers during the switch, without its
    locks, go to the same file QEMU is about to open; the guest's next flush
    syncs that file, theirs included.

Killed between 2 and 4
    QEMU still runs on the NBD node and its connection is gone; the raw file
    holds every write the server acknowledged, and the .add-cow file is still
    there, complete, ALL_ALLOCATED durable. With ``reconnect-delay`` on QEMU's
    NBD node, restarting ``addcow serve`` on the same socket lets QEMU
    reconnect, and a new handoff finishes the job. Without it QEMU's NBD node
    stays disconnected: the disk's I/O fails in the guest and a switch fails
    (QEMU flushes the old node first); the data is in the raw file.

Afterwards
    The .add-cow file is detached (:func:`~addcow.serve.live.detach`), and
    once every export is handed over the server stops cleanly, unless
    ``--handoff-stay``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import urllib.parse
from dataclasses import dataclass
from typing import Any

from ..errors import AddCowError
from ..locking import lock_raw, unlock_raw
from ..nbd import wire
from . import live
from .export import (
    HANDOFF_DONE,
    HANDOFF_FAILED,
    HANDOFF_RUNNING,
    HANDOFF_WAITING,
    Export,
)
from .qmp import QMPClient, flag, members, text
from .server import NBDServer

log = logging.getLogger("addcow.serve.handoff")

NODE_PREFIX = "addcow"
"""The names of the nodes a handoff adds start with this (then ``-file``/``-raw`` and a number)."""


class HandoffError(AddCowError):
    """The export could not be handed over; it is served as before."""


@dataclass(frozen=True)
class Plan:
    """Where QEMU's device sits, as found by :func:`find_device`."""

    device: str  # the device's name in query-block
    qdev: str  # its QOM path (for qom-set)
    fmt: dict[str, Any] | None  # the raw format node over the NBD node, if any
    nbd: dict[str, Any]  # the NBD protocol node

    @property
    def nbd_name(self) -> str:
        return str(self.nbd["node-name"])


@dataclass(frozen=True)
class Endpoint:
    """Where an NBD client connects: a Unix socket path, or a TCP host and port."""

    path: str | None = None
    host: str | None = None
    port: int | None = None


def our_endpoints(uris: list[str]) -> list[Endpoint]:
    """The endpoints in the server's own URIs (``nbd+unix:///?socket=P``, ``nbd://H:P/``)."""
    out = []
    for uri in uris:
        parts = urllib.parse.urlsplit(uri)
        if parts.scheme.endswith("+unix"):
            sock = urllib.parse.parse_qs(parts.query).get("socket")
            if sock:
                out.append(Endpoint(path=sock[0]))
        elif parts.hostname is not None and parts.port is not None:
            out.append(Endpoint(host=parts.hostname, port=parts.port))
    return out


def nbd_target(node: dict[str, Any]) -> tuple[Endpoint, str]:
    """The endpoint and export name an ``nbd`` node of QEMU reaches (from its file name:
    ``nbd+unix:///EXPORT?socket=P``, ``nbd://H:P/EXPORT``, or ``json:{...}``)."""
    name = text(node.get("image") or {}, "filename", "query-named-block-nodes: image")
    if name.startswith("json:"):
        try:
            opts = json.loads(name[5:])
        except ValueError as exc:
            raise HandoffError(f"QEMU's NBD node: cannot read its options {name[:80]!r}") from exc
        server = opts.get("server") if isinstance(opts, dict) else None
        if not isinstance(server, dict):
            raise HandoffError(f"QEMU's NBD node: no server in {name[:80]!r}")
        export = opts.get("export") or ""
        if server.get("type") == "unix" and isinstance(server.get("path"), str):
            return Endpoint(path=server["path"]), str(export)
        try:
            port = int(str(server.get("port")))
            return Endpoint(host=str(server.get("host")), port=port), str(export)
        except (TypeError, ValueError) as exc:
            raise HandoffError(f"QEMU's NBD node: bad server address in {name[:80]!r}") from exc
    parts = urllib.parse.urlsplit(name)
    export = urllib.parse.unquote(parts.path.lstrip("/"))
    if parts.scheme.endswith("+unix"):
        sock = urllib.parse.parse_qs(parts.query).get("socket")
        if not sock:
            raise HandoffError(f"QEMU's NBD node: no socket in {name!r}")
        return Endpoint(path=sock[0]), export
    if parts.hostname is None:
        raise HandoffError(f"QEMU's NBD node: expected an NBD URI, found {name!r}")
    return Endpoint(host=parts.hostname, port=parts.port or wire.PORT), export


async def _same_endpoint(theirs: Endpoint, ours: Endpoint) -> bool:
    if theirs.path is not None or ours.path is not None:
        if theirs.path is None or ours.path is None:
            return False
        try:
            return os.path.samefile(theirs.path, ours.path)
        except OSError:
            return False
    if theirs.port != ours.port:
        return False
    if theirs.host == ours.host or ours.host in ("0.0.0.0", "::"):
        return True
    loop = asyncio.get_running_loop()
    try:
        a = await loop.getaddrinfo(theirs.host, theirs.port, type=socket.SOCK_STREAM)
        b = await loop.getaddrinfo(ours.host, ours.port, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool({x[4][0] for x in a} & {x[4][0] for x in b})


async def is_ours(server: NBDServer, export: Export, node: dict[str, Any]) -> bool:
    """Whether QEMU's NBD ``node`` reaches ``export`` on this server."""
    endpoint, name = nbd_target(node)
    if (name or server.exports[0].info.name) != export.info.name:
        return False
    for ours in our_endpoints(server.uris):
        if await _same_endpoint(endpoint, ours):
            return True
    return False


async def find_device(qmp: QMPClient, server: NBDServer, export: Export) -> Plan:
    """The device of QEMU that runs on ``export`` through NBD; HandoffError if none is."""
    blocks = members(await qmp.execute("query-block"), "query-block")
    nodes = members(
        await qmp.execute("query-named-block-nodes", {"flat": True}), "query-named-block-nodes"
    )
    by_name = {text(n, "node-name", "query-named-block-nodes"): n for n in nodes}
    seen = []
    for block in blocks:
        inserted = block.get("inserted")
        if not isinstance(inserted, dict):
            continue
        top = by_name.get(text(inserted, "node-name", "query-block: inserted"))
        if top is None:
            continue
        drv = text(top, "drv", "query-named-block-nodes")
        if drv == "nbd":
            fmt, nbd = None, top
        elif drv == "raw":
            # The raw node's "file" is its child's file name; the child is the NBD
            # node with that name (several with the same one: ambiguous, refused).
            child = text(top, "file", "query-named-block-nodes")
            under = [
                n
                for n in nodes
                if n.get("drv") == "nbd" and (n.get("image") or {}).get("filename") == child
            ]
            if len(under) != 1:
                continue
            fmt, nbd = top, under[0]
        else:
            continue
        seen.append(str(nbd["node-name"]))
        if await is_ours(server, export, nbd):
            device = block.get("device") or block.get("qdev") or ""
            qdev = block.get("qdev") or device
            if not isinstance(device, str) or not isinstance(qdev, str) or not qdev:
                raise HandoffError(f"QEMU's node {nbd['node-name']} has no device to switch")
            return Plan(device, qdev, fmt, nbd)
    found = ", ".join(seen) if seen else "no device on an NBD node"
    raise HandoffError(
        f"QEMU's node is not ours: expected a device on an NBD node of export "
        f"{export.info.name!r} at {', '.join(server.uris)}, found {found}"
    )


def _cache(node: dict[str, Any]) -> dict[str, bool]:
    found = node.get("cache")
    cache: dict[str, Any] = found if isinstance(found, dict) else {}
    return {
        "direct": flag(cache, "direct", "cache"),
        "no-flush": flag(cache, "no-flush", "cache"),
    }


def _fresh_name(taken: set[str], kind: str) -> str:
    n = 0
    while f"{NODE_PREFIX}-{kind}{n}" in taken:
        n += 1
    name = f"{NODE_PREFIX}-{kind}{n}"
    taken.add(name)
    return name


async def hand_over(server: NBDServer, export: Export, qmp_path: str) -> dict[str, Any]:
    """Hand ``export`` over to the QEMU whose QMP socket is ``qmp_path``; see the module notes.

    Returns what QEMU runs now (device, node, image file). HandoffError (one
    line) if it was refused or failed; the export is then served as before.
    """
    state, image, name = export.live, export.image, export.info.name
    if state.handoff_status == HANDOFF_RUNNING:
        raise HandoffError(f"{name}: a handoff is already running")
    if state.handoff_status == HANDOFF_DONE:
        raise HandoffError(f"{name}: already handed over ({state.handoff_detail})")
    if export.info.read_only:
        raise HandoffError(f"{name}: read-only export; a handoff needs it writable")
    if not image.complete:
        left = image.total_clusters - image.allocated_clusters
        raise HandoffError(
            f"{name}: not complete: {left} of {image.total_clusters} clusters are still "
            "read from the backing file"
        )
    previous = state.handoff_status
    state.handoff_status = HANDOFF_RUNNING
    try:
        done = await _hand_over(server, export, qmp_path)
    except AddCowError as exc:
        state.handoff_status, state.handoff_detail = HANDOFF_FAILED, str(exc)
        log.error("%s: handoff to QEMU (%s) failed, serving as before: %s", name, qmp_path, exc)
        raise HandoffError(f"{name}: handoff failed, serving as before: {exc}") from exc
    except BaseException:
        state.handoff_status = previous
        raise
    state.handoff_status = HANDOFF_DONE
    state.handoff_detail = f"device {done['device']} on node {done['node']} ({done['image-file']})"
    log.info("%s: handed over to QEMU: %s", name, state.handoff_detail)
    if not image.detached:
        await live.detach(server, export)
    if not state.options.handoff_stay and all(
        e.live.handoff_status == HANDOFF_DONE for e in server.exports if not e.info.read_only
    ):
        log.info("every export is handed over to QEMU: stopping")
        server.stop()
    return done


async def _hand_over(server: NBDServer, export: Export, qmp_path: str) -> dict[str, Any]:
    state, image = export.live, export.image
    if state.finish_task is not None:
        await asyncio.shield(state.finish_task)
    if image.backing is not None:
        raise HandoffError("the backing file could not be released")
    async with QMPClient(qmp_path) as qmp:
        plan = await find_device(qmp, server, export)
        taken = {
            str(n.get("node-name"))
            for n in members(
                await qmp.execute("query-named-block-nodes", {"flat": True}),
                "query-named-block-nodes",
            )
        }
        old = plan.fmt if plan.fmt is not None else plan.nbd
        read_only = flag(old, "ro", "query-named-block-nodes")
        file_node = _fresh_name(taken, "file")
        file_options: dict[str, Any] = {
            "driver": "file",
            "filename": os.path.abspath(image.image_path),
            "node-name": file_node,
            "aio": "threads",
            "cache": _cache(plan.nbd),
            "read-only": read_only,
            "discard": "unmap",
        }
        added: list[str] = []
        # 1. Hold the writes, let the pool drain, flush, make the file the disk's size.
        state.writes_open.clear()
        locked = True
        try:
            pending = server.pending()
            if pending:
                await asyncio.wait(pending)
            await server.call(image.flush)
            if not image.detached:
                await server.call(image.trim_image_file)
            size = os.fstat(image.image_fd).st_size
            if size != image.size:
                raise HandoffError(
                    f"{image.image_path}: expected {image.size} bytes (the disk's size), "
                    f"found {size}"
                )
            # 2. QEMU needs the write permission the server's locks keep.
            unlock_raw(image.image_fd, image.image_path)
            locked = False
            # 3. The file node; then the writes go again (see "Why no write is lost").
            await qmp.execute("blockdev-add", file_options)
            added.append(file_node)
            state.writes_open.set()
            # 4. Switch the device to the raw file.
            top = await _switch(qmp, plan, file_node, read_only, taken, added)
        except BaseException as exc:
            state.writes_open.set()
            await _undo(qmp, added)
            if not locked:
                _relock(image.image_fd, image.image_path)
            if isinstance(exc, OSError):
                raise HandoffError(f"{image.image_path}: {exc.strerror or exc}") from exc
            raise
        # 5. The NBD node, if the monitor owns it: the connection to this server closes.
        if not plan.nbd_name.startswith("#"):
            try:
                await qmp.execute("blockdev-del", {"node-name": plan.nbd_name})
            except AddCowError as exc:
                log.warning(
                    "%s: QEMU runs on the raw file, but its NBD node %s stays: %s",
                    export.info.name,
                    plan.nbd_name,
                    exc,
                )
    return {"device": plan.device, "node": top, "image-file": os.path.abspath(image.image_path)}


async def _switch(
    qmp: QMPClient,
    plan: Plan,
    file_node: str,
    read_only: bool,
    taken: set[str],
    added: list[str],
) -> str:
    """Step 4: put the device on ``file_node``; the node the device now sits on."""
    fmt = plan.fmt
    if fmt is not None and not str(fmt["node-name"]).startswith("#"):
        options = {
            "driver": "raw",
            "node-name": fmt["node-name"],
            "file": file_node,
            "read-only": read_only,
            "detect-zeroes": text(fmt, "detect_zeroes", "query-named-block-nodes"),
            "cache": _cache(fmt),
        }
        await qmp.execute("blockdev-reopen", {"options": [options]})
        return str(fmt["node-name"])
    top = file_node
    if fmt is not None:
        top = _fresh_name(taken, "raw")
        await qmp.execute(
            "blockdev-add",
            {
                "driver": "raw",
                "node-name": top,
                "file": file_node,
                "read-only": read_only,
                "detect-zeroes": text(fmt, "detect_zeroes", "query-named-block-nodes"),
                "cache": _cache(fmt),
            },
        )
        added.append(top)
    await qmp.execute("qom-set", {"path": plan.qdev, "property": "drive", "value": top})
    return top


async def _undo(qmp: QMPClient, added: list[str]) -> None:
    """Delete the nodes a failed handoff added, newest first (each failure logged)."""
    for node in reversed(added):
        try:
            await qmp.execute("blockdev-del", {"node-name": node})
        except AddCowError as exc:
            log.error("undoing the handoff: could not delete QEMU's node %s: %s", node, exc)


def _relock(fd: int, path: str) -> None:
    try:
        lock_raw(fd, path, writable=True)
    except AddCowError as exc:
        log.error("%s: could not take its locks back (serving without them): %s", path, exc)


async def watch(server: NBDServer, export: Export) -> None:
    """``--handoff-qmp``: hand the export over once it is complete and a client uses it.

    A failed attempt (logged; the export is served as before) is tried again
    when the next client starts using the export: the first client need not be
    that QEMU. The control socket's ``handoff`` may try again at any time.
    """
    state = export.live
    qmp_path = state.options.handoff_qmp
    if qmp_path is None or export.info.read_only:
        return
    state.handoff_status = HANDOFF_WAITING
    while not server.stopping and state.handoff_status != HANDOFF_DONE:
        state.changed.clear()
        finishing = state.finish_task is not None and not state.finish_task.done()
        used = any(c.export is export for c in server.clients)
        if export.image.complete and not finishing and used:
            with contextlib.suppress(HandoffError):
                await hand_over(server, export, qmp_path)
                return
        await state.changed.wait()


def start(server: NBDServer) -> None:
    """Start :func:`watch` for every export served with ``--handoff-qmp`` (a task of the
    export's live features, which the shutdown stops)."""
    for export in server.exports:
        if export.live.options.handoff_qmp is not None:
            export.live.tasks.append(asyncio.create_task(watch(server, export)))


def describe(export: Export) -> dict[str, Any]:
    """The ``handoff`` member of an export in the control socket's ``query``."""
    state = export.live
    return {
        "status": state.handoff_status,
        "qmp": state.options.handoff_qmp,
        "detail": state.handoff_detail,
    }
