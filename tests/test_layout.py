"""The layout rules of docs/architecture.md, read from the source: who may import whom, no cycles, no
private names across modules, and the size limits that keep each module readable in one sitting."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("datapipes", "missrec_torchrec")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources(*tops: str) -> Dict[str, Tuple[Path, ast.Module]]:
    found = {}
    for top in tops:
        for path in sorted((REPO / top).rglob("*.py")):
            found[module_name(path)] = (path, ast.parse(path.read_text(), str(path)))
    return found


PACKAGE = sources(*PACKAGES)


def imports(tree: ast.Module, here: str) -> Iterator[Tuple[str, List[str], int]]:
    """(module, names taken from it, line) for every import statement, function-level ones included."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + (1 if here in PACKAGE_INITS else 0)]
                base = ".".join(anchor + ([base] if base else []))
            yield base, [a.name for a in node.names], node.lineno


PACKAGE_INITS = {name for name, (path, _) in PACKAGE.items() if path.name == "__init__.py"}


def targets(module: str, names: List[str]) -> Set[str]:
    """The package modules an import statement loads (`from a import b` loads a.b when it is a module)."""
    out = {module} if module in PACKAGE else set()
    out |= {f"{module}.{n}" for n in names if f"{module}.{n}" in PACKAGE}
    return out


def graph() -> Dict[str, Set[str]]:
    edges: Dict[str, Set[str]] = {}
    for name, (_, tree) in PACKAGE.items():
        edges[name] = set()
        for module, names, _ in imports(tree, name):
            edges[name] |= targets(module, names) - {name}
    return edges


def test_datapipes_never_imports_the_model_package():
    bad = [f"{PACKAGE[name][0].relative_to(REPO)}:{line} imports {module}"
           for name in PACKAGE if name.startswith("datapipes")
           for module, _, line in imports(PACKAGE[name][1], name) if module.startswith("missrec_torchrec")]
    assert not bad, bad


def find_cycles(edges: Dict[str, Set[str]]) -> List[List[str]]:
    state: Dict[str, int] = {}
    stack: List[str] = []
    cycles: List[List[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return cycles


def test_package_imports_form_no_cycle():
    edges = graph()
    # A package's __init__ importing its own submodules is how a package exposes them, not a cycle.
    for init in PACKAGE_INITS:
        edges[init] = {m for m in edges[init] if not m.startswith(init + ".")}
    assert not find_cycles(edges), [" -> ".join(c) for c in find_cycles(edges)]


def test_no_private_name_crosses_a_module():
    everything = {**PACKAGE, **sources("components", "bench", "tests")}
    bad = []
    for name, (path, tree) in everything.items():
        modules = set()
        for module, names, line in imports(tree, name):
            if not module.split(".")[0] in PACKAGES:
                continue
            bad += [f"{path.relative_to(REPO)}:{line} imports {module}.{n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
            modules |= {module.split(".")[-1]} | {n for n in names if f"{module}.{n}" in PACKAGE}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not bad, bad


def test_modules_and_functions_stay_short():
    long = []
    for name, (path, tree) in PACKAGE.items():
        lines = path.read_text().count("\n")
        if lines > MAX_MODULE_LINES:
            long.append(f"{path.relative_to(REPO)}: {lines} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {n} lines")
    assert not long, long


def test_the_checks_above_can_fail():
    # A cycle, a private import and a datapipes -> model import, planted in parsed sources.
    tree = ast.parse("from missrec_torchrec.trainer import _hidden\nimport missrec_torchrec.cli\n")
    found = list(imports(tree, "datapipes.stream"))
    assert ("missrec_torchrec.trainer", ["_hidden"], 1) in found
    assert targets("missrec_torchrec", ["cli"]) >= {"missrec_torchrec.cli"}
    assert "missrec_torchrec.session" in graph()["missrec_torchrec.trainer"]
    assert find_cycles({"cli": {"trainer"}, "trainer": {"scoring"}, "scoring": {"cli"}}) == [
        ["cli", "trainer", "scoring", "cli"]]
    assert find_cycles({"cli": {"trainer"}, "trainer": {"session"}}) == []
