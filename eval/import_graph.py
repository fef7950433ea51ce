"""The package's import graph, counting imports placed inside functions: lines per module, the
import cycles (strongly connected components), and the imports of private names across modules.

    python eval/import_graph.py --out eval/results/import_graph.json

`lint-imports` (import-linter, .importlinter) enforces the layers in CI; this script measures, so a
change can say what it did to the graph (cycles before/after, lines per module).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def modules() -> dict[str, Path]:
    """Module name -> file: llmsqueeze/**.py."""
    out = {}
    for pkg, base in (("llmsqueeze", ROOT / "llmsqueeze"),):
        for f in sorted(base.rglob("*.py")):
            if f.is_symlink():
                continue
            parts = list(f.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, list[str], bool]]:
    """-> [(imported module, names taken from it, inside a function)] for the package's own modules."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found = []

    def visit(node, nested):
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name.split(".")[0] == "llmsqueeze":
                        found.append((a.name, [], inner))
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] != "llmsqueeze":
                    continue
                for a in child.names:
                    sub = f"{mod}.{a.name}"
                    if sub in known:  # `from . import kernels`: a module, not a name
                        found.append((sub, [], inner))
                    else:
                        found.append((mod, [a.name], inner))
            visit(child, inner)

    visit(tree, False)
    out = []
    for mod, names, inner in found:
        while mod not in known and "." in mod:
            mod = mod.rpartition(".")[0]
        if mod in known and mod != name:
            out.append((mod, names, inner))
    return out


def sccs(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10000)

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
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

    for v in graph:
        if v not in index:
            strong(v)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    mods = modules()
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    nested = 0
    private = []
    for m, f in mods.items():
        for target, names, inner in imports_of(m, f, known):
            # the package root re-exports the public API; importing it from inside is not a layer edge
            if target == "llmsqueeze" and m != "llmsqueeze":
                continue
            graph[m].add(target)
            nested += inner
            private += [f"{m} <- {target}.{n}" for n in names if n.startswith("_") and n != "__version__"]
    lines = {m: sum(1 for _ in f.open()) for m, f in mods.items()}
    cycles = sccs(graph)
    kernels_up = sorted(f"{m} -> {t}" for m in mods if m.startswith("llmsqueeze.kernels")
                        for t in graph[m] if not t.startswith("llmsqueeze.kernels"))
    print(f"{len(mods)} modules, {sum(lines.values())} lines, {sum(map(len, graph.values()))} import edges "
          f"({nested} imports inside functions)")
    print(f"cycles: {len(cycles)}" + "".join(f"\n  {len(c)} modules: {', '.join(c)}" for c in cycles))
    print(f"kernels importing the package above them: {len(kernels_up)}" + "".join(f"\n  {k}" for k in kernels_up))
    print(f"private names imported across modules: {len(private)}" + "".join(f"\n  {x}" for x in private))
    print("\n| module | lines |\n|---|---|")
    for m in sorted(mods):
        print(f"| {m} | {lines[m]} |")
    if args.out:
        args.out.write_text(json.dumps({
            "command": "python eval/import_graph.py", "lines": lines, "total_lines": sum(lines.values()),
            "edges": {m: sorted(t) for m, t in graph.items()}, "imports_inside_functions": nested,
            "cycles": cycles, "kernels_upward": kernels_up, "private_imports": private,
        }, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
