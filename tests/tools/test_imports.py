"""tools/ imports one way and leaves sys.path alone: its modules run as ``python -m tools.X`` from the
repository root, where the packages are importable as they are, and an import cycle among them would
make what a module finds defined depend on which module was imported first."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
MODULES = sorted(TOOLS.glob("*.py"))
MAINS = [p.stem for p in MODULES if 'if __name__ == "__main__":' in p.read_text()]


def tools_imports(path: Path) -> set[str]:
    """The tools modules ``path`` imports, at any depth: an import inside a function closes a cycle too,
    only later."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = ".".join(["tools", *([node.module] if node.module else [])]) if node.level else node.module
            names = [module, *(f"{module}.{a.name}" for a in node.names)]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "tools" and len(parts) > 1 and (TOOLS / f"{parts[1]}.py").is_file():
                found.add(parts[1])
    return found - {path.stem}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (module -> the modules it imports) as [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(node):
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        done.add(path.pop())
        return None

    for node in sorted(graph):
        if node not in done and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_sees_direct_and_longer_cycles():
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"m": {"a"}, "a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_tools_modules():
    graph = {p.stem: tools_imports(p) for p in MODULES}
    assert graph["train"] >= {"training", "recipes"}  # the parser sees the imports it should
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in tools/: " + " -> ".join(cycle)


def test_no_sys_path_manipulation_in_tools():
    found = []
    for p in MODULES:
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and (node.value.id, node.attr) in {("sys", "path"), ("site", "addsitedir")}) \
                    or (isinstance(node, ast.ImportFrom) and node.module == "sys"
                        and any(a.name == "path" for a in node.names)):
                found.append(f"{p.name}:{node.lineno}")
    assert not found, f"sys.path changed in {', '.join(found)}: run the tool as `python -m tools.NAME` instead"


def test_documented_commands_run_tools_as_modules():
    docs = [*MODULES, TOOLS / "gpu_checks.sh", ROOT / "README.md", ROOT / "BENCHMARKS.md"]
    old = [f"{p.relative_to(ROOT)}:{i}" for p in docs for i, line in enumerate(p.read_text().splitlines(), 1)
           if re.search(r"python3? tools/\w+\.py", line)]
    assert not old, f"`python tools/NAME.py` in {', '.join(old)}: write `python -m tools.NAME`"


@pytest.mark.parametrize("name", MAINS)
def test_tool_runs_as_a_module_from_the_repository_root(name):
    out = subprocess.run([sys.executable, "-m", f"tools.{name}", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr
