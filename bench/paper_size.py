"""Benchmark: one sample at the paper's 186×248 size, knn vs exact (paper defaults otherwise).

For each backend, ``--seeds`` samples are drawn, each in its own process so that peak RSS is that
sample's alone; wall and CPU seconds are the median over the first ``--runs`` of them, patch-SWD
is the mean over all samples and diversity is measured across them. Also times the whole
``gigasid generate`` command (start-up included) for the first backend, the median of ``--runs``
for knn. Prints a table and writes JSON. Run: ``python bench/paper_size.py [--backends knn exact]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def worker(image: str, backend: str, seed: int, out: str, overrides: list[str]) -> None:
    """One sample in this process; prints a JSON line with its costs."""
    # gigasid first, as the CLI does: it chooses the OpenMP wait policy before torch loads
    from gigasid import jobs  # noqa: I001

    import numpy as np
    import torch

    from gigasid.config import load_pipeline
    from gigasid.io.images import read_image

    preset = "uncond" if backend == "knn" else "uncond-exact"
    sets = list(overrides)
    if backend == "fused":
        sets.append("denoiser.backend=fused")
    config = load_pipeline(preset, sets)
    pixels = read_image(image)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    reference = torch.from_numpy(pixels).permute(2, 0, 1).contiguous() * 2.0 - 1.0
    job = jobs.prepare(reference, config)
    result = jobs.run(job, seed=seed)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    np.save(out, ((result.image.clamp(-1, 1) + 1) * 0.5).permute(1, 2, 0).numpy())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_mb": rss_mb}))


def machine_speed() -> dict:
    """How fast this (shared, virtual) machine runs right now: a fixed pure-Python loop and a
    2-thread fp32 / bf16 matmul. Timings taken while these are off their usual values (issue 2:
    ~156 and ~322 GFLOP/s) are inflated by the host, not by gigasid."""
    import torch

    started = time.perf_counter()
    total = 0
    for i in range(2_000_000):
        total += i
    loop_ns = (time.perf_counter() - started) / 2_000_000 * 1e9
    speeds = {"python_loop_ns": round(loop_ns, 1)}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(2048, 2048).to(dtype)
        a @ a
        started = time.perf_counter()
        for _ in range(5):
            a @ a
        seconds = (time.perf_counter() - started) / 5
        speeds[f"{name}_matmul_gflops"] = round(2 * 2048**3 / seconds / 1e9, 1)
    return speeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(ROOT / "examples" / "rocket.png"))
    parser.add_argument("--backends", nargs="+", default=["knn", "exact"])
    parser.add_argument("--runs", type=int, default=3, help="timed runs (median)")
    parser.add_argument("--seeds", type=int, default=4, help="samples for SWD and diversity (>= runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "paper_size.json"))
    parser.add_argument("--worker", nargs=4, metavar=("IMAGE", "BACKEND", "SEED", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        image, backend, seed, out = args.worker
        worker(image, backend, int(seed), out, args.overrides)
        return

    import numpy as np

    from gigasid.io.images import read_image
    from gigasid.metrics import patch_swd, pixel_diversity

    reference = read_image(args.image)
    speed_before = machine_speed()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            costs, samples = [], []
            for seed in range(max(args.seeds, args.runs)):
                out = f"{tmp}/{backend}_{seed}.npy"
                extra = [f"--set={o}" for o in args.overrides]
                cmd = [sys.executable, __file__, *extra, "--worker", args.image, backend, str(seed), out]
                line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
                costs.append(json.loads(line))
                samples.append(np.load(out))
                print(f"  {backend} seed {seed}: {costs[-1]['wall_s']:.2f} s", file=sys.stderr)
            timed = costs[: args.runs]
            swd = [patch_swd(s, reference) for s in samples]
            rows.append(
                {
                    "backend": backend,
                    "wall_s": statistics.median(c["wall_s"] for c in timed),
                    "cpu_s": statistics.median(c["cpu_s"] for c in timed),
                    "peak_rss_mb": max(c["peak_rss_mb"] for c in costs),
                    "patch_swd": float(np.mean(swd)),
                    "diversity": pixel_diversity(samples, reference) if len(samples) > 1 else None,
                    "runs": timed,
                }
            )
        first = args.backends[0]
        preset = "uncond" if first == "knn" else "uncond-exact"
        cli_runs = []
        for _ in range(args.runs if first == "knn" else 1):  # an exact command takes minutes: once
            started = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "gigasid.cli", "generate", args.image, "-o", f"{tmp}/cli.png",
                 "--pipeline", preset],
                check=True, capture_output=True,
            )
            cli_runs.append(time.perf_counter() - started)
        cli = statistics.median(cli_runs)

    print(f"\npaper size 186x248 ({Path(args.image).name}), {platform.processor() or platform.machine()}, "
          f"median of {args.runs} runs")
    print(f"{'backend':<8} {'wall s':>8} {'cpu s':>8} {'peak RSS MB':>12} {'patch-SWD':>10} {'diversity':>10}")
    for row in rows:
        div = f"{row['diversity']:.3f}" if row["diversity"] is not None else "-"
        print(f"{row['backend']:<8} {row['wall_s']:>8.2f} {row['cpu_s']:>8.2f} {row['peak_rss_mb']:>12.0f} "
              f"{row['patch_swd']:>10.4f} {div:>10}")
    runs = " / ".join(f"{c:.2f}" for c in cli_runs)
    print(f"whole `gigasid generate` command ({first}), start-up included: {cli:.2f} s (median of {runs})")
    speed_after = machine_speed()
    print(f"machine speed before / after: {speed_before} / {speed_after}")
    result = {"image": args.image, "overrides": args.overrides, "rows": rows, "cli_wall_s": cli, "cli_runs": cli_runs,
              "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform(),
                          "speed_before": speed_before, "speed_after": speed_after}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
