"""Nobody touches another module's ``_private`` members (STYLE.md habit 5; issue 21).

A leading underscore says "mine": a module may use its own objects' private
names, through ``self``/``cls``/``super()`` or its own module-level classes and
functions, and nothing else's. A caller that needs something gets a public
method or property instead (Qcow2Image.remap, Image.make_durable, ...), so what
crosses a module boundary is what the owner chose to offer.

Read from the source with ``ast``: every ``X._name`` where X is not one of
those. Dunders (``__class__``) are Python's, not private.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cachefs"

#: Public APIs that only look private, each with its reason.
ALLOWED = {
    "os._exit",  # the documented exit without cleanup, for a forked child (fuse/daemon.py)
}


def _own_names(tree: ast.Module) -> set[str]:
    """The names a module defines at its top level: its classes, functions and variables."""
    own = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            own.add(node.name)
        elif isinstance(node, ast.Assign):
            own.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own.add(node.target.id)
    return own


def _is_own(value: ast.expr, own: set[str]) -> bool:
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls") or value.id in own
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def private_accesses(source: str, filename: str) -> list[str]:
    """``file:line: X._name`` for every access to a private name of something not the module's own."""
    tree = ast.parse(source, filename)
    own = _own_names(tree)
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
            continue
        if node.attr.startswith("__") and node.attr.endswith("__"):
            continue
        text = ast.unparse(node)
        if not _is_own(node.value, own) and text not in ALLOWED:
            found.append(f"{filename}:{node.lineno}: {text}")
    return sorted(found, key=lambda s: (s.split(":")[0], int(s.split(":")[1])))


def test_no_module_touches_another_ones_private_members():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        bad += private_accesses(path.read_text(), str(path.relative_to(PKG.parent)))
    print("\n".join(bad))
    assert len(bad) == 0, "private members used from outside:\n" + "\n".join(bad)


def test_the_detector_sees_a_violation():
    source = (
        "import os\n"
        "from cachefs.image.qcow2image import Qcow2Image\n"
        "class Mine:\n"
        "    _table = {}\n"
        "    def f(self, img, other):\n"
        "        self._x = cls._y = super()._z  # its own\n"
        "        Mine._table, _helper._cache, img.__class__, os._exit  # its own, a dunder, allowed\n"
        "        img._core()\n"
        "        self.image._zcache = None\n"
        "        Qcow2Image._adopt\n"
        "        other.engine._all_zero(b'')\n"
        "def _helper():\n"
        "    pass\n")
    assert private_accesses(source, "probe.py") == [
        "probe.py:8: img._core",
        "probe.py:9: self.image._zcache",
        "probe.py:10: Qcow2Image._adopt",
        "probe.py:11: other.engine._all_zero",
    ]
