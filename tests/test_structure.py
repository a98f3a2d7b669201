"""The shape of the package: no import cycles inside ``neox_rt`` (function-level imports included), and a
``docs/structure.md`` that names every module.

An edge A -> B means that module A's source imports B anywhere (at the top or inside a function): ``import a.b``
and ``from a import b`` (b a module) point at ``a.b``; ``from a import name`` (name not a module) at ``a``, the
package's ``__init__``. Parents that Python imports implicitly on the way are not edges (the convention of
import-linter and pydeps); a package ``__init__`` that re-exports its children has those children as edges.
"""
from __future__ import annotations

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "neox_rt")


def package_modules() -> dict[str, str]:
    """Dotted module name -> file, for every .py file under neox_rt/ (the kernels link included)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(PACKAGE, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        rel = os.path.relpath(dirpath, REPO).replace(os.sep, ".")
        for name in sorted(filenames):
            if name.endswith(".py"):
                mod = rel if name == "__init__.py" else f"{rel}.{name[:-3]}"
                out[mod] = os.path.join(dirpath, name)
    return out


def import_edges(modules: dict[str, str]) -> dict[str, set[str]]:
    """Module -> the package modules its source imports (every ``import`` statement, at any depth)."""
    edges = {}
    for mod, path in modules.items():
        is_pkg = path.endswith("__init__.py")
        package = mod if is_pkg else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read(), path)):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = ".".join(base[:len(base) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                else:
                    base = node.module
                for a in node.names:
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        edges[mod] = {t for t in targets if t in modules and t != mod}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search with colours)."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = "done"
        return None

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_cycle_finder_sees_function_level_imports(tmp_path):
    """The walker itself: a cycle hidden behind a function-level import is found; a chain is not a cycle."""
    (tmp_path / "a.py").write_text("import os\nfrom pkg import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from pkg.a import thing\n    return thing\n")
    (tmp_path / "c.py").write_text("from pkg import b\n")
    modules = {f"pkg.{n}": str(tmp_path / f"{n}.py") for n in "abc"}
    edges = import_edges(modules)
    assert edges == {"pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}, "pkg.c": {"pkg.b"}}
    assert find_cycle(edges) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.b", "pkg.a", "pkg.b"])
    del edges["pkg.b"]
    assert find_cycle(edges) is None


def test_no_import_cycles():
    modules = package_modules()
    assert "neox_rt.ops.table" in modules and "neox_rt.kernels.linear" in modules  # the walk found the layout
    cycle = find_cycle(import_edges(modules))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("layer,forbidden", [
    ("neox_rt.model", ("neox_rt.engine", "neox_rt.checkpoints", "neox_rt.api", "neox_rt.ops.cuda",
                       "neox_rt.ops.triton", "neox_rt.parallel.p2p")),
    ("neox_rt.ops", ("neox_rt.model", "neox_rt.engine", "neox_rt.checkpoints", "neox_rt.parallel", "neox_rt.api")),
    ("neox_rt.engine", ("neox_rt.checkpoints", "neox_rt.api", "neox_rt.ops.cuda", "neox_rt.ops.triton")),
    ("neox_rt.kernels", ("neox_rt.",)),
])
def test_layers_import_only_downwards(layer, forbidden):
    """The model says what a layer computes and never which backend or transport runs it; the ops know nothing
    of the model; the engine does not read checkpoints; the Triton kernels are free of the runtime."""
    edges = import_edges(package_modules())
    bad = sorted(f"{m} -> {t}" for m, ts in edges.items() if m == layer or m.startswith(layer + ".")
                 for t in ts if t.startswith(forbidden) and not (t == layer or t.startswith(layer + ".")))
    assert not bad, bad


def test_structure_doc_names_every_module():
    """docs/structure.md has a line for every module of the package (one sentence per module; keep it true)."""
    doc = open(os.path.join(REPO, "docs", "structure.md"), encoding="utf-8").read()
    missing = []
    for mod, path in package_modules().items():
        rel = os.path.relpath(path, REPO).replace(os.sep, "/")
        if rel.startswith("neox_rt/kernels/"):  # a link to the top-level kernels/ folder, where the doc names them
            rel = rel[len("neox_rt/"):]
        if f"`{rel}`" not in doc:
            missing.append(rel)
    assert not missing, f"docs/structure.md does not name: {missing}"


def test_every_package_is_installed():
    """pyproject.toml lists every package of neox_rt/ (a wheel or a non-editable install has only those)."""
    import re
    text = open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8").read()
    listed = set(re.findall(r'"(neox_rt(?:\.\w+)*)"', text.split("packages = [", 1)[1].split("]", 1)[0]))
    packages = {m for m, path in package_modules().items() if path.endswith("__init__.py")}
    assert packages - listed == set(), f"pyproject.toml's packages lack {sorted(packages - listed)}"
