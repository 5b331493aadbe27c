import math

import pytest
import torch

from invdiff.exact import ExactPosterior, ExactTwist, NotTractable
from invdiff.operators import GaussianNoise, PoissonNoise, matrix_operator
from invdiff.posterior import Posterior
from invdiff.prior import GaussianMixturePrior, GaussianPrior
from invdiff.problems import load_problem
from invdiff.sde import VESDE, VPSDE
from invdiff.testing import Z_SCORE, gaussian_mixture, linear_gaussian, mean_z_scores


def log_normal(x: float, mean: float, variance: float) -> float:
    """log N(x; mean, variance) for scalars."""
    return -0.5 * ((x - mean) ** 2 / variance + math.log(2 * math.pi * variance))


def test_gaussian_posterior_matches_the_information_form():
    posterior, exact = linear_gaussian(dimension=5, measurements=3, sigma_y=0.4)
    prior_covariance, prior_mean = posterior.prior.covariances[0], posterior.prior.means[0]
    matrix, _ = posterior.operator.matrix((5,))
    y = posterior.measurement[0]
    precision = torch.linalg.inv(prior_covariance) + matrix.T @ matrix / 0.4**2
    covariance = torch.linalg.inv(precision)
    mean = covariance @ (torch.linalg.solve(prior_covariance, prior_mean) + matrix.T @ y / 0.4**2)
    covariance_error = float((exact.covariance - covariance).abs().max())
    mean_error = float((exact.mean - mean).abs().max())
    assert covariance_error < 1e-10, f"covariance differs from the information form by {covariance_error:.3g}"
    assert mean_error < 1e-10, f"mean differs from the information form by {mean_error:.3g}"


def test_the_gaussian_fit_s_posterior_is_the_information_form_with_the_mixture_s_moments():
    """``from_gaussian_fit`` replaces a mixture prior by the Gaussian of its mean and covariance: one component, the
    posterior of that Gaussian (the Wiener filter's mean and covariance); a network prior gets the same from its data."""
    posterior, _ = gaussian_mixture(dimension=4, measurements=2, sigma_y=0.5)
    prior = posterior.prior
    weights = prior.log_weights.exp()
    mean = weights @ prior.means
    second = torch.einsum("k,kde->de", weights, prior.covariances + prior.means[:, :, None] * prior.means[:, None, :])
    covariance = second - mean[:, None] * mean[None, :]
    matrix, _ = posterior.operator.matrix((4,))
    precision = torch.linalg.inv(covariance) + matrix.T @ matrix / 0.5**2
    expected_covariance = torch.linalg.inv(precision)
    expected_mean = expected_covariance @ (torch.linalg.solve(covariance, mean)
                                           + matrix.T @ posterior.measurement[0] / 0.5**2)
    fit = ExactPosterior.from_gaussian_fit(posterior)
    assert fit.means.shape == (1, 4)
    assert torch.allclose(fit.means[0], expected_mean, atol=1e-8)
    assert torch.allclose(fit.covariances[0], expected_covariance, atol=1e-8)


def test_the_gaussian_fit_s_posterior_of_data_with_constant_values():
    """The digits' blank border pixels never vary: their data covariance is singular, and so was the fit's posterior
    (its Cholesky factor failed, and ``twisted_smc -o guidance=gaussian_fit`` with it on the digits UNet); the fit's
    ridge keeps it, with those pixels' posterior variance near zero and the others' unchanged."""
    posterior = load_problem("problems/inpaint.yaml", "digits-box").posterior
    constant = torch.diagonal(posterior.prior.data_covariance()) == 0
    assert constant.any(), "the digits' data covariance no longer has constant values: the test tests nothing"
    variances = torch.diagonal(ExactPosterior.from_gaussian_fit(posterior).covariances[0])
    assert float(variances[constant].max()) < 1e-6
    assert float(variances[~constant].min()) > 1e-6


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
    assert exact.log_evidence > single + math.log(0.3), \
        f"log p(y) {exact.log_evidence:.4f} is below its first component's share {single + math.log(0.3):.4f}"


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.02, 20.0)], ids=["vp", "ve"])
def test_exact_twist_of_a_one_dimensional_mixture_by_quadrature(sde):
    """log p(y | x_t) = log of int p(y | x_0) p(x_0 | x_t) dx_0, by quadrature, at several times and states; near
    t = 0 it is the likelihood at x_t, near t = T the evidence for VP (whose x_T forgets x_0)."""
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                                 torch.tensor([[0.5], [0.2]]), sde)
    operator = matrix_operator(torch.tensor([[1.3]], dtype=torch.float64), GaussianNoise(0.6))
    posterior = Posterior(prior, operator, torch.tensor([[0.9]], dtype=torch.float64))
    twist = ExactTwist(posterior)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    likelihood = -0.5 * ((0.9 - 1.3 * grid) ** 2 / 0.36 + math.log(2 * math.pi * 0.36))
    states = torch.tensor([[-1.7], [0.2], [2.4]], dtype=torch.float64)
    for t in (0.05, 0.3, 0.7):
        lambda_t, sigma_t = float(sde.lambda_t(t)), float(sde.sigma_t(t))
        for state in states[:, 0].tolist():
            joint = prior.log_prob(grid[:, None]) - 0.5 * (state - lambda_t * grid) ** 2 / sigma_t**2
            expected = (torch.logsumexp(joint + likelihood, 0) - torch.logsumexp(joint, 0)).item()
            computed = twist.log_likelihood(torch.tensor([[state]], dtype=torch.float64), t).item()
            assert computed == pytest.approx(expected, abs=1e-6), f"t = {t}, x_t = {state}"
    assert torch.allclose(twist.log_likelihood(states, 1e-7), posterior.log_likelihood(states), atol=1e-4)
    if isinstance(sde, VPSDE):
        evidence = ExactPosterior.from_posterior(posterior).log_evidence
        assert torch.allclose(twist.log_likelihood(states, sde.T), torch.full((3,), evidence, dtype=torch.float64),
                              atol=0.02)   # lambda_T = 0.007: x_T keeps a trace of x_0


def test_noised_posterior_of_a_one_dimensional_mixture_by_quadrature():
    """At noise level rho the likelihood is N(y; a x, sigma_y^2 + rho^2 a^2): weights and mean by quadrature; a
    large rho leaves the prior's weights."""
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]),
                                 torch.tensor([[0.5], [0.2]]), VPSDE())
    operator = matrix_operator(torch.tensor([[1.3]], dtype=torch.float64), GaussianNoise(0.6))
    posterior = Posterior(prior, operator, torch.tensor([[0.9]], dtype=torch.float64))
    rho = 0.8
    noised = ExactPosterior.from_posterior(posterior, noise_level=rho)
    grid = torch.linspace(-12, 12, 200001, dtype=torch.float64)
    variance = 0.6**2 + rho**2 * 1.3**2
    likelihood = -0.5 * ((0.9 - 1.3 * grid) ** 2 / variance + math.log(2 * math.pi * variance))
    integrand = torch.exp(prior.log_prob(grid[:, None]) + likelihood)
    evidence = torch.trapezoid(integrand, grid)
    first_component = 0.3 * torch.exp(-0.5 * ((grid + 2.0) ** 2 / 0.5 + math.log(2 * math.pi * 0.5)) + likelihood)
    assert noised.log_evidence == pytest.approx(math.log(evidence), abs=1e-8)
    assert float(noised.mean) == pytest.approx(float(torch.trapezoid(grid * integrand, grid) / evidence), abs=1e-8)
    assert float(noised.log_weights.exp()[0]) == pytest.approx(float(torch.trapezoid(first_component, grid) / evidence),
                                                              abs=1e-8)
    exact_weights = ExactPosterior.from_posterior(posterior).log_weights.exp()
    assert not torch.allclose(noised.log_weights.exp(), exact_weights, atol=1e-3)
    flat = ExactPosterior.from_posterior(posterior, noise_level=1e4).log_weights.exp()
    assert torch.allclose(flat, torch.tensor([0.3, 0.7], dtype=torch.float64), atol=1e-6)


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
    error = float((exact.log_prob(points) - expected).abs().max())
    assert error < 1e-6, f"log p(x | y) and log p(y | x) + log p(x) - log p(y) differ by up to {error:.3g}"


def test_exact_draws_have_the_exact_moments():
    posterior, exact = gaussian_mixture(dimension=8, measurements=2)
    draws = exact.sample(20000, generator=torch.Generator().manual_seed(0))
    z_score = float(mean_z_scores(draws, exact).max())
    assert z_score < Z_SCORE, f"largest mean z-score of 20000 exact draws {z_score:.2f} (limit {Z_SCORE})"


def test_untractable_posteriors_say_why():
    prior = GaussianPrior(torch.zeros(2), torch.ones(2), VPSDE())
    poisson = Posterior(prior, matrix_operator(torch.eye(2), PoissonNoise(1.0)), torch.ones(1, 2))
    with pytest.raises(NotTractable, match="needs Gaussian noise"):
        ExactPosterior.from_posterior(poisson)
