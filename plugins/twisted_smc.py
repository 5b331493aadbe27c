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

With ``split_time = t_s`` (and ``num_runs = R > 1``) the particles move as one run until the first step at or
below ``t_s``, then split into R runs (``ParticleWeights.split``): before, one population's weights compare the
posterior's modes (runs of a few particles each settle where their proposal takes them); after, the runs keep
the samples' paths apart (one run collapses at image dimension). Before the split one run of K particles, after
it R runs of K / R: exact as K / R grows, like runs.

With ``restart_time = t_r`` (above ``t_s``), right after the split every particle is noised forward by the SDE from
``t_s`` to ``t_r`` (``SDE.forward_transition``), weighted by ``p~_{t_r}(y | x_{t_r}) / p~_{t_s}(y | x_{t_s})``, and
the runs go down from ``t_r`` again: the one run chooses the mode, the noise makes the few paths it kept many again
(restart sampling, Xu et al., NeurIPS 2023, re-noises the same way, without weights). The weight is the SMC
sampler's with the prior's reverse transition as the backward kernel (Del Moral, Doucet and Jasra, JRSS B 2006):
exact where the discretised model's marginal at ``t_s`` is the prior's, so as the steps grow.

With ``twisting = "exact"`` (Gaussian-mixture priors, linear operators, Gaussian noise only) the twist is
``p(y | x_t)`` itself (``invdiff.exact.ExactTwist``), so the intermediate targets are the exact ``p(x_t | y)``
and the proposal's gradient is the exact ``grad log p(y | x_t)``: an oracle that separates the engine's error
from the Tweedie twist's.

With ``twisting = "second_order"`` (linear operators with Gaussian noise) the twist is the Gaussian with the
prior's own second moment of ``x0`` given ``x_t``: ``N(y; A x0_hat + b, sigma_y^2 I + A C A^T)``, ``C =
Cov[x0 | x_t]`` from ``Prior.measured_covariance`` (closed form for a mixture prior; for a network, one
Jacobian-vector product of the denoiser per observed value, per particle and step). Its gradient holds ``C``
fixed (one backpropagation through the denoiser, as Tweedie's).

With ``twisting = "gaussian_fit"`` ``C`` is instead the covariance of ``x0`` given ``x_t`` were the prior the Gaussian
with its data covariance (``Prior.data_covariance``), plus the network's error, the same for every particle
(``GaussianFitTwist``): no extra network evaluation, and the proposal and the moves follow its gradient with the
Gaussian fit's Jacobian in place of the network's (no backpropagation).

With ``guidance = "pilot"`` the proposal and the moves follow, instead of the twist's gradient,
``(lambda_t / sigma_t^2) (E[x0 | x_t, y] - x0_hat)`` with ``p(x0 | y)`` replaced by the per-value Gaussian
``N(m, diag(v))`` of a pilot run's samples, so that ``E[x0 | x_t, y]`` is closed form (``PilotGuidance``; no
backpropagation). The pilot is ``pilot_samples`` samples of ``pilot_sampler`` (its default options, this sampler's
``num_steps``, then ``pilot_options``: e.g. twisted_smc itself with a ``split_time``), refitted ``pilot_rounds - 1``
times to this sampler's own samples under the previous fit (iterated auxiliary particle filters, Guarniero, Johansen
and Lee, JASA 2017, in the small). With ``pilot_count = P > 1`` the pilot sampler runs P times and ``p(x0 | y)`` is
replaced by the equal-weight mixture of the P Gaussians, so that pilots settling in different modes guide the
particles to all of them (each particle follows its responsibilities under the noised mixture). The weights see only
the twist, so the sampler stays asymptotically exact whatever the pilot; the pilot's runs count in the network
evaluations.

With ``guidance = "gaussian_fit"`` the same guide takes its per-value Gaussian from no run at all: the marginal means
and variances of the posterior were the prior the Gaussian with its data mean and covariance
(``ExactPosterior.from_gaussian_fit``: the Wiener filter's posterior, closed form), times ``pilot_inflation``. With
``guidance = "pilot"`` and ``pilot_gaussian_fit`` that Gaussian joins the pilots' in the equal-weight mixture (of
every round, with ``pilot_rounds > 1``): a pilot that settled in one mode guides the particles near it, the fit, which
spans the modes, the others.
"""

from __future__ import annotations

import json
from functools import partial
from typing import Any, Callable, Literal

import torch
from pydantic import Field, ValidationError, model_validator
from torch import Tensor

import invdiff
from invdiff.exact import ExactPosterior, ExactTwist
from invdiff.plugins import PluginError, load_registry
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor, UnsupportedProblem, sample_posterior
from invdiff.sde import gaussian_log_density
from invdiff.smc import (MeasurementTwist, ResampleMove, SplitRunOptions, TargetPoint, check_run_times, chunked,
                         end_of_step, particle_weights, unused_under_noise, weighted_result)
from invdiff.twists import FIT_ERROR_OPTION, GaussianFitTwist, SecondOrderTwist, fit_error_usage


TwistFunction = Callable[[Tensor, Tensor, Tensor], Tensor]


def _tweedie_twist(twist: MeasurementTwist, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
    """TDS's twist, a function of the denoised estimate: ``N(y; G(x0_hat), sigma_y^2 I + r_t^2 A A^T)``."""
    return twist.log_likelihood(denoised, t)


def _exact_twist(twist: ExactTwist, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
    """The oracle twist ``log p(y | x_t)`` of a Gaussian-mixture prior, a function of the particle itself."""
    return twist.log_likelihood(x, t)


class PilotGuidance:
    """The twist's gradient replaced by ``(lambda_t / sigma_t^2) (E[x0 | x_t, y] - x0_hat)`` with ``p(x0 | y)``
    replaced by the equal-weight mixture of ``N(m_p, diag(v_p))``, the per-value mean and variance of each pilot's
    samples (one set of samples per pilot). As ``x_t`` depends on ``y`` only through ``x0``, each component gives
    ``E_p[x0 | x_t] = (m_p / v_p + lambda_t x_t / sigma_t^2) / (1 / v_p + lambda_t^2 / sigma_t^2)``, weighted by
    its responsibility for ``x_t`` under ``N(lambda_t m_p, lambda_t^2 v_p + sigma_t^2)``: the exact gradient
    ``grad log p(y | x_t)`` if the posterior were that mixture (one pilot: that Gaussian). ``inflation`` multiplies
    each ``v_p``: a pilot narrower than the posterior pulls every particle to its mean."""

    def __init__(self, posterior: Posterior, means: Tensor, variances: Tensor, inflation: float = 1.0):
        """Per pilot, the means and variances ``(pilots, values)``; ``from_samples`` and ``of_gaussian_fit`` make
        them."""
        device = posterior.measurement.device
        self.sde = posterior.prior.sde
        self.means = means.to(device, torch.float64)
        self.variances = inflation * variances.to(device, torch.float64).clamp(min=1e-8)

    @classmethod
    def from_samples(cls, posterior: Posterior, samples: list[Tensor], inflation: float = 1.0) -> "PilotGuidance":
        """One pilot per tensor of ``samples``: their per-value mean and variance."""
        if isinstance(samples, Tensor):     # iterating one tensor would give one-sample pilots, whose variance is NaN
            raise TypeError("PilotGuidance.from_samples takes a list of sample tensors, one per pilot; got one tensor")
        flat = [each.flatten(1).to(torch.float64) for each in samples]
        return cls(posterior, torch.stack([each.mean(0) for each in flat]), torch.stack([each.var(0) for each in flat]),
                   inflation)

    @classmethod
    def of_gaussian_fit(cls, posterior: Posterior, inflation: float = 1.0) -> "PilotGuidance":
        """One pilot, no samples: the marginals of the Gaussian fit's posterior
        (``ExactPosterior.from_gaussian_fit``)."""
        fit = ExactPosterior.from_gaussian_fit(posterior)
        return cls(posterior, fit.means, torch.diagonal(fit.covariances, dim1=1, dim2=2), inflation)

    def with_gaussian_fit(self, posterior: Posterior) -> "PilotGuidance":
        """These pilots and one more, ``of_gaussian_fit``'s (not inflated), in an equal-weight mixture."""
        fit = PilotGuidance.of_gaussian_fit(posterior)
        return PilotGuidance(posterior, torch.cat([self.means, fit.means]), torch.cat([self.variances, fit.variances]))

    def __call__(self, x: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
        lambda_t, sigma_t = float(self.sde.lambda_t(t)), float(self.sde.sigma_t(t))
        flat = x.flatten(1).to(torch.float64)[:, None, :]   # (particles, 1, values) against (pilots, values)
        conditional_means = ((self.means / self.variances + lambda_t * flat / sigma_t**2)
                             / (1 / self.variances + lambda_t**2 / sigma_t**2))
        marginal_variances = lambda_t**2 * self.variances + sigma_t**2
        log_densities = -0.5 * (((flat - lambda_t * self.means) ** 2 / marginal_variances).sum(-1)
                                + marginal_variances.log().sum(-1))
        responsibilities = torch.softmax(log_densities, dim=1)[:, :, None]
        conditional_mean = (responsibilities * conditional_means).sum(1)
        gradient = lambda_t / sigma_t**2 * (conditional_mean - denoised.flatten(1).to(torch.float64))
        return gradient.reshape(x.shape).to(x.dtype)


class TwistedSMCOptions(SplitRunOptions):
    """``SplitRunOptions`` with three more twists (``exact``, ``second_order``, ``gaussian_fit``) and the pilot
    guidance."""

    twisting: Literal["tweedie", "capped", "none", "exact", "second_order", "gaussian_fit"] = Field(
        "tweedie", description=SplitRunOptions.model_fields["twisting"].description + "; or 'exact': the closed-form "
        "p(y | x_t) of a Gaussian-mixture prior with a linear operator and Gaussian noise (an oracle for checking "
        "the engine, no network prior has it); or 'second_order': N(y; A x0_hat + b, sigma_y^2 I + A C A^T) with "
        "C = Cov[x0 | x_t] the prior's own (linear operators with Gaussian noise; a network prior pays one "
        "Jacobian-vector product per observed value, per particle and step); or 'gaussian_fit': the same with C "
        "the covariance of x0 given x_t were the prior the Gaussian with its data covariance (no extra network "
        "evaluation)")
    fit_error: float = FIT_ERROR_OPTION
    guidance: Literal["twist", "pilot", "gaussian_fit"] = Field(
        "twist", description="what the proposal and the moves follow: the twist's gradient, or 'pilot': the "
        "gradient of log p(y | x_t) were p(x0 | y) the per-value Gaussian of a pilot's samples (no "
        "backpropagation), or 'gaussian_fit': the same with the per-value marginals of the posterior under the "
        "Gaussian fit of the prior's data (closed form, no pilot run; linear operators with Gaussian noise, priors "
        "that know their data's mean and covariance)")
    pilot_sampler: str = Field("dps", description="guidance 'pilot': the registered sampler whose samples (its "
                               "default options, this sampler's num_steps, pilot_options) make the first pilot")
    pilot_options: dict[str, Any] = Field({}, description="guidance 'pilot': options of the pilot sampler (over its "
                                          "defaults and this sampler's num_steps)")
    pilot_samples: int = Field(64, ge=2, description="guidance 'pilot': samples per pilot fit")
    pilot_count: int = Field(1, ge=1, description="guidance 'pilot': independent runs of the pilot sampler, each of "
                             "pilot_samples samples; the guide is the equal-weight mixture of their per-value "
                             "Gaussians (pilots that settle in different modes describe them all)")
    pilot_rounds: int = Field(1, ge=1, description="guidance 'pilot': pilot fits, the pilot sampler's and then "
                              "pilot_rounds - 1 refits to this sampler's own samples guided by the previous fit")
    pilot_inflation: float = Field(1.0, ge=1.0, description="guidance 'pilot' or 'gaussian_fit': the factor on "
                                   "each fit's per-value variance")
    pilot_gaussian_fit: bool = Field(False, description="guidance 'pilot': the marginals of the Gaussian fit's "
                                     "posterior (guidance 'gaussian_fit''s Gaussian, not inflated) as one more "
                                     "Gaussian of the guide's equal-weight mixture: the pilots pick modes, the fit "
                                     "weighs them")

    def usage(self) -> dict[str, tuple[bool, str]]:
        pilot = (self.guidance == "pilot", "with guidance 'pilot'")
        return {**super().usage(), **fit_error_usage(self.twisting),
                **dict.fromkeys(("pilot_sampler", "pilot_options", "pilot_samples", "pilot_count", "pilot_rounds"),
                                pilot),
                "pilot_inflation": (self.guidance != "twist", "with guidance 'pilot' or 'gaussian_fit'")}

    @model_validator(mode="after")
    def _pilot_options_agree(self) -> "TwistedSMCOptions":
        if self.pilot_gaussian_fit and self.guidance != "pilot":
            raise ValueError("pilot_gaussian_fit adds the Gaussian fit to a pilot's guide: set guidance 'pilot' (or "
                             "guidance 'gaussian_fit' for the fit alone)")
        if self.pilot_count > 1 and self.pilot_rounds > 1:
            raise ValueError("pilot_rounds refits one Gaussian to this sampler's own samples: with pilot_count > 1, "
                             "set pilot_rounds to 1")
        return self


class TwistedSMC(Sampler):
    """Twisted SMC (Wu et al., NeurIPS 2023): particles with Tweedie twisting, asymptotically exact."""

    name = "twisted_smc"
    Options = TwistedSMCOptions
    asymptotically_exact = True

    @property
    def needs_network_gradient(self) -> bool:
        """Backpropagation through the network: for the twist's gradient where the proposal follows it, except the
        Gaussian fit's (a pilot sampler may backpropagate; the Gaussian fit's guide does not)."""
        if self.options.guidance == "pilot":
            return True
        return self.options.guidance == "twist" and self.options.twisting != "gaussian_fit"

    @staticmethod
    def _twist(posterior: Posterior, log_twist_of: TwistFunction, x: Tensor, t: Tensor,
               guidance: PilotGuidance | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Denoised estimate, ``log p~_t(y | x)`` and its gradient (or ``guidance``'s stand-in for it), for a
        batch of particles."""
        if guidance is not None:
            denoised = posterior.prior.denoise(x, t)
            return denoised, log_twist_of(x, denoised, t), guidance(x, denoised, t)
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

    def unused_options(self, posterior: Posterior) -> dict[str, str]:
        return {**super().unused_options(posterior), **unused_under_noise(self.options, posterior)}

    def check(self, posterior: Posterior) -> None:
        check_run_times(self.options, posterior.prior.sde.time_grid(self.options.num_steps))
        if self.options.twisting == "exact":
            ExactTwist.check(posterior)
        if self.options.twisting == "second_order":
            SecondOrderTwist.check(posterior)
        if self.options.twisting == "gaussian_fit":
            GaussianFitTwist.check(posterior)
        if self.options.guidance == "gaussian_fit" or self.options.pilot_gaussian_fit:
            ExactPosterior.check_gaussian_fit(posterior)
        pilot_sampler = self.build_pilot()
        if pilot_sampler is not None:
            pilot_sampler.check(posterior)

    def build_pilot(self) -> Sampler | None:
        """With ``guidance 'pilot'``, the pilot sampler (its defaults, this sampler's ``num_steps`` where it has steps,
        then ``pilot_options``), else None; an unknown name or a bad option is an ``UnsupportedProblem``."""
        if self.options.guidance != "pilot":
            return None
        try:
            pilot_class = load_registry().get(self.options.pilot_sampler).sampler_class
        except PluginError as error:
            raise UnsupportedProblem(f"pilot_sampler: {error}") from None
        steps = {"num_steps": self.options.num_steps} if "num_steps" in pilot_class.Options.model_fields else {}
        try:
            return pilot_class(**{**steps, **self.options.pilot_options})
        except ValidationError as error:
            from invdiff.problems import format_validation_error   # here: listing samplers must not load deepinv

            raise UnsupportedProblem(format_validation_error(error, f"pilot_options ({pilot_class.name})",
                                                             model=pilot_class.Options)) from None

    def _pilot(self, posterior: Posterior, generator: torch.Generator, progress: bool) -> PilotGuidance | None:
        """``guidance 'pilot'``: the pilot sampler's fit, refitted ``pilot_rounds - 1`` times (module docstring);
        the generators of these runs are seeded from ``generator``; each run gets its own progress bar. With
        ``guidance 'gaussian_fit'`` the Gaussian fit's guide (no run)."""
        if self.options.guidance == "gaussian_fit":
            return PilotGuidance.of_gaussian_fit(posterior, self.options.pilot_inflation)
        if self.options.guidance != "pilot":
            return None
        pilots, rounds = self.options.pilot_count, self.options.pilot_rounds
        seeds = torch.randint(2**62, (pilots + rounds - 1,), generator=generator, device=generator.device)
        generators = [torch.Generator(device=generator.device).manual_seed(int(seed)) for seed in seeds]
        pilot_sampler = self.build_pilot()
        samples = [sample_posterior(pilot_sampler, posterior, self.options.pilot_samples, generator=pilot_generator,
                                    progress=progress).samples for pilot_generator in generators[:pilots]]
        guidance = self._guide(posterior, samples)
        for round_index, round_generator in enumerate(generators[pilots:], start=2):
            name = f"{self.name} pilot round {round_index}/{self.options.pilot_rounds}"
            monitor = StepMonitor(name, self.options.num_steps, progress)
            try:
                result = self._run(posterior, self.options.pilot_samples, round_generator, monitor, guidance)
            finally:
                monitor.close()
            guidance = self._guide(posterior, [result.samples])
        return guidance

    def _guide(self, posterior: Posterior, samples: list[Tensor]) -> PilotGuidance:
        """The guide of these pilots' samples; with ``pilot_gaussian_fit`` the Gaussian fit's posterior joins it (in
        every refit round's guide too)."""
        guidance = PilotGuidance.from_samples(posterior, samples, self.options.pilot_inflation)
        return guidance.with_gaussian_fit(posterior) if self.options.pilot_gaussian_fit else guidance

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        guidance = self._pilot(posterior, generator, monitor.progress)
        result = self._run(posterior, num_samples, generator, monitor, guidance)
        pilot = self.build_pilot()
        if pilot is not None:   # the options it ran with (its defaults, num_steps, pilot_options), for the summary
            result.extras["pilot_sampler_options"] = json.dumps(pilot.options.model_dump(mode="json"), sort_keys=True)
        return result

    def _run(self, posterior: Posterior, num_samples: int, generator: torch.Generator, monitor: StepMonitor,
             guidance: TwistFunction | None) -> SampleResult:
        """One run; ``guidance`` (a pilot's, or None) replaces the twist's gradient in the proposal and the moves."""
        prior = posterior.prior
        dtype, device = posterior.dtype, posterior.device
        grid = prior.sde.time_grid(self.options.num_steps)
        weights = particle_weights(self.options, num_samples, generator=generator, device=device,
                                   one_run=self.options.split_time is not None)   # one run until split_time

        measurement_twist = MeasurementTwist(posterior, self.options)
        mover = ResampleMove(posterior, self.options, measurement_twist.svd, generator)
        if self.options.twisting == "exact":
            log_twist_of = partial(_exact_twist, ExactTwist(posterior))
        elif self.options.twisting == "second_order":
            log_twist_of = SecondOrderTwist(posterior)
        elif self.options.twisting == "gaussian_fit":
            log_twist_of = GaussianFitTwist(posterior, self.options.fit_error)
            guidance = guidance or log_twist_of.gradient
        else:
            log_twist_of = partial(_tweedie_twist, measurement_twist)

        def twist(x, t):
            return chunked(lambda part: self._twist(posterior, log_twist_of, part, t, guidance), x,
                           self.options.batch_size)

        x = prior.terminal_sample(weights.total_particles, generator=generator, dtype=dtype, device=device)
        denoised, log_twist, gradient = twist(x, grid[0])
        weights.reweight(log_twist, where=f"the initial weights (t={float(grid[0]):.4g})")
        index = 0
        while index < len(grid) - 1:
            t, s = grid[index], grid[index + 1]
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
            index, x, (denoised, log_twist, gradient) = end_of_step(
                weights, monitor, grid, index, x, (denoised, log_twist, gradient), evaluate=twist, mover=mover,
                target_point=partial(self._target_point, posterior), options=self.options, sde=prior.sde,
                generator=generator)
        return weighted_result(x, weights, num_samples, last_step_deterministic=True)


@invdiff.hookimpl
def register_samplers(register):
    register(TwistedSMC)
