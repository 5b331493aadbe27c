"""Twisted diffusion sampler (TDS): Wu, Trippe, Naesseth, Blei, Cunningham, "Practical and
asymptotically exact conditional sampling in diffusion models", NeurIPS 2023 (arXiv:2306.17775).

SMC over the reverse diffusion path (ALGORITHMS.md section 5), for any SDE of ``invdiff.sde``:

* twisting ``p~_t(y | x_t) = N(y; G(x0_hat(t, x_t)), sigma_y^2 I + r_t^2 A A^T)`` with
  ``r_t^2 = sigma_t^2 / lambda_t^2`` by default (``invdiff.smc.MeasurementTwist``);
* proposal ``N(m + delta^2 grad log p~_t(y | x_t), delta^2)`` around the prior's reverse kernel
  ``N(m, delta^2)``, the gradient taken through the network;
* start ``x_T ~ prior.terminal_sample`` (the model's own law at ``T``, so ``w_T`` needs no correction);
* weights ``w_T = p~_T(y | x_T)``, ``w = p(x_s | x_t) p~_s(y | x_s) / [p~_t(y | x_t) q(x_s | x_t)]``,
  and at the last step, where the kernel is the deterministic ``x_0 = x0_hat(t_1, x_1)``,
  ``w_0 = p(y | x_0) / p~_{t_1}(y | x_1)``.

The weights telescope, so the weighted particles target the posterior of the discretised model as
the number of particles grows, and their running mean estimates ``p(y)``. Cost: one network
evaluation with backpropagation per particle per step.

With ``move_steps = M > 0``, each resampling is followed by M Langevin moves of the particles
(``invdiff.smc.ResampleMove``, with the twist's exact gradient), M more network evaluations with
backpropagation per particle; the weights are unchanged.

With ``num_runs = R > 1`` the particles form R independent runs (``invdiff.smc``: weighted and
resampled apart, the samples spread over them, each run weighted 1/R).

With ``twisting = "exact"`` (Gaussian-mixture priors, linear operators, Gaussian noise only) the twist is
``p(y | x_t)`` itself (``invdiff.exact.ExactTwist``), so the intermediate targets are the exact ``p(x_t | y)``
and the proposal's gradient is the exact ``grad log p(y | x_t)``: an oracle that separates the engine's error
from the Tweedie twist's.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import Tensor

import invdiff
from invdiff.exact import ExactTwist
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor
from invdiff.sde import gaussian_log_density
from invdiff.smc import (MeasurementTwist, ResampleMove, SMCOptions, TargetPoint, chunked, particle_weights,
                         weighted_result)


TwistFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


def _tweedie_twist(twist: MeasurementTwist, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
    """TDS's twist, a function of the denoised estimate: ``N(y; G(x0_hat), sigma_y^2 I + r_t^2 A A^T)``."""
    return twist.log_likelihood(denoised, t)


def _exact_twist(twist: ExactTwist, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
    """The oracle twist ``log p(y | x_t)`` of a Gaussian-mixture prior, a function of the particle itself."""
    return twist.log_likelihood(x, t)


class TwistedSMCOptions(SMCOptions):
    """``SMCOptions`` with one more twist: ``exact``."""

    twisting: Literal["tweedie", "capped", "none", "exact"] = Field(
        "tweedie", description=SMCOptions.model_fields["twisting"].description + "; or 'exact': the closed-form "
        "p(y | x_t) of a Gaussian-mixture prior with a linear operator and Gaussian noise (an oracle for checking "
        "the engine, no network prior has it)")


class TwistedSMC(Sampler):
    """Twisted SMC (Wu et al., NeurIPS 2023): particles with Tweedie twisting, asymptotically exact."""

    name = "twisted_smc"
    Options = TwistedSMCOptions
    asymptotically_exact = True

    @staticmethod
    def _twist(posterior: Posterior, log_twist_of: TwistFunction, x: Tensor,
               t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Denoised estimate, ``log p~_t(y | x)`` and its gradient, for a batch of particles."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            denoised = posterior.prior.denoise(x, t)
            log_twist = log_twist_of(x, denoised, t)
            (gradient,) = torch.autograd.grad(log_twist.sum(), x)
        return denoised.detach(), log_twist.detach(), gradient

    @staticmethod
    def _target_point(posterior: Posterior, x: Tensor, t: Tensor,
                      carried: tuple[Tensor, Tensor, Tensor]) -> TargetPoint:
        """What a move needs from the carried ``(denoised, log_twist, gradient)``: the score is Tweedie's
        formula solved for it, ``(lambda_t x0_hat - x) / sigma_t^2``."""
        denoised, log_twist, gradient = carried
        sde = posterior.prior.sde
        score = (sde.lambda_t(t).to(x.dtype) * denoised - x) / sde.sigma_t(t).to(x.dtype) ** 2
        return TargetPoint(score, log_twist, gradient)

    def check(self, posterior: Posterior) -> None:
        if self.options.twisting == "exact":
            ExactTwist.check(posterior)

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        prior = posterior.prior
        dtype, device = posterior.dtype, posterior.device
        grid = prior.sde.time_grid(self.options.num_steps)
        weights = particle_weights(self.options, num_samples, generator=generator, device=device)

        measurement_twist = MeasurementTwist(posterior, self.options)
        mover = ResampleMove(posterior, self.options, measurement_twist.svd, generator)
        if self.options.twisting == "exact":
            log_twist_of = partial(_exact_twist, ExactTwist(posterior))
        else:
            log_twist_of = partial(_tweedie_twist, measurement_twist)

        def twist(x, t):
            return chunked(lambda part: self._twist(posterior, log_twist_of, part, t), x, self.options.batch_size)

        x = prior.terminal_sample(weights.total_particles, generator=generator, dtype=dtype, device=device)
        denoised, log_twist, gradient = twist(x, grid[0])
        weights.reweight(log_twist, where=f"the initial weights (t={float(grid[0]):.4g})")
        for index, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
            where = f"step {index + 1}/{self.options.num_steps} (t={float(s):.4g})"
            mean, variance = prior.sde.reverse_kernel(x, denoised, t, s)
            if index == len(grid) - 2:   # the last kernel is the deterministic x_0 = x0_hat(t_1, x_1)
                x = mean
                log_increment = posterior.log_likelihood(x) - log_twist
            else:
                proposal_mean = mean + variance * gradient
                noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=device)
                x = proposal_mean + variance.sqrt() * noise
                denoised, new_log_twist, gradient = twist(x, s)
                log_increment = (gaussian_log_density(x, mean, variance) + new_log_twist - log_twist
                                 - gaussian_log_density(x, proposal_mean, variance))
                log_twist = new_log_twist
            weights.reweight(log_increment, where)
            move_diagnostics = {}
            if index < len(grid) - 2:   # the last weights stay with the particles they weigh
                (x, denoised, log_twist, gradient), resampled = weights.resample_if_needed(x, denoised, log_twist,
                                                                                          gradient)
                if resampled and mover.num_moves:
                    x, (denoised, log_twist, gradient), move_diagnostics["move_acceptance"] = mover.move(
                        x, s, (denoised, log_twist, gradient), twist, partial(self._target_point, posterior))
                    weights.record_move()
            monitor.step(index, s, x, **weights.end_step(), **move_diagnostics)
        return weighted_result(x, weights, num_samples, last_step_deterministic=True)


@invdiff.hookimpl
def register_samplers(register):
    register(TwistedSMC)
