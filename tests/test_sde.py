import math

import pytest
import torch

from invdiff.sde import VESDE, VPSDE, DDPMSchedule, gaussian_log_density

SDES = [VPSDE(), VPSDE(2.0, 2.0, T=5.0), VESDE(0.01, 20.0), DDPMSchedule()]


def test_ornstein_uhlenbeck_is_vp_with_constant_rate():
    sde = VPSDE(2.0, 2.0, T=3.0)
    for t in (0.1, 1.0, 2.5):
        assert float(sde.lambda_t(t)) == pytest.approx(math.exp(-t))
        assert float(sde.sigma_t(t)) ** 2 == pytest.approx(1 - math.exp(-2 * t))


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_marginals_start_clean(sde):
    assert float(sde.lambda_t(0.0)) == pytest.approx(1.0)
    assert float(sde.sigma_t(0.0)) == pytest.approx(0.0, abs=1e-12)
    grid = sde.time_grid(10)
    assert float(grid[0]) == pytest.approx(sde.T) and float(grid[-1]) == 0.0
    assert (grid[1:] < grid[:-1]).all()


def test_ddpm_schedule_matches_cumulative_product():
    sde = DDPMSchedule(100, 1e-4, 0.02)
    betas = torch.linspace(1e-4, 0.02, 100, dtype=torch.float64)
    alpha_bar = torch.cumprod(1 - betas, 0)
    for index in (1, 37, 100):
        assert float(sde.lambda_t(index / 100)) ** 2 == pytest.approx(float(alpha_bar[index - 1]), rel=1e-10)
    assert torch.allclose(sde.time_grid(10) * 100, torch.arange(100, -1, -10, dtype=torch.float64))


def test_ve_marginal_variance_is_geometric_minus_start():
    sde = VESDE(0.01, 20.0)
    t = 0.7
    assert float(sde.sigma_t(t)) ** 2 == pytest.approx(0.01**2 * ((20 / 0.01) ** (2 * t) - 1))


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_reverse_kernel_preserves_the_forward_marginal(sde):
    """If x_t = lambda_t x0 + sigma_t z and the kernel is given the true x0, then x_s ~ N(lambda_s x0, sigma_s^2)."""
    x0 = torch.tensor([[0.3, -1.2]], dtype=torch.float64)
    for t, s in ((sde.T, 0.5 * sde.T), (0.4 * sde.T, 0.1 * sde.T)):
        lambda_t, sigma_t = sde.lambda_t(t), sde.sigma_t(t)
        lambda_s, sigma_s = sde.lambda_t(s), sde.sigma_t(s)
        x_coefficient = (sde.reverse_kernel(torch.ones_like(x0), torch.zeros_like(x0), t, s)[0])[0, 0]
        mean_at_zero_noise, variance = sde.reverse_kernel(lambda_t * x0, x0, t, s)
        assert torch.allclose(mean_at_zero_noise, lambda_s * x0)
        assert float(x_coefficient**2 * sigma_t**2 + variance) == pytest.approx(float(sigma_s**2), rel=1e-9)


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_forward_transition_carries_the_marginal_at_s_to_the_marginal_at_t(sde):
    """x_s = lambda_s x0 + sigma_s z, then ``forward_transition`` to t > s: mean lambda_t x0 and standard deviation
    sigma_t, within 5 standard errors of 20000 draws."""
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    s, t = 0.1 * sde.T, 0.6 * sde.T
    x_s = sde.lambda_t(s) * x0 + sde.sigma_t(s) * torch.randn(x0.shape, generator=generator, dtype=torch.float64)
    x_t = sde.forward_transition(x_s, s, t, generator=generator)
    sigma_t, error = float(sde.sigma_t(t)), 1 / math.sqrt(len(x0))
    assert float(x_t.mean()) == pytest.approx(0.7 * float(sde.lambda_t(t)), abs=5 * sigma_t * error)
    assert float(x_t.std()) == pytest.approx(sigma_t, rel=5 * error / math.sqrt(2))


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_last_reverse_step_returns_the_denoised_estimate(sde):
    x, denoised = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    grid = sde.time_grid(5)
    mean, variance = sde.reverse_kernel(x, denoised, grid[-2], grid[-1])
    assert float(variance) == 0.0
    assert torch.allclose(mean, denoised)


def test_gaussian_log_density_matches_torch():
    x, mean = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    expected = torch.distributions.Normal(mean, 0.7).log_prob(x).sum(1)
    assert torch.allclose(gaussian_log_density(x, mean, 0.49), expected)
