"""Benchmark: wall time and peak memory of the exporters on a gigapixel-class job store.

A synthetic finished store (gigasid.io.testing: gradients + bars + noise, 1024-px chunks, written
chunk by chunk) of ``--size`` HEIGHTxWIDTH (default 20000x20000, 0.4 GP; the 1-GP acceptance run is
``--size 14336x70080``), then, each step in a fresh process so that its peak RSS is its own
(``os.wait4`` on the child): building the store, building its output pyramid (shared by every
exporter, built once), and each exporter with its default options — pyramidal OME-TIFF (JPEG q90,
256-px tiles), DeepZoom (JPEG q90, 256-px tiles, overlap 1), OME-Zarr (zstd, 256-px chunks).
Prints a table and writes JSON to ``bench/results/export_<size>.json``. The acceptance: peak RSS
<= 1 GB for every exporter (and the pyramid) at 1 gigapixel.

Run: ``python bench/export.py [--size 20000x20000] [--workdir DIR] [--keep] [--exporters tif dzi ome.zarr]``.
The work folder needs about 2.5x the raw image size of free disk (store, pyramid, outputs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RSS_LIMIT_MB = 1000  # the acceptance at 1 gigapixel
OUTPUTS = {"tif": "out.ome.tif", "dzi": "out.dzi", "ome.zarr": "out.ome.zarr"}


def child(step: str, store: str, size: str, output: str | None) -> None:
    """One measured step, in this (fresh) process."""
    if step == "store":
        from gigasid.io.testing import write_synthetic_store

        height, width = map(int, size.split("x"))
        write_synthetic_store(store, height, width, tile=1024)
    elif step == "pyramid":
        from gigasid.io.output_pyramid import ensure_output_pyramid, open_finished_store

        ensure_output_pyramid(open_finished_store(store))
    else:
        from gigasid.io.exporters import export

        export(store, output)


def measure(args: list[str]) -> dict:
    """Run ``bench/export.py --child ...`` and return its wall time and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, __file__, "--child", *args], env=env)
    _, status, usage = os.wait4(process.pid, 0)  # this child's own rusage, not all children's
    process.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if process.returncode != 0:
        sys.exit(f"step {args} failed with exit code {process.returncode}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def disk_mb(path: Path) -> float:
    if path.is_file():
        return path.stat().st_size / 2**20
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def versions() -> dict:
    import imagecodecs
    import numpy
    import pyvips
    import tifffile
    import zarr

    return {"python": platform.python_version(), "numpy": numpy.__version__, "zarr": zarr.__version__,
            "tifffile": tifffile.__version__, "imagecodecs": imagecodecs.__version__,
            "libvips": f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="20000x20000", help="HEIGHTxWIDTH of the synthetic store")
    parser.add_argument("--exporters", nargs="+", default=list(OUTPUTS), choices=list(OUTPUTS))
    parser.add_argument("--workdir", help="where to build (default: a temporary folder, removed after)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", help="JSON output (default bench/results/export_<size>.json)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, store, size, *output = args.child
        child(step, store, size, output[0] if output else None)
        return

    height, width = map(int, args.size.lower().split("x"))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gigasid-bench-export-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / f"{args.size}.zarr"
    if store.exists():
        shutil.rmtree(store)
    rows = []
    try:
        for step, output in [("store", None), ("pyramid", None)] + [(name, OUTPUTS[name]) for name in args.exporters]:
            target = workdir / output if output else None
            print(f"{step} ...", file=sys.stderr, flush=True)
            result = measure([step, str(store), args.size] + ([str(target)] if target else []))
            result["step"] = step
            if target is not None:
                result["output_mb"] = round(disk_mb(target) + (disk_mb(workdir / "out_files") if step == "dzi" else 0), 1)
            elif step == "store":
                result["output_mb"] = round(disk_mb(store / "output"), 1)
            else:
                result["output_mb"] = round(disk_mb(store / "output_pyramid"), 1)
            rows.append(result)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    gigapixels = height * width / 1e9
    print(f"\nexport of a {height}x{width} synthetic RGB store ({gigapixels:.2f} GP), {os.cpu_count()} CPUs")
    print(f"{'step':<10} {'wall s':>8} {'peak RSS MB':>12} {'on disk MB':>11}")
    for row in rows:
        print(f"{row['step']:<10} {row['wall_s']:>8.1f} {row['peak_rss_mb']:>12.0f} {row.get('output_mb', 0):>11.0f}")
    worst = max(row["peak_rss_mb"] for row in rows if row["step"] != "store")
    verdict = "within" if worst <= RSS_LIMIT_MB else "OVER"
    print(f"largest peak RSS of the pyramid and exporters: {worst:.0f} MB ({verdict} the {RSS_LIMIT_MB} MB limit)")
    result = {
        "size": [height, width], "gigapixels": gigapixels, "cpus": os.cpu_count(), "machine": platform.machine(),
        "versions": versions(), "steps": rows, "rss_limit_mb": RSS_LIMIT_MB, "within_limit": worst <= RSS_LIMIT_MB,
    }
    path = Path(args.json or ROOT / "bench" / "results" / f"export_{height}x{width}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
