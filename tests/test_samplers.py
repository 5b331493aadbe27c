"""Every registered sampler, built-in or third-party, against exact posteriors.

Samplers that declare ``asymptotically_exact`` must pass the exact checks with tolerances derived
from the sample size (z-scores of mean and covariance, sliced Wasserstein against the exact-vs-exact
distribution). Weighted particle samplers are judged on their weighted particles, with their
effective sample size as the sample size. The others are held to what they do promise: moving the
samples from the prior towards the posterior. Their bias is measured in their own test files
(e.g. test_dps.py).
"""

import pytest
import torch

from conftest import (Z_SCORE, covariance_z_scores, effective_count, gaussian_mixture, linear_gaussian,
                      mean_z_scores, sliced_wasserstein_threshold)
from invdiff.metrics import sliced_wasserstein
from invdiff.plugins import load_registry
from invdiff.posterior import SamplingError, UnsupportedProblem, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.sde import VESDE, VPSDE

REGISTRY = load_registry()
SAMPLER_NAMES = sorted(REGISTRY.samplers)
#: smaller budgets than the defaults, to keep the suite fast
TEST_OPTIONS = {"dps": {"num_steps": 100}}


def make_sampler(name, **overrides):
    return REGISTRY.get(name).sampler_class(**{**TEST_OPTIONS.get(name, {}), **overrides})


def run(name, test_bed, num_samples, seed=0, **test_bed_arguments):
    """Sample the test bed with a VP prior, or with a VE prior for samplers that need one."""
    sampler = make_sampler(name)
    for sde in (VPSDE(), VESDE(0.02, 60.0)):
        posterior, exact = test_bed(sde=sde, **test_bed_arguments)
        try:
            return sampler, posterior, exact, sample_posterior(sampler, posterior, num_samples,
                                                               generator=torch.Generator().manual_seed(seed))
        except UnsupportedProblem:
            continue
    pytest.fail(f"{name} supports neither the VP nor the VE test bed")


def test_built_in_samplers_are_registered():
    assert {"dps", "exact"} <= set(SAMPLER_NAMES)
    assert not REGISTRY.failures


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_linear_gaussian_posterior(name):
    sampler, posterior, exact, result = run(name, linear_gaussian, 2000, dimension=4, measurements=2)
    assert result.samples.shape == (2000, 4)
    if sampler.asymptotically_exact:
        particles = result.particles if result.particles is not None else result.samples
        assert mean_z_scores(particles, exact, result.log_weights).max() < Z_SCORE
        assert covariance_z_scores(particles, exact, result.log_weights).max() < Z_SCORE
    else:
        prior_mean = posterior.prior.means[0]
        distance = (result.samples.mean(0) - exact.mean).norm()
        assert distance < 0.5 * (prior_mean - exact.mean).norm()


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_gaussian_mixture_posterior(name):
    sampler, posterior, exact, result = run(name, gaussian_mixture, 1000, dimension=8, measurements=2)
    reference = exact.sample(1000, generator=torch.Generator().manual_seed(99))
    if result.particles is not None:   # weighted particles, compared with exact sets of their effective size
        distance = sliced_wasserstein(result.particles, reference, first_log_weights=result.log_weights)
    else:
        distance = sliced_wasserstein(result.samples, reference)
    floor, threshold = sliced_wasserstein_threshold(exact, effective_count(result), reference_size=1000)
    if sampler.asymptotically_exact:
        assert distance < threshold, f"sliced Wasserstein {distance:.3f}, exact-vs-exact {floor:.3f}"
    else:
        prior_draws = posterior.prior.sample_clean(1000, generator=torch.Generator().manual_seed(5))
        assert distance < sliced_wasserstein(prior_draws, reference)


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_a_seed_fixes_every_draw(name):
    runs = [run(name, linear_gaussian, 8, seed=seed)[3].samples for seed in (3, 3, 4)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


class NaNAfterHalfwayPrior(GaussianPrior):
    def _score(self, x, t):
        score = super()._score(x, t)
        return score * float("nan") if float(t) < 0.5 else score


def test_nan_during_sampling_names_the_step():
    posterior, _ = linear_gaussian()
    prior = posterior.prior
    posterior.prior = NaNAfterHalfwayPrior(prior.means[0], prior.covariances[0], VPSDE())
    with pytest.raises(SamplingError, match=r"dps: non-finite values in 8 of 8 chains at step \d+/100 \(t=0\.4"):
        sample_posterior(make_sampler("dps"), posterior, 8)


def test_result_reports_cost_and_diagnostics():
    posterior, _ = linear_gaussian()
    result = sample_posterior(make_sampler("dps"), posterior, 16)
    assert result.nfe == 100 and result.network_evaluations == 1600
    assert len(result.diagnostics) == 100 and "residual_norm" in result.diagnostics[0]
    assert result.wall_time > 0
