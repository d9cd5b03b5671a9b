"""Benchmark: detail, fog and source usage of large outputs on real multi-megapixel photos.

For each photo and each requested preset and size, samples with a few seeds (in memory: the tiled
engine gives the same pixels bit for bit), then reports per sample: detail retention, fog
fraction, source usage (top-1 % share, coverage, repetition), multi-scale patch-SWD, the largest
verbatim copy as a share of the area, and seconds; per (photo, preset, size) the pixel diversity
across seeds. Writes a JSON file and, per photo, a contact sheet: 1:1 crops of the reference and of
every output side by side (the crops a person should look at: the reference's most detailed
region, the output's most fogged region and its centre), plus an overview with the fog map in red.

The photos are the 2560×1600 (4 MP) wallpapers of Debian's ``plasma-workspace-wallpapers``,
fetched at run time with ``apt-get download`` + ``dpkg-deb -x`` into a cache folder (never
committed); ``--photo FILE`` adds any other image. Sizes are area factors of the reference: ``1``
is its own size, ``4`` twice each side.

Run: ``python bench/detail.py [--runs uncond:1 gigapixel:1,4] [--seeds 0 1] [--tag NAME]``
(pixel ``uncond`` at 4 MP takes about ten minutes per sample on 2 cores; gigapixel about 15 s at
1x and 40 s at 4x.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyvips
import torch

from gigasid import jobs, metrics
from gigasid.config import load_pipeline
from gigasid.io.images import read_image

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "gigasid-bench" / "wallpapers"
# Fine structure of four kinds: forest and foliage, water with boats and gravel, moss, leaves.
DEFAULT_PHOTOS = ["Path", "EveningGlow", "OneStandsOut", "FallenLeaf"]
WALLPAPER = "usr/share/wallpapers/{name}/contents/images/2560x1600.jpg"
CROP = 384  # px per side of each 1:1 crop on the contact sheet


def fetch_wallpapers(names: list[str]) -> dict[str, Path]:
    """The wallpapers' JPEGs in the cache, downloading the Debian package once if one is missing."""
    wanted = {name: CACHE / f"{name}.jpg" for name in names}
    if all(path.is_file() for path in wanted.values()):
        return wanted
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", "plasma-workspace-wallpapers"], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deb = next(Path(tmp).glob("plasma-workspace-wallpapers_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(Path(tmp) / "x")], check=True)
        for name, path in wanted.items():
            source = Path(tmp) / "x" / WALLPAPER.format(name=name)
            if not source.is_file():
                sys.exit(f"no wallpaper named {name!r} in plasma-workspace-wallpapers")
            shutil.copyfile(source.resolve(), path)
    return wanted


def parse_runs(specs: list[str]) -> list[tuple[str, str, list[str], list[float]]]:
    """``preset[+key=value...][:area,area...]`` → (label, preset, overrides, area factors); no
    factors = the preset's own size. Overrides let one run compare a preset with its previous
    settings, interleaved on the same machine state (e.g. ``gigapixel+latent.texture_channel=false``)."""
    runs = []
    for spec in specs:
        label, _, factors = spec.partition(":")
        preset, *overrides = label.split("+")
        runs.append((label, preset, overrides, [float(f) for f in factors.split(",")] if factors else [0.0]))
    return runs


def output_size(height: int, width: int, area: float) -> tuple[int, int] | None:
    """The output for an area factor: both sides × √area, rounded to whole latent cells."""
    if area == 0.0:
        return None
    side = math.sqrt(area)
    return (8 * round(height * side / 8), 8 * round(width * side / 8))


def _hwc(pixels_chw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels_chw.transpose(1, 2, 0))


def measure(out: np.ndarray, ref: np.ndarray) -> dict:
    """Every per-sample metric of one (H, W, 3) uint8 output against its reference."""
    fog = metrics.fog_map(out, ref)
    usage = metrics.source_usage(out, ref)
    return {
        "detail": metrics.detail_retention(out, ref),
        "fog_fraction": fog.fraction,
        "top1_share": usage.top_share,
        "coverage": usage.coverage,
        "repetition": usage.repetition,
        "patch_swd": metrics.patch_swd(out, ref),
        "largest_copy_share": metrics.largest_copied_region(out, ref) / (out.shape[0] * out.shape[1]),
        "_fog": fog,
    }


def _crop(img: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    height, width = img.shape[:2]
    r0 = int(np.clip(centre[0] - CROP // 2, 0, max(0, height - CROP)))
    c0 = int(np.clip(centre[1] - CROP // 2, 0, max(0, width - CROP)))
    crop = img[r0 : r0 + CROP, c0 : c0 + CROP]
    return np.pad(crop, ((0, CROP - crop.shape[0]), (0, CROP - crop.shape[1]), (0, 0)))


def _overview(img: np.ndarray, fog: metrics.FogMap | None, width: int) -> np.ndarray:
    """The whole image fitted in a CROP × ``width`` box, fogged blocks tinted red."""
    shown = img.astype(np.float32)
    if fog is not None and fog.fogged.any():
        mask = np.kron(fog.fogged, np.ones((fog.block, fog.block), dtype=bool))
        mask = np.pad(mask, ((0, max(0, img.shape[0] - mask.shape[0])), (0, max(0, img.shape[1] - mask.shape[1]))))
        mask = mask[: img.shape[0], : img.shape[1]]
        shown[mask] = 0.5 * shown[mask] + 0.5 * np.array([255.0, 0.0, 0.0])
    scale = min(CROP / img.shape[0], width / img.shape[1])
    small = pyvips.Image.new_from_array(shown.astype(np.uint8)).resize(scale, kernel="linear")
    arr = small.numpy()[:CROP, :width]
    return np.pad(arr, ((0, CROP - arr.shape[0]), (0, width - arr.shape[1]), (0, 0)))


def _most_detailed(ref: np.ndarray) -> tuple[int, int]:
    """The centre of the half-crop block of the reference with the most fine detail."""
    fog = metrics.fog_map(ref, ref, block=CROP // 2)  # its own blocks: detail is the reference's
    i, j = np.unravel_index(np.argmax(fog.detail), fog.detail.shape)
    return (int(i * CROP // 2 + CROP // 4), int(j * CROP // 2 + CROP // 4))


def contact_sheet(path: Path, ref: np.ndarray, rows: list[tuple[str, np.ndarray, metrics.FogMap]]) -> None:
    """One row per image: overview (fog in red) | 1:1 crops at its centre and its most fogged
    region (the reference: its most detailed region). Labels go in the JSON, rows in order."""
    lines = []
    detailed = _most_detailed(ref)
    width = min(2 * CROP, round(CROP * ref.shape[1] / ref.shape[0]))  # the reference's aspect
    lines.append(np.concatenate([_overview(ref, None, width), _crop(ref, (ref.shape[0] // 2, ref.shape[1] // 2)),
                                 _crop(ref, detailed)], axis=1))
    for _, out, fog in rows:
        gap = fog.expected - fog.detail
        i, j = np.unravel_index(np.argmax(gap), gap.shape)
        foggiest = (int(i * fog.block + fog.block // 2), int(j * fog.block + fog.block // 2))
        lines.append(np.concatenate([_overview(out, fog, width), _crop(out, (out.shape[0] // 2, out.shape[1] // 2)),
                                     _crop(out, foggiest)], axis=1))
    sheet = np.concatenate([np.pad(line, ((0, 6), (0, 0), (0, 0)), constant_values=255) for line in lines])
    path.parent.mkdir(parents=True, exist_ok=True)
    pyvips.Image.new_from_array(sheet.astype(np.uint8)).write_to_file(str(path), Q=88)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", nargs="*", default=DEFAULT_PHOTOS, help="wallpaper names")
    parser.add_argument("--photo", type=Path, action="append", default=[], help="another image file")
    parser.add_argument("--runs", nargs="*", default=["uncond:1", "gigapixel:1,4"],
                        help="preset[+key=value...][:area factors], e.g. gigapixel:1,2,4 (no factors: the "
                             "preset's size)")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1])
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        help="override for every run, as gigasid's --set (key=value)")
    parser.add_argument("--tag", default="current", help="names the JSON and the contact sheets' folder")
    args = parser.parse_args()
    photos = fetch_wallpapers(args.photos) if args.photos else {}
    photos.update({path.stem: path for path in args.photo})
    out_dir = ROOT / "bench" / "results" / "detail" / args.tag
    results = []
    for name, path in photos.items():
        ref = read_image(path)  # (H, W, C) float in [0, 1]
        image = torch.from_numpy(ref).permute(2, 0, 1).contiguous() * 2.0 - 1.0
        ref_u8 = _hwc(jobs.to_pixels(image))
        ref_usage = metrics.source_usage(ref_u8, ref_u8)
        print(f"{name}: {ref_u8.shape[1]}x{ref_u8.shape[0]}, its own repetition {ref_usage.repetition:.3f}", flush=True)
        sheet_rows = []
        for label, preset, overrides, areas in parse_runs(args.runs):
            config = load_pipeline(preset, args.overrides + overrides)
            for area in areas:
                size = output_size(*ref_u8.shape[:2], area)
                outputs = []
                for seed in args.seeds:
                    started = time.perf_counter()
                    job = jobs.prepare(image, config, size=size)
                    result = jobs.run(job, seed=seed)
                    seconds = time.perf_counter() - started
                    out = _hwc(jobs.to_pixels(result.decoded if result.decoded is not None else result.image))
                    row = measure(out, ref_u8)
                    fog = row.pop("_fog")
                    row.update(photo=name, preset=label, area=area, size=list(out.shape[:2]), seed=seed,
                               seconds=seconds, reference_repetition=ref_usage.repetition)
                    results.append(row)
                    outputs.append(out)
                    if seed == args.seeds[0]:
                        sheet_rows.append((f"{label} x{area:g}", out, fog))
                    print(f"  {label:<10} x{area:<4g} seed {seed}  {out.shape[1]}x{out.shape[0]}  {seconds:6.1f} s  "
                          f"detail {row['detail']:.3f}  fog {row['fog_fraction']:.3f}  "
                          f"top1% {row['top1_share']:.3f}  cov {row['coverage']:.3f}  rep {row['repetition']:.3f}  "
                          f"swd {row['patch_swd']:.4f}  copy {row['largest_copy_share']:.3f}", flush=True)
                if len(outputs) > 1:
                    diversity = metrics.pixel_diversity(outputs, ref_u8)
                    for row in results[-len(outputs):]:
                        row["diversity"] = diversity
                    print(f"  {label:<10} x{area:<4g} diversity {diversity:.3f}", flush=True)
        contact_sheet(out_dir / f"{name}.jpg", ref_u8, sheet_rows)
        print(f"  contact sheet: rows = reference, {', '.join(label for label, _, _ in sheet_rows)}", flush=True)
    summary = {}
    for row in results:
        key = f"{row['preset']} x{row['area']:g}"
        summary.setdefault(key, []).append(row)
    print(f"\n{'run':<44} {'detail':>7} {'fog':>6} {'top1%':>6} {'cov':>6} {'rep':>6} {'swd':>7} {'copy':>6} {'div':>6} {'s':>7}")
    table = {}
    for key, rows in summary.items():
        mean = {m: float(np.mean([r[m] for r in rows if m in r])) if any(m in r for r in rows) else float("nan")
                for m in ("detail", "fog_fraction", "top1_share", "coverage", "repetition", "patch_swd",
                          "largest_copy_share", "diversity", "seconds")}
        table[key] = mean
        print(f"{key:<44} {mean['detail']:7.3f} {mean['fog_fraction']:6.3f} {mean['top1_share']:6.3f} "
              f"{mean['coverage']:6.3f} {mean['repetition']:6.3f} {mean['patch_swd']:7.4f} "
              f"{mean['largest_copy_share']:6.3f} {mean['diversity']:6.3f} {mean['seconds']:7.1f}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "detail.json").write_text(json.dumps(
        {"machine": platform.platform(), "nproc": os.cpu_count(), "args": vars(args) | {"photo": [str(p) for p in args.photo]},
         "summary": table, "rows": results}, indent=1, default=str))
    print(f"wrote {out_dir}")


if __name__ == "__main__":
    main()
