"""Benchmark: the latent path's quality at 1024² against pixel-space sampling (issue 4).

For each bundled example: one pixel-space sample (``uncond``, knn) and latent samples with the
lapped PCA codec decoded two ways — correspondence decode and the codec's own decoder — all at the
same output size. Reported per sample: multi-scale patch-SWD to the reference, sharpness (mean
gradient magnitude relative to the reference's), the grid-seam ratio (mean gradient across the
8-px block boundaries over the mean gradient elsewhere; 1 = no seams) and, for correspondence
decode, the source-seam ratio (mean gradient across the boundaries between cells copied from
different reference offsets over the mean gradient elsewhere) and the share of such boundaries.
Also the codec's reconstruction PSNR of each reference per K. Prints tables, writes JSON.

Run: ``python bench/latent_quality.py [--size 1024] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from gigasid import jobs, metrics
from gigasid.config import load_pipeline
from gigasid.io.images import read_image

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ["coffee.png", "rocket.png", "bricks.png"]


def _gray(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64).mean(0)


def gradient_ratio(gray: np.ndarray, boundary_rows: np.ndarray, boundary_cols: np.ndarray) -> float:
    """Mean |difference| across the marked boundaries over the mean |difference| elsewhere.

    ``boundary_cols[i, j]`` marks the horizontal step between pixel (i, j) and (i, j + 1),
    ``boundary_rows[i, j]`` the vertical step between (i, j) and (i + 1, j).
    """
    dx = np.abs(np.diff(gray, axis=1))
    dy = np.abs(np.diff(gray, axis=0))
    across = np.concatenate([dx[boundary_cols], dy[boundary_rows]])
    elsewhere = np.concatenate([dx[~boundary_cols], dy[~boundary_rows]])
    if across.size == 0 or elsewhere.size == 0:
        return float("nan")
    return float(across.mean() / elsewhere.mean())


def grid_seams(gray: np.ndarray, factor: int = 8) -> float:
    height, width = gray.shape
    cols = np.zeros((height, width - 1), dtype=bool)
    cols[:, factor - 1 :: factor] = True
    rows = np.zeros((height - 1, width), dtype=bool)
    rows[factor - 1 :: factor] = True
    return gradient_ratio(gray, rows, cols)


def source_seams(gray: np.ndarray, offsets: np.ndarray, factor: int = 8) -> tuple[float, float]:
    """(ratio, share of cell boundaries between different source offsets); ``offsets`` (h, w, 2)
    is each latent cell's dominant source offset."""
    height, width = gray.shape
    change_c = np.any(offsets[:, 1:] != offsets[:, :-1], axis=-1)  # between cell (i, j) and (i, j+1)
    change_r = np.any(offsets[1:] != offsets[:-1], axis=-1)
    cols = np.zeros((height, width - 1), dtype=bool)
    rows = np.zeros((height - 1, width), dtype=bool)
    for j in range(change_c.shape[1]):
        x = factor * (j + 1) - 1
        if x < width - 1:
            cols[:, x] = np.repeat(change_c[:, j], factor)[:height]
    for i in range(change_r.shape[0]):
        y = factor * (i + 1) - 1
        if y < height - 1:
            rows[y, :] = np.repeat(change_r[i], factor)[:width]
    share = (change_c.sum() + change_r.sum()) / (change_c.size + change_r.size)
    return gradient_ratio(gray, rows, cols), float(share)


def cell_offsets(job, result, config) -> np.ndarray:
    """Each output cell's source offset: the best candidate of the query centred on it."""
    alphas_sigmas = jobs.make_noise_schedule(config.noise_schedule, config.num_steps)
    positions, weights = job.denoisers[0].matches(
        result.last_input, float(alphas_sigmas[0][1]), float(alphas_sigmas[1][1]), step=1
    )
    best = positions.gather(2, weights.argmax(2, keepdim=True))[..., 0].numpy()
    ref_grid_w = job.reference_shapes[0][1] - config.patch_size + 1
    grid_h, grid_w = best.shape
    rows, cols = np.meshgrid(np.arange(grid_h), np.arange(grid_w), indexing="ij")
    offsets = np.stack([best // ref_grid_w - rows, best % ref_grid_w - cols], -1)
    # cell (i, j) is the centre of query (i - r, j - r): clamp at the edges
    r = config.patch_size // 2
    height, width = job.output_shapes[0]
    qi = np.clip(np.arange(height) - r, 0, grid_h - 1)
    qj = np.clip(np.arange(width) - r, 0, grid_w - 1)
    return offsets[np.ix_(qi, qj)]


def sharpness(gray: np.ndarray) -> float:
    return float(np.abs(np.diff(gray, axis=1)).mean() + np.abs(np.diff(gray, axis=0)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--examples", nargs="*", default=EXAMPLES)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latent_quality.json")
    args = parser.parse_args()
    size = (args.size, args.size)
    rows, psnr = [], []
    for name in args.examples:
        pixels = read_image(ROOT / "examples" / name)
        image = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0
        reference = jobs.to_pixels(image)
        ref_sharp = sharpness(_gray(reference))
        variants = {
            "pixel knn": load_pipeline("uncond"),
            "latent pca + correspondence": load_pipeline("gigapixel"),
            "latent pca + codec decode": load_pipeline("gigapixel", ["latent.decode=codec"]),
        }
        for label, config in variants.items():
            started = time.perf_counter()
            job = jobs.prepare(image, config, size=size)
            result = jobs.run(job, seed=args.seed)
            seconds = time.perf_counter() - started
            out = jobs.to_pixels(result.image)
            gray = _gray(out)
            row = {
                "example": name, "variant": label, "seconds": seconds,
                "patch_swd": metrics.patch_swd(out.transpose(1, 2, 0), reference.transpose(1, 2, 0)),
                "sharpness_vs_reference": sharpness(gray) / ref_sharp,
                "grid_seam_ratio": grid_seams(gray) if job.codec is not None else float("nan"),
            }
            if job.codec is not None and config.latent.decode == "correspondence":
                ratio, share = source_seams(gray, cell_offsets(job, result, config))
                row.update(source_seam_ratio=ratio, source_boundary_share=share)
            rows.append(row)
            print(f"{name:<11} {label:<28} {seconds:7.1f} s  swd {row['patch_swd']:.4f}  "
                  f"sharp {row['sharpness_vs_reference']:.2f}  grid {row['grid_seam_ratio']:.3f}  "
                  f"source {row.get('source_seam_ratio', float('nan')):.3f} "
                  f"({100 * row.get('source_boundary_share', float('nan')):.1f} % of boundaries)", flush=True)
        from gigasid.codecs.lapped_pca import fit_lapped_pca

        for k in (16, 32, 48, 64):
            codec = fit_lapped_pca(lambda s, b: image[:, b[0] : b[2], b[1] : b[3]], [tuple(image.shape[1:])], k,
                                   image_channels=image.shape[0], max_blocks=200_000)
            decoded = codec.decode(codec.encode(image))[:, : image.shape[1], : image.shape[2]]
            mse = float((decoded - image).pow(2).mean())
            psnr.append({"example": name, "k": k, "psnr_db": 10 * np.log10(4.0 / mse)})
        print("  codec PSNR: " + ", ".join(f"K={p['k']} {p['psnr_db']:.1f} dB" for p in psnr if p["example"] == name))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.platform(), "size": size, "rows": rows, "psnr": psnr}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
