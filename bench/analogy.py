"""Structural analogy against issue 14's acceptance: layout kept, style's patch statistics kept.

For each (style, structure) pair: one analogy (``--pipeline analogy``, or ``analogy-large`` with
``--large``) and one unconditional sample of the style with the same settings and output size.
Printed and written to ``bench/results/analogy/analogy.json`` (contact sheet ``sheet.jpg``):

* ``layout_corr``: Pearson correlation of the output's low-pass grey with the structure's
  (Gaussian σ = 1/16 of the output's short side; the structure resampled to the output's size
  first). Acceptance: >= 0.8.
* ``swd_ratio``: ``gigasid.metrics.patch_swd`` of the analogy to the style over that of the
  unconditional sample to the style. Acceptance: <= 1.5.

Pairs: the bundled examples, and photos from ``~/.cache/gigasid-bench/wallpapers`` (Debian
wallpapers, 2560x1600; never committed) reduced to ``--photo-size`` (long side) for the pixel
preset, full size with ``--large``. CPU-heavy: run it once.

    python bench/analogy.py                 # pixel preset, examples + 2 photo pairs
    python bench/analogy.py --large         # adds the latent preset on the full-size photos
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

from gigasid import jobs
from gigasid.config import load_pipeline
from gigasid.core.pyramid import resample
from gigasid.io.images import read_image
from gigasid.metrics import patch_swd

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PHOTOS = Path.home() / ".cache" / "gigasid-bench" / "wallpapers"
OUT = REPO / "bench" / "results" / "analogy"
# (style, structure): the bundled examples, then photo pairs
EXAMPLE_PAIRS = [("coffee.png", "rocket.png"), ("rocket.png", "coffee.png"), ("bricks.png", "coffee.png"),
                 ("coffee.png", "bricks.png")]
PHOTO_PAIRS = [("FallenLeaf.jpg", "Path.jpg"), ("EveningGlow.jpg", "OneStandsOut.jpg"),
               ("ColorfulCups.jpg", "summer_1am.jpg")]


def model_space(path: Path, long_side: int | None = None) -> torch.Tensor:
    image = torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous() * 2.0 - 1.0
    if long_side and max(image.shape[1:]) > long_side:
        scale = long_side / max(image.shape[1:])
        image = resample(image, (round(image.shape[1] * scale), round(image.shape[2] * scale)))
    return image


def grey(image: torch.Tensor) -> np.ndarray:
    x = (image.numpy().astype(np.float64) + 1.0) / 2.0
    return x[0] if x.shape[0] == 1 else 0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def layout_corr(output: torch.Tensor, structure: torch.Tensor) -> float:
    """Correlation of the low-pass greys (σ = short side / 16) at the output's size."""
    shape = tuple(output.shape[1:])
    sigma = min(shape) / 16
    a = ndimage.gaussian_filter(grey(output), sigma)
    b = ndimage.gaussian_filter(grey(resample(structure, shape)), sigma)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def hwc(image: torch.Tensor) -> np.ndarray:
    return np.clip((image.permute(1, 2, 0).numpy() + 1.0) / 2.0, 0.0, 1.0)


def thumb(image: torch.Tensor, height: int) -> Image.Image:
    pixels = (hwc(image) * 255).round().astype(np.uint8)
    picture = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels).convert("RGB")
    return picture.resize((max(1, round(picture.width * height / picture.height)), height), Image.LANCZOS)


def run_pair(style_path: Path, structure_path: Path, preset: str, long_side: int | None, seed: int) -> tuple:
    style, structure = model_space(style_path, long_side), model_space(structure_path, long_side)
    config = load_pipeline(preset)
    started = time.perf_counter()
    analogy = jobs.run(jobs.prepare(style, config, structure=structure), seed=seed).image
    analogy_s = time.perf_counter() - started
    uncond_config = load_pipeline(preset, ["application=uncond"])
    started = time.perf_counter()
    uncond = jobs.run(jobs.prepare(style, uncond_config, size=tuple(analogy.shape[1:])), seed=seed).image
    uncond_s = time.perf_counter() - started
    swd_analogy = patch_swd(hwc(analogy), hwc(style))
    swd_uncond = patch_swd(hwc(uncond), hwc(style))
    row = {
        "style": style_path.name, "structure": structure_path.name, "preset": preset,
        "style_size": list(style.shape[1:]), "output_size": list(analogy.shape[1:]), "seed": seed,
        "layout_corr": round(layout_corr(analogy, structure), 3),
        "layout_corr_uncond": round(layout_corr(uncond, structure), 3),
        "swd_analogy": round(swd_analogy, 4), "swd_uncond": round(swd_uncond, 4),
        "swd_ratio": round(swd_analogy / swd_uncond, 3),
        "seconds_analogy": round(analogy_s, 1), "seconds_uncond": round(uncond_s, 1),
    }
    row["pass"] = bool(row["layout_corr"] >= 0.8 and row["swd_ratio"] <= 1.5)
    return row, [thumb(x, 160) for x in (style, structure, analogy, uncond)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo-size", type=int, default=640, help="long side of the photos for the pixel preset")
    parser.add_argument("--large", action="store_true", help="also analogy-large on the full-size photo pairs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    runs = [(EXAMPLES / s, EXAMPLES / c, "analogy", None) for s, c in EXAMPLE_PAIRS]
    photos = [(PHOTOS / s, PHOTOS / c) for s, c in PHOTO_PAIRS if (PHOTOS / s).is_file() and (PHOTOS / c).is_file()]
    runs += [(s, c, "analogy", args.photo_size) for s, c in photos]
    if args.large:
        runs += [(s, c, "analogy-large", None) for s, c in photos[:2]]
    OUT.mkdir(parents=True, exist_ok=True)
    rows, sheet_rows = [], []
    print(f"{'style':<18} {'structure':<18} {'preset':<14} {'output':>10} {'corr':>6} {'swd':>7} {'uncond':>7} "
          f"{'ratio':>6} {'s':>6}  pass")
    for style, structure, preset, long_side in runs:
        row, thumbs = run_pair(style, structure, preset, long_side, args.seed)
        rows.append(row)
        sheet_rows.append(thumbs)
        size = "x".join(map(str, row["output_size"]))
        print(f"{row['style']:<18} {row['structure']:<18} {preset:<14} {size:>10} {row['layout_corr']:>6.3f} "
              f"{row['swd_analogy']:>7.4f} {row['swd_uncond']:>7.4f} {row['swd_ratio']:>6.2f} "
              f"{row['seconds_analogy']:>6.1f}  {row['pass']}", flush=True)
    width = max(sum(t.width for t in thumbs) + 4 * (len(thumbs) - 1) for thumbs in sheet_rows)
    sheet = Image.new("RGB", (width, len(sheet_rows) * 164), "white")
    for i, thumbs in enumerate(sheet_rows):
        left = 0
        for picture in thumbs:
            sheet.paste(picture, (left, i * 164))
            left += picture.width + 4
    sheet.save(OUT / "sheet.jpg", quality=85)
    info = {"columns of sheet.jpg": ["style", "structure", "analogy", "unconditional sample of the style"],
            "machine": f"{os.cpu_count()} CPU cores", "torch_threads": torch.get_num_threads(), "runs": rows}
    (OUT / "analogy.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {OUT / 'analogy.json'} and {OUT / 'sheet.jpg'}")


if __name__ == "__main__":
    main()
