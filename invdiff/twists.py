"""Measurement twists with a full covariance of ``x0`` given ``x_t`` (linear operators with Gaussian noise):

    p~_t(y | x_t) = N(y; A x0_hat + b, sigma_y^2 I + A C A^T),

where Tweedie's twist (``invdiff.smc.MeasurementTwist``) puts ``r_t^2 I`` for ``C``. ``SecondOrderTwist`` takes the
prior's own ``C = Cov[x0 | x_t]`` (per particle); ``GaussianFitTwist`` the one of the Gaussian with the prior's data
covariance, the same for every particle (twisted_smc's and ve_smc's ``twisting: gaussian_fit``).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor
from torch.distributions import MultivariateNormal

from invdiff.noise import GaussianNoise
from invdiff.posterior import Posterior, UnsupportedProblem

__all__ = ["SecondOrderTwist", "GaussianFitTwist", "FIT_ERROR_OPTION", "fit_error_usage"]

#: the samplers' ``fit_error`` option of ``twisting: gaussian_fit``
FIT_ERROR_OPTION = Field(1e-4, ge=0, description="twisting 'gaussian_fit': the mean squared error of the network's "
                         "noise prediction, which adds fit_error sigma_t^2 / lambda_t^2 to the twist's variance (0 for "
                         "an exact score; the shipped natural prior's held-out error at t = 0.9 is 1.7e-4)")


def fit_error_usage(twisting: str) -> dict[str, tuple[bool, str]]:
    """``SamplerOptions.usage``'s entry for ``fit_error``: used with ``twisting: gaussian_fit`` only."""
    return {"fit_error": (twisting == "gaussian_fit", "with twisting 'gaussian_fit'")}


class SecondOrderTwist:
    """``log N(y; A x0_hat + b, sigma_y^2 I + A C A^T)`` with ``C = Cov[x0 | x_t]`` the prior's own
    (``Prior.measured_covariance``), held fixed under differentiation: the Gaussian with the right first two
    moments of ``x0`` given ``x_t``, where Tweedie's twist puts ``r_t^2 I`` for ``C``. On the observed values only
    (rows of ``A`` that are not zero); each other value adds its constant ``log N(y_i - b_i; 0, sigma_y^2)``.
    """

    #: most observed values: the twist factors an ``m x m`` matrix per particle and step
    MAX_OBSERVED = 4096

    #: the ``twisting`` option that selects this twist, named in refusals
    TWISTING = "second_order"

    @classmethod
    def check(cls, posterior: Posterior) -> None:
        operator = posterior.operator
        if not operator.linear or not isinstance(operator.noise, GaussianNoise):
            raise UnsupportedProblem(f"twisting '{cls.TWISTING}' needs a linear operator with Gaussian noise; "
                                     f"'{operator.name}' with {operator.noise.settings()['type']} noise is not")
        values = posterior.measurement[0].numel()
        if values > SecondOrderTwist.MAX_OBSERVED:
            raise UnsupportedProblem(f"twisting '{cls.TWISTING}' factors an m x m matrix per particle and step; this "
                                     f"measurement has m = {values} values, at most {SecondOrderTwist.MAX_OBSERVED} "
                                     f"are allowed (use twisting 'tweedie')")

    def __init__(self, posterior: Posterior):
        self.prior = posterior.prior
        matrix, offset = posterior.operator.matrix(self.prior.event_shape, device=posterior.measurement.device)
        residual = posterior.measurement.flatten().to(torch.float64) - offset
        observed = matrix.abs().sum(1) > 0
        self.matrix, self.residual = matrix[observed], residual[observed]
        self.noise_variance = posterior.operator.noise.sigma_y ** 2
        unobserved = residual[~observed]
        self.constant = -0.5 * float((unobserved**2).sum() / self.noise_variance
                                     + len(unobserved) * math.log(2 * math.pi * self.noise_variance))

    def factor(self, x: Tensor, t: Tensor) -> Tensor:
        """The Cholesky factor of ``sigma_y^2 I + A C A^T`` on the observed values, ``(B, m, m)``."""
        covariance = self.prior.measured_covariance(x, t, self.matrix)
        return torch.linalg.cholesky(covariance + self.noise_variance * torch.eye(
            len(self.matrix), dtype=torch.float64, device=covariance.device))

    def __call__(self, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
        mean = denoised.flatten(1).to(torch.float64) @ self.matrix.T
        law = MultivariateNormal(mean, scale_tril=self.factor(x, t), validate_args=False)
        return (law.log_prob(self.residual) + self.constant).to(x.dtype)


class GaussianFitTwist(SecondOrderTwist):
    """``SecondOrderTwist`` with ``C = Cov[x0 | x_t]`` were the prior the Gaussian with its data covariance
    ``Sigma`` (``Prior.data_covariance``), ``sigma_t^2 Sigma (lambda_t^2 Sigma + sigma_t^2 I)^-1``, plus the error of
    the network's ``x0_hat``, ``fit_error sigma_t^2 / lambda_t^2 I`` (``fit_error``: the mean squared error of its
    noise prediction; the estimate divides it by ``lambda_t / sigma_t``, so at large ``t`` it dominates). The same
    for every particle, so it costs no network evaluation (the analytic posterior covariance of Peng et al.,
    "Improving diffusion models for inverse problems using optimal posterior covariance", ICML 2024; Tweedie's
    twist is ``Sigma = infinity``, the ``capped`` twist ``Sigma = tau^2 I``). One ``m x m`` factor per step.

    ``gradient`` is the twist's gradient with the Jacobian of ``x0_hat`` replaced by the Gaussian fit's,
    ``lambda_t C_t / sigma_t^2``: no backpropagation, and bounded where a network's Jacobian, ``1 / lambda_t`` times
    its noise prediction's, is mostly error (large ``t``), which would throw the proposal far off.
    """

    TWISTING = "gaussian_fit"

    @classmethod
    def check(cls, posterior: Posterior) -> None:
        super().check(posterior)
        if posterior.prior.data_covariance() is None:
            raise UnsupportedProblem("twisting 'gaussian_fit' needs the prior's data covariance, which this prior does "
                                     "not know (mixture priors do, and network priors trained by invdiff on its "
                                     "shipped data, on images of at most 3072 values; use twisting 'tweedie')")

    def __init__(self, posterior: Posterior, fit_error: float):
        super().__init__(posterior)
        eigenvalues, eigenvectors = torch.linalg.eigh(self.prior.data_covariance().to(self.matrix))
        self.eigenvalues, self.eigenvectors = eigenvalues.clamp(min=0.0), eigenvectors
        self.rotated = self.matrix @ eigenvectors                                      # A U, (m, d)
        self.gram = self.matrix @ self.matrix.T                                        # A A^T, (m, m)
        self.fit_error = fit_error
        # by time, the covariance and its Cholesky factor: every particle, chunk and move at t shares them
        self._at_time: dict[float, tuple[Tensor, Tensor]] = {}

    def _shrunk(self, t: Tensor) -> tuple[float, float, Tensor]:
        """``lambda_t``, ``sigma_t`` and the eigenvalues of the Gaussian fit's ``Cov[x0 | x_t]``."""
        lambda_t, sigma_t = float(self.prior.sde.lambda_t(t)), float(self.prior.sde.sigma_t(t))
        return lambda_t, sigma_t, self.eigenvalues * sigma_t**2 / (lambda_t**2 * self.eigenvalues + sigma_t**2)

    def covariance(self, t: Tensor) -> Tensor:
        """The twist's covariance ``sigma_y^2 I + A C_t A^T + fit_error sigma_t^2 / lambda_t^2 A A^T``, ``(m, m)``."""
        return self._covariance_and_factor(t)[0]

    def factor(self, x: Tensor, t: Tensor) -> Tensor:
        """The Cholesky factor of ``covariance(t)``, ``(m, m)``."""
        return self._covariance_and_factor(t)[1]

    def _covariance_and_factor(self, t: Tensor) -> tuple[Tensor, Tensor]:
        key = float(t)
        if key not in self._at_time:
            lambda_t, sigma_t, shrunk = self._shrunk(t)
            error = self.fit_error * sigma_t**2 / lambda_t**2
            covariance = (self.rotated * shrunk) @ self.rotated.T + error * self.gram
            covariance.diagonal().add_(self.noise_variance)
            self._at_time = {key: (covariance, torch.linalg.cholesky(covariance))}
        return self._at_time[key]

    def log_likelihood(self, denoised: Tensor, t: float | Tensor) -> Tensor:
        """The twist at a denoised estimate alone (``MeasurementTwist``'s signature: the fit's ``C`` does not
        depend on the particle), differentiable in ``denoised``."""
        return self(denoised, denoised, t)

    def gradient(self, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
        """The twist's gradient in ``x`` with the Gaussian fit's Jacobian of ``x0_hat``,
        ``lambda_t C_t / sigma_t^2``."""
        lambda_t, sigma_t, shrunk = self._shrunk(t)
        residual = self.residual - denoised.flatten(1).to(torch.float64) @ self.matrix.T          # (B, m)
        pulled = torch.cholesky_solve(residual.T, self.factor(x, t)).T @ self.matrix               # (B, d)
        gradient = lambda_t / sigma_t**2 * ((pulled @ self.eigenvectors) * shrunk) @ self.eigenvectors.T
        return gradient.reshape(x.shape).to(x.dtype)
