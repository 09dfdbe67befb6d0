"""The tree's shape, checked rather than claimed: the import contracts (floors) hold, no module
imports itself through others, no product module grows past 500 lines, and the benchmarks stay
a thin layer over the shared harness.

The floors themselves are written in ``pyproject.toml`` (``[tool.importlinter]``) and drawn in
``docs/architecture.md``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (
    "embedding",
    "index",
    "pipelines",
    "serve",
    "visual_search",
    "harness",
    "tests",
    "benchmarks",
)
MAX_LINES = 500
BENCHMARK_SHARE = 0.25


def python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py"))


def lines_of(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_import_contracts_hold():
    """``lint-imports`` over the whole project, as a developer runs it (every contract kept)."""
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    done = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert "0 broken" in done.stdout, done.stdout[-2000:]


def strongly_connected(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's algorithm over the module graph: the components with more than one module (a
    cycle), counting imports inside functions too, so a deferred import cannot hide one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(module: str) -> None:
        nonlocal counter
        index[module] = low[module] = counter
        counter += 1
        stack.append(module)
        on_stack.add(module)
        for nxt in graph.find_modules_directly_imported_by(module):
            if nxt not in index:
                visit(nxt)
                low[module] = min(low[module], low[nxt])
            elif nxt in on_stack:
                low[module] = min(low[module], index[nxt])
        if low[module] == index[module]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles():
    graph = grimp.build_graph(*PACKAGES, include_external_packages=False)
    # A package's __init__ importing its own submodules is how packages re-export: not a cycle
    # unless a submodule imports the package back, which the graph below still shows.
    cycles = strongly_connected(graph)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    """The check above could fail: a two-module cycle is reported."""
    graph = grimp.ImportGraph()
    for a, b in (("pkg.a", "pkg.b"), ("pkg.b", "pkg.a"), ("pkg.b", "pkg.c")):
        graph.add_import(importer=a, imported=b)
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"]]


def test_no_module_over_500_lines():
    folders = [p for p in PACKAGES if p != "tests"] + ["scripts"]
    sizes = {str(p.relative_to(ROOT)): lines_of(p) for p in python_files(*folders)}
    big = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_benchmarks_are_a_thin_layer():
    """benchmarks/ under a quarter of the project's Python outside tests/ (harness included)."""
    bench = sum(lines_of(p) for p in python_files("benchmarks"))
    rest = sum(lines_of(p) for p in python_files(*[p for p in PACKAGES if p != "tests"], "scripts"))
    share = bench / rest
    print(f"benchmarks/: {bench} of {rest} lines outside tests/ ({share:.1%})")
    assert share < BENCHMARK_SHARE, f"benchmarks/ is {share:.1%} of the non-test Python lines"


def test_ruff_clean():
    """``ruff check .`` as CI's reviewers run it (pyproject's rules: pycodestyle, pyflakes,
    isort, bugbear, pyupgrade; 100 columns)."""
    exe = shutil.which("ruff", path=str(Path(sys.executable).parent)) or "ruff"
    done = subprocess.run(
        [exe, "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
