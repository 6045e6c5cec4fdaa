"""The import graph keeps its layers: serving code never reaches into bench/ or train/, policies/ stays pure (numbers
in, decisions out: no app, kernels, ray or torch), kernels/ never imports app/, and no modules import each other in a
cycle.

Every .py under the packages is parsed with `ast` (nothing is imported): `import` and `from ... import` statements
anywhere in a file count, those inside functions included; relative imports are resolved against the file's package.
`from pkg import name` is an edge to the module ``pkg.name`` when that is a module of the repo, else to ``pkg``.
Imports under ``if TYPE_CHECKING:`` never run, so they count for the layers but not for cycles.
"""

from __future__ import annotations

import ast
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "kernels", "policies", "bench", "train")
SERVING = ("app", "kernels", "policies")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a repo module, or the top-level name of a third-party one
    file: str
    line: int
    type_only: bool  # under `if TYPE_CHECKING:`

    def __str__(self) -> str:
        note = " (TYPE_CHECKING)" if self.type_only else ""
        return f"{self.file}:{self.line}: {self.src} -> {self.dst}{note}"


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if not any(p.startswith(".") or p == "__pycache__" for p in path.relative_to(root).parts):
                mods[_module_name(path, root)] = path
    return mods


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, type_only) for every Import/ImportFrom, at any depth."""
    stack = [(tree, False)]
    while stack:
        node, type_only = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend((child, True) for child in node.body)
            stack.extend((child, type_only) for child in node.orelse)
            continue
        stack.extend((child, type_only) for child in ast.iter_child_nodes(node))


def _repo_module(name: str, mods: dict[str, Path]) -> str:
    """The longest prefix of a dotted name that is a module of the repo (``app.x.Y`` -> ``app.x``)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in mods:
            return ".".join(parts[:n])
    return name


def _graph(root: Path = ROOT) -> tuple[dict[str, Path], list[Edge]]:
    mods = _modules(root)
    edges: list[Edge] = []
    for mod, path in mods.items():
        rel = str(path.relative_to(root))
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), filename=rel)
        for node, type_only in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    assert node.level - 1 < len(base), f"{rel}:{node.lineno}: relative import beyond the top package"
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    targets.append(sub if sub in mods else target)
            for target in targets:
                top = target.split(".")[0]
                dst = _repo_module(target, mods) if top in PACKAGES else top
                if dst != mod:
                    edges.append(Edge(mod, dst, rel, node.lineno, type_only))
    return mods, list(dict.fromkeys(edges))  # one edge per statement, not per imported name


MODS, EDGES = _graph()


def _top(name: str) -> str:
    return name.split(".")[0]


def _fmt(edges: list[Edge]) -> str:
    return "\n  " + "\n  ".join(str(e) for e in sorted(set(edges), key=lambda e: (e.file, e.line, e.dst)))


def test_the_reader_on_a_small_tree(tmp_path):
    """Relative imports, imports inside functions and TYPE_CHECKING blocks, and the cycle report, on files made here."""
    files = {
        "app/__init__.py": "",
        "app/a.py": "from . import b\nfrom .sub.c import X\n",
        "app/b.py": "def f():\n    from app import a\n",
        "app/sub/__init__.py": "",
        "app/sub/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import Y\n"
                        "import torch.nn\nfrom ..b import f\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    mods, edges = _graph(tmp_path)
    got = {(e.src, e.dst, e.type_only) for e in edges}
    assert got == {("app.a", "app.b", False), ("app.a", "app.sub.c", False), ("app.b", "app.a", False),
                   ("app.sub.c", "app.a", True), ("app.sub.c", "typing", False), ("app.sub.c", "torch", False),
                   ("app.sub.c", "app.b", False)}
    report = _cycles(mods, edges)
    assert len(report) == 1 and "app.a -> app.b -> app.a" in report[0] and "app/b.py:2" in report[0]


def test_the_graph_is_read():
    assert {"app.engine.engine", "policies.tree_selection", "kernels.tree_attention", "bench.sweep"} <= MODS.keys()
    internal = [e for e in EDGES if _top(e.dst) in PACKAGES]
    assert len(internal) > 50 and any(e.src == "app.engine.engine" and e.dst == "app.engine.config" for e in EDGES)


def test_serving_packages_import_nothing_from_bench_or_train():
    bad = [e for e in EDGES if _top(e.src) in SERVING and _top(e.dst) in ("bench", "train")]
    assert not bad, "serving code (app, kernels, policies) imports bench/train:" + _fmt(bad)


def test_policies_are_pure_and_kernels_do_not_import_app():
    bad = [e for e in EDGES if _top(e.src) == "policies" and _top(e.dst) in ("app", "kernels", "bench", "train",
                                                                                "ray", "torch")]
    bad += [e for e in EDGES if _top(e.src) == "kernels" and _top(e.dst) == "app"]
    assert not bad, "policies must import only numbers-in/decisions-out code; kernels must not import app:" + _fmt(bad)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's SCCs (iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    sccs: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    scc = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        scc.append(member)
                        if member == node:
                            break
                    sccs.append(sorted(scc))
    return sccs


def _shortest_cycle(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """start -> ... -> start, the fewest hops, within one SCC."""
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(graph[node] & members):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, start]
            if child not in parent:
                parent[child] = node
                queue.append(child)
    raise AssertionError(f"{start} is in no cycle")


def _cycles(mods: dict[str, Path], edges: list[Edge]) -> list[str]:
    """One report per strongly connected set of modules: its members, a shortest cycle and that cycle's imports."""
    runtime = [e for e in edges if not e.type_only and e.dst in mods]
    graph: dict[str, set[str]] = defaultdict(set)
    for mod in mods:
        graph[mod]
    for e in runtime:
        graph[e.src].add(e.dst)
    first_edge: dict[tuple[str, str], list[Edge]] = defaultdict(list)
    for e in runtime:
        first_edge[(e.src, e.dst)].append(e)
    report = []
    for scc in _strongly_connected(graph):
        if len(scc) < 2:
            continue
        cycle = _shortest_cycle(scc[0], graph, set(scc))
        lines = [f"cycle among {len(scc)} modules ({', '.join(scc)}), e.g. {' -> '.join(cycle)}:"]
        for a, b in zip(cycle, cycle[1:]):
            lines += [f"    {e}" for e in first_edge[(a, b)]]
        report.append("\n".join(lines))
    return report


def test_no_import_cycles():
    report = _cycles(MODS, EDGES)
    assert not report, "import cycles (imports inside functions count):\n  " + "\n  ".join(report)
