"""Shared test beds with exact answers, and tolerances derived from the sample size."""

from __future__ import annotations

import math

import pytest
import torch

from invdiff.exact import ExactPosterior
from invdiff.metrics import sliced_wasserstein
from invdiff.operators import GaussianNoise, matrix_operator
from invdiff.posterior import Posterior
from invdiff.prior import GaussianMixturePrior, GaussianPrior
from invdiff.sde import VPSDE

#: z-score for every per-coordinate check: with <= 50 coordinates the family-wise false alarm
#: probability of a correct sampler is below 50 * 5.7e-7 (two-sided normal tail at 5).
Z_SCORE = 5.0


def linear_gaussian(dimension: int = 4, measurements: int = 2, sigma_y: float = 0.5, sde=None, seed: int = 1):
    """A Gaussian prior with a random covariance, a random matrix, a simulated y: (posterior, exact)."""
    generator = torch.Generator().manual_seed(seed)
    factor = 0.5 * torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    covariance = factor @ factor.T + 0.1 * torch.eye(dimension, dtype=torch.float64)
    mean = torch.randn(dimension, generator=generator, dtype=torch.float64)
    matrix = torch.randn(measurements, dimension, generator=generator, dtype=torch.float64)
    prior = GaussianPrior(mean, covariance, sde or VPSDE())
    operator = matrix_operator(matrix, GaussianNoise(sigma_y))
    truth = prior.sample_clean(1, generator=generator)
    posterior = Posterior(prior, operator, operator.measure(truth, generator))
    return posterior, ExactPosterior.from_posterior(posterior)


def discretised_model_posterior(posterior: Posterior, num_steps: int) -> ExactPosterior:
    """The exact posterior of the *discretised* reverse-diffusion model of a Gaussian prior.

    With an exact Gaussian score every reverse step on ``sde.time_grid(num_steps)`` is an affine map
    plus Gaussian noise, so the model's law of ``x_0`` is a Gaussian whose mean and covariance we
    propagate step by step; its posterior and evidence are then closed form. A particle sampler is
    exact for this model as K grows; its distance to the true posterior is the discretisation bias.
    """
    prior = posterior.prior
    dimension = prior.dimension
    identity = torch.eye(dimension, dtype=torch.float64)
    prior_mean, prior_covariance = prior.means[0], prior.covariances[0]
    sde = prior.sde
    mean = torch.zeros(dimension, dtype=torch.float64)
    covariance = sde.terminal_std() ** 2 * identity
    grid = sde.time_grid(num_steps)
    for t, s in zip(grid[:-1], grid[1:]):
        lambda_t, sigma_t = float(sde.lambda_t(t)), float(sde.sigma_t(t))
        diffused_inverse = torch.linalg.inv(lambda_t**2 * prior_covariance + sigma_t**2 * identity)
        denoise_matrix = (identity - sigma_t**2 * diffused_inverse) / lambda_t    # x0_hat = M x + c
        denoise_offset = sigma_t**2 * diffused_inverse @ prior_mean
        x_coefficient = sde.reverse_kernel(torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64), t, s)[0]
        denoised_coefficient, variance = sde.reverse_kernel(torch.zeros(1, 1, dtype=torch.float64),
                                                            torch.ones(1, 1, dtype=torch.float64), t, s)
        step = float(x_coefficient) * identity + float(denoised_coefficient) * denoise_matrix
        mean = step @ mean + float(denoised_coefficient) * denoise_offset
        covariance = step @ covariance @ step.T + float(variance) * identity
    matrix, offset = posterior.operator.matrix((dimension,))
    covariance = 0.5 * (covariance + covariance.T) + 1e-12 * identity
    return ExactPosterior.from_linear_gaussian(torch.zeros(1, dtype=torch.float64), mean[None], covariance[None],
                                               matrix, offset, posterior.measurement[0].to(torch.float64),
                                               posterior.operator.noise.sigma_y)


def gaussian_mixture(dimension: int = 8, measurements: int = 2, sigma_y: float = 1.0, seed: int = 0, sde=None):
    """The mixture test bed of MCGdiff (ALGORITHMS.md section 6): 25 unit-covariance components with
    means (8i, 8j, 8i, 8j, ...), i, j in -2..2, random weights, a random operator and y."""
    generator = torch.Generator().manual_seed(seed)
    grid = torch.tensor([(8.0 * i, 8.0 * j) for i in range(-2, 3) for j in range(-2, 3)], dtype=torch.float64)
    means = grid.repeat(1, dimension // 2)
    weights = torch.rand(25, generator=generator, dtype=torch.float64) ** 2
    prior = GaussianMixturePrior(weights, means, torch.ones(25, dimension, dtype=torch.float64), sde or VPSDE())
    matrix = torch.randn(measurements, dimension, generator=generator, dtype=torch.float64)
    operator = matrix_operator(matrix, GaussianNoise(sigma_y))
    truth = prior.sample_clean(1, generator=generator)
    posterior = Posterior(prior, operator, operator.measure(truth, generator))
    return posterior, ExactPosterior.from_posterior(posterior)


def _weighted(samples: torch.Tensor, log_weights: torch.Tensor | None):
    """Flattened samples, normalised weights and the effective count (ESS for weighted particles)."""
    flat = samples.reshape(samples.shape[0], -1).to(torch.float64)
    if log_weights is None:
        return flat, torch.full((len(flat),), 1.0 / len(flat), dtype=torch.float64), len(flat)
    weights = torch.softmax(log_weights.to(torch.float64), 0)
    # copies of one particle (from resampling) are one draw: pool their weights before counting
    _, groups = torch.unique(flat, dim=0, return_inverse=True)
    pooled = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).scatter_add_(0, groups, weights)
    return flat, weights, float(1.0 / (pooled**2).sum())


def mean_z_scores(samples: torch.Tensor, exact: ExactPosterior, log_weights: torch.Tensor | None = None):
    """|sample mean - exact mean| in units of the standard error sqrt(var / n), per coordinate.

    For weighted particles the mean is weighted and n is the effective sample size, counting copies
    of a particle once (it still ignores the correlation of particles that share older ancestors).
    """
    flat, weights, count = _weighted(samples, log_weights)
    standard_error = torch.sqrt(exact.covariance.diagonal() / count)
    return ((weights[:, None] * flat).sum(0) - exact.mean.flatten()).abs() / standard_error


def covariance_z_scores(samples: torch.Tensor, exact: ExactPosterior, log_weights: torch.Tensor | None = None):
    """|sample covariance - exact covariance| per entry, in units of its standard error
    sqrt((S_ii S_jj + S_ij^2) / n) (exact for Gaussian samples, a close guide otherwise)."""
    flat, weights, count = _weighted(samples, log_weights)
    centred = flat - (weights[:, None] * flat).sum(0)
    estimate = (weights[:, None] * centred).T @ centred * count / max(count - 1, 1)
    covariance = exact.covariance
    variances = covariance.diagonal()
    standard_error = torch.sqrt((variances[:, None] * variances[None, :] + covariance**2) / count)
    return (estimate - covariance).abs() / standard_error


def effective_count(result) -> int:
    """How many independent draws a result is worth: its samples, or its particles' ESS."""
    if result.log_weights is None:
        return len(result.samples)
    return int(_weighted(result.particles, result.log_weights)[2])


def replicate_z_scores(estimates: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """|mean of R independent estimates - truth| in units of their standard error std / sqrt(R)."""
    standard_error = estimates.std(0) / math.sqrt(len(estimates))
    return (estimates.mean(0) - truth).abs() / standard_error


def sliced_wasserstein_threshold(exact: ExactPosterior, num_samples: int, *, reference_size: int | None = None,
                                 repeats: int = 30, seed: int = 100) -> tuple[float, float]:
    """The exact-vs-exact sliced Wasserstein distribution: ``num_samples`` exact draws against a
    reference of ``reference_size`` (default the same) exact draws. Returns (mean, threshold).

    The threshold is mean + 5 standard deviations of the distances between independent exact sets,
    so a correct sampler exceeds it with negligible probability.
    """
    generator = torch.Generator().manual_seed(seed)
    distances = torch.tensor([
        sliced_wasserstein(exact.sample(num_samples, generator=generator),
                           exact.sample(reference_size or num_samples, generator=generator), seed=seed + repeat)
        for repeat in range(repeats)])
    return float(distances.mean()), float(distances.mean() + 5 * distances.std())


@pytest.fixture
def generator():
    return torch.Generator().manual_seed(0)


def log_normal(x: float, mean: float, variance: float) -> float:
    return -0.5 * ((x - mean) ** 2 / variance + math.log(2 * math.pi * variance))
