"""The package layout holds: methods are named only in their own folders and the registry, importing the package
installs no import hook and loads no heavy toolkit, and no two modules import each other (directly or in a cycle)."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: installed package name -> source folder (pyproject maps adapters/ and cli/ into decomp_hooks)
SOURCES = {"decomp_hooks": ROOT / "decomp_hooks", "decomp_hooks.adapters": ROOT / "adapters",
           "decomp_hooks.cli": ROOT / "cli"}
METHOD_NAME = re.compile(r'"apd"|== "spd"')


def modules() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> file."""
    out = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if package == "decomp_hooks" and parts[0] in ("adapters", "cli"):
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            out[".".join((package, *parts))] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports at import time (module level, outside `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node):
            if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef)):
                break
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - sub.level + 1] + ([base] if base else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in sub.names}
    return {m for m in found if m in known and m != name}


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), ignoring edges into a parent package
    (importing `a.b` always runs `a/__init__` first; that is not a cycle the code wrote)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if v.startswith(w + "."):
                continue
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

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and "decomp_hooks.methods.spd.method" in graph
    assert graph["decomp_hooks.train.loop"] >= {"decomp_hooks.train.checkpoint", "decomp_hooks.methods.base"}
    assert cycles(graph) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_methods_are_named_only_in_their_folders_and_the_registry():
    allowed = (ROOT / "decomp_hooks" / "methods",)
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in modules().values() if not path.is_relative_to(allowed[0])
            for i, line in enumerate(path.read_text().splitlines(), 1) if METHOD_NAME.search(line)]
    assert hits == []


def test_importing_the_package_adds_no_import_hook_and_no_toolkit():
    code = ("import sys; before = list(sys.meta_path); import decomp_hooks, decomp_hooks.export, decomp_hooks.cli; "
            "assert sys.meta_path == before, sys.meta_path; "
            "heavy = {'sae_lens', 'transformer_lens', 'nnsight', 'transformers'} & set(sys.modules); "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_pyproject_installs_every_package_and_the_shipped_configs():
    """A wheel (not only an editable install) holds every package folder and the YAML configs."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    folders = {".".join((package, *init.parent.relative_to(folder).parts))
               for package, folder in SOURCES.items() for init in folder.rglob("__init__.py")
               if not (package == "decomp_hooks" and init.parent.relative_to(folder).parts[:1] in (("adapters",), ("cli",)))}
    assert folders <= listed, f"packages missing from pyproject.toml: {sorted(folders - listed)}"
    assert {"*.yaml", "lm/*.yaml"} <= set(tool["package-data"]["decomp_hooks.configs"])
