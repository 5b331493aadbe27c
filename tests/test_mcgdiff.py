"""MCGdiff (plugins/mcgdiff.py) against exact posteriors and evidences, and the problems it refuses."""

import statistics

import deepinv
import pytest
import torch

from invdiff.exact import ExactPosterior
from invdiff.operators import ForwardOperator, GaussianNoise, PoissonNoise, matrix_operator
from invdiff.posterior import Posterior, UnsupportedProblem, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.sde import VPSDE
from invdiff.testing import Z_SCORE, check_sampler, covariance_z_scores, linear_gaussian, mean_z_scores
from invdiff_plugins.mcgdiff import MCGdiff


def test_meets_the_standard_it_declares():
    check = check_sampler(MCGdiff)
    assert check.passed, str(check)


def _affine(posterior: Posterior) -> Posterior:
    """The same prior and matrix read through ``image = 0.5 x + 0.25``, so that ``G(0) != 0``, and a
    measurement simulated from it."""
    generator = torch.Generator().manual_seed(3)
    operator = posterior.operator.with_input_map(0.5, 0.25)
    truth = posterior.prior.sample_clean(1, generator=generator)
    return Posterior(posterior.prior, operator, operator.measure(truth, generator))


@pytest.mark.parametrize("case", ["two of four coordinates seen", "more measurements than coordinates",
                                  "affine operator"])
def test_evidence_matches_the_exact_one_on_the_linear_gaussian_bed(case):
    """``log Z_hat`` (with the singular values, the joins, the pure-noise rows and the offset of an affine
    operator accounted for) is unbiased: its mean over 6 seeds is within 0.3 nats of ``log p(y)``.
    Measured spread over seeds at K = 2000: sd ~0.1 with two coordinates seen, ~0.4 with all four."""
    posterior, _ = linear_gaussian(4, 6 if case == "more measurements than coordinates" else 2)
    if case == "affine operator":
        posterior = _affine(posterior)
    exact = ExactPosterior.from_posterior(posterior)
    errors = [sample_posterior(MCGdiff(), posterior, 2000, generator=torch.Generator().manual_seed(seed)).log_evidence
              - exact.log_evidence for seed in range(6)]
    assert abs(statistics.mean(errors)) < 0.3, f"mean error of log Z_hat over 6 seeds: {errors} ({case})"


def test_samples_match_the_posterior_on_a_fine_grid():
    """With the exact score and 1000 steps the chain reproduces the forward noising, the condition of
    MCGdiff's exactness with noise: mean and covariance z-scores below the exact standard."""
    posterior, exact = linear_gaussian()
    result = sample_posterior(MCGdiff(num_steps=1000), posterior, 2000, generator=torch.Generator().manual_seed(0))
    mean_z = float(mean_z_scores(result.particles, exact, result.log_weights).max())
    covariance_z = float(covariance_z_scores(result.particles, exact, result.log_weights).max())
    assert mean_z < Z_SCORE, f"largest mean z-score {mean_z:.2f} against the exact posterior"
    assert covariance_z < Z_SCORE, f"largest covariance z-score {covariance_z:.2f} against the exact posterior"


def _square_operator() -> ForwardOperator:
    return ForwardOperator(deepinv.physics.Physics(A=lambda x: x**2), GaussianNoise(0.1), name="square",
                           dtype=torch.float64)


@pytest.mark.parametrize("problem, reason", [
    ("non-linear operator", "needs a linear operator; 'square' is not linear"),
    ("Poisson noise", "needs Gaussian noise, got poisson"),
    ("large event", "events of at most 4096 values; this prior has 4097"),
])
def test_refuses_problems_outside_its_scope(problem, reason):
    small, _ = linear_gaussian()
    if problem == "non-linear operator":
        posterior = Posterior(small.prior, _square_operator(), torch.ones(1, 4, dtype=torch.float64))
    elif problem == "Poisson noise":
        operator = matrix_operator(torch.rand(3, 4, dtype=torch.float64), PoissonNoise(0.1)).with_input_map(0.1, 1.0)
        posterior = Posterior(small.prior, operator, torch.ones(1, 3, dtype=torch.float64))
    else:
        dimension = 4097
        prior = GaussianPrior(torch.zeros(dimension), torch.ones(dimension), VPSDE())
        operator = matrix_operator(torch.eye(1, dimension, dtype=torch.float64), GaussianNoise(0.1))
        posterior = Posterior(prior, operator, torch.zeros(1, 1, dtype=torch.float64))
    with pytest.raises(UnsupportedProblem, match=reason):
        sample_posterior(MCGdiff(num_steps=5), posterior, 4)
