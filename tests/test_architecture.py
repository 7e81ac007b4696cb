"""The shape of the code: imports go one way, modules and functions stay small enough to read.

The library's modules import downward only (no circle); the library never imports Snakemake; no
module of the library is over 700 lines and no function of the library, the workflow adapters or
the benchmarks over 60 (docstring included).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAX_MODULE_LINES = 700
MAX_FUNCTION_LINES = 60


def library_imports() -> dict[str, set[str]]:
    """allfuse module -> the allfuse modules it imports (at any depth of its code)."""
    graph: dict[str, set[str]] = {}
    for path in sorted((REPO / "allfuse").glob("*.py")):
        name = f"allfuse.{path.stem}" if path.stem != "__init__" else "allfuse"
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("allfuse"):
                if node.module == "allfuse":
                    found |= {f"allfuse.{alias.name}" for alias in node.names}
                else:
                    found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("allfuse.")}
        graph[name] = {m for m in found if m != name and m != "allfuse"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, as the list of modules on it (depth-first search, each found once)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_library_has_no_import_circle():
    graph = library_imports()
    assert "allfuse.training" in graph and graph["allfuse.members"]  # the graph was read
    assert cycles(graph) == []
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]  # the check can fail


def test_members_do_not_import_tuning_and_nothing_imports_snakemake():
    graph = library_imports()
    assert "allfuse.tuning" not in graph["allfuse.members"]
    for path in (REPO / "allfuse").glob("*.py"):
        assert "snakemake" not in {
            n.module.split(".")[0] for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom) and n.module
        }, path.name


@pytest.mark.parametrize("path", sorted((REPO / "allfuse").glob("*.py")), ids=lambda p: p.name)
def test_no_library_module_is_over_700_lines(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES


def long_functions(folder: Path) -> list[str]:
    out = []
    for path in sorted(folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    return out


@pytest.mark.parametrize("folder", ["allfuse", "workflow_scripts", "benchmarks"])
def test_no_function_is_over_60_lines(folder):
    assert (REPO / folder).is_dir()
    assert long_functions(REPO / folder) == []
