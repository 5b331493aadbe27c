"""MCGdiff: Cardoso, Janati, Le Corff, Moulines, "Monte Carlo guided Denoising Diffusion models for
Bayesian linear inverse problems", ICLR 2024 (arXiv:2308.07983). Written from ALGORITHMS.md section 5
("MCGdiff"), which says where the reference code (gabrielvc/mcg_diff) must not be followed.

A particle filter for a linear operator with Gaussian noise, run in the operator's singular basis
``A = U S V^T`` (``invdiff.spectral.LinearGaussianSVD``, as transforms; the operator is affine,
``G(x) = A x + b``, so ``b`` is taken off ``y``):

* ``xbar = V^T x``; the observed coordinates (``s_i > 0``) see ``ybar_i = (U^T (y - b))_i / s_i
  = xbar0_i + rho_i eps_i``, ``rho_i = sigma_y / s_i``. With ``c_t = sigma_t^2 / lambda_t^2``, the
  coordinate ``u_t = xbar_t / lambda_t`` is ``xbar0`` plus a Brownian motion run for time ``c_t``, so
  ``ybar_i`` is that coordinate at the diffusion time where ``c = rho_i^2``: the join. On the grid
  ``t_0 = 0 < ... < t_N = T`` the join is the last grid time ``t_j`` with ``c_{t_j} <= rho_i^2``, with
  the residual variance ``e_i^2 = rho_i^2 - c_{t_j}`` kept in the potential, so no grid snapping
  changes ``sigma_y``.
* Factors ``h_{n,i}(x) = N(x; lambda_{t_n} ybar_i, v_{n,i})``, ``v_{n,i} = lambda_{t_n}^2 (c_{t_n} -
  c_{t_j} + e_i^2)``: at the join the potential, before it (higher noise) a forward bridge that steers
  the coordinate to ``lambda_t ybar_i``; after it the coordinate is free (the rest of the reverse
  diffusion supplies the observation-noise spread) and never weighted again.
* Step ``t_{n+1} -> t_n`` with the prior's reverse kernel ``N(m, delta^2 I)`` (``sde.reverse_kernel``,
  ``m`` from one network call at ``x_{t_{n+1}}``): with ``J`` the coordinates not yet past their join
  and ``mbar = V^T m``, the weight depends on the current particle only,
  ``log w = sum_{i in J} log N(lambda_{t_n} ybar_i; mbar_i, delta^2 + v_{n,i})
  - log N(xbar_i; lambda_{t_{n+1}} ybar_i, v_{n+1,i})``, so the particles are reweighted and resampled
  first (``ParticleWeights``; by default at every step, as the reference does, except the first, whose proposal
  leaves from the start's weighted particles and whose weights the second step's resampling takes with its own),
  then moved by the locally optimal proposal: free coordinates
  ``N(mbar_i, delta^2)``, those in ``J`` the product ``N(mbar_i, delta^2) h_{n,i}``.
* Start from the chain's ``N(0, q^2 I)`` (``q = sde.terminal_std()``) with the observed coordinates
  drawn from that Gaussian times ``h_{N,i}``, weighted by its normaliser; no final weight.
* Evidence: the running product of mean weights estimates ``p(ybar) / prod_i lambda_{t_{j_i}}``, and
  ``log p(y) = log p(ybar) - sum_i log s_i + sum log N((U^T (y - b))_k; 0, sigma_y^2)`` over the
  entries with ``s_k = 0``.

Exactness as the particles grow: the posterior ``p_theta(x0) N(ybar; xbar0, rho^2)`` of the model
prior (the chain's x0-law) provided the chain reproduces the forward noising, ``p_theta(x_t | x0) =
q(x_t | x0)`` (an exact score on a fine grid), since the potential sits at ``t_j`` rather than at
``0``. At the sizes of ``invdiff check`` that condition is not met well enough (see
``asymptotically_exact``), so the sampler declares the non-exact standard. Cost: one network forward per
particle per step and two transforms (``V^T``, ``V``; FFTs for blurs and downsampling), no
backpropagation. Masks, circular blurs and circular downsampling at any size; other linear operators
on events of at most ``DenseSVD.MAX_DIMENSION`` values (a dense SVD). The shared options ``twisting``
and ``twisting_cap`` are not used: MCGdiff's twist is the exact bridge above.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import Tensor

import invdiff
from invdiff.noise import GaussianNoise
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor, UnsupportedProblem
from invdiff.sde import SDE
from invdiff.smc import SMCOptions, chunked, particle_weights, weighted_result
from invdiff.spectral import DenseSVD, LinearGaussianSVD

#: singular values below this fraction of the largest are taken as zero (their entries of U^T y are noise)
RANK_TOLERANCE = 1e-6


def _gaussian_log_density(x: Tensor, mean: Tensor, variance: Tensor) -> Tensor:
    """Elementwise ``log N(x; mean, variance)``."""
    return -0.5 * ((x - mean) ** 2 / variance + torch.log(2 * math.pi * variance))


class SpectralObservation:
    """The measurement in the operator's singular basis, on a time grid: ``ybar``, the joins and the
    factor variances ``v``. Grid positions ``p = 0 .. N`` run from ``T`` down to ``0``."""

    def __init__(self, svd: LinearGaussianSVD, measurement: Tensor, sde: SDE, grid: Tensor):
        singular_values = svd.singular_values
        rank = int((singular_values > RANK_TOLERANCE * singular_values.max()).sum()) if len(singular_values) else 0
        rotated = svd.rotate_measurement(measurement - svd.offset)[0]              # U^T (y - b), (m,)
        device = rotated.device
        self.svd = svd
        self.rank = rank
        self.singular_values = singular_values[:rank]
        self.ybar = rotated[:rank] / self.singular_values
        rho_squared = (svd.sigma_y / self.singular_values) ** 2
        self.lambdas = sde.lambda_t(grid).to(device)
        self.bridge_times = (sde.sigma_t(grid).to(device) / self.lambdas) ** 2        # c_t, decreasing to 0
        # the join: the first grid position (highest noise) with c <= rho^2; the last position has c = 0
        self.join = (self.bridge_times[None, :] <= rho_squared[:, None]).to(torch.int8).argmax(1)
        self.residual_variance = rho_squared - self.bridge_times[self.join]        # e^2 >= 0
        self.pure_noise = rotated[rank:]
        self.sigma_y = svd.sigma_y

    def steered(self, position: int) -> Tensor:
        """Which observed coordinates are not past their join at this grid position (the set J)."""
        return position <= self.join

    def target(self, position: int) -> Tensor:
        """``lambda_t ybar``, where the factors centre the observed coordinates."""
        return self.lambdas[position] * self.ybar

    def variance(self, position: int) -> Tensor:
        """``v = lambda_t^2 (c_t - c_{t_j} + e^2)`` per observed coordinate (meaningful where steered)."""
        spread = self.bridge_times[position] - self.bridge_times[self.join] + self.residual_variance
        return self.lambdas[position] ** 2 * spread.clamp(min=0)

    def evidence_correction(self) -> float:
        """What turns the particles' ``log Z_hat`` into ``log p(y)``."""
        correction = torch.log(self.lambdas[self.join]).sum() - torch.log(self.singular_values).sum()
        noise_variance = torch.tensor(self.sigma_y**2, dtype=self.pure_noise.dtype)
        correction += _gaussian_log_density(self.pure_noise, torch.zeros_like(self.pure_noise), noise_variance).sum()
        return float(correction)


class MCGdiffOptions(SMCOptions):
    """The shared SMC options; ``twisting`` and ``twisting_cap`` are not used (the twist is the bridge), and
    resample-move is not implemented here (``move_steps`` must stay 0)."""

    move_steps: int = Field(0, ge=0, le=0, description="resample-move is not implemented for mcgdiff")

    resampling_threshold: float = Field(
        1.0, ge=0, le=1, description="resample when ESS < threshold * K; default 1, every step: between "
        "resamplings MCGdiff's weights compound into heavy tails at high noise (the bridge halves the spread "
        "that the weights then restore), and log Z_hat varied 2-4 times more across seeds at threshold 0.5")

    def usage(self) -> dict[str, tuple[bool, str]]:
        never = (False, "never: mcgdiff's twist is the bridge")
        return {**super().usage(), "twisting": never, "twisting_cap": never,
                "move_step_size": (False, "never: mcgdiff has no resample-move")}


def _no_singular_basis(posterior: Posterior) -> str:
    return (f"mcgdiff needs the operator's singular basis: a mask, circular blur or circular downsampling, or another "
            f"linear operator on events of at most {DenseSVD.MAX_DIMENSION} values; this prior has "
            f"{math.prod(posterior.prior.event_shape)}")


class MCGdiff(Sampler):
    """MCGdiff (Cardoso et al., ICLR 2024): SMC in the operator's singular basis, observed coordinates
    bridged to noised copies of y; linear operators with Gaussian noise, no backprop."""

    name = "mcgdiff"
    Options = MCGdiffOptions
    #: exact as K grows only where the chain reproduces the forward noising (exact score, fine grid);
    #: at the check's sizes the exact standard fails (K = 2000, seed 0, resampling every step): 100 steps,
    #: covariance z-score 10.4 (discretisation: 2.5 at 1000 steps); 300 steps, mixture sliced Wasserstein
    #: 0.145 against a limit of 0.097; 1000 steps, mixture log Z_hat off by 0.44 nats (limit 0.3)
    asymptotically_exact = False
    needs_network_gradient = False

    def check(self, posterior: Posterior) -> None:
        operator = posterior.operator
        if not operator.linear:
            raise UnsupportedProblem(f"mcgdiff needs a linear operator; '{operator.name}' is not linear")
        if not isinstance(operator.noise, GaussianNoise):
            raise UnsupportedProblem(f"mcgdiff needs Gaussian noise, got {operator.noise.settings().get('type')}")
        if not LinearGaussianSVD.exists_for(posterior):
            raise UnsupportedProblem(_no_singular_basis(posterior))

    @staticmethod
    def _spectral_observation(posterior: Posterior, grid: Tensor) -> SpectralObservation:
        svd = LinearGaussianSVD.from_posterior(posterior)
        if svd is None:   # a structured form that failed its reproduction check, on a large event
            raise UnsupportedProblem(_no_singular_basis(posterior))
        return SpectralObservation(svd, posterior.measurement, posterior.prior.sde, grid)

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        prior = posterior.prior
        dtype, device = posterior.dtype, posterior.device
        num_steps = self.options.num_steps
        grid = prior.sde.time_grid(num_steps)
        observation = self._spectral_observation(posterior, grid)
        weights = particle_weights(self.options, num_samples, generator=generator, device=device)

        def to_image(rotated: Tensor) -> Tensor:
            return observation.svd.image(rotated).to(dtype)

        def look_ahead(x: Tensor, position: int) -> tuple[Tensor, Tensor, Tensor]:
            """The reverse kernel from grid position ``position`` (its mean rotated, its variance) and the
            log-weight of the step it starts: one network call at ``x``."""
            t, s = grid[position], grid[position + 1]
            (denoised,) = chunked(lambda part: (prior.denoise(part, t),), x, self.options.batch_size)
            mean, kernel_variance = prior.sde.reverse_kernel(x, denoised, t, s)
            rotated_mean = observation.svd.rotate_image(mean)
            return rotated_mean, kernel_variance, self._log_weight(observation, x, rotated_mean, kernel_variance,
                                                                    position)

        with torch.no_grad():
            rotated, log_start = self._start(observation, weights.total_particles, prior.sde.terminal_std(), generator)
            x = to_image(rotated)
            weights.reweight(log_start, where=f"the initial weights (t={float(grid[0]):.4g})")
            rotated_mean, kernel_variance, log_increment = look_ahead(x, 0)
            weights.reweight(log_increment, where=f"the weights of step 1/{num_steps}")
            for index in range(num_steps):
                x = to_image(self._propose(observation, rotated_mean, kernel_variance, index + 1, generator))
                if index < num_steps - 1:   # weigh and resample for the next step; none after the last
                    rotated_mean, kernel_variance, log_increment = look_ahead(x, index + 1)
                    weights.reweight(log_increment, where=f"the weights of step {index + 2}/{num_steps} "
                                                          f"(t={float(grid[index + 2]):.4g})")
                    (x, rotated_mean), _ = weights.resample_if_needed(x, rotated_mean)
                monitor.step(index, grid[index + 1], x, **weights.end_step())
        weights.add_log_evidence(observation.evidence_correction())
        # the last kernel (to t = 0) has no noise, so the last step's copies stay equal
        return weighted_result(x, weights, num_samples, last_step_deterministic=True)

    @staticmethod
    def _start(observation: SpectralObservation, num_particles: int, terminal_std: float,
               generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Rotated draws from ``N(0, q^2 I)`` times the first factors, and the log of their normaliser."""
        singular_values = observation.singular_values
        rotated = terminal_std * torch.randn((num_particles, observation.svd.dimension), generator=generator,
                                             dtype=singular_values.dtype, device=singular_values.device)
        rank, prior_variance = observation.rank, terminal_std**2
        variance, target = observation.variance(0), observation.target(0)
        posterior_variance = prior_variance * variance / (prior_variance + variance)
        posterior_mean = target * prior_variance / (prior_variance + variance)
        rotated[:, :rank] = posterior_mean + posterior_variance.sqrt() * rotated[:, :rank] / terminal_std
        log_normaliser = _gaussian_log_density(target, torch.zeros_like(target), prior_variance + variance).sum()
        return rotated, log_normaliser.expand(num_particles)

    @staticmethod
    def _log_weight(observation: SpectralObservation, x: Tensor, rotated_mean: Tensor, kernel_variance: Tensor,
                    position: int) -> Tensor:
        """``sum_J log N(lambda_{t_n} ybar; mbar, delta^2 + v_n) - log N(xbar; lambda_{t_{n+1}} ybar, v_{n+1})``
        for the step from ``position`` (``t_{n+1}``) to ``position + 1`` (``t_n``)."""
        rank = observation.rank
        steered = observation.steered(position + 1)
        rotated = observation.svd.rotate_image(x)[:, :rank]
        predictive = _gaussian_log_density(observation.target(position + 1), rotated_mean[:, :rank],
                                           kernel_variance.to(rotated.dtype) + observation.variance(position + 1))
        previous = _gaussian_log_density(rotated, observation.target(position), observation.variance(position))
        return torch.where(steered, predictive - previous, torch.zeros_like(previous)).sum(1)

    @staticmethod
    def _propose(observation: SpectralObservation, rotated_mean: Tensor, kernel_variance: Tensor, position: int,
                 generator: torch.Generator) -> Tensor:
        """Rotated draws at grid position ``position``: ``N(mbar, delta^2)``, times the factor on J."""
        kernel_variance = kernel_variance.to(rotated_mean.dtype)
        noise = torch.randn(rotated_mean.shape, generator=generator, dtype=rotated_mean.dtype,
                            device=rotated_mean.device)
        draw = rotated_mean + kernel_variance.sqrt() * noise
        rank = observation.rank
        variance = observation.variance(position)
        gain = kernel_variance / (kernel_variance + variance)
        observed_mean = rotated_mean[:, :rank] + gain * (observation.target(position) - rotated_mean[:, :rank])
        observed = observed_mean + (gain * variance).sqrt() * noise[:, :rank]
        draw[:, :rank] = torch.where(observation.steered(position), observed, draw[:, :rank])
        return draw


@invdiff.hookimpl
def register_samplers(register):
    register(MCGdiff)
