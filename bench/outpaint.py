"""Benchmark: outpainting and masked inpainting (issue 14), the figures its acceptance asks for.

Three runs, each ``gigasid generate`` in its own process (peak RSS is that run's alone):

* ``panorama``: a 4 MP photo (2560x1600, Debian's wallpapers cached in
  ``~/.cache/gigasid-bench/wallpapers``; never committed) grown into a 6x-wide panorama
  (1600x15360) with ``outpaint-large``, out of core (``-o JOB.zarr``);
* ``outpaint``: ``examples/coffee.png`` (256x384) on a 3x-wide canvas with the pixel ``outpaint``;
* ``inpaint``: the photo reduced to 1280x800 with an elliptic hole (white = regenerate) near its
  centre, ``inpaint`` through the tiled engine.

For each: wall seconds, peak RSS, the largest difference from the reference over the known pixels
(acceptance: <= 1 grey level) and ``metrics.border_gradient_ratio`` (acceptance: <= 1.2); for
inpainting also ``metrics.hole_detail`` (the fill's detail over its surroundings': fog scores low). Writes
``bench/results/outpaint/outpaint.json`` and a contact sheet (``sheet.jpg``: each output reduced,
the known region's border in red). Run: ``python bench/outpaint.py [--photo NAME.jpg ...] [--only NAME]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scaling import run_cli  # one CLI run in its own process: wall seconds, peak RSS

from gigasid.metrics import hole_detail

WALLPAPERS = Path.home() / ".cache" / "gigasid-bench" / "wallpapers"
OUT = ROOT / "bench" / "results" / "outpaint"

def read_output(path: Path) -> np.ndarray:
    if path.suffix == ".zarr":
        from gigasid.api import open_output

        return np.asarray(open_output(path).compute()).transpose(1, 2, 0)
    return np.asarray(Image.open(path).convert("RGB"))


def figures(name, output, reference, known, wall, rss, extra) -> dict:
    from gigasid.metrics import border_gradient_ratio

    placed = output[known].astype(int)
    expected = reference.reshape(-1, 3).astype(int) if reference.shape[:2] != known.shape else reference[known]
    row = {"run": name, "output": f"{output.shape[0]}x{output.shape[1]}", "wall_s": round(wall, 1),
           "peak_rss_mb": round(rss), "known_max_diff": int(np.abs(placed - expected).max()),
           "border_gradient_ratio": round(border_gradient_ratio(output, known), 3), **extra}
    print(json.dumps(row), flush=True)
    return row


def sheet_tile(output: np.ndarray, known: np.ndarray, width: int) -> Image.Image:
    scale = width / output.shape[1]
    image = Image.fromarray(output).resize((width, max(1, round(output.shape[0] * scale))), Image.LANCZOS)
    rows, cols = np.nonzero(known)
    draw = ImageDraw.Draw(image)
    if known.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1):  # a rectangle
        draw.rectangle([cols.min() * scale, rows.min() * scale, (cols.max() + 1) * scale, (rows.max() + 1) * scale],
                       outline=(255, 0, 0))
    else:
        edge = known ^ np.roll(known, 1, 0) | known ^ np.roll(known, 1, 1)
        for r, c in zip(*np.nonzero(edge[::4, ::4])):
            draw.point((c * 4 * scale, r * 4 * scale), fill=(255, 0, 0))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", nargs="+", default=["EveningGlow.jpg"],
                        help="files in " + str(WALLPAPERS) + " (inpaint runs on each, the panorama on the first)")
    parser.add_argument("--only", choices=("panorama", "outpaint", "inpaint"))
    parser.add_argument("--scheduler", default="threads")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    photo = WALLPAPERS / args.photo[0]
    rows, tiles = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.only in (None, "outpaint"):
            source = ROOT / "examples" / "coffee.png"
            reference = np.asarray(Image.open(source).convert("RGB"))
            out = tmp / "outpaint.png"
            wall, rss = run_cli(["generate", str(source), "-o", str(out), "--pipeline", "outpaint",
                                 "--size", "256x1152", "--place", "center"])
            output = read_output(out)
            known = np.zeros(output.shape[:2], bool)
            known[:, 384:768] = True
            rows.append(figures("outpaint (pixel)", output, reference, known, wall, rss,
                                {"reference": "coffee.png 256x384", "pipeline": "outpaint"}))
            tiles.append(("outpaint: coffee.png 256x384 -> 256x1152", sheet_tile(output, known, 1536)))
        for name in args.photo if args.only in (None, "inpaint") else []:
            small = tmp / "photo.png"
            Image.open(WALLPAPERS / name).convert("RGB").resize((1280, 800), Image.LANCZOS).save(small)
            reference = np.asarray(Image.open(small))
            rr, cc = np.mgrid[:800, :1280]
            hole = ((rr - 430) / 110.0) ** 2 + ((cc - 700) / 170.0) ** 2 <= 1.0
            mask = tmp / "mask.png"
            Image.fromarray((hole * 255).astype(np.uint8)).save(mask)
            store = tmp / "inpaint.zarr"
            wall, rss = run_cli(["generate", str(small), "-o", str(store), "--pipeline", "inpaint", "--mask", str(mask),
                                 "--tile", "256", "--scheduler", args.scheduler])
            output = read_output(store)
            rows.append(figures("inpaint (pixel, tiled)", output, reference, ~hole, wall, rss,
                                {"reference": f"{name} at 1280x800", "hole_px": int(hole.sum()),
                                 "hole_detail": round(hole_detail(output, reference, hole), 3)}))
            tiles.append((f"inpaint: {name} 1280x800, elliptic hole", sheet_tile(output, ~hole, 1536)))
            shutil.rmtree(store, ignore_errors=True)  # the next photo's store
        if args.only in (None, "panorama"):
            reference = np.asarray(Image.open(photo).convert("RGB"))
            height, width = reference.shape[:2]
            store = tmp / "panorama.zarr"
            size = f"{height}x{6 * width}"
            wall, rss = run_cli(["generate", str(photo), "-o", str(store), "--pipeline", "outpaint-large",
                                 "--size", size, "--place", "center", "--scheduler", args.scheduler])
            output = read_output(store)
            known = np.zeros(output.shape[:2], bool)
            left = (6 * width - width) // 2 // 8 * 8
            known[:, left : left + width] = True
            rows.append(figures("panorama (outpaint-large, out of core)", output, reference, known, wall, rss,
                                {"reference": f"{args.photo[0]} {height}x{width}", "size": size}))
            tiles.append((f"panorama: {args.photo[0]} {height}x{width} -> {size}", sheet_tile(output, known, 1536)))
    result = {"machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
              "runs": rows}
    path = OUT / ("outpaint.json" if args.only is None else f"outpaint-{args.only}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    height = sum(t.height + 24 for _, t in tiles)
    sheet = Image.new("RGB", (1536, height), "white")
    top = 0
    for label, tile in tiles:
        ImageDraw.Draw(sheet).text((4, top + 6), label, fill=(0, 0, 0))
        sheet.paste(tile, (0, top + 24))
        top += tile.height + 24
    sheet.save(OUT / ("sheet.jpg" if args.only is None else f"sheet-{args.only}.jpg"), quality=88)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
