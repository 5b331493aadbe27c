import pytest
import torch
from sklearn.mixture import GaussianMixture

from invdiff.testing import Z_SCORE
from invdiff.prior import GaussianMixturePrior, GaussianPrior, digits_gaussian_mixture
from invdiff.sde import VESDE, VPSDE, DDPMSchedule

SDES = [VPSDE(), VESDE(0.01, 20.0), DDPMSchedule()]


def random_mixture(diagonal: bool, sde=None, seed: int = 0) -> GaussianMixturePrior:
    generator = torch.Generator().manual_seed(seed)
    components, dimension = 3, 4
    means = 2 * torch.randn(components, dimension, generator=generator, dtype=torch.float64)
    if diagonal:
        covariances = 0.2 + torch.rand(components, dimension, generator=generator, dtype=torch.float64)
    else:
        factors = torch.randn(components, dimension, dimension, generator=generator, dtype=torch.float64)
        covariances = factors @ factors.transpose(1, 2) / dimension + 0.1 * torch.eye(dimension, dtype=torch.float64)
    weights = torch.rand(components, generator=generator, dtype=torch.float64)
    return GaussianMixturePrior(weights, means, covariances, sde or VPSDE(), event_shape=(1, 2, 2))


@pytest.mark.parametrize("diagonal", [False, True], ids=["full", "diag"])
@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_mixture_score_is_the_gradient_of_the_diffused_log_density(diagonal, sde):
    prior = random_mixture(diagonal, sde)
    x = torch.randn(5, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    for t in (0.02, 0.3, 0.9):
        (autograd_score,) = torch.autograd.grad(prior.log_prob(x, t).sum(), x)
        assert torch.allclose(prior.score(x.detach(), t), autograd_score, atol=1e-10)


def test_diagonal_and_full_covariances_agree():
    diagonal = random_mixture(diagonal=True)
    full = GaussianMixturePrior(diagonal.log_weights.exp(), diagonal.means, diagonal.covariances, VPSDE(),
                                event_shape=(1, 2, 2))
    x = torch.randn(6, 1, 2, 2, dtype=torch.float64)
    assert torch.allclose(diagonal.log_prob(x, 0.4), full.log_prob(x, 0.4))
    assert torch.allclose(diagonal.score(x, 0.4), full.score(x, 0.4))


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_gaussian_denoiser_is_the_exact_conditional_mean(sde):
    generator = torch.Generator().manual_seed(3)
    factor = torch.randn(3, 3, generator=generator, dtype=torch.float64)
    covariance, mean = factor @ factor.T + 0.2 * torch.eye(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    prior = GaussianPrior(mean, covariance, sde)
    x, t = torch.randn(4, 3, dtype=torch.float64), 0.5
    lambda_t, sigma_t = prior.sde.lambda_t(t), prior.sde.sigma_t(t)
    diffused = lambda_t**2 * covariance + sigma_t**2 * torch.eye(3, dtype=torch.float64)
    expected = mean + (x - lambda_t * mean) @ torch.linalg.solve(diffused, lambda_t * covariance)
    assert torch.allclose(prior.denoise(x, t), expected)
    assert prior.evaluations == 4


@pytest.mark.parametrize("sde", SDES, ids=lambda sde: sde.settings()["type"])
def test_unconditional_sampling_matches_the_prior_moments(sde):
    prior = random_mixture(diagonal=False, sde=sde)
    samples = prior.sample(4000, num_steps=200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    flat = samples.reshape(len(samples), -1)
    weights = prior.log_weights.exp()
    mean = (weights[:, None] * prior.means).sum(0)
    second_moment = (weights[:, None, None] * (prior.covariances + prior.means[:, :, None] * prior.means[:, None])).sum(0)
    variance = second_moment.diagonal() - mean**2
    assert ((flat.mean(0) - mean).abs() / (variance / len(flat)).sqrt()).max() < Z_SCORE


def test_exact_clean_draws_match_the_mixture():
    prior = random_mixture(diagonal=False)
    draws = prior.sample_clean(20000, generator=torch.Generator().manual_seed(1)).reshape(20000, -1)
    weights = prior.log_weights.exp()
    mean = (weights[:, None] * prior.means).sum(0)
    assert torch.allclose(draws.mean(0), mean, atol=0.06)


def test_from_sklearn_keeps_the_fitted_density():
    data = torch.randn(300, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64).numpy()
    for covariance_type in ("full", "diag", "tied", "spherical"):
        mixture = GaussianMixture(2, covariance_type=covariance_type, random_state=0).fit(data)
        prior = GaussianMixturePrior.from_sklearn(mixture, VPSDE())
        ours = prior.log_prob(torch.as_tensor(data[:10]), 0.0).numpy()
        assert ours == pytest.approx(mixture.score_samples(data[:10]), rel=1e-8)
        responsibilities = prior.responsibilities(torch.as_tensor(data[:10])).numpy()
        assert responsibilities == pytest.approx(mixture.predict_proba(data[:10]), abs=1e-8)


def test_digits_prior_is_an_image_prior_in_minus_one_one():
    prior = digits_gaussian_mixture(VPSDE())
    assert prior.event_shape == (1, 8, 8) and prior.data_range == (-1.0, 1.0)
    assert prior.settings()["components"] == 10
    draws = prior.sample_clean(64, generator=torch.Generator().manual_seed(0))
    assert -1.5 < float(draws.mean()) < 0.0


def test_score_rejects_the_wrong_shape():
    prior = random_mixture(diagonal=True)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(B, 1, 2, 2\)"):
        prior.score(torch.zeros(2, 4), 0.5)


@pytest.mark.parametrize("batch", [3, 8], ids=["batch-differs-from-width", "batch-equals-width"])
def test_score_and_denoise_take_one_time_per_chain(batch):
    """A (B,) time vector gives each chain the result of its own scalar time (a batch of 8 on 8x8
    images once broadcast lambda_t along the image's last axis instead of the batch)."""
    from invdiff.checkpoints import load_prior

    prior = load_prior("digits")
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    times = torch.linspace(0.1, 0.9, batch, dtype=torch.float64)
    for method in (prior.score, prior.denoise):
        together = method(x, times)
        one_by_one = torch.cat([method(x[index:index + 1], float(times[index])) for index in range(batch)])
        difference = float((together - one_by_one).abs().max())   # float32 divided by lambda_t ~ 0.02 at t = 0.9
        assert difference < 1e-3, f"{method.__name__} with per-chain times differs by {difference:.3g} from scalar times"


class _GaussianNoisePredictor(torch.nn.Module):
    """The exact noise prediction ``sigma_t (lambda_t^2 S + sigma_t^2 I)^-1 (x - lambda_t m)`` of a Gaussian
    ``N(m, S)`` prior: a network prior whose denoiser's Jacobian is known."""

    def __init__(self, mean, covariance, sde):
        super().__init__()
        self.mean = torch.nn.Parameter(mean, requires_grad=False)   # a float64 parameter: the prior samples in float64
        self.covariance, self.sde = covariance, sde

    def forward(self, x, times):
        lambda_t, sigma_t = self.sde.lambda_t(times), self.sde.sigma_t(times)
        spread = lambda_t[:, None, None] ** 2 * self.covariance + sigma_t[:, None, None] ** 2 * torch.eye(len(self.mean))
        centred = x - lambda_t[:, None] * self.mean
        return sigma_t[:, None] * torch.linalg.solve(spread, centred[..., None])[..., 0]


def test_measured_covariance_by_jacobian_products_matches_the_closed_forms():
    """``A Cov[x0 | x_t] A^T``: through Jacobian-vector products of a denoiser (the default, what a network prior
    has) it equals the mixture's closed form (law of total covariance) and, for a network that is the exact
    denoiser of a Gaussian prior, the Gaussian's ``A S sigma_t^2 (lambda_t^2 S + sigma_t^2 I)^-1 A^T``."""
    from invdiff.prior import NetworkPrior, Prior
    from invdiff.testing import gaussian_mixture, linear_gaussian

    generator = torch.Generator().manual_seed(0)
    posterior, _ = gaussian_mixture(dimension=8)
    prior = posterior.prior
    matrix = torch.randn(3, 8, generator=generator, dtype=torch.float64)
    for t in (0.9, 0.4, 0.05):
        x = prior.sde.lambda_t(t) * prior.sample_clean(5, generator=generator) + prior.sde.sigma_t(t) * torch.randn(
            5, 8, generator=generator, dtype=torch.float64)
        closed = prior.measured_covariance(x, t, matrix)
        by_products = Prior.measured_covariance(prior, x, t, matrix)
        assert closed.shape == (5, 3, 3)
        assert torch.allclose(closed, by_products, rtol=1e-8, atol=1e-10), \
            f"t={t}: closed form and Jacobian products differ by {float((closed - by_products).abs().max()):.3g}"

    gaussian = linear_gaussian(dimension=4)[0].prior
    mean, covariance = gaussian.means[0], gaussian.covariances[0]
    network = NetworkPrior(_GaussianNoisePredictor(mean, covariance, gaussian.sde), gaussian.sde, (4,), "epsilon")
    matrix = torch.randn(2, 4, generator=generator, dtype=torch.float64)
    x = torch.randn(3, 4, generator=generator, dtype=torch.float64)
    for t in (0.8, 0.1):
        lambda_t, sigma_t = float(gaussian.sde.lambda_t(t)), float(gaussian.sde.sigma_t(t))
        conditional = sigma_t**2 * covariance @ torch.linalg.inv(lambda_t**2 * covariance + sigma_t**2 * torch.eye(4))
        expected = (matrix @ conditional @ matrix.T).expand(3, 2, 2)
        for source in (network, gaussian):
            assert torch.allclose(source.measured_covariance(x, t, matrix), expected, rtol=1e-8, atol=1e-10), \
                f"t={t}: {type(source).__name__}'s covariance differs from the Gaussian's"


class _LinearDenoiser(torch.nn.Module):
    """``x0_hat = M x``: a network whose denoiser's Jacobian ``M`` is indefinite."""

    def __init__(self, matrix):
        super().__init__()
        self.matrix = torch.nn.Parameter(matrix, requires_grad=False)

    def forward(self, x, times):
        return x @ self.matrix.T


def test_measured_covariance_of_a_network_is_a_covariance():
    """A network's ``(sigma_t^2 / lambda_t) d x0_hat / d x_t`` can have negative eigenvalues, which made the second-order
    twist's Cholesky factor fail: the covariance returned is its symmetric part with those set to zero (the nearest
    covariance), and twisted_smc with ``twisting: second_order`` runs."""
    from invdiff.posterior import Posterior, sample_posterior
    from invdiff.prior import NetworkPrior
    from invdiff.testing import linear_gaussian
    from invdiff_plugins.twisted_smc import TwistedSMC

    gaussian_posterior, _ = linear_gaussian(dimension=4, sigma_y=0.01)
    jacobian = torch.tensor([[1.0, 0.3, 0.0, 0.0], [0.0, -2.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0],
                             [0.0, 0.0, 0.0, -0.1]], dtype=torch.float64)
    network = NetworkPrior(_LinearDenoiser(jacobian), gaussian_posterior.prior.sde, (4,), "x0")
    t = 0.5
    scale = float(network.sde.sigma_t(t) ** 2 / network.sde.lambda_t(t))
    eigenvalues, eigenvectors = torch.linalg.eigh(scale * 0.5 * (jacobian + jacobian.T))
    expected = eigenvectors @ torch.diag(eigenvalues.clamp(min=0.0)) @ eigenvectors.T
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    covariance = network.measured_covariance(x, t, torch.eye(4, dtype=torch.float64))
    assert torch.allclose(covariance, expected.expand(3, 4, 4), atol=1e-12)
    assert bool((eigenvalues < 0).any()) and float(torch.linalg.eigvalsh(covariance).min()) > -1e-12
    posterior = Posterior(network, gaussian_posterior.operator, gaussian_posterior.measurement)
    result = sample_posterior(TwistedSMC(num_steps=5, num_particles=4, twisting="second_order"), posterior, 4,
                              generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(result.samples).all()


def test_a_shipped_network_prior_knows_its_training_data_covariance():
    """The natural prior's checkpoint records its training data, so ``data_covariance`` is the covariance of 16384
    training patches at its event shape (in [-1, 1]; computed once, the same every time); above
    ``MAX_COVARIANCE_DIMENSION`` values, and for a network with no recorded data, there is none."""
    from invdiff.checkpoints import load_prior
    from invdiff.data import training_moments

    prior = load_prior("natural")
    covariance = prior.data_covariance()
    assert covariance.shape == (1024, 1024) and prior.data_covariance() is covariance
    assert torch.allclose(covariance, covariance.T) and float(torch.linalg.eigvalsh(covariance)[0]) > 0
    assert 0.05 < float(covariance.diagonal().mean()) < 0.5
    mean, expected = training_moments({"source": "natural", "scales": [1, 2, 4]}, (1, 32, 32))
    assert torch.equal(covariance, expected) and torch.equal(prior.data_mean(), mean) and mean.shape == (1024,)
    assert -1 < float(mean.min()) and float(mean.max()) < 1
    assert prior.resized((1, 64, 64)).data_covariance() is None
    prior.metadata = {}
    assert prior.resized((1, 32, 32)).data_covariance() is None and prior.resized((1, 32, 32)).data_mean() is None


def test_a_checkpoint_prior_records_the_hash_of_its_file(tmp_path):
    """The same path can hold other weights (a shipped prior retrained in place): the settings a summary records
    name the file's SHA-256, for the network priors and the patch GMM alike."""
    import hashlib

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from invdiff.checkpoints import NATURAL_GMM_PATH, SHIPPED_PRIORS_DIRECTORY, load_prior, natural_gaussian_mixture

    shipped = SHIPPED_PRIORS_DIRECTORY / "digits.safetensors"
    assert load_prior("digits").settings()["checkpoint_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert natural_gaussian_mixture(VPSDE()).settings()["checkpoint_sha256"] == \
        hashlib.sha256(NATURAL_GMM_PATH.read_bytes()).hexdigest()
    with safe_open(str(shipped), "pt") as stream:
        document = stream.metadata()
    tensors = load_file(str(shipped))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] + 1e-3   # other weights under the same metadata
    save_file(tensors, str(tmp_path / "digits.safetensors"), metadata=document)
    retrained = load_prior(tmp_path / "digits.safetensors").settings()["checkpoint_sha256"]
    assert retrained != load_prior("digits").settings()["checkpoint_sha256"]
