"""The public way to build a posterior from arrays, its errors, and where samplers start
(``Prior.terminal_sample``: the exact priors' own marginal at time T)."""

import math

import deepinv
import numpy as np
import pytest
import torch

from invdiff.operators import GaussianNoise, PoissonNoise, inpainting, matrix_operator
from invdiff.posterior import Posterior, sample_posterior
from invdiff.prior import GaussianMixturePrior, GaussianPrior, NetworkPrior
from invdiff.sde import VESDE, VPSDE
from invdiff_plugins.dps import DPS
from invdiff_plugins.twisted_smc import TwistedSMC
from invdiff_plugins.ve_smc import VESMC

#: z-score for per-coordinate checks: with <= 50 of them a correct draw fails with probability < 3e-5
Z_SCORE = 5.0


def vector_problem(dimension: int = 4, measurements: int = 2, sigma_y: float = 0.5):
    """A Gaussian prior, a matrix and a measurement built the way the test beds build them."""
    generator = torch.Generator().manual_seed(1)
    factor = 0.5 * torch.randn(dimension, dimension, generator=generator, dtype=torch.float64)
    prior = GaussianPrior(torch.randn(dimension, generator=generator, dtype=torch.float64),
                          factor @ factor.T + 0.1 * torch.eye(dimension, dtype=torch.float64), VPSDE())
    matrix = torch.randn(measurements, dimension, generator=generator, dtype=torch.float64)
    operator = matrix_operator(matrix, GaussianNoise(sigma_y))
    measurement = operator.measure(prior.sample_clean(1, generator=generator), generator)
    return prior, matrix, Posterior(prior, operator, measurement)


def image_prior(size: int = 4) -> GaussianMixturePrior:
    """A two-component diagonal mixture over (1, size, size) images."""
    dimension = size * size
    means = torch.stack([torch.full((dimension,), -0.5), torch.full((dimension,), 0.5)]).double()
    return GaussianMixturePrior(torch.ones(2), means, 0.1 * torch.ones(2, dimension), VPSDE(), (1, size, size))


def test_builder_from_a_numpy_matrix_and_a_one_dimensional_y_equals_the_test_bed_construction():
    prior, matrix, reference = vector_problem()
    built = Posterior.from_arrays(prior, matrix.numpy(), reference.measurement[0].numpy(), noise=0.5)
    assert built.measurement.shape == (1, 2), "the batch axis is added to a 1-D y"
    assert torch.equal(built.measurement, reference.measurement), "the measurement is unchanged"
    assert built.dtype == prior.dtype == torch.float64, "sampling runs in the prior's dtype"
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(built.log_likelihood(x), reference.log_likelihood(x)), "same likelihood"
    assert torch.allclose(built.log_likelihood_grad(x), reference.log_likelihood_grad(x)), "same likelihood gradient"
    assert torch.equal(built.operator.matrix((4,))[0], reference.operator.matrix((4,))[0]), "same operator"


@pytest.mark.parametrize("measurement", [
    lambda y: y.numpy(), lambda y: y[0].numpy().astype(np.float32), lambda y: y[0], lambda y: y[0].tolist()],
    ids=["numpy-batched", "numpy-float32-1d", "torch-1d", "list"])
def test_every_form_of_y_gives_the_same_measurement_in_the_prior_dtype(measurement):
    prior, matrix, reference = vector_problem()
    built = Posterior.from_arrays(prior, matrix, measurement(reference.measurement), noise=GaussianNoise(0.5))
    assert built.measurement.dtype == torch.float64 and built.measurement.shape == (1, 2)
    assert torch.allclose(built.measurement, reference.measurement, atol=1e-6)


def test_the_constructor_names_an_operator_that_is_not_a_forward_operator():
    prior, matrix, reference = vector_problem()
    with pytest.raises(ValueError, match="operator: Posterior\\(prior, operator, y\\) takes an invdiff ForwardOperator, "
                                         "got ndarray; Posterior.from_arrays takes a matrix"):
        Posterior(prior, matrix.numpy(), reference.measurement)


def test_the_constructor_takes_numpy_and_one_dimensional_y_like_the_builder():
    prior, matrix, reference = vector_problem()
    direct = Posterior(prior, reference.operator, reference.measurement[0].numpy())
    assert torch.equal(direct.measurement, reference.measurement)
    float32 = Posterior(prior, reference.operator, reference.measurement[0].float())
    assert float32.dtype == torch.float32, "a floating torch tensor keeps its dtype in the constructor"
    assert Posterior.from_arrays(prior, reference.operator, reference.measurement.float()).dtype == torch.float64


def test_a_network_prior_samples_in_float32_unless_its_network_is_float64():
    for network_dtype, expected in ((torch.float16, torch.float32), (torch.float32, torch.float32),
                                    (torch.float64, torch.float64)):
        prior = NetworkPrior(torch.nn.Linear(3, 3).to(network_dtype), VPSDE(), (3,), "epsilon")
        assert prior.dtype == expected, f"a {network_dtype} network samples in {expected}"


def test_builder_takes_a_deepinv_physics_on_image_events():
    prior = image_prior()
    mask = torch.ones(1, 4, 4, dtype=torch.float64)
    mask[:, 1:3, 1:3] = 0
    physics = deepinv.physics.Inpainting(img_size=(1, 4, 4), mask=mask)
    y = np.zeros((1, 4, 4))
    posterior = Posterior.from_arrays(prior, physics, y, noise=0.1)
    assert posterior.measurement.shape == (1, 1, 4, 4) and posterior.operator.name == "Inpainting"
    result = sample_posterior(TwistedSMC(num_steps=5, num_particles=8), posterior, 4)
    assert result.samples.shape == (4, 1, 4, 4) and result.samples.dtype == torch.float64


def test_builder_keeps_a_forward_operator_and_its_noise():
    prior = image_prior()
    operator = inpainting((1, 4, 4), PoissonNoise(0.5), mask=torch.ones(1, 4, 4), dtype=torch.float64)
    posterior = Posterior.from_arrays(prior, operator, torch.ones(1, 1, 4, 4))
    assert posterior.operator is operator


@pytest.mark.parametrize("arguments, message", [
    (lambda p, m, y: (p, m, y), r"noise: required with a matrix or a deepinv physics"),
    (lambda p, m, y: (p, m, y, "0.5"), r"noise: expected sigma_y \(a positive number\) or a NoiseModel, got str"),
    (lambda p, m, y: (p, m, y, -1.0), r"sigma_y must be > 0, got -1.0"),
    (lambda p, m, y: (p, matrix_operator(m, GaussianNoise(0.5)), y, 0.5), r"noise: this ForwardOperator already has"),
    (lambda p, m, y: (p, m[:, :3], y, 0.5), r"operator: the matrix has 3 columns, but the prior's events have 4"),
    (lambda p, m, y: (p, m[None], y, 0.5), r"operator: a matrix must be 2-D \(measurements, dimension\), got shape "
                                           r"\(1, 2, 4\)"),
    (lambda p, m, y: (p, "A", y, 0.5), r"operator \(a ForwardOperator, a deepinv Physics or a matrix\): expected "
                                      r"numbers"),
    (lambda p, m, y: (p, m, y[:, :1], 0.5), r"the measurement has shape \(1, 1\), but the operator maps one event "
                                            r"of the prior \(4,\) to shape \(2,\)"),
    (lambda p, m, y: (p, m, y.repeat(2, 1), 0.5), r"the measurement must have batch size 1 \(one y per posterior\), "
                                                  r"got shape \(2, 2\)"),
    (lambda p, m, y: (p, m, torch.full((2,), float("nan")), 0.5), r"the measurement contains NaN or infinite values"),
    (lambda p, m, y: (p, m, "y", 0.5), r"the measurement: expected numbers"),
    (lambda p, m, y: (p, m, y.to(torch.complex128), 0.5), r"the measurement: expected real numbers, got "
                                                          r"torch.complex128"),
    (lambda p, m, y: (p, m * float("nan"), y, 0.5), r"operator \(a ForwardOperator, a deepinv Physics or a matrix\) "
                                                  r"contains NaN or infinite values"),
    (lambda p, m, y: (p, m, y, float("inf")), r"noise: sigma_y must be a finite positive number, got inf"),
    (lambda p, m, y: (image_prior(2), m, y, 0.5), r"operator: a matrix acts on vectors, but the prior's events have "
                                                  r"shape \(1, 2, 2\)"),
    (lambda p, m, y: (image_prior(2), deepinv.physics.Inpainting(img_size=(1, 3, 3), mask=torch.ones(1, 3, 3)), y,
                      0.5), r"the operator 'Inpainting' cannot take the prior's events of shape \(1, 2, 2\)"),
], ids=["no-noise", "noise-string", "negative-sigma", "noise-twice", "columns", "three-axes", "not-numbers",
        "y-shape", "y-batch", "y-nan", "y-string", "y-complex", "matrix-nan", "noise-inf", "image-prior-matrix",
        "physics-size"])
def test_builder_errors_are_one_line_naming_the_argument(arguments, message):
    prior, matrix, reference = vector_problem()
    prior_, operator, measurement, *noise = arguments(prior, matrix, reference.measurement)
    with pytest.raises(ValueError, match=message) as error:
        Posterior.from_arrays(prior_, operator, measurement, noise=noise[0] if noise else None)
    assert "\n" not in str(error.value), "the message is one line"


def mixture_terminal_moments(prior: GaussianMixturePrior) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of ``sum_k w_k N(lambda_T mu_k, lambda_T^2 Sigma_k + sigma_T^2 I)``."""
    sde = prior.sde
    lambda_end, sigma_end = sde.lambda_t(sde.T), sde.sigma_t(sde.T)
    weights = prior.log_weights.exp()
    means = lambda_end * prior.means
    covariances = lambda_end**2 * prior.covariances + sigma_end**2 * torch.eye(prior.dimension, dtype=torch.float64)
    mean = (weights[:, None] * means).sum(0)
    second_moment = (weights[:, None, None] * (covariances + means[:, :, None] * means[:, None, :])).sum(0)
    return mean, second_moment - torch.outer(mean, mean)


def moment_z_scores(draws: torch.Tensor, mean: torch.Tensor, covariance: torch.Tensor) -> tuple[float, float]:
    """The largest |z| of the sample mean and of the sample covariance (around the exact mean), each
    in units of its standard error estimated from the draws (the central limit theorem)."""
    count = len(draws)
    mean_z = ((draws.mean(0) - mean).abs() / (covariance.diagonal() / count).sqrt()).max()
    centred = draws - mean
    products = centred[:, :, None] * centred[:, None, :]
    covariance_z = ((products.mean(0) - covariance).abs() / (products.std(0) / math.sqrt(count))).max()
    return float(mean_z), float(covariance_z)


@pytest.mark.parametrize("sde", [VPSDE(2.0, 2.0, T=0.7), VESDE(0.01, 2.0)], ids=["ou", "ve"])
def test_terminal_sample_of_a_mixture_has_the_exact_marginal_moments(sde):
    """Three full-covariance components whose means still show at T: 40000 draws' mean and covariance
    lie within Z_SCORE standard errors of the exact marginal's, while the SDE's reference start does not."""
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(3, 3, 3, generator=generator, dtype=torch.float64)
    covariances = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(3, dtype=torch.float64)
    means = 3 * torch.randn(3, 3, generator=generator, dtype=torch.float64)
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.3, 0.2]), means, covariances, sde)
    mean, covariance = mixture_terminal_moments(prior)
    draws = prior.terminal_sample(40000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert draws.shape == (40000, 3) and draws.dtype == torch.float64
    mean_z, covariance_z = moment_z_scores(draws, mean, covariance)
    assert mean_z < Z_SCORE and covariance_z < Z_SCORE, f"z-scores {mean_z:.1f}, {covariance_z:.1f}"
    reference = sde.terminal_sample((40000, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert max(moment_z_scores(reference, mean, covariance)) > Z_SCORE, "the check detects the reference start"


def test_terminal_sample_takes_dtype_and_repeats_with_the_seed():
    prior = image_prior()
    first = prior.terminal_sample(6, generator=torch.Generator().manual_seed(3))
    again = prior.terminal_sample(6, generator=torch.Generator().manual_seed(3))
    assert first.shape == (6, 1, 4, 4) and first.dtype == torch.float32
    assert torch.equal(first, again)


def test_a_prior_without_a_known_marginal_starts_from_the_sde_reference():
    sde = VPSDE()
    prior = NetworkPrior(torch.nn.Identity(), sde, (3,), "epsilon")
    draws = prior.terminal_sample(5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = sde.terminal_sample((5, 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(draws, expected)


@pytest.mark.parametrize("sampler", [DPS(num_steps=3), TwistedSMC(num_steps=3, num_particles=6),
                                     VESMC(num_steps=3, num_particles=6)], ids=["dps", "twisted_smc", "ve_smc"])
def test_samplers_start_from_the_prior_terminal_sample(sampler, monkeypatch):
    prior, _, posterior = vector_problem()
    calls = []
    original = prior.terminal_sample

    def recording(num_samples, **keywords):
        calls.append((num_samples, keywords["dtype"], keywords["device"]))
        return original(num_samples, **keywords)

    monkeypatch.setattr(prior, "terminal_sample", recording)
    sample_posterior(sampler, posterior, 6)
    assert calls == [(6, torch.float64, posterior.device)], "one start, in the posterior's dtype and device"


def test_sample_posterior_asks_the_sampler_to_check_the_problem_first():
    """``Sampler.check`` refuses before ``sample`` runs; the default accepts."""
    from invdiff.posterior import Sampler, SampleResult, UnsupportedProblem

    class Picky(Sampler):
        name = "picky"
        sampled = False

        def check(self, posterior):
            if posterior.operator.noise.sigma_y < 1:
                raise UnsupportedProblem("picky needs sigma_y >= 1")

        def sample(self, posterior, num_samples, *, generator, monitor):
            type(self).sampled = True
            return SampleResult(samples=torch.zeros(num_samples, *posterior.prior.event_shape, dtype=posterior.dtype))

    _, _, posterior = vector_problem(sigma_y=0.5)
    with pytest.raises(UnsupportedProblem, match="picky needs sigma_y >= 1"):
        sample_posterior(Picky(), posterior, 2)
    assert not Picky.sampled
    _, _, posterior = vector_problem(sigma_y=1.5)
    assert sample_posterior(Picky(), posterior, 2).samples.shape == (2, 4) and Picky.sampled


@pytest.mark.parametrize("num_samples", [0, 2.5, True, "4"])
def test_sample_posterior_takes_a_positive_integer_number_of_samples(num_samples):
    _, _, posterior = vector_problem()
    with pytest.raises(ValueError, match=f"num_samples must be an integer >= 1, got {num_samples!r}"):
        sample_posterior(DPS(num_steps=2), posterior, num_samples)


def _returning(result_of):
    """A sampler whose ``sample`` returns ``result_of(posterior, num_samples)``."""
    from invdiff.posterior import Sampler

    class Returning(Sampler):
        name = "returning"

        def sample(self, posterior, num_samples, *, generator, monitor):
            return result_of(posterior, num_samples)

    return Returning()


def _draws(posterior, count, **kwargs):
    return torch.zeros(count, *posterior.prior.event_shape, **{"dtype": posterior.dtype, **kwargs})


@pytest.mark.parametrize("result_of, message", [
    (lambda posterior, n: _draws(posterior, n), "sample returned Tensor, not an invdiff SampleResult"),
    (lambda posterior, n: _result(samples=_draws(posterior, 1)), r"the samples have shape \(1, 4\), expected \(3, 4\)"),
    (lambda posterior, n: _result(samples=_draws(posterior, n + 2)), r"the samples have shape \(5, 4\), expected"),
    (lambda posterior, n: _result(samples=_draws(posterior, n).flatten()), r"the samples have shape \(12,\)"),
    (lambda posterior, n: _result(samples=_draws(posterior, n, dtype=torch.int64)),
     "the samples are torch.int64, not a real floating-point tensor"),
    (lambda posterior, n: _result(samples=_draws(posterior, n, dtype=torch.complex64)),
     "the samples are torch.complex64, not a real"),
    (lambda posterior, n: _result(samples=_draws(posterior, n) + math.nan), "the final samples contain NaN"),
    (lambda posterior, n: _result(samples=_draws(posterior, n), particles=_draws(posterior, 8)),
     "particles and log_weights go together"),
    (lambda posterior, n: _result(samples=_draws(posterior, n), particles=_draws(posterior, 8),
                                  log_weights=torch.zeros(3)),
     "particles and log_weights go together, one log-weight per particle"),
    (lambda posterior, n: _result(samples=_draws(posterior, n), log_evidence=math.nan),
     "log_evidence is nan, not a finite number"),
])
def test_sample_posterior_refuses_a_result_that_is_not_the_samples_asked_for(result_of, message):
    """A sampler's mistake is a ``SamplingError`` naming it, not a run scored on one sample for three, on samples cut
    to integers, or a NaN evidence written into summary.json."""
    from invdiff.posterior import SamplingError

    _, _, posterior = vector_problem()
    with pytest.raises(SamplingError, match=f"returning: {message}"):
        sample_posterior(_returning(result_of), posterior, 3)


def _result(**fields):
    from invdiff.posterior import SampleResult

    return SampleResult(**fields)
