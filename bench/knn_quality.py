"""Benchmark: how close is the knn image denoiser to the exact one, and what coherence buys.

On one reference scale (default: the 93×124 level of examples/rocket.png, where the exact
denoiser is affordable) a fixed noisy trajectory x_t = alpha_t·z + sigma_t·eps is denoised at every
step of the T=10 flow_linear schedule, z being the reference mirrored and rolled (the same patch
statistics, another layout). Each candidate configuration is measured against the exact
denoiser (float32): RMSE of x_hat relative to the exact x_hat's deviation from its mean, the
recall of the exact top-k (raw-patch distances), and the seconds the candidate search took.
Prints a table, writes JSON. Run: ``python bench/knn_quality.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gigasid.core.denoisers import ExactDenoiser, KnnDenoiser
from gigasid.core.image_denoiser import ImageDenoiser
from gigasid.core.noise import gaussian_noise
from gigasid.core.noise_schedule import flow_linear
from gigasid.core.patches import grid_shape, unfold_rows
from gigasid.core.pyramid import resample
from gigasid.index.candidates import ReferenceCandidates
from gigasid.io.images import read_image

ROOT = Path(__file__).resolve().parent.parent

CONFIGS = {
    "exact top-k (raw)": dict(index="exact", search_dims=0),
    "ivf": dict(index="ivf"),
    "ivf + neighbours": dict(index="ivf", coherence="neighbours"),
    "ivf + previous": dict(index="ivf", coherence="previous"),
    "ivf + both": dict(index="ivf", coherence="both"),
    "ivf stride 2": dict(index="ivf", search_stride=2),
    "ivf stride 2 + both": dict(index="ivf", search_stride=2, coherence="both"),
    "ivf stride 3": dict(index="ivf", search_stride=3),
    "ivf stride 2, 16 dims": dict(index="ivf", search_stride=2, search_dims=16),
    "ivf stride 2, 24 dims": dict(index="ivf", search_stride=2, search_dims=24),
    "ivf stride 2, nprobe 2": dict(index="ivf", search_stride=2, nprobe=2),
    "flat (pca)": dict(index="flat"),
}


class _Timed:
    def __init__(self, source):
        self.source, self.seconds, self.last = source, 0.0, None

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        self.last = self.source(*args, **kwargs)
        self.seconds += time.perf_counter() - started
        return self.last


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "examples" / "rocket.png"))
    parser.add_argument("--shape", default="93x124", help="reference scale HxW the image is resized to")
    parser.add_argument("--patch-size", type=int, default=15)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these configs (names as printed)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "knn_quality.json"))
    args = parser.parse_args()

    height, width = map(int, args.shape.split("x"))
    size = args.patch_size
    image = torch.from_numpy(read_image(args.image)).permute(2, 0, 1).contiguous() * 2 - 1
    reference = resample(image, (height, width))
    layout = torch.roll(reference.flip(-1), shifts=(height // 3, width // 4), dims=(1, 2))
    alphas, sigmas = flow_linear(10)
    steps = list(range(10, 0, -1))
    trajectory = {
        t: float(alphas[t]) * layout + float(sigmas[t]) * gaussian_noise(7, 0, t, 3, (0, 0, height, width))
        for t in steps
    }
    grid_h, _ = grid_shape(height, width, size)
    dataset = unfold_rows(reference.contiguous(), size, 0, grid_h)
    exact = ImageDenoiser(ExactDenoiser(dataset, compute_dtype=torch.float32), patch_size=size, rho=0.2)
    truth, exact_topk = {}, {}
    for t in steps:
        truth[t] = exact(trajectory[t], float(alphas[t]), float(sigmas[t]), step=t)
        if alphas[t] > 0:
            queries = unfold_rows((trajectory[t] / float(alphas[t])).contiguous(), size, 0, grid_h)
            norms = dataset.pow(2).sum(1)
            exact_topk[t] = torch.cat(
                [(norms - 2 * q @ dataset.T).topk(args.k, largest=False).indices for q in queries.split(1024)]
            )
    rows = []
    knn = KnnDenoiser(reference, size)
    for name, options in CONFIGS.items():
        if args.only and name not in args.only:
            continue
        source = _Timed(ReferenceCandidates(reference, size, k=args.k, **options))
        denoiser = ImageDenoiser(knn, patch_size=size, rho=0.2, candidate_source=source)
        errors, recalls = [], []
        for t in steps:
            x_hat = denoiser(trajectory[t], float(alphas[t]), float(sigmas[t]), step=t)
            spread = (truth[t] - truth[t].mean()).pow(2).mean().sqrt()
            errors.append(float((x_hat - truth[t]).pow(2).mean().sqrt() / spread))
            if t in exact_topk:
                hits = (source.last[:, :, None] == exact_topk[t][:, None, :]).any(2).float().mean()
                recalls.append(float(hits))
        rows.append(
            {
                "config": name,
                "options": options,
                "rel_rmse_per_step": errors,
                "rel_rmse_mean": sum(errors) / len(errors),
                "rel_rmse_last": errors[-1],
                "recall_mean": sum(recalls) / len(recalls),
                "search_s": source.seconds,
            }
        )
    print(f"knn vs exact image denoiser, {Path(args.image).name} at {height}x{width}, P={size}, k={args.k}")
    print(f"{'config':<22} {'rel RMSE mean':>14} {'rel RMSE t=1':>13} {'recall@k':>9} {'search s':>9}")
    for row in rows:
        print(f"{row['config']:<22} {row['rel_rmse_mean']:>14.4f} {row['rel_rmse_last']:>13.4f} "
              f"{row['recall_mean']:>9.3f} {row['search_s']:>9.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"image": args.image, "shape": [height, width], "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
