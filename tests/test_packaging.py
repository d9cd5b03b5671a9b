"""The package as a user installs it: a wheel built from this tree, installed into a fresh venv,
run from a folder outside the repository.

What this guards: everything a run reads at run time ships inside the wheel (the presets of
``--pipeline NAME``, the execution profiles of ``--scheduler NAME``, ``py.typed``), found through
``importlib.resources`` and not through paths relative to a source checkout. The venv sees the
current environment's site-packages (torch, faiss, ... are not installed again; nothing is
downloaded), so the test checks that ``import gigasid`` there is the wheel's copy, not this tree
(an editable install's finder could otherwise answer first).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
ROCKET = REPO / "examples" / "rocket.png"  # 186 rows x 248 columns
# what the build needs from the tree; the rest (tests, bench, examples, .git) stays out
BUILD_INPUTS = ("gigasid", "pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")


def _run(args: list, *, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"  # as the one_thread fixture: small jobs on a shared 2-core machine
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def _pip_has_python_option() -> bool:
    import pip

    major, minor = (int(part) for part in pip.__version__.split(".")[:2])
    return (major, minor) >= (22, 3)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    """A venv (system site-packages visible) holding a wheel of this tree; its bin/ folder."""
    if importlib.util.find_spec("setuptools") is None:  # not imported here: it patches distutils
        pytest.skip("building the wheel needs setuptools (the build backend)")
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    source.mkdir()
    for name in BUILD_INPUTS:  # a copy: the build writes build/ and *.egg-info next to its sources
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif path.is_file():
            shutil.copy2(path, source / name)
    dist = root / "dist"
    built = _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                  "-w", dist, source], cwd=root)
    assert built.returncode == 0, built.stdout + built.stderr
    (wheel,) = dist.glob("gigasid-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    for shipped in ("gigasid/py.typed", "gigasid/pipelines/uncond.yaml", "gigasid/pipelines/smoke.yaml",
                    "gigasid/schedulers/threads.yaml", "gigasid/schedulers/sync.yaml"):
        assert shipped in names, f"{shipped} is not in the wheel"

    env = root / "venv"
    with_pip = not _pip_has_python_option()  # pip >= 22.3 installs into another interpreter's env
    made = _run([sys.executable, "-m", "venv", "--system-site-packages", *([] if with_pip else ["--without-pip"]), env],
                cwd=root)
    assert made.returncode == 0, made.stderr
    python = env / "bin" / "python"
    pip = [python, "-m", "pip"] if with_pip else [sys.executable, "-m", "pip", "--python", python]
    # --force-reinstall: the environment's own (editable) gigasid of the same version is visible
    installed = _run([*pip, "install", "--no-deps", "--no-index", "--force-reinstall", wheel], cwd=root)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env / "bin"


def test_the_venv_imports_the_wheel_not_this_tree(venv: Path, tmp_path: Path) -> None:
    script = (
        "import gigasid, gigasid.config as c, gigasid.graph.profiles as p; "
        "print(gigasid.__file__); print(c.PIPELINES_DIR); print(p.SCHEDULERS_DIR); print(c.available_pipelines())"
    )
    probe = _run([venv / "python", "-c", script], cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr
    module, pipelines, schedulers, names = probe.stdout.splitlines()
    installed = (venv.parent / "lib").resolve()
    for path in (module, pipelines, schedulers):
        assert Path(path).resolve().is_relative_to(installed), f"{path} is not the venv's copy"
        assert not Path(path).resolve().is_relative_to(REPO), path
    assert "uncond" in names and "smoke" in names


def test_wheel_generates_with_a_named_preset_outside_the_repo(venv: Path, tmp_path: Path) -> None:
    done = _run([venv / "gigasid", "generate", ROCKET, "-o", "out.png", "--pipeline", "uncond"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "pipeline: uncond" in done.stdout
    with Image.open(tmp_path / "out.png") as written:
        assert written.format == "PNG"
        assert written.size == (248, 186)  # (width, height), as the input


def test_wheel_runs_a_named_scheduler_profile(venv: Path, tmp_path: Path) -> None:
    done = _run([venv / "gigasid", "generate", ROCKET, "-o", "out.png", "--pipeline", "smoke", "--tile", "128",
                 "--scheduler", "sync"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "(sync)" in done.stdout  # the run's last line names the profile's kind
    with Image.open(tmp_path / "out.png") as written:
        assert written.size == (248, 186)
    unknown = _run([venv / "gigasid", "generate", ROCKET, "-o", "x.png", "--pipeline", "smoke", "--tile", "128",
                    "--scheduler", "nonesuch"], cwd=tmp_path)
    assert unknown.returncode == 2
    assert "local-cluster" in unknown.stderr and "threads" in unknown.stderr  # the shipped names are listed
