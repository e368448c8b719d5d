"""The error tree: every class of addcow.errors is exported by ``addcow`` and drawn,
in its place, in the tree of errors.py's docstring."""

from __future__ import annotations

import re
import subprocess
import sys

import addcow
from addcow import errors

SERVER_MODULES = {
    "addcow.nbd.events",
    "addcow.serve.tls",
    "addcow.serve.live",
    "addcow.serve.control",
    "addcow.serve.handoff",
    "addcow.serve.qmp",
}
"""Modules whose own AddCowError subclasses are the NBD server's, not the library's."""


def error_classes() -> dict[str, type[errors.AddCowError]]:
    """Every AddCowError class defined in addcow.errors, by name."""
    return {
        name: obj
        for name, obj in vars(errors).items()
        if isinstance(obj, type)
        and issubclass(obj, errors.AddCowError)
        and obj.__module__ == errors.__name__
    }


def drawn_tree() -> dict[str, str | None]:
    """The docstring's tree: class name -> the name of the class it hangs from."""
    doc = errors.__doc__ or ""
    lines = doc[doc.index("The tree::") :].split("\n\n")[1].splitlines()
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []  # (column of the name, name)
    for line in lines:
        match = re.match(r"^([ |+-]*?)(\w+Error)\s", line + " ")
        assert match, f"not a line of the tree: {line!r}"
        column, name = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= column:
            stack.pop()
        assert name not in parents, f"{name} is drawn twice"
        parents[name] = stack[-1][1] if stack else None
        stack.append((column, name))
    return parents


def test_every_error_class_is_exported_and_drawn_in_its_place() -> None:
    classes = error_classes()
    assert "SlowZeroError" in classes and "AddCowError" in classes
    exported = {name for name in addcow.__all__ if name.endswith("Error")}
    assert exported == set(classes), "addcow.__all__ lists exactly the classes of addcow.errors"
    for name, cls in classes.items():
        assert getattr(addcow, name) is cls
    tree = drawn_tree()
    assert set(tree) == set(classes), "the docstring draws exactly the classes of addcow.errors"
    for name, parent in tree.items():
        base = classes[name].__bases__[0]
        assert parent == (None if base is Exception else base.__name__), name


def test_no_library_error_lives_outside_the_tree() -> None:
    """An AddCowError subclass defined anywhere but addcow.errors (the NBD server's
    own errors aside) would escape the drawn tree and ``addcow.__all__``."""
    script = (
        "import importlib, pkgutil, addcow, addcow.errors as e\n"
        "for m in pkgutil.walk_packages(addcow.__path__, 'addcow.'):\n"
        "    if not m.name.endswith('__main__'):\n"
        "        importlib.import_module(m.name)\n"
        "def walk(c):\n"
        "    for s in c.__subclasses__():\n"
        "        yield s\n"
        "        yield from walk(s)\n"
        "for s in walk(e.AddCowError):\n"
        "    print(s.__module__, s.__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    found = {tuple(line.split()) for line in out.splitlines()}
    outside = {(m, n) for m, n in found if m != errors.__name__ and m not in SERVER_MODULES}
    assert outside == set()
    assert {n for m, n in found if m == errors.__name__} == set(error_classes()) - {"AddCowError"}
    for module in SERVER_MODULES:
        assert module in (errors.__doc__ or ""), f"the docstring says {module} has its own"
