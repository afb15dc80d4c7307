"""`async_ckpt/storage` is self-contained: no module under it imports the rest of async_ckpt
(absolute or relative), importing it pulls in no test dependency, and the top-level `storage/`
folder is never packaged as a Python module."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORAGE = ROOT / "async_ckpt" / "storage"


def _inside_storage(module: str) -> bool:
    return module == "async_ckpt.storage" or module.startswith("async_ckpt.storage.")


def engine_imports(source: str, module: str) -> list[str]:
    """Every import in `source` (the module named `module`; "pkg.__init__" for a package) that
    reaches async_ckpt outside async_ckpt.storage, as 'line N: name'."""
    package = module.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level > len(package):
                found.append(f"line {node.lineno}: relative import beyond the top-level package")
                continue
            base = package[:len(package) - node.level + 1] if node.level else []
            stem = ".".join(base + ([node.module] if node.module else []))
            # `from async_ckpt import x` imports the module async_ckpt.x (or an engine name)
            names = [f"{stem}.{a.name}" for a in node.names] if stem == "async_ckpt" else [stem]
        else:
            continue
        for name in names:
            if (name == "async_ckpt" or name.startswith("async_ckpt.")) and not _inside_storage(name):
                found.append(f"line {node.lineno}: {name}")
    return found


def _modules():
    for path in sorted(STORAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        yield path, ".".join(rel.parts)


def test_storage_imports_nothing_else_of_async_ckpt():
    modules = list(_modules())
    assert len(modules) >= 10 and any(m.endswith("testing.conformance") for _, m in modules)
    bad = {m: hits for path, m in modules if (hits := engine_imports(path.read_text(), m))}
    assert bad == {}, f"async_ckpt/storage must not import the engine: {bad}"


def test_the_checker_catches_engine_imports():
    m = "async_ckpt.storage.s3_errors"
    assert engine_imports("from ..errors import CheckpointError", m) == ["line 1: async_ckpt.errors"]
    assert engine_imports("from .. import libc", m) == ["line 1: async_ckpt.libc"]
    assert engine_imports("import async_ckpt.checkpointer", m) == ["line 1: async_ckpt.checkpointer"]
    assert engine_imports("from async_ckpt import errors", m) == ["line 1: async_ckpt.errors"]
    assert engine_imports("def f():\n    from ...async_ckpt import x", "async_ckpt.storage.testing.a") \
        == ["line 2: async_ckpt.async_ckpt"]
    assert engine_imports("from ..writer import NodeWriter", "async_ckpt.storage.testing.serve") == []
    assert engine_imports("from ...writer import NodeWriter", "async_ckpt.storage.testing.serve") \
        == ["line 1: async_ckpt.writer"]
    assert engine_imports("from . import libc\nfrom .errors import StorageError\n"
                          "from async_ckpt.storage.base import Storage\nimport os", m) == []
    assert engine_imports("from . import base", "async_ckpt.storage.__init__") == []


def test_importing_storage_needs_no_test_dependency():
    code = ("import sys, async_ckpt.storage\n"
            "bad = [m for m in ('pytest', 'boto3', 'moto', 'async_ckpt.storage.testing')\n"
            "       if m in sys.modules]\n"
            "assert not bad, bad\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_top_level_storage_folder_is_not_a_python_package():
    from setuptools import find_packages

    folder = ROOT / "storage"
    assert (folder / "README.md").is_file()
    assert not list(folder.rglob("*.py")), "storage/ holds launchers and docs, no Python module"
    packages = find_packages(where=str(ROOT), include=["async_ckpt*"])    # pyproject's rule
    assert "async_ckpt.storage.testing" in packages
    assert not [p for p in packages if p == "storage" or p.startswith("storage.")]
    assert 'include = ["async_ckpt*"]' in (ROOT / "pyproject.toml").read_text()
    assert os.access(folder / "seaweedfs.sh", os.X_OK) and os.access(folder / "moto.sh", os.X_OK)
