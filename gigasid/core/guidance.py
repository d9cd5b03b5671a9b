"""Gradient guidance of the clean estimate: the paper's text-guided style update and the augmented
views a CLIP model scores.

The paper ("Loss & Training") steers sampling toward a text prompt by moving each step's clean
estimate along the gradient of a CLIP score, with momentum over steps:

    x̂_{t,CLIP} ← γ ∇_{x̂} L_CLIP + λ x̂_t + (1 − λ) x̂_{t+1,CLIP}.

:func:`guided_estimate` is that update as the paper's code applies it: the gradient is taken at the
momentum blend, only the ``fill`` fraction of pixels where it is strongest move (soft-thresholded
at the cut, so the step grows from zero there), and its length is γ times the ratio of the
image's magnitude to the gradient's over those pixels, so one γ serves every image and step.
:func:`augmented_views` makes the views the score averages over (a whole view and random crops,
each flipped, turned and shifted a little, its colours jittered), differentiable and drawn from a
``torch.Generator``: the same seed gives the same views.

Pure torch. What it is not: the CLIP model (``gigasid.guidance`` loads one and turns views into a
score) or the sampling loop (``plan.style_trip``, stepped by ``graph.engine.run_style``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["augmented_views", "guided_estimate"]


def guided_estimate(
    x_hat: torch.Tensor,
    previous: torch.Tensor | None,
    score: Callable[[torch.Tensor], torch.Tensor],
    *,
    strength: float,
    momentum: float,
    fill: float,
) -> torch.Tensor:
    """The guided clean estimate of one step, (C, H, W) in [-1, 1].

    ``x_hat`` is the denoiser's estimate, ``previous`` the last step's guided one (None on the
    first step), ``score`` a scalar to increase (the prompt's CLIP similarity), ``strength`` γ at
    this step, ``momentum`` λ and ``fill`` the fraction of pixels guided."""
    blended = x_hat if previous is None else momentum * x_hat + (1.0 - momentum) * previous
    point = blended.detach().clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(score(point), point)
    energy = gradient.norm(dim=0)  # (H, W): how much the score wants each pixel to move
    flat = energy.flatten()
    still = min(flat.numel() - 1, round((1.0 - fill) * flat.numel()))  # pixels left alone
    cut = flat.kthvalue(still).values if still > 0 else flat.new_zeros(())
    kept = (energy > cut).to(gradient.dtype)
    # the direction of the gradient, its length shrunk by the cut: a soft threshold
    shrunk = gradient * ((energy - cut).clamp_min(0.0) / energy.clamp_min(torch.finfo(energy.dtype).tiny))
    size = torch.linalg.vector_norm(blended.detach() * kept)
    length = torch.linalg.vector_norm(shrunk * kept)
    if float(length) == 0.0:  # a flat score: nothing to follow
        return blended.detach().clamp(-1.0, 1.0)
    return (blended.detach() + strength * (size / length) * shrunk * kept).clamp(-1.0, 1.0)


def augmented_views(
    image: torch.Tensor,
    count: int,
    side: int,
    generator: torch.Generator,
    *,
    crop: tuple[float, float] = (0.6, 1.0),
    turn_degrees: float = 15.0,
    shift: float = 0.1,
    jitter: float = 0.1,
    gray: float = 0.15,
) -> torch.Tensor:
    """``count`` views of ``image`` ((C, H, W) in [0, 1], C = 3), each ``side`` x ``side``:
    (count, 3, side, side), differentiable in ``image``.

    The first view is the whole image; the others are crops of a random ``crop`` fraction of each
    side at a random place. Each is mirrored with probability 1/2, turned by up to
    ``turn_degrees`` and shifted by up to ``shift`` of its side with probability 0.8 (one
    bilinear resampling does crop, mirror, turn and shift), its brightness, contrast and
    saturation scaled by up to ±``jitter`` with probability 0.7, and made gray with probability
    ``gray``. Every random number comes from ``generator``."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"views are made of a (3, H, W) image, got {tuple(image.shape)}")

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand((), generator=generator))

    def chance(p: float) -> bool:
        return float(torch.rand((), generator=generator)) < p

    thetas = []
    for index in range(count):
        # crop: the view's [-1, 1] square maps onto a box of the image's [-1, 1] coordinates
        fraction_y, fraction_x = (1.0, 1.0) if index == 0 else (uniform(*crop), uniform(*crop))
        centre_y = 0.0 if index == 0 else uniform(fraction_y - 1.0, 1.0 - fraction_y)
        centre_x = 0.0 if index == 0 else uniform(fraction_x - 1.0, 1.0 - fraction_x)
        mirror = -1.0 if chance(0.5) else 1.0
        angle, move_y, move_x = 0.0, 0.0, 0.0
        if chance(0.8):
            angle = math.radians(uniform(-turn_degrees, turn_degrees))
            move_y, move_x = uniform(-shift, shift) * 2.0, uniform(-shift, shift) * 2.0
        cos, sin = math.cos(angle), math.sin(angle)
        # (x, y) of the view → rotated and shifted → mirrored → scaled into the crop box
        thetas.append([
            [fraction_x * mirror * cos, -fraction_x * mirror * sin, fraction_x * mirror * move_x + centre_x],
            [fraction_y * sin, fraction_y * cos, fraction_y * move_y + centre_y],
        ])
    theta = torch.tensor(thetas, dtype=image.dtype, device=image.device)
    grid = F.affine_grid(theta, [count, 3, side, side], align_corners=False)
    views = F.grid_sample(image.unsqueeze(0).expand(count, -1, -1, -1), grid, mode="bilinear",
                          padding_mode="border", align_corners=False)
    out = []
    for view in views:
        if chance(0.7):
            view = view * uniform(1.0 - jitter, 1.0 + jitter)
            mean = view.mean()
            view = mean + (view - mean) * uniform(1.0 - jitter, 1.0 + jitter)
            luma = _luma(view)
            view = luma + (view - luma) * uniform(1.0 - jitter, 1.0 + jitter)
        if chance(gray):
            view = _luma(view).expand(3, -1, -1)
        out.append(view.clamp(0.0, 1.0))
    return torch.stack(out)


def _luma(view: torch.Tensor) -> torch.Tensor:
    """(1, H, W): the ITU-R BT.601 luma of an RGB view."""
    return (0.299 * view[0] + 0.587 * view[1] + 0.114 * view[2]).unsqueeze(0)
