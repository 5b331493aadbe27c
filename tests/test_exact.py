import math

import pytest
import torch

from conftest import gaussian_mixture, linear_gaussian, log_normal, mean_z_scores, Z_SCORE
from invdiff.exact import ExactPosterior, NotTractable
from invdiff.operators import GaussianNoise, PoissonNoise, matrix_operator
from invdiff.posterior import Posterior
from invdiff.prior import GaussianMixturePrior, GaussianPrior
from invdiff.problems import load_problem
from invdiff.sde import VPSDE


def test_gaussian_posterior_matches_the_information_form():
    posterior, exact = linear_gaussian(dimension=5, measurements=3, sigma_y=0.4)
    prior_covariance, prior_mean = posterior.prior.covariances[0], posterior.prior.means[0]
    matrix, _ = posterior.operator.matrix((5,))
    y = posterior.measurement[0]
    precision = torch.linalg.inv(prior_covariance) + matrix.T @ matrix / 0.4**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ (torch.linalg.solve(prior_covariance, prior_mean) + matrix.T @ y / 0.4**2)
    assert torch.allclose(exact.covariance, covariance, atol=1e-10)
    assert torch.allclose(exact.mean, mean, atol=1e-10)


def test_evidence_of_a_one_dimensional_mixture_by_quadrature():
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                                 torch.tensor([[0.5], [0.2]]), VPSDE())
    operator = matrix_operator(torch.tensor([[1.3]], dtype=torch.float64), GaussianNoise(0.6))
    posterior = Posterior(prior, operator, torch.tensor([[0.9]], dtype=torch.float64))
    exact = ExactPosterior.from_posterior(posterior)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)[:, None]
    integrand = torch.exp(prior.log_prob(grid) + posterior.log_likelihood(grid))
    assert exact.log_evidence == pytest.approx(math.log(torch.trapezoid(integrand, grid[:, 0])), abs=1e-8)
    single = log_normal(0.9, 1.3 * -2.0, 1.3**2 * 0.5 + 0.36)
    assert exact.log_evidence > single + math.log(0.3)


@pytest.mark.parametrize("bed", ["mixture", "digits_inpainting"])
def test_bayes_rule_holds_pointwise(bed):
    """log p(x | y) = log p(y | x) + log p(x) - log p(y) at arbitrary points: density and evidence agree."""
    if bed == "mixture":
        posterior, exact = gaussian_mixture(dimension=8, measurements=2)
        points = posterior.prior.sample_clean(5, generator=torch.Generator().manual_seed(3))
    else:
        problem = load_problem("problems/inpaint.yaml", "digits-gmm-box")
        posterior, exact = problem.posterior, ExactPosterior.from_posterior(problem.posterior)
        points = exact.sample(5, generator=torch.Generator().manual_seed(3))
    log_likelihood = posterior.operator.log_likelihood(posterior.measurement.to(torch.float64),
                                                       points.to(torch.float64))
    expected = log_likelihood + posterior.prior.log_prob(points) - exact.log_evidence
    assert torch.allclose(exact.log_prob(points), expected, atol=1e-6)


def test_exact_draws_have_the_exact_moments():
    posterior, exact = gaussian_mixture(dimension=8, measurements=2)
    draws = exact.sample(20000, generator=torch.Generator().manual_seed(0))
    assert mean_z_scores(draws, exact).max() < Z_SCORE


def test_untractable_posteriors_say_why():
    prior = GaussianPrior(torch.zeros(2), torch.ones(2), VPSDE())
    poisson = Posterior(prior, matrix_operator(torch.eye(2), PoissonNoise(1.0)), torch.ones(1, 2))
    with pytest.raises(NotTractable, match="needs Gaussian noise"):
        ExactPosterior.from_posterior(poisson)
