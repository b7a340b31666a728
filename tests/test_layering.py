"""Dependencies run one way: tools -> exporter -> runtime -> dit -> foresight, and no package has an
import cycle among its modules (an import inside a function counts: it closes the cycle later)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Each package and the project packages it may import (besides itself).
ALLOWED = {
    "foresight": set(),  # standard library only
    "dit": {"foresight"},  # model code: torch/diffusers and the error root
    "runtime": {"foresight", "dit"},
    "exporter": {"foresight", "dit", "runtime"},
    "tools": {"foresight", "dit", "runtime", "exporter"},
}


def modules(package: str) -> dict[str, Path]:
    base = ROOT / package
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p
            for p in sorted(base.rglob("*.py"))}


def imports(name: str, path: Path) -> set[str]:
    """Fully qualified modules (or module.attribute names) ``path`` imports, relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            subs = {f"{base}.{a.name}" for a in node.names}
            found |= subs if subs & set(ALL) else {base} | subs  # `from pkg import sub` imports pkg.sub
    return found


ALL = {name: path for pkg in ALLOWED for name, path in modules(pkg).items()}


@pytest.mark.parametrize("package", list(ALLOWED))
def test_packages_import_only_the_layers_below(package):
    wrong = sorted((name, imp) for name, path in modules(package).items() for imp in imports(name, path)
                   if imp.split(".")[0] in ALLOWED and imp.split(".")[0] not in ALLOWED[package] | {package})
    assert not wrong, f"{package} must not import these: {wrong}"


def test_foresight_uses_the_standard_library_only():
    import sys

    for name, path in modules("foresight").items():
        for imp in imports(name, path):
            top = imp.split(".")[0]
            assert top in sys.stdlib_module_names or top in ("foresight", "__future__"), (name, imp)


def module_edges(name: str, path: Path) -> set[str]:
    """The project modules ``name`` imports: ``from pkg import sub`` is an edge to ``pkg.sub`` when
    that is a module; edges to the module's own ancestor packages are left out (Python imports
    those before any submodule, whatever the submodule imports)."""
    out = set()
    for imp in imports(name, path):
        target = imp if imp in ALL else imp.rpartition(".")[0]
        if target in ALL and target != name and not name.startswith(target + "."):
            out.add(target)
    return out


def test_no_import_cycle_among_modules():
    graph = {name: module_edges(name, path) for name, path in ALL.items()}
    done, stack = set(), []

    def visit(node):
        stack.append(node)
        for nxt in sorted(graph[node]):
            assert nxt not in stack, f"import cycle: {' -> '.join(stack[stack.index(nxt):] + [nxt])}"
            if nxt not in done:
                visit(nxt)
        done.add(stack.pop())

    for node in sorted(graph):
        if node not in done:
            visit(node)
