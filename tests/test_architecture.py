"""The map in ARCHITECTURE.md holds: no import cycle between any two modules, light --help."""

from __future__ import annotations

import subprocess
import sys

import grimp


def _cycles(adj: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in adj:
        if root in index:
            continue
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.append(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": [], "c": ["a"]}) == []


def test_no_import_cycle_between_modules():
    # function-level imports included: the layers contract (lint-imports) orders packages,
    # this also covers modules inside one package
    g = grimp.build_graph("imgclf", exclude_type_checking_imports=True)
    adj = {m: sorted(g.find_modules_directly_imported_by(m)) for m in sorted(g.modules)}
    assert len(adj) > 50 and _cycles(adj) == []


def test_help_imports_no_heavy_library():
    code = "import sys; from imgclf.cli.main import build_parser; build_parser(); print(sorted(m for m in ('torch', 'onnx', 'onnxruntime', 'openvino', 'timm', 'sklearn', 'matplotlib', 'fastapi') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
