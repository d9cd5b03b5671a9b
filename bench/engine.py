"""Benchmark: the engine's wall time, peak memory and CPU use, and the README command old vs new.

Two measurements, each a subprocess running the real command line:

* ``--compare REV``: ``gigasid generate examples/rocket.png -o out.png`` (the README's command),
  from this tree and from a git worktree of ``REV``, interleaved (old, new, old, new, ...) so both
  see the same machine load; median of ``--repeats`` runs each, and their ratio.
* ``--sizes 4096 8192``: the ``gigapixel`` preset at N×N from ``--reference`` (a real photo of at
  least 10 MP) into a job store: wall seconds, peak RSS of the process (children included), and
  CPU utilisation = (user + system CPU seconds) / wall seconds, in cores.

With both ``--compare REV`` and ``--sizes``, the gigapixel jobs run from both trees instead,
interleaved, ``--gigapixel-repeats`` times each (``--gigapixel-only`` skips the README command).

Writes ``bench/results/engine/engine.json`` (or ``--out``) and prints a table. Run:
``python bench/engine.py --compare HEAD~1 --reference PHOTO.jpg --sizes 4096 8192``
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUNNER = "import sys; from gigasid.cli import entry_point; sys.argv[0] = 'gigasid'; entry_point()"


def run_cli(tree: Path, args: list[str]) -> dict:
    """One ``gigasid`` command with ``tree``'s package first on the path: wall, CPU, peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, cwd=tree, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"gigasid {' '.join(args)} failed in {tree}:\n{done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    # ru_maxrss of the children is the largest any child reached so far (KiB on Linux)
    return {"wall_s": wall, "cpu_s": cpu, "cores": cpu / wall, "peak_rss_gib": after.ru_maxrss / 2**20}


@contextlib.contextmanager
def worktree(rev: str, work: Path):
    """A git worktree of ``rev`` under ``work``, removed afterwards."""
    old = work / "old-tree"
    if old.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)
    subprocess.run(["git", "worktree", "add", "--detach", str(old), rev], cwd=ROOT, check=True,
                   capture_output=True)
    try:
        yield old
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=ROOT, check=False)


def resolved(rev: str) -> str:
    """A revision as its short commit hash (what a result file should name)."""
    done = subprocess.run(["git", "rev-parse", "--short", rev], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip() or rev


def compare(rev: str, old: Path, repeats: int, work: Path) -> dict:
    times = {"old": [], "new": []}
    trees = {"old": old, "new": ROOT}
    for name, tree in trees.items():  # warm-up: numba's on-disk cache of each tree
        run_cli(tree, ["generate", "examples/rocket.png", "-o", str(work / f"warm-{name}.png")])
    for _ in range(repeats):
        for name, tree in trees.items():
            run = run_cli(tree, ["generate", "examples/rocket.png", "-o", str(work / f"{name}.png")])
            times[name].append(run["wall_s"])
    old_median, new_median = statistics.median(times["old"]), statistics.median(times["new"])
    return {"rev": resolved(rev), "old_s": times["old"], "new_s": times["new"], "old_median_s": old_median,
            "new_median_s": new_median, "new_over_old": new_median / old_median}


def gigapixel(reference: Path, side: int, work: Path, tree: Path = ROOT) -> dict:
    store = work / f"gigapixel-{side}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    stats = run_cli(tree, ["generate", str(reference), "-o", str(store), "--pipeline", "gigapixel",
                           "--size", f"{side}x{side}"])
    shutil.rmtree(store, ignore_errors=True)
    return {"side": side, **stats}


def gigapixel_old_vs_new(rev: str, old: Path, reference: Path, side: int, repeats: int, work: Path) -> dict:
    """The gigapixel job from ``rev``'s tree and this one, interleaved (old, new, old, new, ...)."""
    runs = {"old": [], "new": []}
    for tree in (old, ROOT):  # warm-up: numba's on-disk cache of each tree, latent kernels included
        run_cli(tree, ["generate", "examples/rocket.png", "-o", str(work / "warm.zarr"), "--pipeline", "gigapixel"])
        shutil.rmtree(work / "warm.zarr", ignore_errors=True)
    for _ in range(repeats):
        for name, tree in (("old", old), ("new", ROOT)):
            runs[name].append(gigapixel(reference, side, work, tree))
    old_median = statistics.median(run["wall_s"] for run in runs["old"])
    new_median = statistics.median(run["wall_s"] for run in runs["new"])
    return {"rev": resolved(rev), "side": side, **runs, "old_median_s": old_median, "new_median_s": new_median,
            "new_over_old_wall": new_median / old_median}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", metavar="REV", help="git revision to compare the README command with")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference", type=Path, help="a real photo of at least 10 MP")
    parser.add_argument("--sizes", type=int, nargs="*", default=[])
    parser.add_argument("--gigapixel-repeats", type=int, default=2,
                        help="with --compare and --sizes: gigapixel runs of each tree, interleaved")
    parser.add_argument("--gigapixel-only", action="store_true", help="with --compare: skip the README command")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "engine" / "engine.json")
    args = parser.parse_args()
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="gigasid-bench-") as tmp:
        work = Path(tmp)
        if args.sizes and args.reference is None:
            raise SystemExit("--sizes needs --reference PHOTO (a real photo of at least 10 MP)")
        if args.compare:
            with worktree(args.compare, work) as old:
                if not args.gigapixel_only:
                    results["readme_command"] = found = compare(args.compare, old, args.repeats, work)
                    print(f"README command: old ({found['rev']}) median {found['old_median_s']:.2f} s, new "
                          f"{found['new_median_s']:.2f} s, new/old {found['new_over_old']:.3f}")
                results["gigapixel_old_vs_new"] = []
                for side in args.sizes:
                    found = gigapixel_old_vs_new(args.compare, old, args.reference, side, args.gigapixel_repeats, work)
                    results["gigapixel_old_vs_new"].append(found)
                    cores = {name: [round(run["cores"], 2) for run in found[name]] for name in ("old", "new")}
                    print(f"gigapixel {side}x{side}: old median {found['old_median_s']:.1f} s, new "
                          f"{found['new_median_s']:.1f} s, new/old {found['new_over_old_wall']:.3f}; cores old "
                          f"{cores['old']}, new {cores['new']}")
        elif args.sizes:
            import pyvips

            image = pyvips.Image.new_from_file(str(args.reference))
            results["reference"] = {"path": args.reference.name, "size": [image.height, image.width]}
            results["gigapixel"] = []
            print(f"reference {args.reference.name}: {image.width}x{image.height}")
            print(f"{'output':>12} {'wall s':>8} {'cores':>6} {'peak RSS GiB':>13}")
            for side in args.sizes:
                row = gigapixel(args.reference, side, work)
                results["gigapixel"].append(row)
                print(f"{side:>5}x{side:<6} {row['wall_s']:8.1f} {row['cores']:6.2f} {row['peak_rss_gib']:13.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
