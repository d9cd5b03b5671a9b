"""Benchmark: seconds and peak RSS from 256² to 8192² outputs of one reference (issue 4).

The paper's ablation rows — pixel exact, pixel knn, latent exact, latent knn — each run as the
real command (``gigasid generate REF -o OUT.zarr --size SxS``, out of core through the tiled
engine) in its own process, so that wall time includes everything (codec fit, encoding, indexes,
sampling, decode, the store) and peak RSS is that run's alone (the process's and its children's).
Rows too slow for a size are skipped (``--max`` per row). Prints a table, writes JSON.

Run: ``python bench/resolution_sweep.py [--sizes 256 1024 2048 4096 8192] [--reference IMG]``
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# row → (pipeline and settings, the largest size it is run at by default)
ROWS = {
    "pixel exact": (["--pipeline", "uncond-exact"], 256),
    "pixel knn": (["--pipeline", "uncond"], 2048),
    "latent exact": (["--pipeline", "gigapixel", "--set", "denoiser.backend=exact", "--set", "latent.decode=codec",
                      "--set", "denoiser.compute_dtype=bfloat16"], 1024),
    "latent knn": (["--pipeline", "gigapixel"], 8192),
}


def one_run(reference: str, size: int, settings: list[str], workdir: Path) -> dict:
    """Run one generate in a child process; wall seconds and the child's peak RSS."""
    out = workdir / f"out-{size}-{time.monotonic_ns()}.zarr"
    command = [sys.executable, "-m", "gigasid.cli", "generate", reference, "-o", str(out),
               "--size", f"{size}x{size}", *settings]
    started = time.perf_counter()
    # a fresh process per run: RUSAGE_CHILDREN's max then covers this run alone only if it is the
    # largest so far, so run it under a tiny wrapper that reports its own peak
    wrapper = ("import resource, runpy, sys; sys.argv = sys.argv[1:]; "
               "code = 0\ntry:\n    runpy.run_module('gigasid.cli', run_name='__main__')\n"
               "except SystemExit as exit:\n    code = exit.code or 0\n"
               "peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
               "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
               "print(f'PEAK_RSS_KB {peak}', file=sys.stderr)\nsys.exit(code)")
    done = subprocess.run([sys.executable, "-c", wrapper, *command[2:]], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK_RSS_KB")]
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-2:] if done.stderr else "failed"}
    subprocess.run(["rm", "-rf", str(out)])
    return {"seconds": seconds, "peak_rss_mb": int(peak[-1].split()[1]) / 1024 if peak else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[256, 1024, 2048, 4096, 8192])
    parser.add_argument("--rows", nargs="*", default=list(ROWS))
    parser.add_argument("--reference", default=str(ROOT / "examples" / "coffee.png"))
    parser.add_argument("--max", type=int, nargs="*", help="override each row's largest size, in --rows order")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "resolution_sweep.json")
    args = parser.parse_args()
    limits = {row: ROWS[row][1] for row in args.rows}
    if args.max:
        limits.update(zip(args.rows, args.max))
    results = []
    print(f"{'row':<14} {'size':>6} {'seconds':>9} {'peak RSS MB':>12}")
    with tempfile.TemporaryDirectory(prefix="gigasid-sweep-") as scratch:
        for row in args.rows:
            for size in args.sizes:
                if size > limits[row]:
                    continue
                figures = one_run(args.reference, size, ROWS[row][0], Path(scratch))
                results.append({"row": row, "size": size, **figures})
                if "error" in figures:
                    print(f"{row:<14} {size:>6} failed: {figures['error']}", flush=True)
                else:
                    print(f"{row:<14} {size:>6} {figures['seconds']:>9.1f} {figures['peak_rss_mb']:>12.0f}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "reference": args.reference,
                                    "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
