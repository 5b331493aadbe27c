"""SMC diffusion sampler with frozen-score twisted proposals (seed 000, "SMC Diffusion Sampler", written
there for the VE SDE; the same proposal family as MCGdiff, Cardoso et al., ICLR 2024, and FPS, Dou
and Song, ICLR 2024).

The reverse kernel ``N(m, v)`` (for VE, ``m = x_t + (sigma_t^2 - sigma_s^2) s_bar``) uses the
network score ``s_bar = s(x_t, t)``. Freezing that score, Tweedie's estimate at the next time is
affine in ``x``: ``x0_hat(s, x) ~ (x + sigma_s^2 s_bar) / lambda_s`` (``lambda_s = 1`` for VE, the
seed's case), so the twisted proposal

    q(x | x_t) ∝ N(x; m, v) p~_s(y | (x + sigma_s^2 s_bar) / lambda_s)

needs no backpropagation through the network. For a linear operator with Gaussian noise it is
Gaussian in closed form, computed in the rotated coordinates of the operator's SVD
(``invdiff.spectral.LinearGaussianSVD``: transforms, so masks, circular blurs and circular
downsampling at any size, other linear operators up to ``DenseSVD.MAX_DIMENSION`` values); otherwise it
is the gradient step ``N(m + v grad_x log p~_s(y | (x_t + sigma_s^2 s_bar) / lambda_s), v)``. The
weights use the exact proposal density and the twisting at the true Tweedie estimate of the new state,
whose network call is the one that drives the next step:

    w = N(x_s; m, v) p~_s(y | x0_hat(s, x_s)) / [p~_t(y | x_t) q(x_s | x_t)],

with the deterministic last step ``x_0 = x0_hat(t_1, x_1)`` weighted by ``p(y | x_0) / p~_{t_1}``; the
particles start from ``prior.terminal_sample`` with weights ``p~_T(y | x0_hat(T, x_T))``.
The product telescopes, so the particles target the posterior as their number grows. Cost: one
network evaluation per particle per step, no backpropagation through the network.

With ``move_steps = M > 0``, each resampling is followed by M Langevin moves of the particles
(``invdiff.smc.ResampleMove``), M more network evaluations per particle, still without
backpropagation through the network: the proposal's twist gradient freezes the score, as the
gradient proposal does, and the accept step corrects for that. The weights are unchanged.

With ``twisting = "gaussian_fit"`` (linear operators with Gaussian noise) the twist is
``invdiff.twists.GaussianFitTwist``: ``N(y; A x0_hat + b, sigma_y^2 I + A C_s A^T + e_s A A^T)`` with ``C_s`` the
covariance of ``x0`` given ``x_s`` were the prior the Gaussian with its data covariance and ``e_s`` the network's
error, the same for every particle. The proposal stays closed form, with the twist's covariance dense on the ``m``
observed values (Matheron's rule, ``_fitted_step``: one ``m x m`` factor per step, shared by the particles); the moves
follow the twist's gradient with the fit's Jacobian. Tweedie's ``r_s^2 I`` is unbounded at large ``s``, where this
``C_s`` is bounded by the data covariance, so the twist starts to act while structure forms.

With ``num_runs = R > 1`` the particles form R independent runs (``invdiff.smc``: weighted and
resampled apart, the samples spread over them, each run weighted 1/R). With ``split_time = t_s`` they move as one
run until the first step at or below ``t_s``, then split into the R runs (``ParticleWeights.split``, as twisted_smc):
the one run's weights choose among the posterior's modes, the runs keep the samples' paths apart. With
``restart_time = t_r`` (above ``t_s``), right after the split every particle is noised forward by the SDE to ``t_r``,
weighted by ``p~_{t_r}(y | x_{t_r}) / p~_{t_s}(y | x_{t_s})``, and the runs go down from ``t_r`` again, as twisted_smc's
(``invdiff.smc.restart_runs``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor
from torch.distributions import MultivariateNormal

import invdiff
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor, UnsupportedProblem
from invdiff.sde import gaussian_log_density
from invdiff.smc import (MeasurementTwist, ResampleMove, SplitRunOptions, TargetPoint, check_run_times, chunked,
                         end_of_step, particle_weights, twisting_variance, unused_under_noise, weighted_result)
from invdiff.spectral import DenseSVD, LinearGaussianSVD
from invdiff.twists import FIT_ERROR_OPTION, GaussianFitTwist, fit_error_usage


class VESMCOptions(SplitRunOptions):
    twisting: Literal["tweedie", "capped", "none", "gaussian_fit"] = Field(
        "tweedie", description=SplitRunOptions.model_fields["twisting"].description + "; or 'gaussian_fit': "
        "N(y; A x0_hat + b, sigma_y^2 I + A C A^T) with C the covariance of x0 given x_t were the prior the Gaussian "
        "with its data covariance, plus the network's error (linear operators with Gaussian noise)")
    fit_error: float = FIT_ERROR_OPTION
    proposal: Literal["auto", "closed_form", "gradient"] = Field(
        "auto", description="closed_form (Gaussian noise and a mask, circular blur or circular downsampling "
        f"of any size, or another linear operator on events up to {DenseSVD.MAX_DIMENSION} values), gradient, or "
        "auto: closed_form where it applies")

    def usage(self) -> dict[str, tuple[bool, str]]:
        return {**super().usage(), **fit_error_usage(self.twisting)}


NO_CLOSED_FORM = ("ve_smc proposal closed_form needs a linear operator with Gaussian noise: a mask, circular blur or "
                  f"circular downsampling, or another one on events of at most {DenseSVD.MAX_DIMENSION} values")


class VESMC(Sampler):
    """SMC diffusion sampler (seed 000, VE): frozen-score twisted proposals, no backprop through the network."""

    name = "ve_smc"
    Options = VESMCOptions
    asymptotically_exact = True
    needs_network_gradient = False

    def unused_options(self, posterior: Posterior) -> dict[str, str]:
        return {**super().unused_options(posterior), **unused_under_noise(self.options, posterior)}

    def check(self, posterior: Posterior) -> None:
        check_run_times(self.options, posterior.prior.sde.time_grid(self.options.num_steps))
        if self.options.twisting == "gaussian_fit":
            GaussianFitTwist.check(posterior)
        if self.options.proposal == "closed_form" and not LinearGaussianSVD.exists_for(posterior):
            raise UnsupportedProblem(NO_CLOSED_FORM)

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        prior = posterior.prior
        sde = prior.sde
        dtype, device = posterior.dtype, posterior.device
        twist = MeasurementTwist(posterior, self.options)
        svd = twist.svd
        if self.options.proposal == "closed_form" and svd is None:   # a structured form that failed its check
            raise UnsupportedProblem(NO_CLOSED_FORM)
        closed_form = svd is not None and self.options.proposal != "gradient"
        fit = None
        if self.options.twisting == "gaussian_fit":   # its closed form is dense on the observed values
            twist = fit = GaussianFitTwist(posterior, self.options.fit_error)
            closed_form = self.options.proposal != "gradient"
        grid = sde.time_grid(self.options.num_steps)
        weights = particle_weights(self.options, num_samples, generator=generator, device=device,
                                   one_run=self.options.split_time is not None)   # one run until split_time
        mover = ResampleMove(posterior, self.options, svd, generator)

        def evaluate(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            """The score at ``x`` and the twisting at its Tweedie estimate."""
            def one_chunk(part):
                score = prior.score(part, t)
                denoised = (part + sde.sigma_t(t).to(dtype) ** 2 * score) / sde.lambda_t(t).to(dtype)
                return score, twist.log_likelihood(denoised, t)
            return chunked(one_chunk, x, self.options.batch_size)

        with torch.no_grad():
            x = prior.terminal_sample(weights.total_particles, generator=generator, dtype=dtype, device=device)
            score, log_twist = evaluate(x, grid[0])
            weights.reweight(log_twist, where=f"the initial weights (t={float(grid[0]):.4g})")
            index = 0
            while index < len(grid) - 1:
                t, s = grid[index], grid[index + 1]
                where = f"step {index + 1}/{self.options.num_steps} (t={float(s):.4g})"
                denoised = (x + sde.sigma_t(t).to(dtype) ** 2 * score) / sde.lambda_t(t).to(dtype)
                mean, variance = sde.reverse_kernel(x, denoised, t, s)
                if index == len(grid) - 2:   # the last kernel is the deterministic x_0 = x0_hat(t_1, x_1)
                    x = mean
                    log_increment = posterior.log_likelihood(x) - log_twist
                else:
                    frozen_shift = sde.sigma_t(s).to(dtype) ** 2 * score
                    lambda_s = float(sde.lambda_t(s))
                    if closed_form and fit is not None:
                        x, log_proposal = self._fitted_step(fit, mean, variance, frozen_shift, lambda_s, s,
                                                            generator)
                    elif closed_form:
                        spread = twisting_variance(sde, s, self.options)
                        x, log_proposal = self._closed_form_step(svd, posterior, mean, variance, frozen_shift,
                                                                 lambda_s, spread, generator)
                    else:
                        x, log_proposal = self._gradient_step(twist, x, mean, variance, frozen_shift, lambda_s, s,
                                                              generator)
                    score, new_log_twist = evaluate(x, s)
                    log_increment = gaussian_log_density(x, mean, variance) + new_log_twist - log_twist - log_proposal
                    log_twist = new_log_twist
                weights.reweight(log_increment, where)
                index, x, (score, log_twist) = end_of_step(
                    weights, monitor, grid, index, x, (score, log_twist), evaluate=evaluate, mover=mover,
                    target_point=partial(self._target_point, posterior, twist), options=self.options, sde=sde,
                    generator=generator)
        return weighted_result(x, weights, num_samples, last_step_deterministic=True)

    @staticmethod
    def _target_point(posterior: Posterior, twist: MeasurementTwist | GaussianFitTwist, x: Tensor, t: Tensor,
                      carried: tuple[Tensor, Tensor]) -> TargetPoint:
        """What a move needs from the carried ``(score, log_twist)``: the twist gradient with the score
        frozen, ``grad_x log p~_t(y | (x + sigma_t^2 s_bar) / lambda_t)``, which needs no network call; with the
        Gaussian-fit twist the gradient with the fit's Jacobian (``GaussianFitTwist.gradient``), since the frozen
        score's ``I / lambda_t`` meets the fit's narrow directions in full and throws the moves off (all rejected)."""
        score, log_twist = carried
        sde = posterior.prior.sde
        lambda_t = sde.lambda_t(t).to(x.dtype)
        denoised = (x + sde.sigma_t(t).to(x.dtype) ** 2 * score) / lambda_t
        if isinstance(twist, GaussianFitTwist):
            return TargetPoint(score, log_twist, twist.gradient(x, denoised, t))
        with torch.enable_grad():
            denoised = denoised.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(twist.log_likelihood(denoised, t).sum(), denoised)
        return TargetPoint(score, log_twist, gradient / lambda_t)

    @staticmethod
    def _closed_form_step(svd: LinearGaussianSVD, posterior: Posterior, mean: Tensor, variance: Tensor,
                          frozen_shift: Tensor, lambda_s: float, spread: float,
                          generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw from ``N(x; mean, v) N(y; A (x + shift) / lambda_s + b, sigma_y^2 I + spread A A^T)``
        normalised, and return the draw with its log-density; all is diagonal in the coordinates
        ``V^T x`` and ``U^T y``."""
        rotated_mean = svd.rotate_image(mean)                                            # V^T m, (B, d)
        shifted = posterior.operator.forward(frozen_shift / lambda_s)                    # A shift / lambda_s + b
        rotated_target = svd.rotate_measurement(posterior.measurement - shifted)
        rank = min(len(svd.singular_values), rotated_mean.shape[1])
        singular = svd.singular_values[:rank] / lambda_s
        noise_variances = svd.sigma_y**2 + spread * svd.singular_values[:rank] ** 2
        precision = torch.full_like(rotated_mean[0], 1.0 / float(variance))
        precision[:rank] += singular**2 / noise_variances
        information = rotated_mean / float(variance)
        information[:, :rank] += singular * rotated_target[:, :rank] / noise_variances
        proposal_mean = information / precision
        noise = torch.randn(rotated_mean.shape, generator=generator, dtype=rotated_mean.dtype,
                            device=rotated_mean.device)
        rotated_draw = proposal_mean + noise / precision.sqrt()
        log_density = (-0.5 * (noise**2).sum(1) + 0.5 * torch.log(precision).sum()
                       - 0.5 * rotated_mean.shape[1] * math.log(2 * math.pi))
        return svd.image(rotated_draw).to(mean.dtype), log_density.to(mean.dtype)

    @staticmethod
    def _fitted_step(fit: GaussianFitTwist, mean: Tensor, variance: Tensor, frozen_shift: Tensor, lambda_s: float,
                     s: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw from ``N(x; mean, v) N(y; A (x + shift) / lambda_s + b, S_s)`` normalised, ``S_s`` the Gaussian fit's
        twist covariance (dense on the observed values), and return the draw with its log-density.

        Matheron's rule: ``z ~ N(mean, v)``, ``e ~ N(0, S_s)``,
        ``x = z + (v / lambda_s) A^T M^-1 (r - A z / lambda_s - e)`` with ``r = y - b - A shift / lambda_s`` and
        ``M = S_s + (v / lambda_s^2) A A^T``; the density by Bayes' rule,
        ``N(x; mean, v) N(r; A x / lambda_s, S_s) / N(r; A mean / lambda_s, M)``. One ``m x m`` factor per step.
        """
        matrix, spread = fit.matrix, float(variance)
        noise_factor = fit.factor(mean, s)
        marginal_factor = torch.linalg.cholesky(fit.covariance(s) + spread / lambda_s**2 * fit.gram)
        flat_mean = mean.flatten(1).to(torch.float64)
        target = fit.residual - frozen_shift.flatten(1).to(torch.float64) @ matrix.T / lambda_s           # r, (B, m)
        noise = torch.randn(flat_mean.shape, generator=generator, dtype=torch.float64, device=mean.device)
        measurement_noise = torch.randn(target.shape, generator=generator, dtype=torch.float64, device=mean.device)
        prior_draw = flat_mean + math.sqrt(spread) * noise
        innovation = target - prior_draw @ matrix.T / lambda_s - measurement_noise @ noise_factor.T
        draw = prior_draw + spread / lambda_s * torch.cholesky_solve(innovation.T, marginal_factor).T @ matrix
        log_density = (-0.5 * ((draw - flat_mean) ** 2).sum(1) / spread
                       - 0.5 * draw.shape[1] * math.log(2 * math.pi * spread)
                       + MultivariateNormal(draw @ matrix.T / lambda_s, scale_tril=noise_factor,
                                            validate_args=False).log_prob(target)
                       - MultivariateNormal(flat_mean @ matrix.T / lambda_s, scale_tril=marginal_factor,
                                            validate_args=False).log_prob(target))
        return draw.reshape(mean.shape).to(mean.dtype), log_density.to(mean.dtype)

    @staticmethod
    def _gradient_step(twist: MeasurementTwist | GaussianFitTwist, x: Tensor, mean: Tensor, variance: Tensor,
                       frozen_shift: Tensor, lambda_s: float, s: Tensor,
                       generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw from ``N(mean + v grad_x log p~_s(y | (x + shift) / lambda_s) at x_t, v)``; return it with
        its log-density."""
        with torch.enable_grad():
            point = x.detach().requires_grad_(True)
            log_twist = twist.log_likelihood((point + frozen_shift) / lambda_s, s)
            (gradient,) = torch.autograd.grad(log_twist.sum(), point)
        proposal_mean = mean + variance * gradient
        draw = proposal_mean + variance.sqrt() * torch.randn(x.shape, generator=generator, dtype=x.dtype,
                                                             device=x.device)
        return draw, gaussian_log_density(draw, proposal_mean, variance)


@invdiff.hookimpl
def register_samplers(register):
    register(VESMC)
