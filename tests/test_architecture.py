"""The package's boundaries, checked on its source: which part may import which, and no cycles.

The allowed dependencies are the architecture of docs/design.md: `storage` moves bytes and
imports nothing else of async_ckpt; the base modules (errors, types, version) import nothing but
`storage`'s own errors (errors.py translates them);
`dist` and `format` sit on them; `sharing` on `dist`; `load` and `save` on all of those (a save
reads a written record back for FULL validation, so `save` may use `load`, never the other way);
`training` is built on the public API; the checkpointer and the package root sit on top, and
nothing imports them but the command line (`cli`, run by `__main__`), which sits above all, and
the `integrations` (Accelerate, Hugging Face) and `trainers` built on them (trainers on top).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "async_ckpt"

BASE = {"errors", "types", "version"}
ALLOWED: dict[str, set[str]] = {
    "storage": set(),
    "errors": {"storage"}, "types": set(), "version": set(),
    "options": {"errors"},
    "retention": set(),
    "handle": {"errors", "types"},
    "dist": BASE,
    "format": BASE | {"storage"},
    "sharing": BASE | {"dist"},
    "load": BASE | {"storage", "format", "dist", "options", "sharing"},
    "save": BASE | {"storage", "format", "dist", "options", "sharing", "retention", "handle", "load"},
    "training": BASE | {"retention"},
    "checkpointer": BASE | {"storage", "format", "dist", "options", "sharing", "retention", "handle",
                            "load", "save"},
    # integrations (accelerate, hf) and the trainers sit on the public API, beside the command line
    "integrations": BASE | {"training", "checkpointer"},
    "trainers": BASE | {"training", "checkpointer", "integrations"},
    # the command line sits on top of everything; `python -m async_ckpt` runs it
    "cli": BASE | {"storage", "format", "dist", "options", "sharing", "retention", "handle", "load",
                   "save", "checkpointer"},
    "__main__": {"cli"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("async_ckpt",) + tuple(p for p in parts if p != "__init__"))
        found[name] = path
    return found


def _imports(name: str, path: Path) -> set[str]:
    """Every async_ckpt module `name` imports (relative imports resolved)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "async_ckpt"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "async_ckpt":
                continue
            out.add(target)
            out |= {f"{target}.{a.name}" for a in node.names}   # `from . import x` names modules
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_each_part_imports_only_what_sits_below_it():
    modules = _modules()
    problems = []
    for name, path in sorted(modules.items()):
        unit = _unit(name)
        if unit == "__init__":
            continue
        for target in _imports(name, path):
            if target not in modules:
                continue           # `from .x import SomeClass` yields x.SomeClass: not a module
            other = _unit(target)
            if other != unit and other not in ALLOWED[unit]:
                problems.append(f"{name} imports {target} ({unit} may use {sorted(ALLOWED[unit])})")
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules():
    modules = _modules()
    graph = {name: {t for t in _imports(name, path) if t in modules and t != name}
             for name, path in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of the design.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_module_says_what_it_owns():
    missing = [name for name, path in _modules().items()
               if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, f"modules without an opening docstring: {missing}"
