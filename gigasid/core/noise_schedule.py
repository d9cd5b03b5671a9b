"""Noise schedules as plain arrays, and the sampler step of paper Eq. 5.

A schedule is a pair of 1-D float64 tensors ``(alphas, sigmas)`` of length T + 1 indexed by the
step t: ``x_t = alpha_t * y + sigma_t * eps``. Index 0 is the terminal (alpha, sigma) = (1, 0),
where the denoiser is never called; indices 1..T are the evaluation points, T the noisiest. The
step draws no randomness itself: its fresh noise is an argument, so the caller decides where noise
comes from (a global, position-keyed generator in the tiled engine).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

NoiseScheduleName = Literal["flow_linear", "ve_edm"]


def flow_linear(num_steps: int, *, sigma_min: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t = linspace(1 - sigma_min, 0, T), sigma_t = 1 - alpha_t (rectified-flow schedule)."""
    alphas = torch.linspace(1.0 - sigma_min, 0.0, num_steps, dtype=torch.float64)
    return _with_terminal(alphas, 1.0 - alphas)


def ve_edm(
    num_steps: int, *, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Variance exploding (Karras et al. 2022): alpha = 1, sigmas rho-spaced in [sigma_min, sigma_max]."""
    ramp = torch.linspace(0.0, 1.0, num_steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    sigmas = (lo + ramp * (hi - lo)) ** rho  # ascending: index 1 is the least noisy
    return _with_terminal(torch.ones(num_steps, dtype=torch.float64), sigmas)


def _with_terminal(alphas: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    one = torch.ones(1, dtype=torch.float64)
    return torch.cat([one, alphas]), torch.cat([one * 0.0, sigmas])


NOISE_SCHEDULES: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "flow_linear": flow_linear,
    "ve_edm": ve_edm,
}


def make_noise_schedule(name: str, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (alphas, sigmas) of a registered schedule; an unknown name lists the valid ones."""
    if name not in NOISE_SCHEDULES:
        raise ValueError(f"unknown noise schedule {name!r}; valid: {', '.join(NOISE_SCHEDULES)}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return NOISE_SCHEDULES[name](num_steps)


def epsilon_from_x_hat(x_t: torch.Tensor, x_hat: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """The noise implied by a clean estimate: invert x_t = alpha x_hat + sigma eps (sigma > 0)."""
    return (x_t - alpha * x_hat) / sigma


def step(
    x_hat: torch.Tensor,
    eps_hat: torch.Tensor,
    *,
    alpha_to: float,
    sigma_to: float,
    eta: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Paper Eq. 5: x_{t-1} = a' x_hat + sqrt(s'^2 - (eta s')^2) eps_hat + eta s' z.

    eta = 0 is deterministic DDIM (``noise`` may be None); eta = 1 re-noises from scratch. Landing
    on the terminal (sigma_to = 0) returns x_hat itself.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    if sigma_to == 0.0:
        return x_hat
    fresh = eta * sigma_to
    kept = (sigma_to**2 - fresh**2) ** 0.5
    out = alpha_to * x_hat + kept * eps_hat
    if fresh > 0.0:
        if noise is None:
            raise ValueError("eta > 0 needs fresh noise")
        out = out + fresh * noise
    return out
