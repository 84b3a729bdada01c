"""The package's shape (docs/architecture.md): no import cycles among its modules, counting imports inside
functions too; no module imports another module's ``_private`` names; no library module changes
process-wide state (torch threads, environment) outside `actatlas.runtime`; and the installable
library pins no exact torch."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PKG = SRC / "actatlas"


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (p, is_pkg)
    return mods


def _imports(mods) -> tuple[dict[str, set[str]], list[tuple[str, str, str]]]:
    """module -> the package modules it imports (anywhere in its body); and (importer, module, name)
    for every ``from module import _name`` of a private name."""
    edges: dict[str, set[str]] = {m: set() for m in mods}
    private = []
    for m, (path, is_pkg) in mods.items():
        pkg = m if is_pkg else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")[:len(pkg.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("actatlas"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in mods:
                        edges[m].add(sub)
                    elif target in mods:
                        edges[m].add(target)
                        if alias.name.startswith("_") and not alias.name.startswith("__"):
                            private.append((m, target, alias.name))
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in mods:
                        edges[m].add(alias.name)
    for m in edges:
        edges[m].discard(m)
    return edges, private


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_the_checks_see_cycles_and_private_imports():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    mods, _ = _modules(), None
    edges, _ = _imports(mods)
    assert "actatlas.stages" in edges["actatlas.pipeline"]       # the walker finds real imports


def test_the_raise_walker_sees_bare_errors_and_flags(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g(x):\n    raise UserError(f'bad {x}: pick another with --port')\n"
                 "def h():\n    raise ConfigError('per_image must be >= 1')\n")
    assert _raises(f) == [("UserError", "bad  : pick another with --port"), ("ConfigError", "per_image must be >= 1")]


def test_no_import_cycles():
    edges, _ = _imports(_modules())
    assert _cycles(edges) == []


def test_no_imports_of_private_names():
    _, private = _imports(_modules())
    assert private == []


def _raises(path: Path):
    """(exception name, message text) of every ``raise Name(...)`` in a module (string parts joined)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call) and isinstance(node.exc.func, ast.Name):
            text = " ".join(c.value for c in ast.walk(node.exc) if isinstance(c, ast.Constant)
                            and isinstance(c.value, str))
            out.append((node.exc.func.id, text))
    return out


def test_library_errors_are_typed_and_name_no_cli_flags():
    """Library code raises a specific kind (ConfigError, DataError, ...), never the bare base, and its
    messages name settings, not flags: only the cli/ package speaks of --flags."""
    bare, flags = [], []
    for p in PKG.rglob("*.py"):
        if "cli" in p.relative_to(PKG).parts or p.name == "errors.py":
            continue
        for name, text in _raises(p):
            if name == "UserError":
                bare.append(str(p.relative_to(PKG)))
            if re.search(r"(^|[\s(\'\"])--[a-z]", text):
                flags.append((str(p.relative_to(PKG)), text[:80]))
    assert bare == [] and flags == []


# torch.set_num_threads / os.environ writes belong to Runtime.apply (and the Ray workers' start-up)
GLOBAL_STATE = re.compile(r"torch\.set_num_threads\(|os\.environ\[[^]]+\]\s*=|os\.environ\.(setdefault|update)\(")
ALLOWED = {"runtime.py", "ray_engine.py"}


def test_no_library_module_sets_process_wide_state():
    offenders = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py")
                 if p.name not in ALLOWED and GLOBAL_STATE.search(p.read_text())]
    assert offenders == []


def test_library_states_a_torch_range_not_a_pin():
    text = (SRC.parent / "pyproject.toml").read_text()
    deps = re.search(r"dependencies = \[(.*?)\]", text, re.S).group(1)
    torch_req = re.search(r'"torch([^"]*)"', deps).group(1)
    assert ">=" in torch_req and "==" not in torch_req
    assert "==" not in deps                                   # exact pins live in requirements.txt
    pins = (SRC.parent / "requirements.txt").read_text()
    assert re.search(r"^torch==", pins, re.M)


@pytest.mark.slow  # fresh interpreters
@pytest.mark.parametrize("module", ["actatlas", "actatlas.cli", "actatlas.pipeline", "actatlas.export"])
def test_modules_import_cleanly_in_a_fresh_interpreter(module):
    import subprocess

    res = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
