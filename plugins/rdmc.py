"""Reverse diffusion Monte Carlo (RDMC): Huang, Dong, Hao, Ma, Zhang, ICLR 2024 (arXiv:2307.02037).

The posterior is an unnormalised target ``exp(-f*(x))``, ``f*(x) = -log p(y | x) - log q0(x)``,
sampled by simulating the reverse Ornstein-Uhlenbeck process with a score estimated by an inner
Monte Carlo loop instead of a network (ALGORITHMS.md section 5). With ``s`` the remaining diffusion
time (``Y = X_{T-t}``, ``s = T - t``):

    dY = [Y + 2 grad log p_s(Y)] dt + sqrt(2) dW,       Y ~ N(0, (1 - e^{-2T}) I) at s = T
    grad log p_s(x) = E_{x0 ~ q(. | x)}[e^{-s} x0 - x] / (1 - e^{-2s})          (Tweedie)
                    = e^{s} E_{x0 ~ q(. | x)}[-grad f*(x0)]                      (target score)
    q(x0 | x) ∝ exp(-f*(x0)) N(x0; e^{s} x, (e^{2s} - 1) I)

Each outer step freezes the estimate ``v`` and takes the exponential-integrator step
``x <- e^h x + 2 (e^h - 1) v + sqrt(e^{2h} - 1) xi``. The inner loop runs ``num_chains`` ULA or
MALA chains on ``q(. | x)`` for every outer particle, all in one batch. MALA adapts each outer
particle's step size towards ``target_acceptance``.

The prior enters through ``grad log q0``. Where the prior has a density (``log_prob``: Gaussian,
Gaussian mixture) it is the exact score at time 0. A network prior has none: its score at the
smallest positive time of ``prior.sde.time_grid(prior_steps)`` (VP with 1000 steps: t = 0.001,
sigma_t ~ 0.01) stands in for it, which smooths q0 by that noise level. That score is stiff
(curvature up to ``1 / sigma_t^2 ~ 10^4``): ULA with a fixed step of 0.01 diverges on the digits
prior, so MALA stays the default, with the change of ``-f*`` along each proposed move taken by the
trapezoidal rule on the scores at both ends (exact for Gaussian targets, an approximation of the
Metropolis ratio otherwise; its step-size adaptation keeps the chains stable: on the digits UNet
the step settles at 1.0e-4 ~ sigma_t^2 with acceptance 0.57). Without a log-density there are no
``exp(-f*)`` importance weights either (the Gaussian warm start then needs ``importance_draws=1``).

Departures from the paper, each an option whose other value is the paper's (1000 samples on the
test beds of tests/conftest.py; the full table is benchmarks/rdmc_evidence.py's):

* ``time_grid='quadratic'``: remaining times ``s_k = T (1 - k/K)^2``, finer where the score changes
  fastest. With the exact score in place of the inner estimate (T = 5, 25 steps) the paper's
  uniform grid alone is 0.40 in sliced Wasserstein from the linear-Gaussian posterior
  (exact-vs-exact 0.027), the quadratic grid 0.063.
* ``warm_start='prior_pool'``: the chains start from a pool of ``pool_size`` prior draws, shared by
  all particles and drawn once, resampled for each particle with weights
  ``p(y | x0) N(x; e^{-s} x0, 1 - e^{-2s})`` (the prior's density cancels). The paper's start,
  ``'gaussian'``, resamples draws of the Gaussian factor with weights ``exp(-f*)``; at large ``s``
  that factor is far wider than the posterior, the draws land in arbitrary basins of ``f*`` and
  Langevin chains cannot leave them: with the paper's three choices 94% of the samples sit in modes
  that the posterior (d = 8, d_y = 2, one mode) does not have, against none with the defaults.
  Chains restart from the pool while its effective sample size for the particle is at least
  ``refresh_ess``, so the modes' weights follow the Gaussian factor as it narrows; after that they
  carry over between outer steps. The samples are not independent: they share the pool. A prior
  without exact draws (a network) draws the pool with its own reverse sampler: ``pool_size *
  pool_steps`` network evaluations (512 * 100 by default), counted in the cost.
* ``score_estimator='combined'``: per coordinate, the variance-minimising convex combination of
  the Tweedie and target-score estimates (both unbiased; the weight is estimated from all chains
  of the step). On the mixture with d = 80, d_y = 4 it gives 0.26 against 0.44 for the Tweedie
  estimate alone (exact-vs-exact 0.076); on digits inpainting (256 samples, seeds 0-2) 0.12-0.15
  against 0.15-0.18.

RDMC is not asymptotically exact: a finite number of chains and inner steps gives a biased score,
and the outer discretisation is biased too (with the exact score and 25 quadratic steps the mode
weights of the d = 8, d_y = 1 mixture posterior are off by 0.04 in total variation).

Cost: every target gradient is one prior score (one network evaluation), so the core's count of
network evaluations is RDMC's cost (plus the pool's draws for a network prior). The result's
``extras`` also give ``target_gradient_evaluations`` and ``target_log_density_evaluations`` (MALA's
and the importance weights', free for the exact priors), and every step's diagnostics the running
``target_gradients_per_sample``. The defaults take about 2000 target gradients per sample.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

import invdiff
from invdiff.posterior import (MAX_STEPS, Posterior, Sampler, SampleResult, SamplerOptions, SamplingError,
                               StepMonitor, UnsupportedProblem)
from invdiff.prior import Prior


class RDMCOptions(SamplerOptions):
    terminal_time: float = Field(5.0, gt=0, le=100, description="T: the reverse process starts from N(0, (1 - "
                                 "e^{-2T}) I); e^{-T} times the posterior's spread must be small (T = 2 misplaces "
                                 "modes 8 apart; at 100, e^{-T} is 4e-44)")
    num_steps: int = Field(25, ge=1, le=MAX_STEPS, description="outer steps of the reverse OU process")
    time_grid: Literal["quadratic", "uniform"] = Field(
        "quadratic", description="remaining times T (1 - k/K)^2 (finer near the end) or T (1 - k/K) (the paper's)")
    num_chains: int = Field(8, ge=1, description="inner chains per outer particle: the Monte Carlo sample size")
    inner_steps: int = Field(10, ge=1, description="inner Langevin steps per outer step")
    inner_sampler: Literal["mala", "ula"] = Field(
        "mala", description="Langevin chains on q(x0 | x): Metropolis-adjusted (for a network prior with the "
        "trapezoidal log-density change) or not")
    inner_step_size: float = Field(0.01, gt=0, description="ULA's step size; MALA's initial step size")
    target_acceptance: float | None = Field(0.574, gt=0, lt=1, description="MALA adapts each outer particle's "
                                            "step size towards this acceptance rate; None keeps it fixed")
    score_estimator: Literal["combined", "tweedie"] = Field(
        "combined", description="tweedie: mean of (e^{-s} x0 - x) / (1 - e^{-2s}) (the paper's); combined: per "
        "coordinate, the least-variance convex combination with e^{s} times the mean of -grad f*(x0)")
    warm_start: Literal["prior_pool", "gaussian"] = Field(
        "prior_pool", description="where the chains start: prior draws weighted by likelihood times Gaussian "
        "factor, or Gaussian-factor draws weighted by exp(-f*) (the paper's)")
    pool_size: int | None = Field(None, ge=1, description="prior_pool: prior draws in the shared pool; None: 4096 "
                                  "where the prior has exact draws (free), 512 otherwise (drawn by the network)")
    refresh_ess: float = Field(2.0, ge=1, description="prior_pool with reuse_chains: a particle's chains restart "
                               "from the pool while its effective sample size there is at least this")
    importance_draws: int = Field(64, ge=1, description="gaussian: Gaussian-factor draws per chain, one of which "
                                  "is resampled with weights exp(-f*) (1: unweighted)")
    reuse_chains: bool = Field(True, description="carry the chains over to the next outer step (gaussian: restart "
                               "only at the first; prior_pool: see refresh_ess); False: restart at every step")
    prior_steps: int = Field(1000, ge=1, description="priors without a log-density (networks): the prior score is "
                             "taken at the smallest positive time of prior.sde.time_grid(prior_steps)")
    pool_steps: int = Field(100, ge=1, description="prior_pool for priors without exact draws (networks): reverse "
                            "steps of the prior's own sampler that draw the pool (pool_size * pool_steps network "
                            "evaluations)")
    chunk_size: int = Field(8192, ge=1, description="points per call to the prior and the likelihood (memory)")

    def usage(self) -> dict[str, tuple[bool, str]]:
        prior_pool = (self.warm_start == "prior_pool", "with warm_start 'prior_pool'")
        return {**super().usage(), "target_acceptance": (self.inner_sampler == "mala", "with inner_sampler 'mala'"),
                "pool_size": prior_pool, "pool_steps": prior_pool,
                "refresh_ess": (self.warm_start == "prior_pool" and self.reuse_chains,
                                "with warm_start 'prior_pool' and reuse_chains"),
                "importance_draws": (self.warm_start == "gaussian", "with warm_start 'gaussian'")}


#: the rate at which MALA's log step size follows (acceptance - target_acceptance) per inner step
STEP_SIZE_ADAPTATION_RATE = 1.0
#: the default pool sizes of the prior_pool warm start: exact draws cost nothing, a network's cost pool_steps each
EXACT_POOL_SIZE, NETWORK_POOL_SIZE = 4096, 512


def has_log_density(prior: Prior) -> bool:
    """Whether the prior has an exact log-density ``log_prob(x, t)`` (Gaussian, Gaussian mixture), whose
    score at time 0 is then the exact ``grad log q0``; a network prior has only its score."""
    return callable(getattr(prior, "log_prob", None))


def _smallest_positive_time(prior: Prior, num_steps: int) -> float:
    try:
        return float(prior.sde.time_grid(num_steps)[-2])
    except ValueError as error:
        raise UnsupportedProblem(f"rdmc: prior_steps={num_steps}: {error}") from None


class Target:
    """The unnormalised posterior ``exp(-f*)``: log-density and score, evaluated in chunks and counted."""

    def __init__(self, posterior: Posterior, options: RDMCOptions):
        self.posterior = posterior
        self.chunk_size = options.chunk_size
        self.has_log_density = has_log_density(posterior.prior)
        self.prior_time = 0.0 if self.has_log_density else _smallest_positive_time(posterior.prior, options.prior_steps)
        self.gradient_evaluations = 0
        self.log_density_evaluations = 0

    def _chunked(self, function, x: Tensor) -> Tensor:
        return torch.cat([function(part) for part in x.split(self.chunk_size)])

    def log_density(self, x: Tensor) -> Tensor:
        """``-f*(x)``, float64, shape ``(N,)`` (priors with a log-density only)."""
        self.log_density_evaluations += x.shape[0]
        prior = self.posterior.prior
        return self._chunked(lambda part: self.posterior.log_likelihood(part).to(torch.float64)
                             + prior.log_prob(part, 0.0), x)

    def score(self, x: Tensor) -> Tensor:
        """``-grad f*(x) = grad log p(y | x) + grad log q0(x)``, in ``x``'s dtype."""
        self.gradient_evaluations += x.shape[0]
        prior = self.posterior.prior
        return self._chunked(lambda part: self.posterior.log_likelihood_grad(part)
                             + prior.score(part, self.prior_time), x)


class Chains:
    """The inner chains ``(B, C, *event)`` with their cached target score and log-density (MALA)."""

    def __init__(self, states: Tensor, target: Target, with_log_density: bool):
        self.with_log_density = with_log_density
        self.states, self.score, self.log_density = self._evaluate(states, target)

    def _evaluate(self, states: Tensor, target: Target) -> tuple[Tensor, Tensor, Tensor | None]:
        flat = states.flatten(0, 1)
        score = target.score(flat).reshape(states.shape)
        log_density = target.log_density(flat).reshape(states.shape[:2]) if self.with_log_density else None
        return states, score, log_density

    def restart(self, particles: Tensor, states: Tensor, target: Target) -> None:
        """Replace the chains of the particles selected by the ``(B,)`` mask with ``states[particles]``."""
        if not particles.any():
            return
        states, score, log_density = self._evaluate(states[particles], target)
        self.states[particles], self.score[particles] = states, score
        if log_density is not None:
            self.log_density[particles] = log_density


def has_exact_draws(prior) -> bool:
    """Whether the prior draws exactly (``sample_clean``), at no network cost."""
    return callable(getattr(prior, "sample_clean", None))


def pool_size(options: RDMCOptions, prior) -> int:
    """The pool's draws: ``pool_size``, else 4096 exact draws or 512 of the network's reverse sampler."""
    return options.pool_size or (EXACT_POOL_SIZE if has_exact_draws(prior) else NETWORK_POOL_SIZE)


class PriorPool:
    """Prior draws shared by every particle, resampled with weights ``p(y | x0) N(x; e^{-s} x0, 1 - e^{-2s})``.

    Exact draws (``sample_clean``) where the prior has them; otherwise the prior's own reverse
    sampler with ``pool_steps`` steps, whose network evaluations the core counts in the cost.
    """

    def __init__(self, posterior: Posterior, options: RDMCOptions, generator: torch.Generator):
        prior, measurement = posterior.prior, posterior.measurement
        exact_draws = has_exact_draws(prior)
        self.size = pool_size(options, prior)
        if exact_draws:
            # sample_clean draws on the CPU: seed a CPU generator from the sampler's (possibly CUDA) one
            seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
            draws = prior.sample_clean(self.size, generator=torch.Generator().manual_seed(seed))
        else:
            draws = prior.sample(self.size, num_steps=options.pool_steps, generator=generator,
                                 dtype=measurement.dtype, device=measurement.device)
        self.draws = draws.to(dtype=measurement.dtype, device=measurement.device)
        self.flat = self.draws.flatten(1).to(torch.float64)
        self.chunk_size = options.chunk_size
        self.log_likelihood = torch.cat([posterior.log_likelihood(part).to(torch.float64)
                                         for part in self.draws.split(self.chunk_size)])

    def resample(self, x: Tensor, remaining: float, num_chains: int,
                 generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Chain starts ``(B, C, *event)`` for the particles ``x`` and the pool's effective sample size ``(B,)``."""
        chosen, effective_sizes = zip(*(self._choose(part, remaining, num_chains, generator)
                                        for part in x.split(self.chunk_size)))
        return self.draws[torch.cat(chosen)], torch.cat(effective_sizes)

    def _choose(self, x: Tensor, remaining: float, num_chains: int,
                generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Pool indices ``(B, C)`` for one chunk of particles, and the pool's effective sample size ``(B,)``."""
        decay, noise_variance = math.exp(-remaining), -math.expm1(-2 * remaining)
        flat_x = x.flatten(1).to(torch.float64)
        squared_distance = ((flat_x**2).sum(1, keepdim=True) - 2 * decay * flat_x @ self.flat.T
                            + decay**2 * (self.flat**2).sum(1))
        weights = torch.softmax(self.log_likelihood - squared_distance / (2 * noise_variance), dim=1)
        chosen = torch.multinomial(weights, num_chains, replacement=True, generator=generator)
        return chosen, 1.0 / (weights**2).sum(1)


def _gaussian_factor_starts(target: Target, centre: Tensor, variance: float, num_chains: int, num_draws: int,
                            generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """Chain starts ``(B, C, *event)``, each resampled from ``num_draws`` draws of ``N(centre, variance I)``
    with weights ``exp(-f*)``, and the mean effective sample size as a fraction of ``num_draws``
    (None when ``num_draws`` is 1: unweighted draws)."""
    batch, event_shape = centre.shape[0], centre.shape[1:]
    noise = torch.randn((batch, num_chains, num_draws, *event_shape), generator=generator, dtype=centre.dtype,
                        device=centre.device)
    draws = centre[:, None, None] + math.sqrt(variance) * noise
    if num_draws == 1:
        return draws[:, :, 0], None
    log_weights = target.log_density(draws.flatten(0, 2)).reshape(batch * num_chains, num_draws)
    if log_weights.isnan().any() or not (log_weights > -math.inf).any(1).all():
        raise SamplingError("rdmc: the chain starts' importance weights are not finite (the outer chain is far outside "
                            f"the prior: |x| up to {float(centre.abs().max()):.3g}); more num_steps, a smaller "
                            "inner_step_size, or importance_draws=1")
    weights = torch.softmax(log_weights, dim=1)
    chosen = torch.multinomial(weights, 1, generator=generator).squeeze(1)
    states = draws.flatten(0, 1)[torch.arange(batch * num_chains, device=centre.device), chosen]
    effective_fraction = (1.0 / (weights**2).sum(1)).mean() / num_draws
    return states.reshape(batch, num_chains, *event_shape), effective_fraction


def _squared_norm(x: Tensor) -> Tensor:
    """Squared norm over the event axes of a ``(B, C, *event)`` tensor: ``(B, C)``, float64."""
    return x.flatten(2).pow(2).sum(-1).to(torch.float64)


def _per_particle(values: Tensor, like: Tensor) -> Tensor:
    """A ``(B,)`` tensor shaped to broadcast against ``(B, C, *event)``, in ``like``'s dtype."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def _inner_drift(states: Tensor, score: Tensor, centre: Tensor, variance: float) -> Tensor:
    """``grad log q(x0 | x) = -grad f*(x0) - (x0 - e^{s} x) / (e^{2s} - 1)``."""
    return score - (states - centre[:, None]) / variance


def _ula_step(chains: Chains, target: Target, centre: Tensor, variance: float, step_size: Tensor,
              generator: torch.Generator) -> None:
    """One unadjusted Langevin step of every chain on ``q(x0 | x)``, in place."""
    states = chains.states
    step = _per_particle(step_size, states)
    noise = torch.randn(states.shape, generator=generator, dtype=states.dtype, device=states.device)
    states = states + step * _inner_drift(states, chains.score, centre, variance) + torch.sqrt(2 * step) * noise
    chains.states, chains.score = states, target.score(states.flatten(0, 1)).reshape(states.shape)


def _mala_step(chains: Chains, target: Target, centre: Tensor, variance: float, step_size: Tensor,
               generator: torch.Generator) -> Tensor:
    """One Metropolis-adjusted Langevin step of every chain on ``q(x0 | x)``, in place; returns the
    acceptance probability averaged over each particle's chains, ``(B,)``.

    Without a prior log-density (a network prior) the change of ``-f*`` along the move is the
    trapezoidal rule on the scores at both ends, ``(s(x) + s(x')) . (x' - x) / 2``: exact for
    Gaussian targets, an approximation otherwise (see the module's docstring)."""
    states = chains.states
    step = _per_particle(step_size, states)

    def log_gaussian_factor(points):
        return -_squared_norm(points - centre[:, None]) / (2 * variance)

    def log_proposal_density(end, start, start_drift):
        return -_squared_norm(end - start - step * start_drift) / (4 * step_size[:, None])

    drift = _inner_drift(states, chains.score, centre, variance)
    noise = torch.randn(states.shape, generator=generator, dtype=states.dtype, device=states.device)
    proposal = states + step * drift + torch.sqrt(2 * step) * noise
    proposal_score = target.score(proposal.flatten(0, 1)).reshape(states.shape)
    if chains.log_density is not None:
        proposal_log_density = target.log_density(proposal.flatten(0, 1)).reshape(states.shape[:2])
        log_target_change = proposal_log_density - chains.log_density
    else:
        log_target_change = ((proposal_score + chains.score) * (proposal - states)).flatten(2).sum(-1).to(
            torch.float64) / 2
    proposal_drift = _inner_drift(proposal, proposal_score, centre, variance)
    log_ratio = (log_target_change + log_gaussian_factor(proposal) - log_gaussian_factor(states)
                 + log_proposal_density(states, proposal, proposal_drift)
                 - log_proposal_density(proposal, states, drift))
    uniform = torch.rand(log_ratio.shape, generator=generator, dtype=torch.float64, device=log_ratio.device)
    accepted = torch.log(uniform) < log_ratio
    accepted_states = accepted.reshape(*accepted.shape, *([1] * (states.dim() - 2)))
    chains.states = torch.where(accepted_states, proposal, states)
    chains.score = torch.where(accepted_states, proposal_score, chains.score)
    if chains.log_density is not None:
        chains.log_density = torch.where(accepted, proposal_log_density, chains.log_density)
    return log_ratio.clamp(max=0.0).exp().mean(1)


def _tweedie_weight(tweedie: Tensor, target_score: Tensor) -> Tensor:
    """Per coordinate, the weight ``w`` in [0, 1] minimising the variance of ``w T + (1 - w) S`` over the
    chains (deviations from each particle's chain mean, pooled over particles); 1 where ``T = S``."""
    tweedie_deviation = (tweedie - tweedie.mean(1, keepdim=True)).to(torch.float64)
    score_deviation = (target_score - target_score.mean(1, keepdim=True)).to(torch.float64)
    difference = tweedie_deviation - score_deviation
    difference_variance = difference.pow(2).mean((0, 1))
    covariance = -(score_deviation * difference).mean((0, 1))
    weight = torch.where(difference_variance > 0, covariance / difference_variance.clamp(min=1e-300), 1.0)
    return weight.clamp(0.0, 1.0).to(tweedie.dtype)


def _score_estimate(chains: Chains, x: Tensor, remaining: float, estimator: str) -> tuple[Tensor, Tensor | None]:
    """The estimate of ``grad log p_s(x)`` from the chains, and the mean Tweedie weight (combined only)."""
    decay = math.exp(-remaining)
    tweedie = (decay * chains.states - x[:, None]) / -math.expm1(-2 * remaining)
    if estimator == "tweedie":
        return tweedie.mean(1), None
    target_score = chains.score / decay
    weight = _tweedie_weight(tweedie, target_score)
    return weight * tweedie.mean(1) + (1 - weight) * target_score.mean(1), weight.mean()


def remaining_times(terminal_time: float, num_steps: int, spacing: str) -> list[float]:
    """The remaining diffusion times ``s_0 = T > s_1 > ... > s_K = 0`` of the outer steps."""
    fractions = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    if spacing == "quadratic":
        fractions = fractions**2
    return (terminal_time * fractions).tolist()


class RDMC(Sampler):
    """Reverse diffusion Monte Carlo (Huang et al., ICLR 2024): a reverse OU process scored by inner Langevin chains."""

    name = "rdmc"
    Options = RDMCOptions
    needs_network_gradient = False

    def prior_pool(self, prior) -> tuple[int, int]:
        """(draws the pool holds, network evaluations drawing them) on ``prior``, for the run's estimate
        (``invdiff.resources``): none without the pool warm start, none spent on exact draws."""
        if self.options.warm_start != "prior_pool":
            return 0, 0
        size = pool_size(self.options, prior)
        return size, 0 if has_exact_draws(prior) else size * self.options.pool_steps

    def check(self, posterior: Posterior) -> None:
        """A network prior needs a positive time from ``prior_steps`` and gives no log-density to weigh draws."""
        options = self.options
        if has_log_density(posterior.prior):
            return
        _smallest_positive_time(posterior.prior, options.prior_steps)
        if options.warm_start == "gaussian" and options.importance_draws > 1:
            raise UnsupportedProblem("rdmc: importance_draws > 1 weighs draws by the prior's log-density, which this "
                                     "prior (a score network) does not have; use importance_draws=1")

    def _start_chains(self, chains: Chains | None, pool: PriorPool | None, target: Target, x: Tensor,
                      remaining: float, with_log_density: bool,
                      generator: torch.Generator) -> tuple[Chains, dict[str, Tensor]]:
        """Start or restart the chains of this outer step (see ``warm_start`` and ``reuse_chains``)."""
        options = self.options
        if pool is not None:
            states, effective_size = pool.resample(x, remaining, options.num_chains, generator)
            if chains is None:
                return Chains(states, target, with_log_density), {"pool_ess": effective_size.mean(), "restarted": 1.0}
            restart = effective_size >= options.refresh_ess if options.reuse_chains else torch.ones_like(
                effective_size, dtype=torch.bool)
            chains.restart(restart, states, target)
            return chains, {"pool_ess": effective_size.mean(), "restarted": restart.to(torch.float64).mean()}
        if chains is not None and options.reuse_chains:
            return chains, {}
        states, effective_fraction = _gaussian_factor_starts(target, math.exp(remaining) * x, math.expm1(2 * remaining),
                                                             options.num_chains, options.importance_draws, generator)
        diagnostics = {} if effective_fraction is None else {"importance_ess_fraction": effective_fraction}
        return Chains(states, target, with_log_density), diagnostics

    def _run_chains(self, chains: Chains, target: Target, x: Tensor, remaining: float, inner_sampler: str,
                    step_size: Tensor, generator: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """``inner_steps`` Langevin steps of every chain on ``q(. | x)``; returns the (adapted) step sizes."""
        options = self.options
        centre, variance = math.exp(remaining) * x, math.expm1(2 * remaining)
        if inner_sampler == "ula":
            for _ in range(options.inner_steps):
                _ula_step(chains, target, centre, variance, step_size, generator)
            return step_size, {}
        acceptance = []
        for _ in range(options.inner_steps):
            rate = _mala_step(chains, target, centre, variance, step_size, generator)
            acceptance.append(rate.mean())
            if options.target_acceptance is not None:
                step_size = step_size * torch.exp(STEP_SIZE_ADAPTATION_RATE * (rate - options.target_acceptance))
        return step_size, {"acceptance_rate": torch.stack(acceptance).mean()}

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        options = self.options
        target = Target(posterior, options)
        inner_sampler = options.inner_sampler
        dtype, device = posterior.measurement.dtype, posterior.measurement.device
        pool = PriorPool(posterior, options, generator) if options.warm_start == "prior_pool" else None
        times = remaining_times(options.terminal_time, options.num_steps, options.time_grid)
        start_std = math.sqrt(-math.expm1(-2 * options.terminal_time))
        x = start_std * torch.randn((num_samples, *posterior.prior.event_shape), generator=generator, dtype=dtype,
                                    device=device)
        step_size = torch.full((num_samples,), options.inner_step_size, dtype=torch.float64, device=device)
        chains = None
        for index, (remaining, next_remaining) in enumerate(zip(times[:-1], times[1:])):
            chains, start_diagnostics = self._start_chains(chains, pool, target, x, remaining,
                                                           inner_sampler == "mala" and target.has_log_density,
                                                           generator)
            step_size, chain_diagnostics = self._run_chains(chains, target, x, remaining, inner_sampler, step_size,
                                                            generator)
            score, tweedie_weight = _score_estimate(chains, x, remaining, options.score_estimator)
            step_length = remaining - next_remaining
            noise = torch.randn(x.shape, generator=generator, dtype=dtype, device=device)
            x = (math.exp(step_length) * x + 2 * math.expm1(step_length) * score
                 + math.sqrt(math.expm1(2 * step_length)) * noise)
            diagnostics = {**start_diagnostics, **chain_diagnostics, "inner_step_size": step_size.mean()}
            if tweedie_weight is not None:
                diagnostics["tweedie_weight"] = tweedie_weight
            # cumulative, so that the last step's record (summary.json) holds RDMC's cost
            diagnostics["target_gradients_per_sample"] = target.gradient_evaluations / num_samples
            monitor.step(index, next_remaining, x, **diagnostics)
        extras = {"target_gradient_evaluations": target.gradient_evaluations,
                  "target_log_density_evaluations": target.log_density_evaluations,
                  "inner_sampler": inner_sampler}
        if pool is not None:
            extras["prior_pool_draws"] = pool.size
        return SampleResult(samples=x, extras=extras)


@invdiff.hookimpl
def register_samplers(register):
    register(RDMC)
