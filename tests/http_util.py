"""A real nginx serving a directory, for the HTTP backing tests.

``nginx_server(root, work)`` writes a config file under ``work``, starts
``nginx`` in the foreground as a single process (``daemon off;
master_process off;``) on 127.0.0.1 and a free port, and yields an
:class:`Nginx` whose ``url`` is the base URL (``http://127.0.0.1:PORT``, or
https with ``tls=`` credentials from :func:`tls_util.make_certs`). On exit it
stops nginx and waits for it. Its pid file, logs and temporary directories are
all under ``work``; ``nginx`` missing is a failure (``require_tool``).

Locations, each serving ``root``:

* ``/`` plainly (strong ETag and Last-Modified, ranges honoured);
* ``/nohead/`` refuses HEAD with 405 (``limit_except GET`` would not: GET
  implies HEAD in nginx), as S3 does for a presigned GET URL;
* ``/norange/`` ignores Range (``max_ranges 0``: a 200 with the whole file);
* ``/lastmod/`` sends no ETag (``etag off``), only Last-Modified.

The access log (``Nginx.access_log()``) has one line per request: method,
URI, status, body bytes sent, Range and If-Match headers.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from conftest import require_tool

START_TIMEOUT = 10.0
LOG_SETTLE = 0.05
"""Seconds the access log must stay the same size before it is read."""


@dataclass
class Nginx:
    """A running nginx: its base URL, port, work directory and process."""

    url: str
    port: int
    work: Path
    proc: subprocess.Popen[bytes]

    def access_log(self) -> list[list[str]]:
        """The access log so far, one list of tab-separated fields per request.

        nginx writes a request's line once the response has gone, so a client may
        hold the response before the line is there: the log is read once it has
        not grown for :data:`LOG_SETTLE` seconds (at most a second of waiting)."""
        path = self.work / "access.log"
        size, deadline = -1, time.monotonic() + 1.0
        while time.monotonic() < deadline:
            now = path.stat().st_size if path.exists() else 0
            if now == size:
                break
            size = now
            time.sleep(LOG_SETTLE)
        if not path.exists():
            return []
        return [line.split("\t") for line in path.read_text().splitlines() if line]

    def error_log(self) -> str:
        path = self.work / "error.log"
        return path.read_text() if path.exists() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _config(root: Path, work: Path, port: int, tls: Path | None) -> str:
    ssl = ""
    if tls is not None:
        ssl = (f"        ssl_certificate {tls / 'server-cert.pem'};\n"
               f"        ssl_certificate_key {tls / 'server-key.pem'};\n")  # fmt: skip
    temps = "".join(
        f"    {kind}_temp_path {work / ('tmp-' + kind)};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {work / "nginx.pid"};
error_log {work / "error.log"} info;
events {{
    worker_connections 256;
}}
http {{
    log_format plain "$request_method\\t$uri\\t$status\\t$body_bytes_sent"
                     "\\t$http_range\\t$http_if_match";
    access_log {work / "access.log"} plain;
{temps}    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 30;
    server {{
        listen 127.0.0.1:{port}{" ssl" if tls is not None else ""};
{ssl}        root {root};
        location / {{
        }}
        location /nohead/ {{
            alias {root}/;
            if ($request_method = HEAD) {{
                return 405;
            }}
        }}
        location /norange/ {{
            alias {root}/;
            max_ranges 0;
        }}
        location /lastmod/ {{
            alias {root}/;
            etag off;
        }}
    }}
}}
"""


def _wait_listening(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """Whether nginx accepts connections on ``port`` before ``deadline`` (False if it exited)."""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with socket.socket() as s, suppress(OSError):
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))
            return True
        time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def nginx_server(root: Path, work: Path, *, tls: Path | None = None) -> Iterator[Nginx]:
    """nginx serving ``root`` (config, logs and temp files in ``work``), stopped on exit.

    ``tls`` is a credential directory with ``server-cert.pem`` and
    ``server-key.pem`` (``make_certs(...)["srv"]``): then it serves https.
    """
    binary = require_tool("nginx")
    work.mkdir(parents=True, exist_ok=True)
    for attempt in range(5):
        port = _free_port()
        conf = work / "nginx.conf"
        conf.write_text(_config(root, work, port, tls))
        stderr = open(work / "stderr.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [binary, "-p", f"{work}/", "-c", str(conf), "-e", str(work / "error.log")],
            stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
        )  # fmt: skip
        try:
            if _wait_listening(proc, port, time.monotonic() + START_TIMEOUT):
                break
        except BaseException:
            _stop(proc)
            stderr.close()
            raise
        _stop(proc)
        stderr.close()
        log = (work / "error.log").read_text() if (work / "error.log").exists() else ""
        if "Address already in use" not in log or attempt == 4:
            raise AssertionError(f"nginx did not start on port {port}:\n{log}\n"
                                 f"{(work / 'stderr.log').read_text()}")  # fmt: skip
        (work / "error.log").unlink()
    scheme = "https" if tls is not None else "http"
    try:
        yield Nginx(f"{scheme}://127.0.0.1:{port}", port, work, proc)
    finally:
        _stop(proc)
        stderr.close()
