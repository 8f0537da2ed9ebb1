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
    assert offenders(files("qcow2/*.py"), IO + ("cachefs.backend", "cachefs.native", "cachefs.image",
                                               "cachefs.dataplane", "cachefs.fuse", "cachefs.cli")) == []


def test_policy_imports_nothing_but_attrs():
    """policy.py: the cache modes as frozen values. ``os`` only for the open(2) flag
    constants that ``auto`` maps (O_DIRECT, O_DSYNC, O_SYNC): no call into it."""
    path = PKG / "policy.py"
    mods = imports_of(path) - {"__future__", "__future__.annotations", "attrs", "typing"}
    assert mods <= {"os"}, mods
    calls = [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)
             and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name) and n.func.value.id == "os"]
    assert calls == [], "policy.py calls into os"


#: The packages, top to bottom (docs/design.md "Layers"; issue 21):
#: cli/ -> fuse/ -> dataplane/ -> image/ -> {qcow2/, backend/} -> {errors, policy, mountinfo}.
#: A module may import its own package and any package of a lower rank, never one of its own
#: rank (qcow2/ and backend/ know nothing of each other) or above.
RANKS = {
    "cachefs.cli": 5,
    "cachefs.fuse": 4,
    "cachefs.dataplane": 3,
    "cachefs.image": 2,
    "cachefs.qcow2": 1,
    "cachefs.backend": 1,
    "cachefs.native": 0,  # the cffi module; only backend/ and dataplane/plane.py may use it (below)
    "cachefs.errors": 0,
    "cachefs.policy": 0,
    "cachefs.mountinfo": 0,
    "cachefs": 0,  # the package's __init__: its version
}


def package_of(mod: str) -> str:
    """The entry of RANKS a module belongs to: its longest matching prefix."""
    best = max((p for p in RANKS if mod == p or mod.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{mod} is in no package of RANKS: add it to the layering"
    return best


def arrow_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, deps in sorted(graph.items()):
        home = package_of(mod)
        for dep in sorted(deps):
            there = package_of(dep)
            if there != home and RANKS[there] >= RANKS[home]:
                bad.append(f"{mod} imports {dep} ({there} is not below {home})")
    return bad


def test_every_module_is_in_a_layer():
    for mod in _graph():
        package_of(mod)


def test_packages_depend_one_way():
    """cli/ -> fuse/ -> dataplane/ -> image/ -> {qcow2/, backend/} -> {errors, policy, mountinfo}."""
    assert arrow_violations(_graph()) == []


def test_the_arrow_rule_sees_a_violation():
    """A package importing one above it, or a sibling of its own rank, is caught."""
    graph = {"cachefs.image.base": {"cachefs.dataplane.plane", "cachefs.qcow2.engine"},
             "cachefs.qcow2.engine": {"cachefs.backend.base"},
             "cachefs.dataplane.plane": set(), "cachefs.backend.base": set()}
    assert arrow_violations(graph) == [
        "cachefs.image.base imports cachefs.dataplane.plane (cachefs.dataplane is not below cachefs.image)",
        "cachefs.qcow2.engine imports cachefs.backend.base (cachefs.backend is not below cachefs.qcow2)"]


def test_backends_know_no_qcow2_and_no_fuse():
    """backend/: bytes at offsets. It knows no image format and no FUSE."""
    assert offenders(files("backend/*.py"), ("cachefs.qcow2", "cachefs.image", "pyfuse3", "cachefs.fuse")) == []


def test_only_the_backend_and_the_data_plane_import_native():
    """native/: the cffi module. Everything else goes through backend/ or dataplane/plane.py (habit 7)."""
    allowed = ("cachefs.backend", "cachefs.native", "cachefs.dataplane.plane")
    users = [p for p in PKG.rglob("*.py")
             if not any(module_name(p) == a or module_name(p).startswith(a + ".") for a in allowed)]
    assert offenders(users, ("cachefs.native",)) == []


def test_below_the_front_end_nothing_imports_pyfuse3():
    """image/, dataplane/, qcow2/, backend/, the catalog and the requests C hands to Python:
    FUSE's types are fuse/operations.py's business."""
    below = [*files("image/*.py"), *files("dataplane/*.py"), *files("qcow2/*.py"), *files("backend/*.py"),
             PKG / "fuse/catalog.py", PKG / "fuse/direct_requests.py"]
    assert offenders(below, ("pyfuse3",)) == []


def test_the_front_end_knows_no_qcow2_internals():
    """fuse/: pyfuse3 operations. It sees images, not L2 tables."""
    assert offenders(files("fuse/*.py"), ("cachefs.qcow2",)) == []


def test_nothing_imports_the_command_line():
    """cli/ is the top: nothing outside it imports it."""
    assert offenders([p for p in PKG.rglob("*.py") if not module_name(p).startswith("cachefs.cli")],
                     ("cachefs.cli",)) == []


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
    """The image layer (image/base.py, image/qcow2image.py, image/opening.py) is below the commands: nothing it
    imports (however deep) imports it back. The repair a dirty lazy-refcounts image needs at open
    is image/repair_file.py, below both the image layer and cli/check.py (issue 10, layering)."""
    graph = _graph()
    for mod in ("cachefs.image.base", "cachefs.image.qcow2image", "cachefs.image.opening"):
        assert mod not in _reachable(graph, mod), mod
        assert "cachefs.cli.check" not in _reachable(graph, mod), mod


def test_the_checker_reads_headers_through_the_format_module():
    """Header reading lives in format.py; the checker and the repair do not depend on the engine."""
    graph = _graph()
    for mod in ("cachefs.qcow2.check", "cachefs.qcow2.repair", "cachefs.image.repair_file"):
        assert "cachefs.qcow2.engine" not in _reachable(graph, mod), mod



# ---------------------------------------------------------------- the tests themselves (issue 21)

TESTS = Path(__file__).resolve().parent


def imports_of_a_test_module(paths: list[Path]) -> list[str]:
    """Imports (at any depth) of a ``test_*`` module in ``paths``: shared helpers live in plain
    modules (recorded.py, powercut.py, mounting.py, ...), so each test file runs and reads alone."""
    bad = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            bad += [f"{p.name} imports {n}" for n in names if n.split(".")[0].startswith("test_")]
    return bad


def test_no_test_module_imports_another():
    assert imports_of_a_test_module(sorted(TESTS.glob("test_*.py"))) == []


def test_the_test_import_rule_sees_a_violation(tmp_path):
    bad = tmp_path / "test_bad.py"
    bad.write_text("import os\n\ndef f():\n    from test_cache_modes import open_recorded\n")
    good = tmp_path / "test_good.py"
    good.write_text("from recorded import open_recorded\nimport testing_helpers\n")
    assert imports_of_a_test_module([bad, good]) == ["test_bad.py imports test_cache_modes"]


#: Functions fit on a screen (STYLE.md, habit 6), in the tests as in production: a longer test
#: reads as named steps (issue 21).
MAX_FUNCTION_LINES = 60


def long_functions(paths: list[Path], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """Functions (tests, helpers, nested ones) of ``paths`` longer than ``limit`` lines, def to last line."""
    found = []
    for p in paths:
        for node in ast.walk(ast.parse(p.read_text(), str(p))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines >= limit:
                    found.append(f"{p.name}:{node.lineno} {node.name}: {lines} lines")
    return found


def test_every_function_in_the_tests_fits_a_screen():
    assert long_functions(sorted(TESTS.glob("*.py"))) == []


def test_the_length_rule_sees_a_long_function(tmp_path):
    long = tmp_path / "test_long.py"
    long.write_text("def test_long():\n" + "    x = 1\n" * 59 + "\n\ndef short():\n    pass\n")
    assert long_functions([long]) == ["test_long.py:1 test_long: 60 lines"]
