"""The layering rules of STYLE.md's "does not import" table, one test per row.

Imports are read from the source with ``ast``, at any depth: a function-level
``import trio`` inside the core is as much a dependency as one at the top.
A rule names module prefixes; ``cachefs.qcow2`` forbids ``cachefs.qcow2.engine``
too. The table lives in ../shared/STYLE.md; each row is copied here with its
reason, so a change of the rules is a change of this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "cachefs"

#: What "I/O" means for the sans-I/O core: anything that reaches a file, a
#: socket, a process or an event loop.
IO = ("os", "io", "socket", "subprocess", "mmap", "select", "selectors", "asyncio", "threading",
      "trio", "cffi", "pyfuse3", "ctypes")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports_of(path: Path, package: str | None = None) -> set[str]:
    """Every module a file imports, absolute (relative imports resolved against its package)."""
    tree = ast.parse(path.read_text(), str(path))
    if package is None:
        package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = parts[:len(parts) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from cachefs import native`
    return out


def files(pattern: str) -> list[Path]:
    found = sorted(PKG.glob(pattern))
    assert found, pattern
    return found


def offenders(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    bad = []
    for p in paths:
        for mod in sorted(imports_of(p)):
            if any(mod == f or mod.startswith(f + ".") for f in forbidden):
                bad.append(f"{p.relative_to(PKG.parent)} imports {mod}")
    return bad


def test_the_qcow2_core_does_no_io():
    """qcow2/*: offset math, allocation, refcounts, plans. No I/O, no trio, no os (habit 1)."""
    assert offenders(files("qcow2/*.py"), IO + ("cachefs.backend", "cachefs.backendset", "cachefs.native",
                                               "cachefs.image", "cachefs.fs", "cachefs.daemon")) == []


def test_policy_imports_nothing_but_attrs():
    """policy.py: the cache modes as frozen values. ``os`` only for the open(2) flag
    constants that ``auto`` maps (O_DIRECT, O_DSYNC, O_SYNC): no call into it."""
    path = PKG / "policy.py"
    mods = imports_of(path) - {"__future__", "__future__.annotations", "attrs", "typing"}
    assert mods <= {"os"}, mods
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"]
    assert calls == [], "policy.py calls into os"


def test_backends_know_no_qcow2_and_no_fuse():
    """backend/: bytes at offsets. It knows no image format and no FUSE."""
    assert offenders(files("backend/*.py"), ("cachefs.qcow2", "cachefs.image", "pyfuse3", "cachefs.fs")) == []


def test_only_the_backend_and_the_data_plane_glue_import_native():
    """native/: the cffi module. Everything else goes through the backend (habit 7)."""
    allowed = ("cachefs.backend", "cachefs.native", "cachefs.dataplane", "cachefs.dpops")
    users = [p for p in PKG.rglob("*.py")
             if not any(module_name(p) == a or module_name(p).startswith(a + ".") for a in allowed)]
    assert offenders(users, ("cachefs.native",)) == []


def test_below_the_front_end_nothing_imports_pyfuse3():
    """image.py, the metadata queue, the catalog and the data-plane glue (once it exists):
    FUSE is fs.py's business."""
    below = [PKG / "image.py", PKG / "qcow2image.py", PKG / "openimage.py", PKG / "catalog.py",
             PKG / "backendset.py", *files("qcow2/*.py"),
             *PKG.glob("dataplane*.py"), PKG / "dpops.py", PKG / "sparse.py"]
    assert offenders(below, ("pyfuse3",)) == []


def test_the_front_end_knows_no_qcow2_internals():
    """fs.py: pyfuse3 operations. It sees images, not L2 tables."""
    assert offenders([PKG / "fs.py"], ("cachefs.qcow2",)) == []


def test_nothing_imports_the_command_line():
    """cli.py is the top: nothing imports it."""
    assert offenders([p for p in PKG.rglob("*.py") if p.name != "cli.py"], ("cachefs.cli",)) == []


def test_the_rules_see_a_violation(tmp_path):
    """The reader of imports is not blind: it finds nested, relative and from-imports."""
    probe = tmp_path / "probe.py"
    probe.write_text("from . import meta\n"
                     "def f():\n    import trio\n    from ..native import POOL\n"
                     "class C:\n    from cachefs import native\n")
    mods = imports_of(probe, "cachefs.qcow2")
    assert {"trio", "cachefs.qcow2.meta", "cachefs.native", "cachefs.native.POOL"} <= mods


def _graph() -> dict[str, set[str]]:
    """cachefs module -> the cachefs modules it imports (at any depth in the file)."""
    paths = {module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for mod, path in paths.items():
        deps = set()
        for imp in imports_of(path):
            while imp and imp not in paths:
                imp = imp.rpartition(".")[0]  # `from cachefs.qcow2 import check` names a module
            if imp and imp != mod:
                deps.add(imp)
        graph[mod] = deps
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()]:
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_image_layer_is_in_no_import_cycle():
    """The image layer (image.py, qcow2image.py, openimage.py) is below the commands: nothing it
    imports (however deep) imports it back. The repair a dirty lazy-refcounts image needs at open
    is repairio.py, below both the image layer and checkcmd.py (issue 10, layering)."""
    graph = _graph()
    for mod in ("cachefs.image", "cachefs.qcow2image", "cachefs.openimage"):
        assert mod not in _reachable(graph, mod), mod
        assert "cachefs.checkcmd" not in _reachable(graph, mod), mod


def test_the_checker_reads_headers_through_the_format_module():
    """Header reading lives in format.py; the checker and the repair do not depend on the engine."""
    graph = _graph()
    for mod in ("cachefs.qcow2.check", "cachefs.qcow2.repair", "cachefs.repairio"):
        assert "cachefs.qcow2.engine" not in _reachable(graph, mod), mod
