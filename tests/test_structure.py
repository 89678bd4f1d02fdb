"""The package's structure: no import circle anywhere in perceiver_fast (module-level or
function-level imports alike), and the CLI and bench import without numpy."""
import ast
import os
import subprocess
import sys

import pytest
from helpers import ROOT

PKG = os.path.join(ROOT, "perceiver_fast")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict:
    """module -> the perceiver_fast modules it imports anywhere in its source (a function body included)."""
    modules = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                modules[module_name(os.path.join(folder, f))] = os.path.join(folder, f)
    graph = {}
    for mod, path in modules.items():
        package = mod if path.endswith("__init__.py") else mod.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for name in names:
                # the deepest module the name refers to ("from pkg import mod" imports pkg.mod)
                while name and name not in modules:
                    name = name.rsplit(".", 1)[0] if "." in name else ""
                if name and name != mod and not mod.startswith(name + "."):  # a parent package is not a cycle
                    deps.add(name)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict):
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_the_graph_sees_the_imports():
    g = import_graph()
    assert "perceiver_fast.bench.schema" in g["perceiver_fast.bench.ops"]
    assert "perceiver_fast.ops.fourier" in g["perceiver_fast.ops.reference"]
    assert "perceiver_fast.train" in g["perceiver_fast.cli.train"]  # a function-level import counts


def test_a_cycle_is_found_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cli_and_bench_list_import_without_numpy():
    """`perceiver-fast bench --list` works with only torch and triton: numpy is blocked here."""
    code = ("import sys; sys.modules['numpy'] = None\n"
            "from perceiver_fast.cli import main\n"
            "sys.exit(main(['bench', '--list']))")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pio-learned" in p.stdout
