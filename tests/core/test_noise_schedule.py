"""Noise schedules as golden arrays, and the step of paper Eq. 5."""

from __future__ import annotations

import pytest
import torch

from gigasid.core.noise_schedule import (
    NOISE_SCHEDULES,
    epsilon_from_x_hat,
    flow_linear,
    make_noise_schedule,
    step,
    ve_edm,
)

# flow_linear, T = 10: alpha_t = (1 - 1e-4)(10 - t)/9 = 0.1111·(10 - t) for t = 1..10, sigma = 1 - alpha
FLOW_ALPHAS = [1.0, 0.9999, 0.8888, 0.7777, 0.6666, 0.5555, 0.4444, 0.3333, 0.2222, 0.1111, 0.0]
FLOW_SIGMAS = [0.0, 0.0001, 0.1112, 0.2223, 0.3334, 0.4445, 0.5556, 0.6667, 0.7778, 0.8889, 1.0]


def test_flow_linear_golden_values() -> None:
    alphas, sigmas = flow_linear(10)
    assert alphas.dtype == sigmas.dtype == torch.float64
    assert alphas.shape == sigmas.shape == (11,)
    # float64 linspace: exact to ~1e-16; 1e-12 is far below the 1e-4 steps between goldens
    torch.testing.assert_close(alphas, torch.tensor(FLOW_ALPHAS, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(sigmas, torch.tensor(FLOW_SIGMAS, dtype=torch.float64), atol=1e-12, rtol=0)
    assert (alphas[0].item(), sigmas[0].item()) == (1.0, 0.0)  # the terminal, exactly
    assert abs(alphas[1].item() - (1 - 1e-4)) < 1e-15 and abs(sigmas[1].item() - 1e-4) < 1e-15
    assert (alphas[10].item(), sigmas[10].item()) == (0.0, 1.0)
    # linear in between: constant differences over the evaluation indices 1..10
    diffs = alphas[1:].diff()
    torch.testing.assert_close(diffs, torch.full_like(diffs, -0.1111), atol=1e-12, rtol=0)
    torch.testing.assert_close(alphas + sigmas, torch.ones(11, dtype=torch.float64), atol=1e-15, rtol=0)


def test_ve_edm_endpoints() -> None:
    alphas, sigmas = ve_edm(10)
    assert alphas.shape == sigmas.shape == (11,)
    assert torch.equal(alphas, torch.ones(11, dtype=torch.float64))
    assert sigmas[0].item() == 0.0
    assert abs(sigmas[1].item() - 0.002) < 1e-12  # (lo)^rho round trip in float64
    assert abs(sigmas[10].item() - 80.0) < 1e-9
    assert bool((sigmas[1:].diff() > 0).all())  # ascending: index T is the noisiest
    # Karras rho = 7 spacing: sigma^(1/7) is linear in the index
    roots = sigmas[1:] ** (1 / 7)
    torch.testing.assert_close(roots.diff(), torch.full((9,), float(roots.diff()[0]), dtype=torch.float64))


def test_registry() -> None:
    assert set(NOISE_SCHEDULES) == {"flow_linear", "ve_edm"}
    alphas, sigmas = make_noise_schedule("flow_linear", 10)
    assert torch.equal(alphas, flow_linear(10)[0]) and torch.equal(sigmas, flow_linear(10)[1])
    with pytest.raises(ValueError, match="flow_linear, ve_edm"):
        make_noise_schedule("cosine", 10)
    with pytest.raises(ValueError, match="num_steps"):
        make_noise_schedule("flow_linear", 0)


def _tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(3, 8, 9, generator=generator, dtype=torch.float64) for _ in range(3))


def test_step_eta0_is_ddim() -> None:
    x_hat, eps_hat, _ = _tensors()
    out = step(x_hat, eps_hat, alpha_to=0.6666, sigma_to=0.3334, eta=0.0, noise=None)
    torch.testing.assert_close(out, 0.6666 * x_hat + 0.3334 * eps_hat, atol=1e-15, rtol=0)
    # eta = 0 draws nothing: the noise argument is ignored
    _, _, z = _tensors(1)
    assert torch.equal(out, step(x_hat, eps_hat, alpha_to=0.6666, sigma_to=0.3334, eta=0.0, noise=z))


def test_step_eta1_ignores_eps_hat() -> None:
    x_hat, eps_hat, z = _tensors()
    out = step(x_hat, eps_hat, alpha_to=0.5555, sigma_to=0.4445, eta=1.0, noise=z)
    torch.testing.assert_close(out, 0.5555 * x_hat + 0.4445 * z, atol=1e-15, rtol=0)
    other = step(x_hat, eps_hat * 7.0 + 3.0, alpha_to=0.5555, sigma_to=0.4445, eta=1.0, noise=z)
    assert torch.equal(out, other)


def test_step_intermediate_eta_formula() -> None:
    x_hat, eps_hat, z = _tensors()
    eta, a, s = 0.5, 0.7777, 0.2223
    out = step(x_hat, eps_hat, alpha_to=a, sigma_to=s, eta=eta, noise=z)
    expected = a * x_hat + (s**2 - (eta * s) ** 2) ** 0.5 * eps_hat + eta * s * z
    torch.testing.assert_close(out, expected, atol=1e-15, rtol=0)


def test_step_onto_terminal_returns_x_hat() -> None:
    x_hat, eps_hat, z = _tensors()
    for eta, noise in [(0.0, None), (1.0, z), (1.0, None)]:
        assert step(x_hat, eps_hat, alpha_to=1.0, sigma_to=0.0, eta=eta, noise=noise) is x_hat


def test_step_errors() -> None:
    x_hat, eps_hat, _ = _tensors()
    with pytest.raises(ValueError, match="fresh noise"):
        step(x_hat, eps_hat, alpha_to=0.5, sigma_to=0.5, eta=0.3, noise=None)
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match="eta"):
            step(x_hat, eps_hat, alpha_to=0.5, sigma_to=0.5, eta=eta, noise=None)


def test_epsilon_round_trip() -> None:
    x0, eps, _ = _tensors()
    alpha, sigma = 0.4444, 0.5556
    x_t = alpha * x0 + sigma * eps
    torch.testing.assert_close(epsilon_from_x_hat(x_t, x0, alpha, sigma), eps, atol=1e-12, rtol=0)
    # a perfect x_hat and eta = 0 walks along the same noise: x_{t-1} = a' x0 + s' eps
    out = step(
        x0, epsilon_from_x_hat(x_t, x0, alpha, sigma), alpha_to=0.5555, sigma_to=0.4445, eta=0.0, noise=None
    )
    torch.testing.assert_close(out, 0.5555 * x0 + 0.4445 * eps, atol=1e-12, rtol=0)
