"""Test beds with exact answers, and the checks every sampler is held to: for plugin authors and the tests.

Test beds (float64, with a closed-form posterior ``invdiff.exact.ExactPosterior``):

* ``linear_gaussian``: a Gaussian prior, a random matrix, Gaussian noise;
* ``gaussian_mixture``: the 25-component mixture of MCGdiff (ALGORITHMS.md section 6);
* ``discretised_model_posterior``: the exact posterior of the *discretised* reverse-diffusion model of
  a Gaussian prior, which a particle sampler converges to as its particle count grows.

Statistics with tolerances derived from the sample size: ``mean_z_scores``, ``covariance_z_scores``,
``effective_count``, ``replicate_z_scores``, ``sliced_wasserstein_threshold``.

The check (what ``invdiff check SAMPLER`` prints and what ``tests/test_samplers.py`` asserts for every
registered sampler): ``check_sampler(SamplerClass, options)`` runs the sampler on the linear-Gaussian
bed (d = 4, d_y = 2, 2000 samples) and the mixture bed (d = 8, d_y = 2, 1000 samples), with a VP
prior, or a VE one if the sampler raises ``UnsupportedProblem`` for VP, and judges it by
``asymptotically_exact``:

* exact samplers: largest mean and covariance z-score below ``Z_SCORE`` (5) on the linear-Gaussian
  bed; sliced Wasserstein distance to 1000 exact draws below the exact-vs-exact threshold (mean + 5
  standard deviations at the sampler's effective sample size) on the mixture; ``|log Z_hat - log
  p(y)|`` below ``EVIDENCE_TOLERANCE`` (0.3 nats) on both, for samplers that return ``log_evidence``;
* non-exact samplers: on both beds, a sliced Wasserstein distance to the exact draws at most
  ``NON_EXACT_FRACTION`` (half) that of the better of two trivial answers: prior draws (which ignore
  the measurement) and a point mass at the exact posterior mean (which has no spread). Their z-scores,
  distance to the exact floor and evidence error are measured and shown, not judged;
* every sampler: the same seed gives the same draws, another seed different ones; and ``MODE_RUNS`` (10)
  independent runs of ``MODE_SAMPLES`` (200) on the same mixture seen through one measurement, whose posterior has
  three modes of real weight (the d_y = 2 bed's has one): the runs' average share of each mode against its exact
  weight, in units of their spread / sqrt(10), below ``MODE_Z`` (6; judged for exact samplers, shown for others).

Weighted particles are judged on the particles with their weights, with the effective sample size
(copies of one particle counted once) as the sample size; that size must be above ``MIN_EFFECTIVE_DRAWS``
(200: so few cannot fail a collapsed sampler), and the returned samples, resampled from the particles, are judged
as well (their distance to the exact draws below the exact-vs-exact threshold at their size), as exact samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from operator import eq, gt, lt
from typing import Any, Callable

import torch
from torch import Tensor

from invdiff.exact import ExactPosterior
from invdiff.metrics import distinct_samples, sliced_wasserstein
from invdiff.noise import GaussianNoise
from invdiff.operators import matrix_operator
from invdiff.posterior import Posterior, Sampler, SampleResult, UnsupportedProblem, sample_posterior
from invdiff.prior import GaussianMixturePrior, GaussianPrior
from invdiff.problems import build_sampler
from invdiff.resources import check_run
from invdiff.sde import SDE, VESDE, VPSDE

__all__ = ["Z_SCORE", "EVIDENCE_TOLERANCE", "NON_EXACT_FRACTION", "MIN_EFFECTIVE_DRAWS", "linear_gaussian",
           "gaussian_mixture", "discretised_model_posterior", "reverse_process_start", "mean_z_scores",
           "covariance_z_scores", "component_shares", "effective_count", "replicate_z_scores",
           "weighted_runs_z_scores", "sliced_wasserstein_threshold", "Check", "SamplerCheck", "check_sampler"]

#: z-score for every per-coordinate check: with <= 50 coordinates the family-wise false alarm
#: probability of a correct sampler is below 50 * 5.7e-7 (two-sided normal tail at 5).
Z_SCORE = 5.0
#: largest |log Z_hat - log p(y)| in nats for an exact sampler's evidence (a tolerance, not a test:
#: twisted_smc and ve_smc are off by 0.01-0.09 on the check's test beds)
EVIDENCE_TOLERANCE = 0.3
#: a non-exact sampler's sliced Wasserstein distance to the posterior must be at most this fraction of
#: the better trivial answer's (prior draws, or a point mass at the exact posterior mean)
NON_EXACT_FRACTION = 0.5
#: the SDE a test bed falls back to for samplers that refuse the VP one
FALLBACK_SDE = VESDE(0.02, 60.0)
#: how many exact posterior draws sample sets are compared with, and the seeds of every fixed draw
REFERENCE_SIZE = 1000
#: weighted particles must keep more effective draws than this: with n of them a sample with no spread at all scores
#: a covariance z-score of only sqrt(n / 2), so up to 2 (2 Z_SCORE)^2 = 200 the z-scores cannot tell a collapsed
#: sampler from a correct one by twice their limit (twisted_smc's and ve_smc's particles keep 1300-1900 of 2000 on the beds)
MIN_EFFECTIVE_DRAWS = int(2 * (2 * Z_SCORE) ** 2)
REFERENCE_SEED, PRIOR_DRAWS_SEED = 99, 5
#: the modes check: independent runs of the three-mode bed, judged by the spread of their shares (Student's t with
#: MODE_RUNS - 1 = 9 degrees of freedom: P(|t| > MODE_Z) = 2e-4 per share, 1e-3 for the 5 judged)
MODE_RUNS, MODE_SAMPLES, MODE_Z = 10, 200, 6.0
REPRODUCIBILITY_SAMPLES = 8


# ---------------------------------------------------------------------------------------------- test beds

def linear_gaussian(dimension: int = 4, measurements: int = 2, sigma_y: float = 0.5, sde: SDE | None = None,
                    seed: int = 1) -> tuple[Posterior, ExactPosterior]:
    """A Gaussian prior with a random covariance, a random matrix, a simulated y: (posterior, exact).

    The prior is ``N(m, F F^T + 0.1 I)`` with ``F`` of entries ``N(0, 0.25)``, ``m`` standard normal;
    the operator a standard normal ``(measurements, dimension)`` matrix; ``sde`` defaults to VP.
    """
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


def gaussian_mixture(dimension: int = 8, measurements: int = 2, sigma_y: float = 1.0, seed: int = 0,
                     sde: SDE | None = None) -> tuple[Posterior, ExactPosterior]:
    """The mixture test bed of MCGdiff (ALGORITHMS.md section 6): (posterior, exact).

    25 unit-covariance components with means (8i, 8j, 8i, 8j, ...), i, j in -2..2, random weights, a
    standard normal ``(measurements, dimension)`` operator and a simulated y; ``sde`` defaults to VP.
    With ``measurements = 1`` the posterior has several modes of real weight, with 2 or more one.
    """
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


def reverse_process_start(prior: GaussianPrior) -> tuple[Tensor, Tensor]:
    """Mean and covariance of ``x_T``, where the reverse process starts: the prior's exact diffused
    marginal ``N(lambda_T mu, lambda_T^2 Sigma + sigma_T^2 I)``, which ``Prior.terminal_sample`` draws.
    Keep the two in step."""
    sde = prior.sde
    terminal_lambda, terminal_sigma = float(sde.lambda_t(sde.T)), float(sde.sigma_t(sde.T))
    identity = torch.eye(prior.dimension, dtype=torch.float64)
    return terminal_lambda * prior.means[0], terminal_lambda**2 * prior.covariances[0] + terminal_sigma**2 * identity


def discretised_model_posterior(posterior: Posterior, num_steps: int,
                                kernel_variance: str = "ddpm") -> ExactPosterior:
    """The exact posterior of the *discretised* reverse-diffusion model of a Gaussian prior.

    With an exact Gaussian score every reverse step on ``sde.time_grid(num_steps)`` is an affine map
    plus Gaussian noise, so the model's law of ``x_0`` is a Gaussian whose mean and covariance we
    propagate step by step from ``reverse_process_start``; its posterior and evidence are then closed
    form. A particle sampler is exact for this model as K grows; its distance to the true posterior
    is the discretisation bias.

    ``kernel_variance`` is the reverse step's: ``ddpm``, the samplers' (``SDE.reverse_kernel``: the
    forward process's ``q(x_s | x_t, x_0)`` at ``x_0 = x0_hat``, which leaves out the spread of ``x_0``
    given ``x_t``); ``analytic``, that plus ``c^2 tr(Cov[x_0 | x_t]) / d`` with ``c`` the kernel's
    coefficient on ``x0_hat`` (Analytic-DPM's optimal isotropic variance, Bao et al., ICLR 2022); ``exact``,
    plus ``c^2 Cov[x_0 | x_t]`` itself, the exact reverse transition of a Gaussian prior (no bias).
    """
    if kernel_variance not in ("ddpm", "analytic", "exact"):
        raise ValueError(f"kernel_variance is 'ddpm', 'analytic' or 'exact', not {kernel_variance!r}")
    prior = posterior.prior
    dimension = prior.dimension
    identity = torch.eye(dimension, dtype=torch.float64)
    prior_mean, prior_covariance = prior.means[0], prior.covariances[0]
    sde = prior.sde
    mean, covariance = reverse_process_start(prior)
    one, zero = torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64)
    grid = sde.time_grid(num_steps)
    for t, s in zip(grid[:-1], grid[1:]):
        lambda_t, sigma_t = float(sde.lambda_t(t)), float(sde.sigma_t(t))
        diffused_inverse = torch.linalg.inv(lambda_t**2 * prior_covariance + sigma_t**2 * identity)
        denoise_matrix = (identity - sigma_t**2 * diffused_inverse) / lambda_t    # x0_hat = M x + c
        denoise_offset = sigma_t**2 * diffused_inverse @ prior_mean
        x_coefficient = sde.reverse_kernel(one, zero, t, s)[0]
        denoised_coefficient, variance = sde.reverse_kernel(zero, one, t, s)
        step = float(x_coefficient) * identity + float(denoised_coefficient) * denoise_matrix
        mean = step @ mean + float(denoised_coefficient) * denoise_offset
        covariance = step @ covariance @ step.T + float(variance) * identity
        if kernel_variance != "ddpm":
            denoising_covariance = (prior_covariance
                                    - lambda_t**2 * prior_covariance @ diffused_inverse @ prior_covariance)
            if kernel_variance == "analytic":
                denoising_covariance = torch.trace(denoising_covariance) / dimension * identity
            covariance = covariance + float(denoised_coefficient) ** 2 * denoising_covariance
    matrix, offset = posterior.operator.matrix(prior.event_shape)
    covariance = 0.5 * (covariance + covariance.T) + 1e-12 * identity
    return ExactPosterior.from_linear_gaussian(torch.zeros(1, dtype=torch.float64), mean[None], covariance[None],
                                               matrix.to(torch.float64), offset.to(torch.float64),
                                               posterior.measurement[0].flatten().to(torch.float64),
                                               posterior.operator.noise.sigma_y, prior.event_shape)


# --------------------------------------------------------------------------------------------- statistics

def _weighted(samples: Tensor, log_weights: Tensor | None) -> tuple[Tensor, Tensor, float]:
    """Flattened samples, normalised weights and the effective count (ESS for weighted particles)."""
    flat = samples.detach().cpu().reshape(samples.shape[0], -1).to(torch.float64)
    if log_weights is None:
        return flat, torch.full((len(flat),), 1.0 / len(flat), dtype=torch.float64), len(flat)
    weights = torch.softmax(log_weights.detach().cpu().to(torch.float64), 0)
    # copies of one particle (from resampling) are one draw: pool their weights before counting
    _, groups = torch.unique(flat, dim=0, return_inverse=True)
    pooled = torch.zeros(int(groups.max()) + 1, dtype=torch.float64).scatter_add_(0, groups, weights)
    return flat, weights, float(1.0 / (pooled**2).sum())


def mean_z_scores(samples: Tensor, exact: ExactPosterior, log_weights: Tensor | None = None) -> Tensor:
    """|sample mean - exact mean| in units of the standard error sqrt(var / n), per coordinate.

    For weighted particles the mean is weighted and n is the effective sample size, counting copies
    of a particle once (it still ignores the correlation of particles that share older ancestors).
    """
    flat, weights, count = _weighted(samples, log_weights)
    standard_error = torch.sqrt(exact.covariance.diagonal() / count)
    return ((weights[:, None] * flat).sum(0) - exact.mean.flatten()).abs() / standard_error


def covariance_z_scores(samples: Tensor, exact: ExactPosterior, log_weights: Tensor | None = None) -> Tensor:
    """|sample covariance - exact covariance| per entry, in units of its standard error
    sqrt((S_ii S_jj + S_ij^2) / n) (exact for Gaussian samples, a close guide otherwise)."""
    flat, weights, count = _weighted(samples, log_weights)
    centred = flat - (weights[:, None] * flat).sum(0)
    estimate = (weights[:, None] * centred).T @ centred * count / max(count - 1, 1)
    covariance = exact.covariance
    variances = covariance.diagonal()
    standard_error = torch.sqrt((variances[:, None] * variances[None, :] + covariance**2) / count)
    return (estimate - covariance).abs() / standard_error


def component_shares(samples: Tensor, prior: GaussianMixturePrior, exact: ExactPosterior,
                     log_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The (weighted) mean responsibilities ``P(k | x)`` of the mixture components that hold at least 1% of the exact
    posterior, and of the others pooled last, next to the exact weights ``P(k | y)`` of the same: over exact draws
    the first is an unbiased estimate of the second."""
    flat, weights, _ = _weighted(samples, log_weights)
    shares = weights @ prior.responsibilities(flat.to(prior.means))
    exact_weights = exact.log_weights.exp()
    held = exact_weights >= 0.01
    return (torch.cat([shares[held], shares[~held].sum(0, keepdim=True)]),
            torch.cat([exact_weights[held], exact_weights[~held].sum(0, keepdim=True)]))


def effective_count(result: SampleResult) -> int:
    """How many independent draws a result is worth: its samples, or its particles' ESS."""
    if result.log_weights is None:
        return len(result.samples)
    return int(_weighted(result.particles, result.log_weights)[2])


def replicate_z_scores(estimates: Tensor, truth: Tensor) -> Tensor:
    """|mean of R independent estimates - truth| in units of their standard error std / sqrt(R)."""
    standard_error = estimates.std(0) / math.sqrt(len(estimates))
    return (estimates.mean(0) - truth).abs() / standard_error


def weighted_runs_z_scores(results: list[SampleResult], exact: ExactPosterior) -> dict[str, float]:
    """The largest replicate z-scores of independent particle runs against exact values: of their
    weighted means, weighted covariances and ``Z_hat / Z`` (unbiased, unlike ``log Z_hat``).
    Particles that share ancestors are correlated, so the spread of independent runs is the honest
    error bar."""
    means, covariances = [], []
    for result in results:
        weights = torch.softmax(result.log_weights, 0)
        mean = (weights[:, None] * result.particles).sum(0)
        centred = result.particles - mean
        means.append(mean)
        covariances.append(((weights[:, None] * centred).T @ centred).flatten())
    evidence_ratios = torch.exp(torch.tensor([result.log_evidence for result in results]) - exact.log_evidence)
    z_scores = {"mean": replicate_z_scores(torch.stack(means), exact.mean),
                "covariance": replicate_z_scores(torch.stack(covariances), exact.covariance.flatten()),
                "Z_hat / Z": replicate_z_scores(evidence_ratios[:, None], torch.ones(1, dtype=torch.float64))}
    return {quantity: round(float(values.max()), 2) for quantity, values in z_scores.items()}


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


# -------------------------------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Check:
    """One measured number against its limit: ``value relation limit`` (relation ``<``, ``=`` or ``>``).

    ``judged`` is False for numbers shown for information (an exact sampler's criteria applied to a
    non-exact one); such a check always ``passed``, and ``within_limit`` says how it would fare.
    """

    test_bed: str
    quantity: str
    value: float
    relation: str
    limit: float
    judged: bool = True
    note: str = ""

    @property
    def within_limit(self) -> bool:
        return {"<": lt, "=": eq, ">": gt}[self.relation](self.value, self.limit)

    @property
    def passed(self) -> bool:
        return self.within_limit or not self.judged

    def line(self) -> str:
        """E.g. ``linear-Gaussian d=4, d_y=2 (VP, 2000 samples): largest mean z-score ... 1.65 (limit < 5; ...) ok``."""
        if self.judged:
            outcome, limit = ("ok" if self.within_limit else "FAIL"), f"limit {self.relation} {_number(self.limit)}"
        else:
            outcome, limit = "not judged", f"an exact sampler's limit {self.relation} {_number(self.limit)}"
        note = f"; {self.note}" if self.note else ""
        return f"{self.test_bed}: {self.quantity} {_number(self.value)} ({limit}{note}) {outcome}"


def _number(value: float) -> str:
    """Three significant digits, without an exponent up to 10^6."""
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


@dataclass
class SamplerCheck:
    """The outcome of ``check_sampler``: every check, the test beds that could not be used, the verdict."""

    sampler: str
    asymptotically_exact: bool
    options: dict[str, Any]
    seed: int
    checks: list[Check] = field(default_factory=list)
    #: one line per test bed the sampler refused (``UnsupportedProblem``) or returned unusable samples for
    not_run: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]

    @property
    def passed(self) -> bool:
        """The verdict: every judged check within its limit, and every test bed run."""
        return not self.failures and not self.not_run

    @property
    def standard(self) -> str:
        """What the sampler is held to, in words."""
        if self.asymptotically_exact:
            return (f"exact (asymptotically_exact = True): mean and covariance z-scores below {Z_SCORE:g}, sliced "
                    f"Wasserstein below the exact-vs-exact threshold, evidence within {EVIDENCE_TOLERANCE:g} nats, "
                    "the same draws for the same seed")
        return (f"non-exact (asymptotically_exact = False): sliced Wasserstein distance to the posterior at most "
                f"{NON_EXACT_FRACTION:g} x that of the better trivial answer (prior draws; a point mass at the exact "
                "posterior mean), the same draws for the same seed")

    @property
    def verdict(self) -> str:
        judged = sum(check.judged for check in self.checks)
        if self.passed:
            standard = "exact" if self.asymptotically_exact else "non-exact"
            return f"PASS: {self.sampler} meets the {standard} standard ({judged} checks judged)"
        problems = [f"{len(self.failures)} of {judged} judged checks failed"] if self.failures else []
        problems += [f"{len(self.not_run)} test bed(s) not run"] if self.not_run else []
        return f"FAIL: {self.sampler}: {', '.join(problems)}"

    def lines(self) -> list[str]:
        """The report: what was run, the standard, one line per check, the beds not run, the verdict."""
        options = ", ".join(f"{key}={value}" for key, value in self.options.items()) or "default options"
        return ([f"invdiff check: sampler {self.sampler} ({options}), seed {self.seed}",
                 f"standard: {self.standard}"]
                + [check.line() for check in self.checks]
                + [f"{reason} FAIL" for reason in self.not_run]
                + [f"verdict: {self.verdict}"])

    def __str__(self) -> str:
        return "\n".join(self.lines())


class _NotRun(Exception):
    """A test bed the sampler refused or returned unusable samples for; the message says which and why."""


@dataclass(frozen=True)
class _TestBed:
    name: str
    build: Callable[..., tuple[Posterior, ExactPosterior]]
    num_samples: int


_LINEAR_GAUSSIAN_BED = _TestBed("linear-Gaussian d=4, d_y=2", lambda sde: linear_gaussian(4, 2, sde=sde), 2000)
_MIXTURE_BED = _TestBed("Gaussian mixture d=8, d_y=2", lambda sde: gaussian_mixture(8, 2, sde=sde), 1000)
#: the same mixture seen through one measurement: a posterior of three modes of real weight (0.48, 0.31, 0.17), where
#: the d_y = 2 bed's has one (0.99999)
_MODES_BED = _TestBed("Gaussian mixture d=8, d_y=1, three modes", lambda sde: gaussian_mixture(8, 1, sde=sde),
                      MODE_SAMPLES)


@dataclass(frozen=True)
class _Run:
    label: str
    posterior: Posterior
    exact: ExactPosterior
    result: SampleResult
    sde: SDE

    @property
    def draws(self) -> Tensor:
        """What is judged: the weighted particles when there are any, else the samples."""
        return self.result.particles if self.result.particles is not None else self.result.samples


def _run(make_sampler: Callable[[], Sampler], bed: _TestBed, num_samples: int, seed: int, progress: bool,
         sdes: tuple[SDE, ...] = (VPSDE(), FALLBACK_SDE)) -> _Run:
    """Sample the bed with the first of ``sdes`` the sampler accepts; ``_NotRun`` naming every refusal
    if it accepts none, or if the samples have the wrong shape."""
    reasons = []
    for sde in sdes:
        posterior, exact = bed.build(sde)
        sampler = make_sampler()
        try:
            sampler.check(posterior)   # a refused bed first, as invdiff solve does, then the memory estimate
            check_run(posterior, sampler, num_samples)   # ResourceError: options that cannot fit (num_particles 1e9)
            result = sample_posterior(sampler, posterior, num_samples, progress=progress,
                                      generator=torch.Generator().manual_seed(seed))
        except UnsupportedProblem as error:
            reasons.append(f"{_sde_name(sde)}: {error}")
            continue
        expected = (num_samples, *posterior.prior.event_shape)
        if tuple(result.samples.shape) != expected:
            raise _NotRun(f"{bed.name}: {sampler.name} returned samples of shape {tuple(result.samples.shape)}, "
                          f"expected {expected}")
        return _Run(f"{bed.name} ({_sde_name(sde)}, {num_samples} samples)", posterior, exact, result, sde)
    raise _NotRun(f"{bed.name}: not run, the sampler refused it: {'; '.join(reasons)}")


def _sde_name(sde: SDE) -> str:
    return type(sde).__name__.removesuffix("SDE")


def _reference(exact: ExactPosterior) -> Tensor:
    return exact.sample(REFERENCE_SIZE, generator=torch.Generator().manual_seed(REFERENCE_SEED))


def _distance(run: _Run, reference: Tensor) -> float:
    """Sliced Wasserstein distance of the judged draws (weighted particles with their weights) to ``reference``."""
    return sliced_wasserstein(run.draws, reference, first_log_weights=run.result.log_weights)


def _z_score_checks(run: _Run, judged: bool) -> list[Check]:
    count = effective_count(run.result)
    arguments = (run.draws, run.exact, run.result.log_weights)
    dimension = run.exact.covariance.shape[0]
    note = f"{count} effective draws"
    return [Check(run.label, f"largest mean z-score of {dimension} coordinates", float(mean_z_scores(*arguments).max()),
                  "<", Z_SCORE, judged, note),
            Check(run.label, f"largest covariance z-score of {dimension}x{dimension} entries",
                  float(covariance_z_scores(*arguments).max()), "<", Z_SCORE, judged, note)]


def _particle_checks(run: _Run, reference: Tensor, judged: bool) -> list[Check]:
    """For weighted particles: enough effective draws for the z-scores and the floor to mean anything, and the
    returned samples (what a user gets: resampled from the particles) judged too, by their distance to the exact
    draws against the exact-vs-exact threshold at the fewer of their distinct values and the particles' ESS."""
    if run.result.particles is None:
        return []
    count = effective_count(run.result)
    distinct = distinct_samples(run.result.samples)
    _, threshold = sliced_wasserstein_threshold(run.exact, min(count, distinct), reference_size=REFERENCE_SIZE)
    return [Check(run.label, "effective draws of the weighted particles", count, ">", MIN_EFFECTIVE_DRAWS,
                  judged, f"of {len(run.result.particles)}; fewer cannot be judged"),
            Check(run.label, f"sliced Wasserstein distance of the returned samples to {REFERENCE_SIZE} exact draws",
                  sliced_wasserstein(run.result.samples, reference), "<", threshold, judged,
                  f"{distinct} distinct; limit: exact-vs-exact mean + 5 sd at {min(count, distinct)} draws")]


def _modes_check(make_sampler: Callable[[], Sampler], seed: int, judged: bool) -> Check:
    """How a sampler weighs the modes: MODE_RUNS independent runs of the three-mode bed, each run's share of every
    mode (the weighted particles' where there are any), their average against the exact weights in units of their
    spread / sqrt(MODE_RUNS). A particle's mode is fixed by its early ancestors, so one run's ESS overstates what its
    shares resolve: independent runs are the honest error bar (``replicate_z_scores``)."""
    runs = [_run(make_sampler, _MODES_BED, MODE_SAMPLES, seed * MODE_RUNS + index, False) for index in range(MODE_RUNS)]
    shares, exact_weights = zip(*(component_shares(run.draws, run.posterior.prior, run.exact, run.result.log_weights)
                                  for run in runs))
    z_scores = replicate_z_scores(torch.stack(shares), exact_weights[0])
    label = f"{_MODES_BED.name} ({_sde_name(runs[0].sde)}, {MODE_RUNS} runs of {MODE_SAMPLES} samples)"
    return Check(label, f"largest z-score of the {len(z_scores) - 1} modes' shares and the rest's over the runs",
                 float(z_scores.max()), "<", MODE_Z, judged,
                 "shares " + " ".join(f"{float(share):.3f}" for share in torch.stack(shares).mean(0))
                 + ", exact " + " ".join(f"{float(weight):.3f}" for weight in exact_weights[0]))


def _evidence_checks(run: _Run, judged: bool) -> list[Check]:
    if run.result.log_evidence is None:
        return []
    error = abs(run.result.log_evidence - run.exact.log_evidence)
    return [Check(run.label, "|log Z_hat - log p(y)| in nats", error, "<", EVIDENCE_TOLERANCE, judged,
                  f"log Z_hat {run.result.log_evidence:.3f}, exact {run.exact.log_evidence:.3f}")]


@lru_cache(maxsize=16)
def _mixture_floor(count: int) -> tuple[float, float]:
    """The exact-vs-exact (mean, threshold) for ``count`` draws against the reference size, on the mixture bed."""
    return sliced_wasserstein_threshold(_MIXTURE_BED.build(VPSDE())[1], count, reference_size=REFERENCE_SIZE)


def _floor_check(run: _Run, reference: Tensor, judged: bool) -> Check:
    count = effective_count(run.result)
    floor, threshold = _mixture_floor(count)
    return Check(run.label, f"sliced Wasserstein distance to {REFERENCE_SIZE} exact draws", _distance(run, reference),
                 "<", threshold, judged, f"exact-vs-exact {floor:.3g} at {count} effective draws, limit: its mean "
                 "+ 5 sd")


def _trivial_answers_check(run: _Run, reference: Tensor) -> Check:
    """The non-exact standard: at most NON_EXACT_FRACTION of the better trivial answer's distance."""
    prior_draws = run.posterior.prior.sample_clean(run.result.samples.shape[0],
                                                   generator=torch.Generator().manual_seed(PRIOR_DRAWS_SEED))
    prior_distance = sliced_wasserstein(prior_draws, reference)
    point_mass_distance = sliced_wasserstein(run.exact.mean.reshape(1, -1), reference)
    limit = NON_EXACT_FRACTION * min(prior_distance, point_mass_distance)
    return Check(run.label, f"sliced Wasserstein distance to {REFERENCE_SIZE} exact draws", _distance(run, reference),
                 "<", limit, True, f"{NON_EXACT_FRACTION:g} x the better of prior draws {prior_distance:.3g} "
                 f"and a point mass at the exact mean {point_mass_distance:.3g}")


def _reproducibility_checks(make_sampler: Callable[[], Sampler], seed: int, sde: SDE) -> list[Check]:
    draws = [_run(make_sampler, _LINEAR_GAUSSIAN_BED, REPRODUCIBILITY_SAMPLES, run_seed, False, (sde,)).result.samples
             for run_seed in (seed, seed, seed + 1)]
    label = f"reproducibility ({_LINEAR_GAUSSIAN_BED.name}, {REPRODUCIBILITY_SAMPLES} samples)"
    return [Check(label, f"seed {seed} twice, largest difference of the draws",
                  float((draws[0] - draws[1]).abs().max()), "=", 0.0),
            Check(label, f"seeds {seed} and {seed + 1}, largest difference of the draws",
                  float((draws[0] - draws[2]).abs().max()), ">", 0.0)]


def check_sampler(sampler_class: type[Sampler], options: dict[str, Any] | None = None, *, seed: int = 0,
                  progress: bool = False) -> SamplerCheck:
    """Run the exactness checks on one sampler (see the module docstring for what is judged, and how).

    ``options`` are the sampler's options (a wrong one raises ``invdiff.problems.ProblemError`` naming
    it); ``seed`` seeds the sampler's draws (the test beds and reference draws are fixed);
    ``progress`` shows each run's progress bar. ``SamplingError`` (NaN) propagates, and so does
    ``invdiff.resources.ResourceError`` where a bed's run cannot fit in memory by ``invdiff solve``'s estimate
    (options such as ``num_particles`` 1e9). The result's ``passed`` is the verdict and ``str()`` the report, one
    line per check.
    """
    options = dict(options or {})
    exact_standard = sampler_class.asymptotically_exact
    outcome = SamplerCheck(build_sampler(sampler_class, options).name, exact_standard, options, seed)

    def make_sampler() -> Sampler:
        return build_sampler(sampler_class, options)

    reproducibility_sde = None   # the linear-Gaussian bed's SDE, once the sampler has accepted it
    for bed in (_LINEAR_GAUSSIAN_BED, _MIXTURE_BED):
        try:
            run = _run(make_sampler, bed, bed.num_samples, seed, progress)
        except _NotRun as reason:
            outcome.not_run.append(str(reason))
            continue
        reference = _reference(run.exact)
        if not exact_standard:
            outcome.checks.append(_trivial_answers_check(run, reference))
        if bed is _LINEAR_GAUSSIAN_BED:
            outcome.checks += _z_score_checks(run, exact_standard)
            reproducibility_sde = run.sde
        else:
            outcome.checks.append(_floor_check(run, reference, exact_standard))
        outcome.checks += _particle_checks(run, reference, exact_standard)
        outcome.checks += _evidence_checks(run, exact_standard)
    try:
        outcome.checks.append(_modes_check(make_sampler, seed, exact_standard))
    except _NotRun as reason:
        outcome.not_run.append(str(reason))
    if reproducibility_sde is not None:
        outcome.checks += _reproducibility_checks(make_sampler, seed, reproducibility_sde)
    return outcome
