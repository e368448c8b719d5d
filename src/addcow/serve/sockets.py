"""Sockets at start-up: binding and listening, stdin/stdout, addresses and URIs.

Files: :func:`bind_unix` replaces only a stale socket (one nobody listens
on; it holds no data) and refuses a live socket, a file, a folder or
anything else at its path. What it created is remembered by inode
(:class:`BoundSocket`), so that at exit the path is unlinked only while it
still names that socket.

:func:`stdio_problem` says what keeps stdin/stdout from carrying an NBD
connection (``--stdio``); :func:`socket_uri` and :func:`peer_address` write
where the server listens and who connected as people read them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from dataclasses import dataclass
from typing import Any

from .. import sysio
from ..errors import AddCowError, AddCowIOError


@dataclass(frozen=True)
class BoundSocket:
    """A Unix socket this process bound: its path, and the inode it created there."""

    path: str
    dev: int
    ino: int

    def remove(self) -> None:
        """Unlink the path if it still names this socket (else someone else's file is there)."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (st.st_dev, st.st_ino) == (self.dev, self.ino):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


def bind_unix(path: str) -> tuple[socket.socket, BoundSocket]:
    """A new Unix socket listening at ``path``, and what it created there.

    Only a stale socket (one nobody listens on) is replaced; a live socket, a
    file, a folder or anything else at ``path`` is refused and left alone.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            sock.bind(path)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise _listen_error(path, exc) from exc
            _remove_stale_socket(path)
            try:
                sock.bind(path)
            except OSError as again:
                raise _listen_error(path, again) from again
        st = os.lstat(path)
        bound = BoundSocket(path, st.st_dev, st.st_ino)
        try:
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            bound.remove()
            raise _listen_error(path, exc) from exc
    except BaseException:
        sock.close()
        raise
    return sock, bound


def peer_address(peer: Any) -> str:
    """A peer address as people write it: ``127.0.0.1:4242``, ``[::1]:4242``; "" for none."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        host = str(peer[0])
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    if isinstance(peer, bytes):
        peer = peer.decode(errors="replace")
    return str(peer) if peer else ""


def socket_uri(sock: socket.socket, *, tls: bool = False) -> str:
    """The NBD URI of a listening Unix or TCP socket (``nbds`` ones with ``tls``)."""
    name = sock.getsockname()
    scheme = "nbds" if tls else "nbd"
    if sock.family == socket.AF_UNIX:
        path = name.decode(errors="surrogateescape") if isinstance(name, bytes) else name
        return f"{scheme}+unix:///?socket={path}"
    host, port = name[0], name[1]
    host_part = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host_part}:{port}/"


def stdio_problem() -> str | None:
    """What keeps stdin/stdout from carrying an NBD connection, or None if nothing does.

    Each must be a connected stream socket or a pipe; otherwise this names
    what it is: ``"a regular file"``, ``"a terminal"``, ... stdout is looked at
    first: in ``addcow serve --stdio img > file`` typed at a terminal, the file
    is the mistake.
    """
    for fd in (1, 0):
        try:
            st = os.fstat(fd)
        except OSError:
            return "a closed descriptor"
        if stat.S_ISFIFO(st.st_mode):
            continue
        if stat.S_ISSOCK(st.st_mode):
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.type != socket.SOCK_STREAM:
                    return "a socket that is not a stream socket"
                if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    return "a listening socket"
            continue
        if os.isatty(fd):
            return "a terminal"
        return sysio.file_kind(st.st_mode)
    return None


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """Whether two ``stat`` results are of one file (device and inode)."""
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def strerror(exc: OSError) -> str:
    """The system's words for a failed socket call (a resolver error's own)."""
    if isinstance(exc, socket.gaierror) or not exc.errno:
        return str(exc.strerror or exc)
    return os.strerror(exc.errno)


def _listen_error(path: str, exc: OSError) -> AddCowIOError:
    return AddCowIOError(f"{path}: cannot listen: {strerror(exc)}", exc.errno)


def _remove_stale_socket(path: str) -> None:
    """Remove a Unix socket nobody listens on; refuse to replace anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddCowError(f"{path}: exists and is {sysio.file_kind(st.st_mode)}, not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        # Nobody listens: the socket file holds no data. Unlink it only while
        # it is still the file examined.
        with contextlib.suppress(FileNotFoundError):
            if same_file(os.lstat(path), st):
                os.unlink(path)
        return
    except FileNotFoundError:
        return
    except (TimeoutError, BlockingIOError):
        pass  # a listener whose backlog is full: it is alive
    except OSError as exc:
        raise AddCowIOError(
            f"{path}: cannot tell whether a server listens there: {strerror(exc)}", exc.errno
        ) from exc
    finally:
        probe.close()
    raise AddCowError(f"{path}: another server is listening on this socket")
