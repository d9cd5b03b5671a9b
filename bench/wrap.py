"""Benchmark: 360° panoramas (``--pipeline panorama-360``) from real photos — is the wrap seamless?

For each photo (the Debian wallpapers ``bench/detail.py`` fetches), runs the preset through the
command line into a job store (tiled, out of core) and measures on the uint8 output's grey:

* wrap seam = mean |grey[:, 0] − grey[:, −1]| ÷ mean |grey[:, j + 1] − grey[:, j]| over the
  interior (the acceptance bound is 1.1: the join looks like any other column step), and the
  share of interior column steps smaller than the seam's (its rank: 0.5 is a typical column), and
  the seam against the steps between 8-px latent cells (the join is one of those; the
  correspondence decode leaves every cell edge a little stronger than the columns inside cells),
  and its rank among the cell edges of the 512 columns around it (local: the content differs
  along a panorama);
* top/bottom = the same across the first and last rows: not forced (a photo's sky and ground
  differ, so this stays far above 1);
* seconds and peak RSS.

It writes ``bench/results/wrap/wrap.json`` and, per photo, a 1:1 crop of the join (the last
256 columns followed by the first 256) so a person can look for the seam.
Run: ``python bench/wrap.py [--photos Path EveningGlow] [--height 800]``
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))


def seam_ratios(pixels: np.ndarray, cell: int = 8) -> dict:
    """The wrap seam against every column step, its rank, against the steps between latent cells
    (the join is one of those), and top/bottom; see the module docstring."""
    grey = pixels.astype(np.float64).mean(0)
    column_steps = np.abs(np.diff(grey, axis=1)).mean(0)  # step j: between columns j and j + 1
    inner_rows = np.abs(np.diff(grey, axis=0)).mean()
    seam = np.abs(grey[:, 0] - grey[:, -1]).mean()
    return {
        "wrap_seam": float(seam / column_steps.mean()),
        "seam_rank": float((column_steps < seam).mean()),
        "seam_vs_cell_edges": float(seam / column_steps[cell - 1 :: cell].mean()),
        "top_bottom": float(np.abs(grey[0] - grey[-1]).mean() / inner_rows),
    }


def near_rank(join: np.ndarray, cell: int = 8) -> float:
    """Among the cell-edge column steps of the 512-px crop around the join (the join at its
    middle), the share weaker than the join's: the join is one of them, so ~0.5 is typical and
    1.0 would mean the strongest edge around."""
    steps = np.abs(np.diff(join.astype(np.float64).mean(0), axis=1)).mean(0)
    middle = join.shape[2] // 2 - 1
    edges = np.delete(steps[cell - 1 :: cell], middle // cell)
    return float((edges < steps[middle]).mean())


def main() -> None:
    from detail import fetch_wallpapers  # the wallpapers, fetched once into ~/.cache

    from gigasid.graph.engine import read_output
    from gigasid.io.images import write_image
    from gigasid.io.store import JobStore

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="*", default=["Path", "EveningGlow", "OneStandsOut"])
    parser.add_argument("--height", type=int, default=0, help="the photo is reduced to this height first (0: as is)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "wrap")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    photos = fetch_wallpapers(args.photos)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gigasid-wrap-") as tmp:
        for name, path in photos.items():
            source = Path(path)
            if args.height:
                import pyvips

                image = pyvips.Image.new_from_file(str(path))
                source = Path(tmp) / f"{name}.png"
                image.resize(args.height / image.height).write_to_file(str(source))
            store = Path(tmp) / f"{name}.zarr"
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-m", "gigasid.cli", "generate", str(source), "-o", str(store),
                 "--pipeline", "panorama-360"], capture_output=True, text=True, check=False,
            )
            seconds = time.perf_counter() - started
            if done.returncode != 0:
                raise SystemExit(done.stderr[-2000:])
            pixels = read_output(JobStore.open(store))
            ratios = seam_ratios(pixels)
            join = np.concatenate([pixels[:, :, -256:], pixels[:, :, :256]], axis=2)
            ratios["seam_rank_near"] = near_rank(join)
            write_image(args.out / f"{name}-join.jpg", join.transpose(1, 2, 0))
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            row = {"photo": name, "size": list(pixels.shape[1:]), **ratios,
                   "seconds": seconds, "peak_rss_gib": rss}
            rows.append(row)
            print(f"{name:14} {pixels.shape[1]}x{pixels.shape[2]}  wrap seam {ratios['wrap_seam']:.2f} (rank "
                  f"{ratios['seam_rank']:.2f}, {ratios['seam_vs_cell_edges']:.2f} of the cell edges', rank "
                  f"{ratios['seam_rank_near']:.2f} among the cell edges around it)  "
                  f"top/bottom {ratios['top_bottom']:.2f}  "
                  f"{seconds:.0f} s  RSS {rss:.2f} GiB", flush=True)
            shutil.rmtree(store, ignore_errors=True)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "rows": rows}
    (args.out / "wrap.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
