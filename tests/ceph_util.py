"""A single-node Ceph cluster with a RADOS Gateway (S3), started once per test run.

``ceph_cluster(root)`` is a context manager shared by every pytest process of
one run (the xdist workers): under an exclusive lock on ``root/lock`` the
first process to enter starts the cluster and writes ``root/state.json``;
every process adds itself to ``root/users`` on entry and removes itself on
exit, and the one that leaves the set empty stops the cluster. A worker that
finishes early therefore never stops a cluster another worker is using, and
a test run that selects no S3 test starts nothing.

The cluster (Debian's Ceph 16, no systemd, no manager): one monitor on a
free loopback port (messenger v2 only), one OSD with BlueStore on a sparse
file, pools of size 1, and ``radosgw`` with its beast frontend on another
free port. cephx is on: radosgw never authenticates to a monitor without it.
Every file (config, keyrings, data, logs, sockets, pid files) is under
``root/cluster``. The daemons fork into the background and write pid files;
stopping sends SIGTERM to each pid (the OSD and monitor after radosgw),
waits for the process to be gone (SIGKILL after a timeout), and removes the
cluster's directory.

:class:`Gateway` starts a further radosgw on the same cluster, owned by one
test (to stop and restart it without touching the shared one).

S3 users: ``state.json`` holds the access and secret keys of two users
(``alice`` and ``bob``) made with ``radosgw-admin``.

RBD: :func:`rbd_pool` makes the pool ``rbd`` (``ceph osd pool create``, ``rbd
pool init``: about 3 s, the placement groups peering) and a client
``client.golden`` with the capabilities docs/serving.md gives a host that
exports golden snapshots, the first time a test asks for them (under the same
lock), so a run of S3 tests alone never waits for it. The client has its own
config file (the monitor's address and its keyring), as a host of the fleet
would.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
TOOLS = ("ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd", "ceph", "radosgw",
         "radosgw-admin")  # fmt: skip


@dataclass(frozen=True)
class Ceph:
    """A running cluster: its config file, admin keyring, S3 endpoint and users' keys."""

    root: Path
    conf: Path
    admin_keyring: Path
    endpoint: str
    keys: dict[str, tuple[str, str]]
    """User name -> (access key, secret key)."""

    def admin(self, *args: str) -> str:
        """Run ``radosgw-admin`` on the cluster; its standard output."""
        return _run(["radosgw-admin", "-c", str(self.conf), "-n", "client.admin",
                     "-k", str(self.admin_keyring), *args])  # fmt: skip

    def ceph(self, *args: str) -> str:
        """Run ``ceph`` as the administrator; its standard output."""
        return _run(["ceph", "-c", str(self.conf), "-n", "client.admin",
                     "-k", str(self.admin_keyring), *args])  # fmt: skip

    def rbd(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rbd`` as the administrator; its standard output."""
        return _run(["rbd", "-c", str(self.conf), "-n", "client.admin",
                     "-k", str(self.admin_keyring), *args], timeout)  # fmt: skip


@dataclass(frozen=True)
class RBDPool:
    """The pool of RBD golden images and the client that exports them."""

    name: str
    user: str
    """The client's id (``golden`` for ``client.golden``)."""
    conf: Path
    """The client's config file: the monitor's address and the client's keyring."""


def require_tools() -> None:
    """Fail (never skip) if a Ceph program is missing: ``make test`` installs them."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (make test installs them)")


def _run(cmd: list[str], timeout: float = 60.0) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int, deadline: float, what: str) -> None:
    """Wait until something accepts connections on ``port`` of 127.0.0.1."""
    while time.monotonic() < deadline:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(0.5)
            s.connect(("127.0.0.1", port))
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} did not listen on port {port}")


def wait_s3(port: int, deadline: float, what: str) -> None:
    """Wait until an S3 server answers an HTTP request on ``port`` (radosgw
    listens before it can serve)."""
    wait_listening(port, deadline, what)
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 2) as s:
            s.settimeout(5)
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            if s.recv(64).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.1)
    raise AssertionError(f"{what} did not answer S3 requests on port {port}")


def _config(d: Path, fsid: str, mon_port: int, rgw_port: int) -> str:
    return f"""\
[global]
fsid = {fsid}
mon host = v2:127.0.0.1:{mon_port}
auth cluster required = cephx
auth service required = cephx
auth client required = cephx
run dir = {d}/run
log file = {d}/log/$name.log
admin socket = {d}/run/$name.asok
pid file = {d}/run/$name.pid
ms bind ipv6 = false
ms bind msgr1 = false
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
osd crush chooseleaf type = 0
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
osd objectstore = bluestore
osd max object name len = 460
osd max object namespace len = 64
mon data = {d}/mon/$cluster-$id
osd data = {d}/osd/$cluster-$id
[osd]
bluestore block path = {d}/osd.block
bluestore block size = 4294967296
bluestore block create = true
bluestore fsck on mkfs = false
bluestore cache autotune = false
bluestore cache size = 134217728
osd memory target = 939524096
[client.rgw.a]
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {d}/rgw/a
keyring = {d}/rgw.keyring
"""


def _start(d: Path) -> dict[str, object]:
    """Make and start the cluster in ``d``; its state (see :class:`Ceph`)."""
    require_tools()
    for sub in ("run", "log", "mon", "osd/ceph-0", "rgw/a"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    fsid, osd_uuid = str(uuid.uuid4()), str(uuid.uuid4())
    mon_port, rgw_port = free_port(), free_port()
    conf = d / "ceph.conf"
    conf.write_text(_config(d, fsid, mon_port, rgw_port))
    c = ["-c", str(conf)]
    mon_kr, admin_kr = d / "mon.keyring", d / "admin.keyring"
    _run(["ceph-authtool", "--create-keyring", str(mon_kr), "--gen-key", "-n", "mon.",
          "--cap", "mon", "allow *"])  # fmt: skip
    _run(["ceph-authtool", "--create-keyring", str(admin_kr), "--gen-key", "-n",
          "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *",
          "--cap", "mgr", "allow *"])  # fmt: skip
    _run(["ceph-authtool", "--create-keyring", str(d / "rgw.keyring"), "--gen-key", "-n",
          "client.rgw.a", "--cap", "mon", "allow rw", "--cap", "osd", "allow rwx"])  # fmt: skip
    for other in (admin_kr, d / "rgw.keyring"):
        _run(["ceph-authtool", str(mon_kr), "--import-keyring", str(other)])
    _run(["monmaptool", "--create", "--fsid", fsid, "--add", "a",
          f"v2:127.0.0.1:{mon_port}", str(d / "monmap")])  # fmt: skip
    _run(["ceph-mon", *c, "--mkfs", "-i", "a", "--monmap", str(d / "monmap"),
          "--keyring", str(mon_kr)])  # fmt: skip
    _run(["ceph-mon", *c, "-i", "a"])
    admin = ["ceph", *c, "-n", "client.admin", "-k", str(admin_kr)]
    secret = _run(["ceph-authtool", "--gen-print-key"]).strip()
    (d / "osd.json").write_text(json.dumps({"cephx_secret": secret}))
    _run([*admin, "osd", "new", osd_uuid, "0", "-i", str(d / "osd.json")])
    (d / "osd/ceph-0/keyring").write_text(f"[osd.0]\n\tkey = {secret}\n")
    _run(["ceph-osd", *c, "-i", "0", "--mkfs", "--osd-uuid", osd_uuid])
    _run(["ceph-osd", *c, "-i", "0"])
    _run(["radosgw", *c, "-n", "client.rgw.a"])
    keys: dict[str, tuple[str, str]] = {}
    for user in ("alice", "bob"):
        access = f"{user.upper()}{uuid.uuid4().hex[:12].upper()}"
        secret_key = uuid.uuid4().hex + uuid.uuid4().hex[:8]
        keys[user] = (access, secret_key)
    deadline = time.monotonic() + START_TIMEOUT
    wait_s3(rgw_port, deadline, "radosgw")
    for user, (access, secret_key) in keys.items():
        _run(["radosgw-admin", *c, "-n", "client.admin", "-k", str(admin_kr), "user",
              "create", f"--uid={user}", f"--display-name={user}",
              f"--access-key={access}", f"--secret-key={secret_key}"])  # fmt: skip
    return {"conf": str(conf), "admin_keyring": str(admin_kr),
            "endpoint": f"http://127.0.0.1:{rgw_port}", "keys": keys}  # fmt: skip


RBD_POOL = "rbd"
RBD_USER = "golden"
RBD_CAPS = ("mon", "profile rbd", "osd", f"profile rbd pool={RBD_POOL}")
"""docs/serving.md's capabilities of a host exporting golden snapshots."""


def rbd_pool(ceph: Ceph) -> RBDPool:
    """The cluster's RBD pool and golden client, made on the first call of a run."""
    d = ceph.root
    pool = RBDPool(RBD_POOL, RBD_USER, d / f"client.{RBD_USER}.conf")
    with _locked(d.parent):
        if not pool.conf.exists():
            if shutil.which("rbd") is None:
                pytest.fail("rbd not installed (make test installs it)")
            ceph.ceph("osd", "pool", "create", RBD_POOL, "8")
            ceph.rbd("pool", "init", RBD_POOL)
            keyring = d / f"client.{RBD_USER}.keyring"
            ceph.ceph("auth", "get-or-create", f"client.{RBD_USER}", *RBD_CAPS,
                      "-o", str(keyring))  # fmt: skip
            mon_host = next(line for line in ceph.conf.read_text().splitlines()
                            if line.startswith("mon host"))  # fmt: skip
            part = pool.conf.with_suffix(".part")
            part.write_text(f"[global]\n{mon_host}\n[client.{RBD_USER}]\nkeyring = {keyring}\n")
            part.rename(pool.conf)
    return pool


def _pids(d: Path) -> list[int]:
    """The daemons' pids, radosgw first, the monitor last."""
    out = []
    for name in ("client.rgw.a", "osd.0", "mon.a"):
        path = d / "run" / f"{name}.pid"
        with contextlib.suppress(OSError, ValueError):
            out.append(int(path.read_text().strip()))
    return out


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def stop_pid(pid: int, timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM ``pid``, wait for it to be gone, SIGKILL it after ``timeout``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.05)
        if not alive(pid):
            return
    raise AssertionError(f"process {pid} did not stop")


def _stop(d: Path) -> None:
    for pid in _pids(d):
        stop_pid(pid)


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / "lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _users(root: Path) -> set[str]:
    path = root / "users"
    return set(path.read_text().split()) if path.exists() else set()


def _set_users(root: Path, users: set[str]) -> None:
    (root / "users").write_text("".join(f"{u}\n" for u in sorted(users)))


@contextlib.contextmanager
def ceph_cluster(root: Path) -> Iterator[Ceph]:
    """The cluster of this test run (``root`` is shared by its processes)."""
    root.mkdir(parents=True, exist_ok=True)
    me = str(os.getpid())
    d = root / "cluster"
    with _locked(root):
        state = root / "state.json"
        if not state.exists():
            if d.exists():  # an earlier start failed part way: stop what it started
                _stop(d)
            try:
                state.write_text(json.dumps(_start(d)))
            except BaseException:
                _stop(d)
                raise
        info = json.loads(state.read_text())
        _set_users(root, _users(root) | {me})
    try:
        yield Ceph(d, Path(info["conf"]), Path(info["admin_keyring"]), info["endpoint"],
                   {k: (v[0], v[1]) for k, v in info["keys"].items()})  # fmt: skip
    finally:
        with _locked(root):
            users = _users(root) - {me}
            _set_users(root, users)
            if not users:
                _stop(d)
                state.unlink()
                shutil.rmtree(d)  # the OSD's block file holds every object written


class Gateway:
    """A radosgw of one test on the shared cluster, on its own port: started,
    stopped and restarted by the test, stopped on exit."""

    def __init__(self, ceph: Ceph, name: str) -> None:
        self.ceph = ceph
        self.name = name
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = ceph.root / "log" / f"client.rgw.{name}.out"

    def start(self) -> None:
        d = self.ceph.root
        (d / "rgw" / self.name).mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                ["radosgw", "-f", "-c", str(self.ceph.conf), "-n", "client.admin",
                 "-k", str(self.ceph.admin_keyring),
                 f"--rgw-frontends=beast endpoint=127.0.0.1:{self.port}",
                 f"--rgw-data={d}/rgw/{self.name}",
                 f"--pid-file={d}/run/rgw.{self.name}.pid",
                 f"--admin-socket={d}/run/rgw.{self.name}.asok",
                 f"--log-file={d}/log/rgw.{self.name}.log"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        wait_s3(self.port, time.monotonic() + START_TIMEOUT, f"radosgw {self.name}")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc = None

    def __enter__(self) -> Gateway:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":  # a manual check: start, show, stop
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.monotonic()
        with ceph_cluster(Path(tmp)) as ceph:
            print(f"up in {time.monotonic() - t0:.1f} s:", ceph)
            if sys.argv[1:] == ["wait"]:
                input("press enter to stop")
        print(f"stopped after {time.monotonic() - t0:.1f} s")
