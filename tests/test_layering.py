"""Dependencies point inward (DESIGN.md §3): checked on the source's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gigasid"

# package or top-level module → (gigasid subpackages/modules it may import, third-party roots it
# must not import). Inward first: core (math) ← index, codecs, tiling ← plan (what a job is) ←
# graph (running it) ← jobs, api, cli (front ends). io (formats) and config stand apart.
NO_DASK = {"dask", "distributed"}
RULES = {
    "errors": (set(), NO_DASK | {"torch", "zarr", "faiss", "pyvips", "tifffile"}),
    "config": ({"errors"}, NO_DASK | {"torch", "zarr", "faiss", "pyvips", "tifffile"}),
    "core": ({"core", "errors"}, NO_DASK | {"zarr", "faiss", "pyvips", "tifffile"}),
    "index": ({"core", "index", "errors"}, NO_DASK | {"zarr", "pyvips"}),
    "weights": ({"errors"}, NO_DASK | {"torch", "zarr", "faiss", "pyvips", "tifffile"}),
    "codecs": ({"core", "codecs", "weights", "errors"}, NO_DASK | {"zarr", "faiss", "pyvips", "tifffile"}),
    "tiling": ({"core", "tiling", "errors"}, NO_DASK | {"zarr", "faiss", "pyvips"}),
    "guidance": ({"core", "guidance", "weights", "errors"}, NO_DASK | {"zarr", "faiss", "pyvips", "tifffile"}),
    "io": ({"io", "errors"}, NO_DASK | {"faiss"}),
    "limits": ({"io", "errors"}, NO_DASK | {"faiss"}),
    "metrics": ({"errors"}, NO_DASK | {"zarr", "pyvips"}),
    "plan": ({"core", "index", "codecs", "guidance", "config", "errors"}, NO_DASK | {"zarr", "pyvips", "tifffile"}),
    "graph": ({"core", "index", "codecs", "tiling", "io", "graph", "plan", "config", "errors", "limits"}, set()),
    "jobs": ({"core", "codecs", "config", "plan", "graph", "errors"}, set()),
}
# every package and module of gigasid has a rule, except the front ends that may import anything
FRONT_ENDS = {"__init__", "cli", "api"}


def test_every_package_has_a_rule() -> None:
    names = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
             if (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file()))}
    assert names - FRONT_ENDS <= set(RULES), sorted(names - FRONT_ENDS - set(RULES))


DASK = NO_DASK


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
    folder = PACKAGE / package
    paths = folder.rglob("*.py") if folder.is_dir() else [PACKAGE / f"{package}.py"]
    for path in paths:
        for name in _imports(path):
            root, _, rest = name.partition(".")
            assert root not in banned, f"{path.relative_to(PACKAGE)} imports {name}"
            if root == "gigasid" and rest and rest != "__version__":
                assert rest.split(".")[0] in allowed, f"{path.relative_to(PACKAGE)} imports {name}"


def test_only_graph_imports_dask() -> None:
    for path in PACKAGE.rglob("*.py"):
        if path.relative_to(PACKAGE).parts[0] == "graph":
            continue
        for name in _imports(path):
            assert name.split(".")[0] not in DASK, f"{path.relative_to(PACKAGE)} imports {name}"
