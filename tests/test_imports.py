"""The import graph of `sempa_dist/`: no cycle, and a light config.

The graph is built from the source with the standard library's `ast`, not by importing anything, so
that it sees every module (also the GPU-only ones that cannot be imported on this machine).

Which imports count: every one in a file, at module level *and* inside functions. A function-level
import is still an edge between two modules; moving an import into a function to dodge a cycle
(`config.validate` importing `eval.sts` did) leaves the two modules knotted together: either one
cannot be understood, tested or made light without the other, and whichever is imported first
decides what is half-initialised. So a cycle through a function-level import is a cycle here too.

Edges also go to the packages Python initialises on the way: importing `sempa_dist.eval.tasks` runs
`sempa_dist/eval/__init__.py` first, so it is an edge to `sempa_dist.eval` as well, unless that
package is the importer's own ancestor (which is already being initialised when the importer runs).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from tests.distributed import REPO, child_env

PACKAGE = REPO / "sempa_dist"
LIGHT = ("sempa_dist.paths", "sempa_dist.sts_tasks")
HEAVY = ("torch", "transformers", "numpy", "scipy", "deepspeed", "datasets", "mlflow")


def module_names() -> dict[str, Path]:
    """Dotted module name -> file, for every .py under sempa_dist/ (a package is its __init__.py)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    """The packages above `name`, outermost first: sempa_dist.eval.sts -> [sempa_dist, sempa_dist.eval]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(node: ast.Import | ast.ImportFrom, importer: str, is_package: bool, modules: dict) -> list[str]:
    """The sempa_dist modules one import statement names (before adding the packages on the way)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:  # relative: resolved against the importer's package
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join([*base, *([node.module] if node.module else [])])
    else:
        target = node.module or ""
    # `from pkg import name`: `name` is a submodule when such a file exists, else an attribute of pkg
    subs = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in modules]
    return subs if len(subs) == len(node.names) else [target, *subs]


def edges(name: str, source: str, is_package: bool, modules: set[str] | dict) -> set[str]:
    """The modules of `modules` that module `name` (its text: `source`) imports anywhere in its file,
    with the packages initialised on the way (see the module docstring)."""
    own = set(_ancestors(name)) | {name}
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for target in _imported(node, name, is_package, modules):
                out |= {dep for dep in [*_ancestors(target), target] if dep in modules and dep not in own}
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the sempa_dist modules it imports."""
    modules = module_names()
    return {name: edges(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", modules)
            for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """For each strongly connected component of more than one module (Tarjan's SCCs): a shortest
    cycle through its first module, and all its modules (the component can hold further cycles)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1 or v in graph[v]:
                found.append((_cycle_in(sorted(scc), graph), sorted(scc)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_in(scc: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path from scc[0] back to itself inside the component (breadth-first)."""
    members, start = set(scc), scc[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return scc


def test_graph_builder_sees_relative_function_level_and_package_imports():
    """The checker itself: a cycle hidden in a function, a relative import and a package __init__ edge."""
    mods = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}
    node_rel = ast.parse("from .sub import c").body[0]
    assert _imported(node_rel, "p.a", False, mods) == ["p.sub.c"]
    node_up = ast.parse("from .. import a").body[0]
    assert _imported(node_up, "p.sub.c", False, mods) == ["p.a"]
    node_attr = ast.parse("from p.sub import thing").body[0]
    assert _imported(node_attr, "p.a", False, mods) == ["p.sub"]
    assert cycles({"a": {"b"}, "b": set()}) == []
    three = {"a": {"b"}, "b": {"c"}, "c": {"a", "b"}, "d": {"a"}}
    assert cycles(three) == [(["a", "b", "c", "a"], ["a", "b", "c"])]
    # a function-level import counts, and so does the package __init__ run on the way
    src = {"p.a": "def f():\n    from p.sub.c import x\n",
           "p.sub": "from p.sub import c\n",
           "p.sub.c": "import p.a\n"}
    graph = {name: edges(name, code, name == "p.sub", mods) for name, code in src.items()}
    assert graph == {"p.a": {"p.sub", "p.sub.c"}, "p.sub": {"p.sub.c"}, "p.sub.c": {"p.a"}}
    # the shortest cycle is the one shown
    assert cycles(graph) == [(["p.a", "p.sub.c", "p.a"], ["p.a", "p.sub", "p.sub.c"])]


def test_no_import_cycle():
    """The issue's done-when: no cycle among sempa_dist's modules, counting every import in a file."""
    graph = import_graph()
    assert "sempa_dist.config" in graph and "sempa_dist.paths" in graph
    found = cycles(graph)
    assert not found, "import cycles in sempa_dist/:\n" + "\n".join(
        f"{' -> '.join(cycle)}  (all modules on cycles with it: {', '.join(members)})"
        for cycle, members in found)


def test_light_modules_use_the_standard_library_only():
    """paths.py (the one home of the cache root, data dir, bundled data and repo root) and sts_tasks.py
    (what the config validates eval.tasks with) must be importable by anything: standard library only."""
    for light in LIGHT:
        tree = ast.parse((REPO / (light.replace(".", "/") + ".py")).read_text(encoding="utf-8"))
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree)
                  if isinstance(node, ast.ImportFrom)}
        assert names <= set(sys.stdlib_module_names), (light, names - set(sys.stdlib_module_names))


def _loaded_after(statement: str) -> dict[str, list[str]]:
    """The heavy libraries and the sempa_dist modules in sys.modules after `statement`, run in a
    fresh interpreter (this one has long imported everything)."""
    code = (f"{statement}\nimport json, sys\n"
            f"print(json.dumps({{'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules),"
            f" 'ours': sorted(m for m in sys.modules if m.split('.')[0] == 'sempa_dist')}}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=child_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_importing_the_config_loads_no_torch():
    """The config is read by the launcher, the CLIs' --help-config and preflight before any model work:
    importing and validating one loads none of the heavy libraries and no sempa_dist module beyond the
    light ones (validation used to import sempa_dist.eval.sts, and with it numpy, scipy and torch)."""
    loaded = _loaded_after("from sempa_dist.config import load_config\n"
                           "load_config('configs/tiny_cpu.yaml', ['eval.tasks=[all]']).validate()")
    assert loaded["heavy"] == []
    assert set(loaded["ours"]) <= {"sempa_dist", "sempa_dist.config", *LIGHT}, loaded["ours"]
