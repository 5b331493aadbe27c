"""Exact posteriors for a linear operator, Gaussian noise and a Gaussian or Gaussian-mixture prior.

With ``y = A x + b + eta``, ``eta ~ N(0, sigma_y^2 I)`` and ``x ~ sum_k w_k N(mu_k, Sigma_k)``, the
posterior is again a Gaussian mixture (ALGORITHMS.md section 6; MCGdiff, Cardoso et al. 2024):

    S_k = A Sigma_k A^T + sigma_y^2 I,         K_k = Sigma_k A^T S_k^{-1}
    mean_k = mu_k + K_k (y - A mu_k - b),      cov_k = Sigma_k - K_k A Sigma_k
    w'_k ∝ w_k N(y; A mu_k + b, S_k),          p(y) = sum_k w_k N(y; A mu_k + b, S_k)

All in float64. These are the references every sampler is checked against.

``noise_level = rho > 0`` gives the posteriors an annealing sampler passes through instead: the likelihood
``N(y; A x + b, sigma_y^2 I + rho^2 A A^T)``, that of a measurement of ``x + rho * noise`` (TDS's twist at
``r_t = rho``, ALGORITHMS.md section 5); ``S_k`` then gains ``rho^2 A A^T``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from invdiff.noise import GaussianNoise
from invdiff.posterior import Posterior, UnsupportedProblem
from invdiff.prior import GaussianMixturePrior

__all__ = ["ExactPosterior", "ExactTwist", "NotTractable"]


class NotTractable(UnsupportedProblem):
    """The posterior has no closed form here; the message says which ingredient is missing."""


def _gaussian_log_density(x: Tensor, mean: Tensor, cholesky: Tensor) -> Tensor:
    """``log N(x; mean, L L^T)`` for ``x`` of shape ``(..., m)`` and a batch of Cholesky factors."""
    whitened = torch.linalg.solve_triangular(cholesky, (x - mean)[..., None], upper=False)[..., 0]
    log_determinant = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * ((whitened**2).sum(-1) + log_determinant + x.shape[-1] * math.log(2 * math.pi))


def _check_linear_gaussian(posterior: Posterior, what: str, mixture: bool = True) -> None:
    """Raise ``NotTractable`` naming the ingredient ``what`` lacks: a mixture prior (unless ``mixture`` is false), a
    linear operator, Gaussian noise."""
    prior, operator = posterior.prior, posterior.operator
    if mixture and not isinstance(prior, GaussianMixturePrior):
        raise NotTractable(f"{what} needs a Gaussian or Gaussian-mixture prior (e.g. digits_gmm, natural_gmm); the "
                           f"prior '{prior.settings()['kind']}' is a {type(prior).__name__}")
    if not operator.linear:
        raise NotTractable(f"{what} needs a linear operator; '{operator.name}' is not")
    if not isinstance(operator.noise, GaussianNoise):
        raise NotTractable(f"{what} needs Gaussian noise, not {operator.noise.settings()['type']}")


def _linear_gaussian_parts(posterior: Posterior, what: str,
                           mixture: bool = True) -> tuple[Tensor, Tensor, Tensor, float]:
    """``(A, b, y, sigma_y)`` on the CPU in float64, or ``NotTractable`` naming the ingredient ``what`` lacks."""
    _check_linear_gaussian(posterior, what, mixture)
    prior, operator = posterior.prior, posterior.operator
    matrix, offset = operator.matrix(prior.event_shape, device=posterior.measurement.device)
    measurement = posterior.measurement.detach().to("cpu", torch.float64).flatten()
    return matrix.cpu().to(torch.float64), offset.cpu().to(torch.float64), measurement, operator.noise.sigma_y


class ExactPosterior:
    """The closed-form Gaussian-mixture posterior, with exact draws, log-density and evidence."""

    def __init__(self, log_weights: Tensor, means: Tensor, covariances: Tensor, log_evidence: float,
                 event_shape: tuple[int, ...]):
        self.log_weights = log_weights
        self.means = means
        self.covariances = covariances
        self.choleskys = torch.linalg.cholesky(covariances)
        self.log_evidence = float(log_evidence)
        self.event_shape = tuple(event_shape)

    @staticmethod
    def check(posterior: Posterior) -> None:
        """Raise ``NotTractable`` if ``posterior`` has no closed form (cheap: no matrix is formed)."""
        _check_linear_gaussian(posterior, "the exact posterior")

    @classmethod
    def from_posterior(cls, posterior: Posterior, noise_level: float = 0.0) -> "ExactPosterior":
        """Build the exact posterior (at ``noise_level``: module docstring), or raise ``NotTractable`` saying why
        it has no closed form."""
        prior = posterior.prior
        matrix, offset, measurement, sigma_y = _linear_gaussian_parts(posterior, "the exact posterior")
        return cls.from_linear_gaussian(prior.log_weights.cpu(), prior.means.cpu(), prior.covariances.cpu(),
                                        matrix, offset, measurement, sigma_y, prior.event_shape, noise_level)

    @staticmethod
    def check_gaussian_fit(posterior: Posterior) -> None:
        """Raise ``NotTractable`` if ``from_gaussian_fit`` cannot build ``posterior``'s Gaussian fit (cheap)."""
        _check_linear_gaussian(posterior, "the Gaussian fit's posterior", mixture=False)
        if posterior.prior.data_covariance() is None:
            raise NotTractable("the Gaussian fit's posterior needs the prior's data mean and covariance, which this "
                               "prior does not know (mixture priors do, and network priors trained by invdiff on its "
                               "shipped data, on images of at most 3072 values)")

    @classmethod
    def from_gaussian_fit(cls, posterior: Posterior) -> "ExactPosterior":
        """The posterior were the prior the Gaussian with its data mean and covariance (``Prior.data_mean``,
        ``Prior.data_covariance``), in closed form (the Wiener filter's, with its uncertainty); ``NotTractable``
        saying why where ``check_gaussian_fit`` refuses."""
        ExactPosterior.check_gaussian_fit(posterior)
        prior = posterior.prior
        matrix, offset, measurement, sigma_y = _linear_gaussian_parts(posterior, "the Gaussian fit's posterior",
                                                                      mixture=False)
        covariance = prior.data_covariance().cpu()

        def fit(covariance: Tensor) -> "ExactPosterior":
            return cls.from_linear_gaussian(torch.zeros(1, dtype=torch.float64), prior.data_mean().cpu()[None],
                                            covariance[None], matrix, offset, measurement, sigma_y, prior.event_shape)

        try:
            return fit(covariance)
        except NotTractable:
            # Values the data never vary (the digits' blank border pixels) make the fit's covariance singular, and
            # the posterior's with it: a ridge of 1e-8 times the mean variance keeps its Cholesky factor.
            ridged = covariance.clone()
            ridged.diagonal().add_(1e-8 * float(covariance.diagonal().mean()))
            return fit(ridged)

    @classmethod
    def from_linear_gaussian(cls, log_weights: Tensor, means: Tensor, covariances: Tensor, matrix: Tensor,
                             offset: Tensor, measurement: Tensor, sigma_y: float,
                             event_shape: tuple[int, ...] | None = None,
                             noise_level: float = 0.0) -> "ExactPosterior":
        """The posterior of ``y = matrix x + offset + N(0, sigma_y^2 I + noise_level^2 A A^T)`` under the
        mixture prior (``noise_level``: module docstring)."""
        matrix = matrix.to(torch.float64)
        noise_covariance = sigma_y**2 * torch.eye(matrix.shape[0], dtype=torch.float64)
        if noise_level:
            noise_covariance = noise_covariance + noise_level**2 * matrix @ matrix.T
        cross = covariances @ matrix.T                                    # Sigma_k A^T, (K, d, m)
        measurement_covariance = matrix @ cross + noise_covariance        # S_k, (K, m, m)
        measurement_cholesky = torch.linalg.cholesky(measurement_covariance)
        predicted = means @ matrix.T + offset                             # A mu_k + b, (K, m)
        gains = torch.cholesky_solve(cross.transpose(1, 2), measurement_cholesky).transpose(1, 2)  # K_k
        posterior_means = means + (gains @ (measurement - predicted)[..., None])[..., 0]
        posterior_covariances = covariances - gains @ cross.transpose(1, 2)
        posterior_covariances = 0.5 * (posterior_covariances + posterior_covariances.transpose(1, 2))
        joint = log_weights + _gaussian_log_density(measurement, predicted, measurement_cholesky)
        log_evidence = torch.logsumexp(joint, 0)
        try:
            return cls(joint - log_evidence, posterior_means, posterior_covariances, float(log_evidence),
                       event_shape or (means.shape[1],))
        except torch.linalg.LinAlgError:
            raise NotTractable(f"the exact posterior's covariance is numerically singular in float64 (sigma_y "
                               f"{sigma_y:.3g} is too small next to the prior's scale)") from None

    @property
    def mean(self) -> Tensor:
        """Posterior mean, shape ``event_shape``."""
        return (self.log_weights.exp()[:, None] * self.means).sum(0).reshape(self.event_shape)

    @property
    def covariance(self) -> Tensor:
        """Posterior covariance ``(d, d)`` (law of total covariance over the components)."""
        weights = self.log_weights.exp()
        mean = (weights[:, None] * self.means).sum(0)
        centred = self.means - mean
        within = (weights[:, None, None] * self.covariances).sum(0)
        between = (weights[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0)
        return within + between

    def sample(self, num_samples: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Exact posterior draws, shape ``(num_samples, *event_shape)``, float64."""
        components = torch.multinomial(self.log_weights.exp(), num_samples, replacement=True, generator=generator)
        noise = torch.randn((num_samples, self.means.shape[1], 1), generator=generator, dtype=torch.float64)
        draws = self.means[components] + (self.choleskys[components] @ noise)[..., 0]
        return draws.reshape(num_samples, *self.event_shape)

    def log_prob(self, x: Tensor) -> Tensor:
        """Posterior log-density at ``x``: shape ``(B,)``."""
        flat = x.reshape(x.shape[0], -1).to(torch.float64)
        per_component = _gaussian_log_density(flat[:, None, :], self.means, self.choleskys)
        return torch.logsumexp(self.log_weights + per_component, dim=1)


class ExactTwist:
    """``log p(y | x_t)``, the likelihood of the measurement given a diffused state, in closed form for a
    Gaussian-mixture prior, a linear operator and Gaussian noise. With ``x_0 | x_t`` the mixture of
    ``GaussianMixturePrior.clean_given_diffused`` (weights ``P(k | x_t)``, means ``m_k(x_t)``, covariances
    ``V_k(t)``),

        p(y | x_t) = sum_k P(k | x_t) N(y; A m_k(x_t) + b, sigma_y^2 I + A V_k(t) A^T).

    It is the twist for which twisted SMC's intermediate targets ``p_t(x_t) p(y | x_t)`` are the exact
    ``p(x_t | y)`` (Wu et al., NeurIPS 2023; ALGORITHMS.md section 5): an oracle, which no network
    prior has, that tells the engine's own error (weights, resampling, moves, runs, time steps) from the
    error of an approximate twist. ``p(y | x_T) -> p(y)`` as ``t -> T`` and ``-> p(y | x_0)`` as ``t -> 0``.
    Float64 on the prior's device, differentiable in ``x``; the Cholesky factors of ``A V_k A^T`` are kept for
    the last ``t``.
    """

    @staticmethod
    def check(posterior: Posterior) -> None:
        """Raise ``NotTractable`` if ``posterior`` has no closed-form twist (cheap: no matrix is formed)."""
        _check_linear_gaussian(posterior, "the exact twist")

    def __init__(self, posterior: Posterior):
        self.prior = posterior.prior
        matrix, offset, measurement, self.sigma_y = _linear_gaussian_parts(posterior, "the exact twist")
        self.device = self.prior.means.device
        self.matrix = matrix.to(self.device)
        self.residual_offset = (measurement - offset).to(self.device)                # y - b
        rotations = self.prior.eigenvectors                                         # A U_k, (K, m, d):
        self.rotated = (self.matrix.expand(len(self.prior.log_weights), -1, -1) if rotations is None
                        else self.matrix @ rotations)
        self._time, self._factors = None, None

    def measured_covariances(self, variances: Tensor) -> Tensor:
        """``A V_k A^T``, shape ``(K, m, m)``, from the eigenvalues ``(K, d)`` of each ``V_k(t)``."""
        return (self.rotated * variances[:, None, :]) @ self.rotated.transpose(1, 2)

    def _inverse_factors(self, t: float, variances: Tensor) -> tuple[Tensor, Tensor]:
        """``L_k^{-1}`` and ``log det`` of ``sigma_y^2 I + A V_k A^T = L_k L_k^T`` at time ``t``."""
        if self._time != t:
            covariances = self.measured_covariances(variances)
            identity = torch.eye(covariances.shape[-1], dtype=torch.float64, device=self.device)
            cholesky = torch.linalg.cholesky(covariances + self.sigma_y**2 * identity)
            identity = identity.expand_as(cholesky)
            inverse = torch.linalg.solve_triangular(cholesky, identity, upper=False)
            log_determinant = 2 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(-1)
            self._time, self._factors = t, (inverse, log_determinant)
        return self._factors

    def log_likelihood(self, x: Tensor, t: float | Tensor) -> Tensor:
        """``log p(y | x_t = x)`` for a batch ``(B, *event_shape)``: shape ``(B,)``, float64, on ``x``'s device."""
        flat = x.reshape(x.shape[0], -1).to(self.device, torch.float64)
        log_responsibilities, means, variances = self.prior.clean_given_diffused(flat, t)
        inverse, log_determinant = self._inverse_factors(float(t), variances)
        residuals = self.residual_offset - means @ self.matrix.T                      # (B, K, m)
        whitened = torch.einsum("kmn,bkn->bkm", inverse, residuals)
        per_component = -0.5 * ((whitened**2).sum(-1) + log_determinant
                                + residuals.shape[-1] * math.log(2 * math.pi))
        return torch.logsumexp(log_responsibilities + per_component, dim=1).to(x.device)
