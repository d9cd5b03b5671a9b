"""Usage balancing: the closed-form denoiser's weights re-weighted so that no reference patch is
drawn on by far more of the output than its share.

Why: a large output sampled from a small coarsest level has only a few hundred reference patches
to lay out its whole composition, and the deterministic sampler lets the ones that can border
themselves (a leaf's interior, gravel) take over: one texture repeated over most of the canvas.
The paper's denoiser (its softmax over candidates, Eq. 5) is the posterior mean under a uniform
prior over the reference patches. Here that prior is replaced, for one denoiser call over a whole
image, by one that discounts the patches the call itself over-uses: the usage of patch j is the
sum of its weights over all queries; the target is every patch used equally (queries / patches,
at least 1, times a slack); a patch used u times its target has its weights multiplied by
u^(−strength), and each query then averages only its best few (as many as a plain search keeps).
A few rounds of this (a Sinkhorn-style balancing that only ever lowers over-used columns) spread
the layout over the reference without forcing every patch in: under-used patches are not pushed.

Global over the queries, so it runs on a whole image at once: the engine applies it only where a
scale is one tile (the coarsest scale, where the layout is decided). Pure torch/numpy, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class UsageBalance:
    """``strength``: the exponent of the discount (0 = the paper's weights); ``rounds``: how many
    times the usage is measured and discounted; ``slack``: how many times its share a patch may
    be drawn on before it is discounted; ``keep``: each query averages only its ``keep`` best
    candidates after the discount (None: all of them), so where nothing is over-used the weights
    are those of a search for ``keep`` neighbours, and balancing only swaps over-used patches out."""

    strength: float
    rounds: int
    slack: float = 1.0
    keep: int | None = None


def balance_weights(weights: torch.Tensor, candidates: torch.Tensor, num_patches: int, balance: UsageBalance) -> torch.Tensor:
    """(Q, k) softmax weights of Q queries over their candidate positions (indices of the
    reference's ``num_patches`` patches; −1: none, weight 0) re-weighted as the module docstring
    says; rows still sum to 1. Deterministic: sums in float64, in a fixed order."""
    base = weights.to(torch.float64).numpy()
    slots = candidates.numpy()
    valid = slots >= 0
    flat = np.where(valid, slots, 0).ravel()
    # every patch drawn on equally (at least once), with ``slack`` times that allowed
    target = balance.slack * max(1.0, weights.shape[0] / max(1, num_patches))
    log_prior = np.zeros(num_patches, dtype=np.float64)
    current = _reweighted(base, log_prior[flat].reshape(slots.shape), valid, balance.keep)
    for _ in range(balance.rounds):
        usage = np.bincount(flat, weights=np.where(valid, current, 0.0).ravel(), minlength=num_patches)
        log_prior -= balance.strength * np.log(np.maximum(usage / target, 1.0))
        current = _reweighted(base, log_prior[flat].reshape(slots.shape), valid, balance.keep)
    return torch.from_numpy(current.astype(np.float32))


def _reweighted(base: np.ndarray, log_prior: np.ndarray, valid: np.ndarray, keep: int | None) -> np.ndarray:
    """base · exp(log_prior) per row, only its ``keep`` largest entries, renormalised; a row the
    prior empties keeps its weights."""
    # shifted by each row's largest log prior: exp never underflows to all zeros where a row has weight
    shifted = np.where(valid, log_prior, -np.inf)
    top = np.max(shifted, axis=1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    scaled = base * np.exp(np.where(valid, log_prior - top, -np.inf))
    if keep is not None and keep < scaled.shape[1]:
        # stable sort: ties keep the candidates' order, so the result does not depend on the sort
        order = np.argsort(-scaled, axis=1, kind="stable")
        dropped = np.ones_like(valid)
        np.put_along_axis(dropped, order[:, :keep], False, axis=1)
        scaled = np.where(dropped, 0.0, scaled)
    total = scaled.sum(axis=1, keepdims=True)
    return np.where(total > 0.0, scaled / np.where(total > 0.0, total, 1.0), base)
