"""The closed-form patch denoisers against a float64 brute-force posterior mean, and each other.

The oracle is the paper's Eq. 2 written the slow, obvious way: explicit squared distances to
every dataset row, ``torch.softmax``, weighted sum, all in float64. Every backend must agree
with it (the dense ones on a dataset matrix, ``knn`` on candidates read from a reference image).
"""

from __future__ import annotations

import pytest
import torch

from gigasid.core.denoisers import ExactDenoiser, FusedDenoiser, KnnDenoiser
from gigasid.core.patches import gather_patches, grid_shape, unfold_rows

# (alpha, sigma) pairs from the flow_linear schedule's range, including its least noisy
# evaluation point (sigma = 1e-4) where the softmax is a hard argmax.
LEVELS = [(0.9999, 1e-4), (0.999, 3e-3), (0.99, 0.02), (0.9, 0.1), (0.5, 0.5), (0.1, 0.9)]


def brute_posterior_mean(x: torch.Tensor, dataset: torch.Tensor, alpha: float, sigma: float) -> torch.Tensor:
    """Σ_j softmax_j(-‖x - alpha y_j‖² / (2 sigma²)) y_j in float64, distances written out."""
    x64, y64 = x.to(torch.float64), dataset.to(torch.float64)
    dist = ((x64[:, None, :] - alpha * y64[None, :, :]) ** 2).sum(-1)
    weights = torch.softmax(-dist / (2.0 * sigma * sigma), dim=1)
    return weights @ y64


def _dataset(n: int = 300, d: int = 27, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=generator, dtype=torch.float64) * 2 - 1


def _queries(dataset: torch.Tensor, alpha: float, sigma: float, seed: int = 1) -> torch.Tensor:
    """Noisy dataset rows (what the sampler sees: x = alpha y + sigma eps) plus off-manifold ones."""
    generator = torch.Generator().manual_seed(seed)
    n, d = dataset.shape
    picks = torch.randint(0, n, (48,), generator=generator)
    noisy = alpha * dataset[picks] + sigma * torch.randn(48, d, generator=generator, dtype=dataset.dtype)
    wild = 0.6 * torch.randn(16, d, generator=generator, dtype=dataset.dtype)
    return torch.cat([noisy, wild])


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_exact_float64_equals_brute_force(alpha: float, sigma: float) -> None:
    dataset = _dataset()
    x = _queries(dataset, alpha, sigma)
    expected = brute_posterior_mean(x, dataset, alpha, sigma)
    got = ExactDenoiser(dataset, compute_dtype=torch.float64, chunk=40)(x, alpha, sigma)
    assert got.shape == (64, 27) and got.dtype == torch.float32
    # float64 compute, float32 output: the only error is the final rounding to float32, at most
    # half an ulp of a value in [-1, 1] (2^-24 ≈ 6e-8); 1e-7 leaves room for nothing else.
    torch.testing.assert_close(got.double(), expected, atol=1e-7, rtol=0)


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_exact_float32_close_to_brute_force(alpha: float, sigma: float) -> None:
    dataset = _dataset()
    x = _queries(dataset, alpha, sigma)
    expected = brute_posterior_mean(x, dataset, alpha, sigma)
    got = ExactDenoiser(dataset.float(), compute_dtype=torch.float32)(x.float(), alpha, sigma)
    # float32 scores carry ~1e-7 relative error, times at most 1/sigma² amplification in the
    # logits where weights are not saturated; measured max error 1.1e-6 (at sigma = 0.5), so
    # 1e-5 is a 10x margin that still catches any real formula error (those are >= 1e-2).
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", [ExactDenoiser, FusedDenoiser])
def test_alpha_zero_is_the_dataset_mean(backend, dtype) -> None:
    dataset = _dataset()
    x = _queries(dataset, 0.0, 1.0)
    got = backend(dataset.to(dtype if dtype != torch.bfloat16 else torch.float32), compute_dtype=dtype)(
        x, 0.0, 1.0
    )
    expected = dataset.mean(0).expand_as(got)
    # every weight is equal: the answer is the mean for every query, whatever the query;
    # the mean is accumulated in float32 or float64, so only float32 rounding remains.
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=0)
    assert torch.equal(got, got[:1].expand_as(got))


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_fused_equals_exact_float32(alpha: float, sigma: float) -> None:
    dataset = _dataset().float()
    x = _queries(dataset, alpha, sigma)
    exact = ExactDenoiser(dataset, compute_dtype=torch.float32)(x, alpha, sigma)
    fused = FusedDenoiser(dataset, compute_dtype=torch.float32, chunk=20)(x, alpha, sigma)
    # same float32 quantity through a different kernel (SDPA on the homogeneous-coordinate
    # keys); measured max difference 2.4e-7; 1e-4 is the tolerance the contract promises.
    torch.testing.assert_close(fused, exact, atol=1e-4, rtol=0)


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_fused_bfloat16_close_to_float32(alpha: float, sigma: float) -> None:
    dataset = _dataset().float()
    x = _queries(dataset, alpha, sigma)
    reference = ExactDenoiser(dataset, compute_dtype=torch.float32)(x, alpha, sigma)
    low = FusedDenoiser(dataset, compute_dtype=torch.bfloat16)(x, alpha, sigma)
    error = (low - reference).abs()
    # bfloat16 keeps 8 significant bits: values in [-1, 1] round by up to 2^-8 ≈ 0.004, which is
    # what the measured max error is at small sigma (0.0037-0.0039); at sigma = 0.5, where many
    # weights mix, rounded keys shift the weights too and the max reaches 0.014 (mean 0.0015).
    # The loose contract that holds: max |error| < 0.03, mean |error| < 0.003.
    assert error.max().item() < 0.03
    assert error.mean().item() < 0.003


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_exact_bfloat16_close_to_brute_force_at_patch_size(alpha: float, sigma: float) -> None:
    """The paper's bfloat16 bottleneck at the real patch dimension (15x15x3 = 675), where at
    sigma = 1e-4 the logits reach ~1e10 and float32 resolves them only to ~1e3: the softmax must
    shift by the row max before it clamps (a threshold "max - 86" rounds to "max" there and made
    every weight equal: error 1.08 here, 0.06 mean in a sampler run)."""
    dataset = _dataset(n=400, d=675)
    x = _queries(dataset, alpha, sigma)[:48]  # the noisy dataset rows: no near ties
    expected = brute_posterior_mean(x, dataset, alpha, sigma)
    got = ExactDenoiser(dataset.float(), compute_dtype=torch.bfloat16, chunk=24)(x.float(), alpha, sigma)
    error = (got.double() - expected).abs()
    # bfloat16 rounds values in [-1, 1] by up to 2^-8 ≈ 0.004: measured max 0.0049, mean 0.00066
    assert error.max().item() < 0.01
    assert error.mean().item() < 0.002


def _reference(seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, 20, 24, generator=generator) * 2 - 1


def test_gather_patches_reads_the_dataset_rows() -> None:
    size = 5
    reference = _reference().contiguous()
    grid_h, grid_w = grid_shape(20, 24, size)
    dataset = unfold_rows(reference, size, 0, grid_h)
    assert dataset.shape == (grid_h * grid_w, 3 * size * size)
    positions = torch.tensor([[0, 1, grid_w], [grid_h * grid_w - 1, 37, grid_w * 7 + 3]])
    assert torch.equal(gather_patches(reference, positions, size), dataset[positions])
    # row layout: a patch row is the (channel, row, col)-ordered C×P×P block at its corner
    top, left = divmod(37, grid_w)
    block = reference[:, top : top + size, left : left + size].reshape(-1)
    assert torch.equal(dataset[37], block)


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_knn_with_every_candidate_equals_exact(alpha: float, sigma: float) -> None:
    size = 5
    image = _reference()
    reference = image.contiguous()
    grid_h, _ = grid_shape(20, 24, size)
    dataset = unfold_rows(reference, size, 0, grid_h)
    count = dataset.shape[0]
    x = _queries(dataset, alpha, sigma)
    candidates = torch.arange(count).expand(x.shape[0], count)
    knn = KnnDenoiser(reference, size, chunk=24)(x, alpha, sigma, candidates)
    exact = ExactDenoiser(dataset, compute_dtype=torch.float32)(x, alpha, sigma)
    # two float32 evaluations of the same sum (centred matmul vs raw gathered bmm); measured max
    # difference 1.8e-6 (sigma = 0.5); 1e-4 as for fused.
    torch.testing.assert_close(knn, exact, atol=1e-4, rtol=0)
    oracle = brute_posterior_mean(x, dataset, alpha, sigma)
    torch.testing.assert_close(knn.double(), oracle, atol=1e-4, rtol=0)


def test_knn_ignores_empty_candidates() -> None:
    size = 5
    reference = _reference().contiguous()
    knn = KnnDenoiser(reference, size)
    grid_h, grid_w = grid_shape(20, 24, size)
    dataset = unfold_rows(reference, size, 0, grid_h)
    positions = [0, 45, grid_h * grid_w - 1]
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(3, dataset.shape[1], generator=generator)  # any query: one candidate wins all
    candidates = torch.tensor([[p, -1, -1] for p in positions])
    for alpha, sigma in [(0.9, 0.1), (0.3, 0.7)]:
        out = knn(x, alpha, sigma, candidates)
        # one valid candidate gets weight exactly 1 (softmax of [v, -inf, -inf])
        assert torch.equal(out, dataset[positions])
    # -1 slots mixed with valid ones: same as giving only the valid ones
    mixed = torch.tensor([[3, -1, 8, -1], [-1, 45, 46, 47]])
    only = [torch.tensor([[3, 8]]), torch.tensor([[45, 46, 47]])]
    out = knn(x[:2], 0.8, 0.3, mixed)
    for row in range(2):
        torch.testing.assert_close(
            out[row : row + 1], knn(x[row : row + 1], 0.8, 0.3, only[row]), atol=1e-6, rtol=0
        )


def test_knn_alpha_zero_is_the_patch_mean() -> None:
    size = 5
    reference = _reference().contiguous()
    grid_h, _ = grid_shape(20, 24, size)
    dataset = unfold_rows(reference, size, 0, grid_h)
    out = KnnDenoiser(reference, size)(torch.zeros(4, dataset.shape[1]), 0.0, 1.0, None)
    torch.testing.assert_close(out, dataset.mean(0).expand_as(out), atol=1e-6, rtol=0)


def test_knn_without_candidates_raises() -> None:
    reference = _reference().contiguous()
    with pytest.raises(ValueError, match="candidate"):
        KnnDenoiser(reference, 5)(torch.zeros(2, 75), 0.5, 0.5, None)


@pytest.mark.parametrize("alpha,sigma", LEVELS)
def test_fused_float64_equals_brute_force(alpha: float, sigma: float) -> None:
    dataset = _dataset()
    x = _queries(dataset, alpha, sigma)
    got = FusedDenoiser(dataset, compute_dtype=torch.float64, chunk=40)(x, alpha, sigma)
    # as for exact float64: only the final float32 rounding
    torch.testing.assert_close(
        got.double(), brute_posterior_mean(x, dataset, alpha, sigma), atol=1e-7, rtol=0
    )


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("alpha,sigma", [(0.0, 1.0), (0.5, 0.5), (0.99, 0.01)])
def test_compiled_knn_fold_equals_the_torch_path(periodic: bool, alpha: float, sigma: float) -> None:
    """The numba fast path (CPU) and the generic torch path compute the same image denoiser."""
    from gigasid.core import knn_fold
    from gigasid.core.image_denoiser import ImageDenoiser

    if not knn_fold.available():
        pytest.skip("numba is not installed: only the torch path exists")
    size = 5
    reference = _reference(3)
    grid_h, grid_w = grid_shape(20, 24, size)
    generator = torch.Generator().manual_seed(4)
    out_h, out_w = 18, 26
    query_grid = (out_h * out_w) if periodic else (out_h - size + 1) * (out_w - size + 1)
    candidates = torch.randint(-1, grid_h * grid_w, (query_grid, 4), generator=generator)
    candidates[::7] = -1  # rows with no candidate at all answer the mean

    def source(x_t, a, *, periodic, step, **placement):
        return candidates

    x_t = torch.rand(3, out_h, out_w, generator=generator) * 2 - 1
    results = []
    for compiled in (True, False):
        denoiser = ImageDenoiser(
            KnnDenoiser(reference, size, compiled=compiled), patch_size=size, rho=0.3,
            periodic=periodic, candidate_source=source,
        )
        results.append(denoiser(x_t, alpha, sigma, step=1))
    # float32 sums in another order: differences of float round-off, amplified by 1/sigma² in
    # the weights at small sigma
    torch.testing.assert_close(results[0], results[1], atol=2e-4, rtol=0)


@pytest.mark.parametrize("sigma", [0.5, 0.05])
def test_matches_weights_compiled_equal_torch(sigma):
    """ImageDenoiser.matches: the compiled weights are the torch path's (float32 round-off), they
    sum to 1, and the candidates are the ones the denoiser averages."""
    from gigasid.core.denoisers import KnnDenoiser
    from gigasid.core.image_denoiser import ImageDenoiser
    from gigasid.index.candidates import ReferenceCandidates

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(4, 30, 40, generator=generator)
    x = torch.randn(4, 25, 33, generator=generator)
    source = ReferenceCandidates(reference, 5, k=4, index="exact")
    compiled = ImageDenoiser(KnnDenoiser(reference, 5), patch_size=5, rho=0.2, candidate_source=source)
    plain = ImageDenoiser(KnnDenoiser(reference, 5, compiled=False), patch_size=5, rho=0.2, candidate_source=source)
    positions, weights = compiled.matches(x, 0.7, sigma)
    positions_torch, weights_torch = plain.matches(x, 0.7, sigma)
    assert positions.shape == (21, 29, 4)
    assert torch.equal(positions, positions_torch)
    torch.testing.assert_close(weights, weights_torch, rtol=0, atol=1e-4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(21, 29), rtol=0, atol=1e-5)
