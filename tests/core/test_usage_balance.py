"""Usage balancing (``core.usage_balance``): the re-weighted softmax against its definition."""

from __future__ import annotations

import numpy as np
import torch

from gigasid.core.usage_balance import UsageBalance, balance_weights


def _weights(queries: int, k: int, patches: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    candidates = torch.stack([torch.randperm(patches, generator=generator)[:k] for _ in range(queries)])
    weights = torch.softmax(torch.randn(queries, k, generator=generator) * 3.0, dim=1)
    return weights, candidates


def _usage(weights: torch.Tensor, candidates: torch.Tensor, patches: int) -> np.ndarray:
    return np.bincount(candidates.numpy().ravel(), weights=weights.double().numpy().ravel(), minlength=patches)


def test_one_round_equals_its_definition() -> None:
    """w'(q, j) ∝ w(q, j) · max(1, u_j / target)^(−strength), u_j = Σ_q w(q, j), target = Q / N."""
    weights, candidates = _weights(40, 4, 10)
    strength = 1.5
    usage = _usage(weights, candidates, 10)
    target = 40 / 10
    factor = np.maximum(usage / target, 1.0) ** -strength
    expected = weights.double().numpy() * factor[candidates.numpy()]
    expected /= expected.sum(1, keepdims=True)
    got = balance_weights(weights, candidates, 10, UsageBalance(strength, 1))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)


def test_balancing_spreads_usage_and_keeps_rows_normalised() -> None:
    # every query prefers patch 0 strongly; its second choice is spread over the others
    queries, k, patches = 60, 3, 20
    weights, candidates = _weights(queries, k, patches)
    candidates[:, 0] = 0
    candidates[:, 1:] = torch.stack([torch.tensor([1 + q % 19, 1 + (q + 7) % 19]) for q in range(queries)])
    weights = torch.softmax(torch.tensor([[4.0, 0.0, 0.0]]).expand(queries, k), dim=1)
    before = _usage(weights, candidates, patches)
    after_w = balance_weights(weights, candidates, patches, UsageBalance(1.0, 3))
    after = _usage(after_w, candidates, patches)
    assert after[0] < 0.5 * before[0]  # the over-used patch gives way
    assert after.max() < before.max()
    np.testing.assert_allclose(after_w.sum(1).numpy(), 1.0, atol=1e-6)


def test_no_strength_and_missing_candidates() -> None:
    weights, candidates = _weights(30, 5, 12, seed=1)
    # strength 0 is the paper's weights
    same = balance_weights(weights, candidates, 12, UsageBalance(0.0, 3))
    np.testing.assert_allclose(same.numpy(), weights.numpy(), atol=1e-7)
    # a missing candidate (−1, weight 0) stays at 0; a row with none keeps its (zero) weights
    candidates[:, -1] = -1
    weights[:, -1] = 0.0
    weights = weights / weights.sum(1, keepdim=True)
    candidates[0] = -1
    weights[0] = 0.0
    got = balance_weights(weights, candidates, 12, UsageBalance(2.0, 4))
    assert torch.all(got[:, -1] == 0.0) and torch.all(got[0] == 0.0)
    np.testing.assert_allclose(got[1:].sum(1).numpy(), 1.0, atol=1e-6)
    # deterministic
    assert torch.equal(got, balance_weights(weights, candidates, 12, UsageBalance(2.0, 4)))


def test_under_used_patches_are_not_pushed() -> None:
    """Only over-use is discounted: when nothing is used more than its share, nothing changes."""
    queries, patches = 10, 40  # target = max(1, 10 / 40) = 1 use per patch
    candidates = torch.arange(queries * 2).view(queries, 2)  # every patch offered once
    weights = torch.softmax(torch.randn(queries, 2, generator=torch.Generator().manual_seed(3)), dim=1)
    got = balance_weights(weights, candidates, patches, UsageBalance(3.0, 3))
    np.testing.assert_allclose(got.numpy(), weights.numpy(), atol=1e-7)



def test_slack_lets_a_patch_be_used_more_than_its_share() -> None:
    weights, candidates = _weights(60, 3, 10, seed=2)  # target 6 uses a patch
    usage = _usage(weights, candidates, 10)
    slack = float(usage.max() / 6.0) + 0.01  # above every patch's usage: nothing to discount
    same = balance_weights(weights, candidates, 10, UsageBalance(2.0, 3, slack=slack))
    np.testing.assert_allclose(same.numpy(), weights.numpy(), atol=1e-7)
    assert not torch.allclose(balance_weights(weights, candidates, 10, UsageBalance(2.0, 3)), weights)


def test_keep_averages_the_best_candidates_after_the_discount() -> None:
    """``keep``: with nothing over-used the weights are the softmax over each query's best
    ``keep`` candidates (what a search for ``keep`` neighbours gives); an over-used best candidate
    is swapped out for the next one."""
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4)
    candidates = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]])
    weights = torch.softmax(logits, dim=1)
    got = balance_weights(weights, candidates, 16, UsageBalance(1.0, 2, keep=2))
    expected = torch.softmax(logits[:, :2], dim=1)
    np.testing.assert_allclose(got[:, :2].numpy(), expected.numpy(), rtol=1e-6)
    assert torch.all(got[:, 2:] == 0.0)
    # now every query's best candidate is patch 0: 4 uses against a share of 1
    crowded = candidates.clone()
    crowded[:, 0] = 0
    got = balance_weights(weights, crowded, 16, UsageBalance(3.0, 3, keep=2))
    assert float(got[:, 0].max()) < float(expected[0, 0]) and torch.all(got[:, 2] > 0.0)

