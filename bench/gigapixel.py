"""Benchmark: a gigapixel output end to end, with a per-stage time table (issue 4).

Makes (or takes) a reference of at least 10 megapixels, runs the ``gigapixel`` preset out of core
into a job store — ingest, codec fit + encoding, indexes, every scale's sampling, the
correspondence decode into the uint8 output — and reports each stage's wall time (from the
store's manifest) and the process's peak RSS (with its children). The default output is
14336×70080 (1.0 gigapixel); expect hours on a 2-core CPU. A killed run continues with
``gigasid resume STORE`` (the table is then printed by ``--report STORE``).

Run: ``python bench/gigapixel.py [--size 14336x70080] [--reference IMG] [--store PATH]``
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def make_reference(path: Path, megapixels: float = 11.0) -> Path:
    """A ≥10 MP reference: the coffee example enlarged with lanczos3 (pyvips, streamed)."""
    import pyvips

    source = pyvips.Image.new_from_file(str(ROOT / "examples" / "coffee.png"))
    factor = (megapixels * 1e6 / (source.width * source.height)) ** 0.5
    source.resize(factor, kernel="lanczos3").write_to_file(str(path))
    return path


def report(store_path: Path, wall: float | None, out: Path) -> None:
    from gigasid.io.store import JobStore

    manifest = JobStore.open(store_path).manifest
    rows = list(manifest.get("setup_timings", {}).items())
    timings = manifest.get("timings", {})
    for scale in reversed(range(len(manifest["output_shapes"]))):
        if str(scale) in timings:
            h, w = manifest["output_shapes"][scale]
            rows.append((f"sampling scale {scale} ({h}x{w} latent)", timings[str(scale)]))
    if "output" in timings:
        rows.append(("decode + output", timings["output"]))
    peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    print(f"{'stage':<40} {'seconds':>10}")
    for name, seconds in rows:
        print(f"{name:<40} {seconds:>10.1f}")
    if wall is not None:
        print(f"{'total wall':<40} {wall:>10.1f}")
    print(f"peak RSS {peak / 1024:.0f} MB, status {manifest['status']}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": platform.platform(), "size": manifest["size"], "stages": rows,
                               "wall": wall, "peak_rss_mb": peak / 1024, "status": manifest["status"]}, indent=1))
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="14336x70080")
    parser.add_argument("--reference", type=Path)
    parser.add_argument("--store", type=Path, default=Path("gigapixel-bench.zarr"))
    parser.add_argument("--scheduler", default="threads")
    parser.add_argument("--report", action="store_true", help="only print the table of an existing store")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "gigapixel.json")
    args = parser.parse_args()
    if args.report:
        report(args.store, None, args.out)
        return
    from gigasid.cli import main as cli

    reference = args.reference or make_reference(args.store.with_suffix(".reference.png"))
    started = time.perf_counter()
    code = cli(["generate", str(reference), "-o", str(args.store), "--pipeline", "gigapixel", "--size", args.size,
                "--scheduler", args.scheduler])
    wall = time.perf_counter() - started
    if code != 0:
        raise SystemExit(code)
    report(args.store, wall, args.out)


if __name__ == "__main__":
    main()
