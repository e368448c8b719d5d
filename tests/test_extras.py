"""How a message says an optional extra is missing: one helper
(:func:`addcow.extras.install_hint`) for every extra pyproject.toml declares,
giving the command from a package index and from a checkout; and each message
that needs an extra ends with it."""

from __future__ import annotations

import os
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
from nbd_util import ADDCOW, env_with_addcow

import addcow
from addcow.extras import EXTRAS, install_hint

ROOT = Path(__file__).resolve().parent.parent


def test_the_hint_gives_the_command_from_an_index_and_from_a_checkout() -> None:
    assert install_hint("http") == (
        "install the 'http' extra: pip install 'addcow[http]' "
        "(from a checkout: pip install '.[http]')"
    )
    for extra in EXTRAS:
        head, commands = install_hint(extra).split(": ", 1)
        assert head == f"install the {extra!r} extra"
        index, checkout = commands.removesuffix(")").split(" (from a checkout: ")
        # quoted so that a shell (zsh globs [...]) passes each on as one argument
        assert shlex.split(index) == ["pip", "install", f"addcow[{extra}]"]
        assert shlex.split(checkout) == ["pip", "install", f".[{extra}]"]
    with pytest.raises(ValueError, match="expected one of fast, zstd, http, s3, found 'nope'"):
        install_hint("nope")


def test_the_extras_are_the_ones_pyproject_declares() -> None:
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert set(EXTRAS) == set(declared) - {"test"}
    for extra, package in EXTRAS.items():
        assert any(req.startswith(package) for req in declared[extra]), (extra, declared)


def test_no_message_writes_its_own_install_command() -> None:
    for path in sorted((ROOT / "src" / "addcow").rglob("*.py")):
        if path.name != "extras.py":
            assert "pip install" not in path.read_text(), path


def test_a_missing_uvloop_names_the_fast_extra(tmp_path: Path) -> None:
    """``ADDCOW_EVENT_LOOP=uvloop`` where uvloop cannot be imported (a module of
    that name first on the path that fails to import)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "uvloop.py").write_text('raise ImportError("uvloop hidden by the test")\n')
    image = tmp_path / "d.add-cow"
    addcow.create(image, size=1 << 20, image_file="d.raw")
    env = env_with_addcow()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    env["ADDCOW_EVENT_LOOP"] = "uvloop"
    proc = subprocess.run(
        [ADDCOW, "serve", "--foreground", "--socket", str(tmp_path / "s.sock"), str(image)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (
        "addcow: ADDCOW_EVENT_LOOP=uvloop: expected uvloop installed, found none; "
        "install the 'fast' extra: pip install 'addcow[fast]' "
        "(from a checkout: pip install '.[fast]')\n"
    )
    assert not (tmp_path / "s.sock").exists()


def test_local_images_need_no_network_library(tmp_path: Path) -> None:
    """The remote stores are loaded only when a backing URI is opened: with ssl,
    urllib3 and botocore failing to import, every command on local files works (and
    none pays for loading them at start)."""
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    for name in ("ssl", "urllib3", "botocore"):
        (hidden / f"{name}.py").write_text(f'raise ImportError("{name} hidden by the test")\n')
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(range(256)) * 4096)
    env = env_with_addcow()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(hidden), env.get("PYTHONPATH")]))
    image = str(tmp_path / "d.add-cow")
    for args in (
        ["create", "-q", "-b", str(base), "-F", "raw", "-o", "image_file=d.raw", image],
        ["info", image],
        ["map", image],
        ["check", image],
        ["stream", "-q", image],
        ["detach", image],
    ):
        proc = subprocess.run([ADDCOW, *args], capture_output=True, text=True, timeout=60, env=env)
        assert (proc.returncode, proc.stderr) == (0, ""), args
    assert (tmp_path / "d.raw").read_bytes() == base.read_bytes()
