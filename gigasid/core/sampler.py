"""The coarse-to-fine sampler (DESIGN.md §2), in memory.

Every output scale runs its own full T-step trajectory from noise, coarsest first. On every scale
but the coarsest, after each denoiser call except the one of the last step, the clean estimate is
Laplacian-blended with the finished coarser scale. The applications are options of this one loop:

* retarget: the output pyramid differs from the reference's; the coarsest scale is not sampled
  but given (the reference's coarsest level resized to the output's coarsest shape);
* symmetric: x_hat is mirrored (averaged with its flip) after every denoiser call, so the last
  estimate — the output — mirrors exactly;
* tileable: periodic denoisers and periodic resampling, so the output wraps with no seam.

Noise comes from :func:`gigasid.core.noise.gaussian_noise` keyed by (seed, scale, step): step 0
keys the starting noise x_T (no step lands on index 0 with fresh noise), step t the fresh noise of
the update from t.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from gigasid.core.noise import gaussian_noise
from gigasid.core.noise_schedule import epsilon_from_x_hat, step
from gigasid.core.pyramid import laplacian_blend

Symmetry = Literal["none", "horizontal", "vertical", "both"]
Denoise = Callable[..., torch.Tensor]  # (x_t, alpha, sigma, *, step) -> x_hat


@dataclass
class ScaleTiming:
    """Wall time of one finished scale."""

    scale: int
    shape: tuple[int, int]
    seconds: float


@dataclass
class SampleResult:
    """The finished scales, finest first (index = scale), and per-scale timings."""

    scales: list[torch.Tensor]
    timings: list[ScaleTiming] = field(default_factory=list)
    #: x_1 of the finest scale, the input of the last denoiser call (``keep_last_input``)
    last_input: torch.Tensor | None = None
    #: the pixel image, when the scales are latents a decoder turned into pixels
    decoded: torch.Tensor | None = None

    @property
    def image(self) -> torch.Tensor:
        """The output: the decoded pixels of a latent job, else the finest scale."""
        return self.decoded if self.decoded is not None else self.scales[0]


def mirror(x_hat: torch.Tensor, symmetry: Symmetry) -> torch.Tensor:
    """Average with the flip(s): bit-exactly symmetric, since a + b == b + a in floating point."""
    if symmetry in ("horizontal", "both"):
        x_hat = 0.5 * (x_hat + x_hat.flip(-1))
    if symmetry in ("vertical", "both"):
        x_hat = 0.5 * (x_hat + x_hat.flip(-2))
    return x_hat


def sample(
    denoisers: Sequence[Denoise],
    shapes: Sequence[tuple[int, int]],
    *,
    channels: int,
    alphas: torch.Tensor,
    sigmas: torch.Tensor,
    eta: float,
    seed: int,
    symmetry: Symmetry = "none",
    periodic: bool = False,
    fixed_coarsest: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    on_scale: Callable[[ScaleTiming], None] | None = None,
    keep_last_input: bool = False,
) -> SampleResult:
    """Sample one image; ``denoisers[s]`` and ``shapes[s]`` are scale s, 0 the finest. With
    ``keep_last_input`` the result also holds x_1 of the finest scale (for decoders that need the
    last step's matches)."""
    last_input = None
    num_scales = len(shapes)
    num_steps = len(alphas) - 1
    finished: list[torch.Tensor | None] = [None] * num_scales
    timings: list[ScaleTiming] = []
    for scale in reversed(range(num_scales)):
        started = time.perf_counter()
        height, width = shapes[scale]
        coarsest = scale == num_scales - 1
        if coarsest and fixed_coarsest is not None:
            finished[scale] = fixed_coarsest.to(device=device, dtype=torch.float32)
        else:
            box = (0, 0, height, width)
            x_t = float(sigmas[-1]) * gaussian_noise(seed, scale, 0, channels, box, device=device)
            for t in range(num_steps, 0, -1):
                alpha, sigma = float(alphas[t]), float(sigmas[t])
                if keep_last_input and scale == 0 and t == 1:
                    last_input = x_t
                x_hat = denoisers[scale](x_t, alpha, sigma, step=t)
                x_hat = mirror(x_hat, symmetry)
                # ε̂ comes from the unblended estimate (paper Eq. 5 uses the denoiser's output)
                eps_hat = epsilon_from_x_hat(x_t, x_hat, alpha, sigma)
                if not coarsest and t != 1:
                    x_hat = laplacian_blend(x_hat, finished[scale + 1], periodic=periodic)
                alpha_to, sigma_to = float(alphas[t - 1]), float(sigmas[t - 1])
                fresh = None
                if eta > 0.0 and sigma_to > 0.0:
                    fresh = gaussian_noise(seed, scale, t, channels, box, device=device)
                x_t = step(x_hat, eps_hat, alpha_to=alpha_to, sigma_to=sigma_to, eta=eta, noise=fresh)
            finished[scale] = x_t
        timing = ScaleTiming(scale, (height, width), time.perf_counter() - started)
        timings.append(timing)
        if on_scale is not None:
            on_scale(timing)
    return SampleResult([s for s in finished if s is not None], timings, last_input)
