"""The shape of the package, checked from outside: module, class and function sizes, parameters, import cycles,
and where the Zarr chunk-key layout is spelled.

    python tools/shape.py            # prints every figure past its target; exit 1 if any (what CI runs)
    python tools/shape.py --quick    # the same (it takes a second)

Targets: no module over 400 lines, no class over 200, no function over 60 lines or 8 parameters, no import cycle
(imports inside functions included), the chunk-key layout (``/c/``) spelled only in ``store/spec.py``. ``ALLOWED``
names the exceptions, each with its reason.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(sys.argv[sys.argv.index("--package") + 1] if "--package" in sys.argv else
               Path(__file__).resolve().parents[1] / "medusa_cache")
ALLOWED = {
    "store/writer.py:from_arrays": "the builder of synthetic stores for tests and tools: keyword-only options that "
                                   "mirror create's (layout, rows kept, codec, ...)",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Modules of the package this module imports, anywhere in it: functions and ``TYPE_CHECKING`` blocks too (a
    module that needs another's names to be read depends on it, at run time or not), ``from`` and plain ``import``."""
    pkg = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("medusa_cache")}
        elif isinstance(node, ast.ImportFrom) and node.level:
            base = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            out |= {target} if node.module else {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("medusa_cache"):
            out.add(node.module)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, done = [], set()

    def visit(u: str, stack: list[str]) -> None:
        for v in sorted(graph.get(u, ())):
            if v in stack:
                found.append(stack[stack.index(v):] + [v])
            elif v not in done:
                done.add(v)
                visit(v, stack + [v])

    for u in sorted(graph):
        if u not in done:
            done.add(u)
            visit(u, [u])
    return found


def problems() -> list[str]:
    out, graph, modules = [], {}, {}
    for f in sorted(PACKAGE.rglob("*.py")):
        modules[module_name(f)] = f
    for name, f in modules.items():
        text = f.read_text()
        rel = str(f.relative_to(PACKAGE))
        tree = ast.parse(text)
        graph[name] = {m for m in imports(tree, name, f.name == "__init__.py") if m in modules and m != name}
        if len(text.splitlines()) > 400:
            out.append(f"module {rel}: {len(text.splitlines())} lines (> 400)")
        if "/c/" in text and rel != "store/spec.py":
            out.append(f"module {rel}: spells the chunk-key layout '/c/' (only store/spec.py may)")
        for node in ast.walk(tree):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > 200:
                out.append(f"class {rel}:{node.name}: {size} lines (> 200)")
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and f"{rel}:{node.name}" not in ALLOWED:
                a = node.args
                params = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs if p.arg not in ("self", "cls")]
                if size > 60 or len(params) > 8:
                    out.append(f"function {rel}:{node.name}: {size} lines, {len(params)} parameters (> 60 / > 8)")
    out += ["import cycle: " + " -> ".join(c) for c in cycles(graph)]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the same check (it is quick)")
    ap.add_argument("--package", help="another checkout's medusa_cache directory (to compare)")
    ap.parse_args()
    found = problems()
    for p in found:
        print(p)
    for where, why in ALLOWED.items():
        print(f"allowed: {where}: {why}")
    print(f"{len(found)} figures past their targets")
    sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
