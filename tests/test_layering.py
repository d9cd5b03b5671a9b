"""Dependencies point inward (DESIGN.md §3): checked on the source's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gigasid"

# package → (gigasid subpackages/modules it may import, third-party roots it must not import)
RULES = {
    "core": ({"core", "errors"}, {"dask", "distributed", "zarr", "faiss", "pyvips", "tifffile"}),
    "index": ({"core", "index", "errors"}, {"dask", "distributed", "zarr", "pyvips"}),
    "codecs": ({"core", "codecs", "errors"}, {"dask", "distributed", "zarr", "faiss", "pyvips", "tifffile"}),
    "tiling": ({"core", "tiling", "errors"}, {"dask", "distributed", "zarr", "faiss", "pyvips"}),
    "io": ({"io", "errors"}, {"dask", "distributed", "faiss"}),
}
DASK = {"dask", "distributed"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_point_inward(package: str) -> None:
    allowed, banned = RULES[package]
    for path in (PACKAGE / package).rglob("*.py"):
        for name in _imports(path):
            root, _, rest = name.partition(".")
            assert root not in banned, f"{path.relative_to(PACKAGE)} imports {name}"
            if root == "gigasid" and rest:
                assert rest.split(".")[0] in allowed, f"{path.relative_to(PACKAGE)} imports {name}"


def test_only_graph_imports_dask() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "graph":
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in DASK, f"{path.relative_to(PACKAGE)} imports {name}"
