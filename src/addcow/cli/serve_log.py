"""Where ``addcow serve`` logs, and in which format.

Destinations
    stderr always (until a detached server lets go of it), plus
    ``--log-file FILE`` (appended to, created 0600; a regular file only, so a
    FIFO is refused instead of waited on, and not a disk image: one that starts
    with an image header or is in use is refused; a start that fails before the
    server serves removes the file if it created it, and leaves one that was
    there as it was) or ``--syslog``
    (``/dev/log``, facility daemon: journald and rsyslog read it). A detached
    server without either logs to syslog when ``/dev/log`` exists; where it
    does not, a successful start says so on stderr after its ready line: the
    server keeps no log then.

What is logged
    At the default level, one line when a client starts using an export (its
    address, the export, its TLS identity) and one when it leaves (what it
    read and wrote), each change of a stream's state (started, paused,
    resumed, rate, complete, detached), each control command but ``query``,
    and every warning and error, each naming the client. ``-v`` adds the
    negotiation details and refused options and requests.

Formats
    ``--log-format text`` (the default): ``addcow serve: MESSAGE`` on stderr,
    with a time stamp and level in a file. ``--log-format json``: one JSON
    object per line, for log shippers: ``time`` (ISO 8601, UTC), ``level``,
    ``logger``, ``message``, ``pid``, and ``client`` / ``export`` where the
    line is about one.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import logging.handlers
import os
import stat
import sys

from .. import sysio
from ..errors import AddCowError
from ..targets import refuse_replacing
from .common import CommandError

SYSLOG_SOCKET = "/dev/log"
FORMATS = ("text", "json")
_EXTRAS = ("client", "export")


class JSONFormatter(logging.Formatter):
    """One JSON object per record (see "Formats")."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, object] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for name in _EXTRAS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def syslog_available() -> bool:
    """Whether a syslog socket (journald's or rsyslog's) is there to log to."""
    try:
        return stat.S_ISSOCK(os.stat(SYSLOG_SOCKET).st_mode)
    except OSError:
        return False


def open_log_file(path: str) -> tuple[int, bool]:
    """Open ``--log-file`` to append to (created 0600): a regular file, or CommandError.

    Returns the descriptor and whether this open created the file (only then
    may a failed start remove it). The open does not wait: a FIFO, whose open
    for writing blocks until a reader comes, is refused at once (ENXIO without
    a reader), as a device is. A file that starts with an image header, or that
    another process has locked (an image in use), is refused
    (:func:`addcow.targets.refuse_replacing`): lines appended to a disk image
    would change it.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT  # read too: its first bytes are checked
    try:
        try:
            fd, created = _open_regular(path, flags | os.O_EXCL), True
        except FileExistsError:
            fd, created = _open_regular(path, flags), False
    except sysio.WrongFileType as exc:
        raise CommandError(f"--log-file {path}: is {exc.kind}, not {exc.expected}") from None
    except OSError as exc:
        if exc.errno == errno.ENXIO and _kind(path) != "a regular file":
            raise CommandError(f"--log-file {path}: is {_kind(path)}, not a regular file") from None
        raise CommandError(f"--log-file {path}: {os.strerror(exc.errno or 0)}") from None
    try:
        refuse_replacing(
            fd,
            path,
            force=False,
            advice="give another log file",
            action="append the log to it",
        )
    except AddCowError as exc:
        os.close(fd)
        raise CommandError(f"--log-file {exc}") from None
    return fd, created


def _open_regular(path: str, flags: int) -> int:
    return sysio.open_file(path, flags, 0o600, accept=stat.S_ISREG, expected="a regular file")


def _kind(path: str) -> str:
    try:
        return sysio.file_kind(os.stat(path).st_mode)
    except OSError:
        return "a special file"


class Logs:
    """What :func:`configure` set up: whether a log is kept, and the log file it opened.

    A log file this start created belongs to the server only once it serves
    (:meth:`keep`); until then :meth:`discard` removes it, if the path still
    names the file opened. A file that was there is never removed.
    """

    def __init__(self, keeps_log: bool, file: tuple[str, int, logging.Handler] | None = None):
        self.keeps_log = keeps_log
        """False if a detached server would keep no log (:data:`NO_LOG_WARNING`)."""
        self._file = file  # (path, descriptor, handler) of a log file this start created

    def keep(self) -> None:
        """The server serves: the log file is its from now on."""
        self._file = None

    def discard(self) -> None:
        """The start failed: remove the log file it created (if not kept)."""
        if self._file is None:
            return
        path, fd, handler = self._file
        self._file = None
        try:
            opened, now = os.fstat(fd), os.lstat(path)
            if (opened.st_dev, opened.st_ino) == (now.st_dev, now.st_ino):
                os.unlink(path)
        except OSError:
            pass  # gone already, or not ours to remove
        finally:
            logging.getLogger("addcow").removeHandler(handler)
            handler.close()


def configure(
    *,
    verbose: bool,
    log_format: str,
    log_file: str | None,
    syslog: bool,
    detached: bool,
) -> Logs:
    """Set up the ``addcow.serve`` loggers as the options say (see the module's note)."""
    root = logging.getLogger("addcow")
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    for old in list(root.handlers):
        root.removeHandler(old)
    json_format = log_format == "json"
    handler: logging.Handler
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(
        JSONFormatter() if json_format else logging.Formatter("addcow serve: %(message)s")
    )
    root.addHandler(stderr)
    if log_file is not None:
        fd, created = open_log_file(log_file)
        handler = logging.StreamHandler(os.fdopen(fd, "a", buffering=1))
        handler.setFormatter(
            JSONFormatter()
            if json_format
            else logging.Formatter(
                "%(asctime)s %(levelname)s addcow serve[%(process)d]: %(message)s"
            )
        )
        root.addHandler(handler)
        return Logs(True, (log_file, fd, handler) if created else None)
    if syslog or (detached and syslog_available()):
        if not syslog_available():
            raise CommandError(f"--syslog: no syslog socket at {SYSLOG_SOCKET}")
        handler = logging.handlers.SysLogHandler(
            SYSLOG_SOCKET, facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(
            JSONFormatter()
            if json_format
            else logging.Formatter("addcow-serve[%(process)d]: %(message)s")
        )
        root.addHandler(handler)
        return Logs(True)
    return Logs(not detached)


NO_LOG_WARNING = (
    f"addcow: warning: no syslog socket at {SYSLOG_SOCKET}: the detached server keeps no log; "
    "give --log-file FILE (or --foreground)"
)
