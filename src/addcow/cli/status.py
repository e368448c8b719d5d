"""``addcow status`` and ``addcow control``: a running server's control socket, from a shell.

``addcow status SOCKET`` prints the server's ``query`` for people (or, with
``--output=json``, the reply as it came); ``addcow control SOCKET COMMAND``
sends one command. The protocol is :mod:`addcow.serve.control`'s.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
from typing import Any

from ..serve.commands import COMMANDS
from ..units import human_size
from .common import CommandError, parse_size

TIMEOUT = 60.0
"""Seconds to wait for the server's reply (a detach flushes and syncs; a handoff waits
for QEMU too)."""
CONTROL_COMMANDS = tuple(command for command in COMMANDS if command != "query")
"""What ``addcow control`` sends (``query`` is ``addcow status``)."""
UNCHANGED = {
    "stream-start": "the export is complete: nothing to stream",
    "stream-cancel": "the stream had already ended",
    "stream-pause": "the stream was already paused",
    "stream-resume": "the stream was already running",
}
"""What ``addcow control`` says when a command found nothing to change."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "status",
        help="show what a running addcow serve is doing (its --control socket)",
        description="Ask a running 'addcow serve --control SOCKET' for its exports, clients "
        "and streams.",
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("socket", metavar="SOCKET", help="the server's --control socket")
    p.set_defaults(func=run_status)

    p = sub.add_parser(
        "control",
        help="start, cancel, pause, resume or rate-limit a running server's stream; detach; "
        "flush; hand an export over to QEMU",
        description="Send one command to a running 'addcow serve --control SOCKET'.",
    )
    p.add_argument("socket", metavar="SOCKET", help="the server's --control socket")
    p.add_argument("command", choices=CONTROL_COMMANDS)
    p.add_argument(
        "value",
        nargs="?",
        metavar="RATE|QMP_PATH",
        help="for stream-set-rate, and optional for stream-start (default: the server's "
        "--stream-rate): bytes per second (k, M, G suffixes; 0: no limit); for handoff: "
        "the QMP socket of the QEMU that uses the export",
    )
    p.add_argument("--export", metavar="NAME", help="the export (default: the first)")
    p.set_defaults(func=run_control)


def request(path: str, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """Send one request to the control socket at ``path``; its ``return`` value."""
    message: dict[str, Any] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(TIMEOUT)
            sock.connect(path)
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("rb") as replies:
                line = replies.readline()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise CommandError(f"{path}: cannot reach the server's control socket: {reason}") from None
    if not line:
        raise CommandError(f"{path}: the server closed the control connection without a reply")
    try:
        reply = json.loads(line)
    except ValueError:
        raise CommandError(f"{path}: the reply is not JSON: {line[:80]!r}") from None
    if not isinstance(reply, dict):
        raise CommandError(f"{path}: expected a JSON object as reply, found {line[:80]!r}")
    if "error" in reply:
        error = reply["error"]
        desc = error.get("desc") if isinstance(error, dict) else error
        raise CommandError(str(desc))
    return reply.get("return")


def run_status(args: argparse.Namespace) -> int:
    status = request(args.socket, "query")
    if args.output == "json":
        print(json.dumps(status, indent=2))
    else:
        print("\n".join(describe(status)))
    return 0


def run_control(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {}
    if args.export is not None:
        arguments["export"] = args.export
    if args.command == "stream-set-rate" and args.value is None:
        raise CommandError("stream-set-rate needs RATE (bytes per second; 0: no limit)")
    if args.command == "handoff":
        if args.value is None:
            raise CommandError("handoff needs QMP_PATH (the QMP socket of QEMU)")
        arguments["qmp"] = os.path.abspath(args.value)
    elif args.value is not None:
        if args.command not in ("stream-set-rate", "stream-start"):
            raise CommandError(f"{args.command} takes no RATE")
        arguments["speed"] = parse_size(args.value)
    result = request(args.socket, args.command, arguments)
    if args.command == "detach":
        print(f"addcow: detached: serving {result['image-file']} alone")
    elif args.command == "handoff":
        print(
            f"addcow: handed over: QEMU's device {result['device']} runs on node "
            f"{result['node']} ({result['image-file']})"
        )
    elif isinstance(result, dict) and result.get("changed") is False:
        print(f"addcow: {UNCHANGED[args.command]}")
    return 0


def describe(status: dict[str, Any]) -> list[str]:
    """``query``'s reply as lines for people."""
    server = status["server"]
    limit = f"limit {server['shared']}" if server["shared"] else "no limit"
    lines = [
        f"server: pid {server['pid']}, on {', '.join(server['uris']) or 'stdio'}, "
        f"TLS {server['tls']}{' (clients verified)' if server['tls-verify-peer'] else ''}, "
        f"up {server['uptime']:.0f} s, {server['connections']} connections ({limit})"
    ]
    for export in status["exports"]:
        backing = export["backing-file"]
        lines.append(
            f"export {export['name']!r}: {export['file']} (image file {export['image-file']}"
            + (f", backing file {backing}" if backing else "")
            + f"), {'read-only' if export['read-only'] else 'read-write'}"
        )
        total, allocated = export["total-clusters"], export["allocated-clusters"]
        percent = 100.0 * allocated / total if total else 100.0
        state = "detached" if export["detached"] else "complete" if export["complete"] else ""
        lines.append(
            f"  allocated: {allocated} of {total} clusters ({percent:.1f}%)"
            + (f", {state}" if state else "")
        )
        stream = export["stream"]
        if stream["status"] != "none":
            done = f"{human_size(stream['offset'])} of {human_size(stream['len'])}"
            speed = f", limit {human_size(stream['speed'])}/s" if stream["speed"] else ""
            lines.append(f"  stream: {stream['status']}, {done} in the image file{speed}")
        if export["copy-on-read"]:
            lines.append("  copy on read: on")
        handoff = export.get("handoff") or {}
        if handoff.get("status", "none") != "none":
            detail = f": {handoff['detail']}" if handoff.get("detail") else ""
            lines.append(f"  handoff to QEMU: {handoff['status']}{detail}")
        lines.append(f"  requests: {_counters(export)}")
    for client in status["clients"]:
        tls = f", TLS ({client['identity']})" if client["tls"] else ""
        where = client["address"] or "local"
        lines.append(
            f"client {client['id']}: {where}, export {client['export']!r}{tls}, "
            f"connected {client['connected']:.0f} s, {_counters(client)}"
        )
    return lines


def _counters(c: dict[str, Any]) -> str:
    return (
        f"{c['rd_operations']} reads ({human_size(c['rd_bytes'])}), "
        f"{c['wr_operations']} writes ({human_size(c['wr_bytes'])}), "
        f"{c['unmap_operations']} trims, {c['flush_operations']} flushes"
    )
