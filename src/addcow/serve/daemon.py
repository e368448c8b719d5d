"""The process around an NBD server: its pidfile, detaching, and socket activation.

Pidfile
    :class:`Pidfile` is locked with a POSIX record lock (``fcntl.lockf``) while
    the server runs, as qemu-nbd locks its own: a second server naming it is
    refused before it opens anything, with the holder's pid when the lock or
    the file names it (:func:`~addcow.locking.record_lock_holder`). The pid is
    written only once the server listens. At exit the file is unlinked only if
    this process created it or wrote its pid into it, and only while the path
    still names the file it locked: a failed start leaves another server's
    pidfile as it was.

Detaching
    :func:`daemonize` runs the server in a grandchild in a session of its own;
    the process that was started waits on a pipe for ``ok <ready line>`` (it
    prints the line and returns 0) or ``error <message>`` (it raises), so the
    caller's exit status says whether the server listens. Once ready, the
    daemon lets go of the caller's terminal or pipes.

Socket activation
    :func:`socket_activation` takes the one socket a launcher (systemd,
    libnbd's ``[ CMD ]``) passed on fd 3, when ``LISTEN_PID`` is this process
    and ``LISTEN_FDS`` is set; it clears those variables and makes fd 3
    close-on-exec, so that nothing this process starts takes them for its own.

Errors are :class:`~addcow.errors.AddCowError`, one line each.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass

from .. import sysio
from ..errors import AddCowError, LockError
from ..locking import record_lock_holder
from ..targets import refuse_replacing


@dataclass
class Activation:
    """The socket a socket-activating launcher passed on fd 3."""

    sock: socket.socket
    listening: bool


def socket_activation() -> Activation | None:
    """The socket passed by socket activation (LISTEN_PID, LISTEN_FDS), or None.

    The variables count only when LISTEN_PID is this process; they are then
    removed from the environment and fd 3 is made close-on-exec, so that
    nothing this process starts takes them for its own.
    """
    pid, count = os.environ.get("LISTEN_PID"), os.environ.get("LISTEN_FDS")
    if pid is None or count is None or pid.strip() != str(os.getpid()):
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count.strip() != "1":
        raise AddCowError(
            f"socket activation passed LISTEN_FDS={count}: addcow serve takes exactly 1 socket"
        )
    try:
        os.set_inheritable(3, False)
        sock = socket.socket(fileno=3)
    except OSError as exc:
        what = "is not open" if exc.errno == errno.EBADF else "is not a socket"
        raise AddCowError(f"socket activation: fd 3 {what}") from None
    if sock.type != socket.SOCK_STREAM or sock.family not in (
        socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
    ):  # fmt: skip
        raise AddCowError("socket activation: fd 3 is not a Unix or TCP stream socket")
    listening = bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    return Activation(sock, listening)


class Pidfile:
    """A pidfile locked (POSIX record lock, as qemu-nbd's) while the server runs.

    :meth:`acquire` opens it, creating it if missing, and locks it before
    anything else happens; :meth:`write` puts the pid in once the server
    listens; :meth:`release` unlinks it only if this process created or wrote
    it and the path still names the file locked.
    """

    def __init__(self, path: str, fd: int, st: os.stat_result, created: bool) -> None:
        self.path = path
        self.fd = fd
        self.identity = (st.st_dev, st.st_ino)
        self.created = created
        self.written = False

    @classmethod
    def acquire(cls, path: str) -> Pidfile:
        """Open and lock ``path``, or raise AddCowError if another process holds it."""
        for _ in range(10):
            created = True
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                created = False
                try:
                    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    continue  # removed since: try to create it again
                except OSError as exc:
                    raise AddCowError(f"{path}: cannot open the pidfile: {exc.strerror}") from None
            except OSError as exc:
                raise AddCowError(f"{path}: cannot create the pidfile: {exc.strerror}") from None
            try:
                pidfile = cls._lock(path, fd, created)
            except BaseException:
                os.close(fd)
                raise
            if pidfile is not None:
                return pidfile
            os.close(fd)
        raise AddCowError(f"{path}: the pidfile keeps being replaced")

    @classmethod
    def _lock(cls, path: str, fd: int, created: bool) -> Pidfile | None:
        """Lock the open ``fd``; None if ``path`` no longer names it (open again)."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AddCowError(f"{path}: the pidfile is {sysio.file_kind(st.st_mode)}, not a file")
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise AddCowError(f"{path}: cannot lock the pidfile: {exc.strerror}") from None
            holder = _lock_holder(fd)
            who = f"another server (pid {holder})" if holder else "another process"
            raise AddCowError(f"{who} holds the pidfile {path}") from None
        try:
            now = os.stat(path)
        except FileNotFoundError:
            return None  # its holder removed it as it exited, after we opened it
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
            return None
        try:  # its own lock held: only what it holds is looked at
            refuse_replacing(
                fd, path, force=False, advice="give another pidfile", probe_locks=False
            )
        except AddCowError as exc:
            raise AddCowError(f"--pidfile {exc}") from None
        return cls(path, fd, st, created)

    def write(self, pid: int) -> None:
        """Put ``pid`` in the locked file (once the server listens)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)
        self.written = True

    def release(self) -> None:
        """Unlink the pidfile if it is this process's and still at its path; unlock it."""
        try:
            if self.created or self.written:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self.identity:
                    os.unlink(self.path)
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)


def _lock_holder(fd: int) -> int | None:
    """The pid of the process whose lock conflicts with ours on ``fd``, if known."""
    holder = record_lock_holder(fd)
    if holder is not None:
        return holder
    # An open-file-description lock names no pid: the holder wrote its own.
    with contextlib.suppress(OSError, ValueError):
        text = os.pread(fd, 32, 0).decode().strip()
        return int(text) if text.isdigit() and int(text) > 0 else None
    return None


def daemonize(serve: Callable[[Callable[[str], None]], int]) -> int:
    """Run ``serve`` in a detached process; print its ready line here, then exit.

    The daemon reports through a pipe: ``ok <ready line>`` once it listens, or
    ``error <message>`` if it fails first.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            report = pipe.read().decode(errors="replace")
        os.waitpid(pid, 0)
        kind, _, text = report.partition(" ")
        if kind == "ok":
            print(text, flush=True)
            return 0
        raise AddCowError(text.strip() or "the server exited before it was ready")
    # First child: a new session, then fork again so the daemon is no session leader.
    os.close(read_fd)
    os.setsid()
    if os.fork():
        os._exit(0)
    reported = False

    def ready(line: str) -> None:
        nonlocal reported
        os.write(write_fd, f"ok {line}".encode())
        os.close(write_fd)
        reported = True
        # Let go of the caller's terminal or pipes: a detached server logs nothing
        # (run it with --foreground to see its log on stderr).
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    status = 1
    try:
        status = serve(ready)
    except (AddCowError, OSError) as exc:
        if isinstance(exc, LockError):
            exc.hint = None  # it offers -U, which serve does not take
        if not reported:
            os.write(write_fd, f"error {exc}".encode())
    except BaseException as exc:
        if not reported:
            os.write(write_fd, f"error {type(exc).__name__}: {exc}".encode())
    finally:
        os._exit(status)
