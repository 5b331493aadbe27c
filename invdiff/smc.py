"""Sequential Monte Carlo parts shared by every particle sampler (Doucet and Johansen, "A tutorial on
particle filtering and smoothing", 2009; the update/weight/resample split of blackjax's SMC).

All weights are kept in log space and normalised, so the running evidence estimate is

    log Z_hat = sum_t log sum_k W_{t-1}^k w_t^k,

with ``W`` the normalised weights before the step (uniform right after a resampling) and ``w_t`` the
incremental weights. Resampling is adaptive: it happens when ``ESS < threshold * K``.

Independent runs (``num_runs = R``): ``R`` particle systems of ``K`` particles each, advanced together
(one network batch) but weighted, resampled and counted separately, so no resampling ever copies a
particle of one run into another. The returned samples are spread evenly over the runs and each run
has weight ``1/R`` (not its ``Z_hat``): as ``K`` grows every run's weighted particles target the
posterior, so the equal mixture does too, while the runs' paths stay independent. Weighting runs by
their ``Z_hat`` instead would give the ``R K``-particle estimate back, and with it one run's collapse
wherever ``Z_hat``'s spread is large (image dimension: on the natural-gmm cases the 64 runs' ``Z_hat``
weights have an effective number of 1.0-4.5 runs, reported as ``run_evidence_ess``). ``log Z_hat`` is
the mean of the runs' ``Z_hat`` (unbiased, like each run's). Every scheme takes ``(log_weights,
num_draws, generator)`` and returns ancestor indices. Those indices are kept
(K integers per step) to give, at the end, the genealogy of the returned samples: how many distinct
particles of each step they descend from. A high ESS after every resampling says nothing about that;
a genealogy that shrinks to one particle says the samples are copies of one path.

The diffusion-specific part is the twisting variance ``r_t^2`` of ALGORITHMS.md section 5 (twisted
SMC): the spread of ``x0`` given ``x_t`` added to the measurement noise variance.

Resample-move (Gilks and Berzuini, "Following a moving target", JRSS B 2001; ALGORITHMS.md
"Resample-move for the diffusion SMC samplers"): after a resampling, ``ResampleMove`` moves every
particle by a few Metropolis-adjusted Langevin steps that leave the twisted target
``gamma_t(x) ∝ p_t(x) p~_t(y | x)`` invariant, so that copies separate again. Such a kernel changes no
weight. It is exact where the prior has a log-density (the Gaussian-mixture priors); with a network
prior, which has only the score, ``log p_t(x') - log p_t(x)`` is the trapezoid rule of the score's line
integral, exact for Gaussian ``p_t`` and otherwise approximate.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Literal, NamedTuple

import torch
from pydantic import Field, model_validator
from torch import Tensor

from invdiff.noise import GaussianNoise
from invdiff.posterior import MAX_STEPS, SampleResult, SamplerOptions, SamplingError, StepMonitor, UnsupportedProblem
from invdiff.prior import GaussianMixturePrior
from invdiff.sde import SDE
from invdiff.spectral import DenseSVD, LinearGaussianSVD

__all__ = ["effective_sample_size", "RESAMPLING_SCHEMES", "ParticleWeights", "distinct_ancestors", "SMCOptions",
           "SplitRunOptions", "check_run_times", "restart_index", "restart_steps",
           "restart_runs", "end_of_step", "particles_per_run", "particle_weights", "twisting_variance",
           "MeasurementTwist", "TargetPoint", "ResampleMove", "chunked", "weighted_result"]


def effective_sample_size(log_weights: Tensor, dim: int = 0) -> Tensor:
    """``(sum w)^2 / sum w^2`` of unnormalised log-weights along ``dim``, between 1 and K."""
    return torch.exp(2 * torch.logsumexp(log_weights, dim) - torch.logsumexp(2 * log_weights, dim))


def _weights(log_weights: Tensor) -> Tensor:
    return torch.softmax(log_weights.to(torch.float64), 0)


def _inverse_cdf(weights: Tensor, uniforms: Tensor) -> Tensor:
    cumulative = torch.cumsum(weights, 0)
    cumulative[-1] = 1.0
    return torch.searchsorted(cumulative, uniforms.to(cumulative.dtype)).clamp(max=len(weights) - 1)


def multinomial(log_weights: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """Independent draws from the weights."""
    return torch.multinomial(_weights(log_weights), num_draws, replacement=True, generator=generator)


def stratified(log_weights: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """One uniform in each of ``num_draws`` equal strata of [0, 1)."""
    offsets = torch.rand(num_draws, generator=generator, dtype=torch.float64, device=log_weights.device)
    uniforms = (torch.arange(num_draws, dtype=torch.float64, device=log_weights.device) + offsets) / num_draws
    return _inverse_cdf(_weights(log_weights), uniforms)


def systematic(log_weights: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """One uniform shifted across ``num_draws`` equal strata (the lowest-variance default)."""
    offset = torch.rand(1, generator=generator, dtype=torch.float64, device=log_weights.device)
    uniforms = (torch.arange(num_draws, dtype=torch.float64, device=log_weights.device) + offset) / num_draws
    return _inverse_cdf(_weights(log_weights), uniforms)


def residual(log_weights: Tensor, num_draws: int, generator: torch.Generator) -> Tensor:
    """``floor(num_draws W_k)`` copies of each particle, the remainder drawn multinomially (``num_draws W_k`` a
    rounding error below an integer counts as that integer: K equal weights give one copy each)."""
    weights = _weights(log_weights)
    copies = torch.floor(num_draws * weights + 1e-9).long()
    indices = torch.repeat_interleave(torch.arange(len(weights), device=weights.device), copies)
    remaining = num_draws - int(copies.sum())
    if remaining > 0:
        remainder = num_draws * weights - copies
        extra = torch.multinomial(remainder / remainder.sum(), remaining, replacement=True, generator=generator)
        indices = torch.cat([indices, extra])
    return indices


RESAMPLING_SCHEMES: dict[str, Callable[[Tensor, int, torch.Generator], Tensor]] = {
    "systematic": systematic, "multinomial": multinomial, "stratified": stratified, "residual": residual}


class ParticleWeights:
    """Log-weights of ``num_runs`` independent runs of K particles (run ``r`` holds particles ``r K`` to
    ``r K + K - 1``), each run's normalised; the runs' ``log Z_hat``; adaptive resampling within each run;
    the ancestry.

    A sampler's step calls ``reweight``, then ``resample_if_needed`` (not at a step whose weights must
    stay with their particles), then ``end_step``, whose diagnostics go to ``monitor.step``.
    """

    def __init__(self, num_particles: int, *, num_runs: int = 1, scheme: str = "systematic", threshold: float = 0.5,
                 generator: torch.Generator, device: torch.device | str = "cpu"):
        if scheme not in RESAMPLING_SCHEMES:
            raise ValueError(f"unknown resampling scheme '{scheme}'; allowed: {', '.join(RESAMPLING_SCHEMES)}")
        self.num_particles = num_particles
        self.num_runs = num_runs
        self.resample_indices = RESAMPLING_SCHEMES[scheme]
        self.threshold = threshold
        self.generator = generator
        self.log_weights = torch.full((num_runs * num_particles,), -math.log(num_particles), dtype=torch.float64,
                                      device=device)
        #: each run's running log Z_hat, shape (num_runs,)
        self.run_log_evidence = torch.zeros(num_runs, dtype=torch.float64, device=device)
        #: the weights as the last reweighting left them, before any resampling: what the diagnostics report
        self.log_weights_before_resampling = self.log_weights
        #: the runs those weights belong to (one on the step that splits one run into several)
        self._runs_before_resampling = num_runs
        #: one entry per finished step: the ancestor indices of its resampling(s), or None where it kept its particles
        self.ancestry: list[Tensor | None] = []
        #: one entry per finished step: whether resample-move moved its particles after resampling
        self.moved: list[bool] = []
        self._step_ancestors: Tensor | None = None
        self._step_moved = False

    @property
    def total_particles(self) -> int:
        """``num_runs * K``: the particles a sampler moves."""
        return self.num_runs * self.num_particles

    @property
    def log_evidence(self) -> float:
        """``log Z_hat``: the log of the mean of the runs' ``Z_hat``."""
        return float(torch.logsumexp(self.run_log_evidence, 0) - math.log(self.num_runs))

    def add_log_evidence(self, constant: float) -> None:
        """Multiply every run's ``Z_hat`` by ``exp(constant)`` (a factor no particle's weight carries)."""
        self.run_log_evidence += constant

    @property
    def pooled_log_weights(self) -> Tensor:
        """The weights of all particles as one normalised system: run ``r``'s weights times ``1/R``."""
        return self.log_weights - math.log(self.num_runs)

    def _by_run(self, log_weights: Tensor) -> Tensor:
        return log_weights.view(self.num_runs, self.num_particles)

    @property
    def ess(self) -> float:
        """The ESS of the pooled weights, between ``num_runs`` and ``num_runs * K``."""
        return float(effective_sample_size(self.pooled_log_weights))

    def reweight(self, log_increments: Tensor, where: str) -> None:
        """Multiply the weights by ``exp(log_increments)``; ``where`` names the step in errors."""
        log_increments = log_increments.detach().to(torch.float64)
        if torch.isnan(log_increments).any():
            count = int(torch.isnan(log_increments).sum())
            raise SamplingError(f"NaN in {count} of {self.total_particles} incremental weights at {where}")
        combined = self._by_run(self.log_weights + log_increments)
        totals = torch.logsumexp(combined, 1)
        if not torch.isfinite(totals).all():
            run = int((~torch.isfinite(totals)).nonzero()[0])
            which = f" in run {run + 1} of {self.num_runs}" if self.num_runs > 1 else ""
            raise SamplingError(f"weight degeneracy at {where}: every particle{which} has weight "
                                f"{'zero' if totals[run] < 0 else 'infinity'}")
        self.run_log_evidence += totals
        self.log_weights = (combined - totals[:, None]).flatten()
        self.log_weights_before_resampling = self.log_weights
        self._runs_before_resampling = self.num_runs

    def resample_if_needed(self, *tensors: Tensor) -> tuple[tuple[Tensor, ...], bool]:
        """Resample, within each run whose ESS < threshold * K, ``tensors`` (particles on the first axis).

        The ancestor indices are kept for the genealogy until ``end_step`` records them.
        """
        by_run = self._by_run(self.log_weights)
        runs = (effective_sample_size(by_run, 1) < self.threshold * self.num_particles).nonzero().flatten().tolist()
        if not runs:
            return tensors, False
        ancestors = torch.arange(self.total_particles, device=self.log_weights.device)
        log_weights = by_run.clone()
        for run in runs:
            first = run * self.num_particles
            ancestors[first:first + self.num_particles] = first + self.resample_indices(
                by_run[run], self.num_particles, self.generator)
            log_weights[run] = -math.log(self.num_particles)
        self._record_ancestors(ancestors)
        self.log_weights = log_weights.flatten()
        return tuple(tensor[ancestors] for tensor in tensors), True

    def _record_ancestors(self, ancestors: Tensor) -> None:
        """Keep a resampling's ancestor indices for ``end_step``; two resamplings in one step compose: new
        particle j descends from old particle earlier[ancestors[j]]."""
        self._step_ancestors = ancestors if self._step_ancestors is None else self._step_ancestors[ancestors]

    def split(self, num_runs: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Turn one run into ``num_runs`` independent runs of ``K / num_runs`` particles: resample all ``K``
        particles from the run's weights (``tensors``, particles on the first axis) in random order, then weigh and
        resample each run apart from here on, each run's ``Z_hat`` continuing from the one run's. The equally
        weighted copies target what the run's weighted particles did, so each new run starts on its target."""
        if self.num_runs != 1 or self.num_particles % num_runs:
            raise ValueError(f"only one run of a multiple of {num_runs} particles splits into {num_runs} runs; "
                             f"this is {self.num_runs} run(s) of {self.num_particles}")
        ancestors = self.resample_indices(self.log_weights, self.num_particles, self.generator)
        ancestors = ancestors[torch.randperm(len(ancestors), generator=self.generator, device=ancestors.device)]
        self._record_ancestors(ancestors)
        self.num_runs, self.num_particles = num_runs, self.num_particles // num_runs
        self.log_weights = torch.full_like(self.log_weights, -math.log(self.num_particles))
        self.run_log_evidence = self.run_log_evidence.expand(num_runs).clone()
        return tuple(tensor[ancestors] for tensor in tensors)

    def record_move(self) -> None:
        """Note that this step moved its particles after resampling (resample-move): copies differ again."""
        self._step_moved = True

    def end_step(self) -> dict[str, float]:
        """Close a step: record its resampling (if any) in ``ancestry`` and its move in ``moved``; return
        the step's diagnostics.

        ``ess`` (of the pooled weights) and ``log_weight_spread`` (the largest within a run) describe the
        weights BEFORE resampling (right after it they would read K and 0 whenever it resampled, hiding a
        collapse); ``resampled`` is 1.0 if any run resampled, else 0.0.
        """
        resampled = self._step_ancestors is not None
        self.ancestry.append(self._step_ancestors)
        self.moved.append(self._step_moved)
        self._step_ancestors = None
        self._step_moved = False
        runs = self._runs_before_resampling   # the one run's weights on the step that split it
        log_weights = self.log_weights_before_resampling.view(runs, -1)
        finite = torch.isfinite(log_weights)
        spread = torch.where(finite.any(1), torch.where(finite, log_weights, -torch.inf).amax(1)
                             - torch.where(finite, log_weights, torch.inf).amin(1), torch.inf)
        return {"ess": float(effective_sample_size(log_weights.flatten() - math.log(runs))),
                "resampled": float(resampled), "log_weight_spread": float(spread.max())}


def distinct_ancestors(ancestry: list[Tensor | None], final_indices: Tensor) -> list[int]:
    """The genealogy: for each step, how many distinct particles that step moved (before its resampling)
    are ancestors of the particles ``final_indices`` (indices into the last step's particles, e.g. the
    final draw): the number of distinct paths through that step.

    ``ancestry[i]`` are the ancestor indices of step ``i``'s resampling (new particle ``j`` is a
    copy of old particle ``ancestry[i][j]``), or None where the step kept its particles. The counts
    can only shrink going back in time; a count of 1 means every final particle descends from one
    particle of that step.
    """
    lineage = final_indices
    counts = []
    for ancestors in reversed(ancestry):
        if ancestors is not None:
            lineage = ancestors[lineage]
        counts.append(int(torch.unique(lineage).numel()))
    return counts[::-1]


class SMCOptions(SamplerOptions):
    """Options every diffusion SMC sampler shares."""

    num_steps: int = Field(100, ge=1, le=MAX_STEPS, description="reverse steps on the SDE's time grid")
    num_particles: int | None = Field(None, ge=1, description="particles K in all, a multiple of num_runs (default: "
                                      "the number of samples, rounded up to a multiple of num_runs)")
    num_runs: int = Field(1, ge=1, description="independent runs sharing the particles equally, advanced in one "
                          "batch; the samples are spread evenly over them, each run weighted 1/num_runs")
    resampling: Literal["systematic", "multinomial", "stratified", "residual"] = "systematic"
    resampling_threshold: float = Field(0.5, ge=0, le=1, description="resample when ESS < threshold * K")
    twisting: Literal["tweedie", "capped", "none"] = Field(
        "tweedie", description="r_t^2 added to the noise variance: sigma_t^2 / lambda_t^2, that capped at "
        "twisting_cap (the TDS reference code), or 0")
    twisting_cap: float = Field(0.12, gt=0, description="tau^2 of the capped rule, in the prior's units")
    batch_size: int | None = Field(None, ge=1, description="most particles per network call (memory budget)")
    move_steps: int = Field(0, ge=0, description="resample-move: Metropolis-adjusted Langevin moves of every "
                            "particle after each resampling of the weights (0: none; not after split_time's split); "
                            "each costs one network evaluation per particle")
    move_step_size: float = Field(0.05, gt=0, le=1, description="c of the moves' step h = c sigma_t^2 / (1 + ||A||^2)")

    def usage(self) -> dict[str, tuple[bool, str]]:
        return {**super().usage(), "twisting_cap": (self.twisting == "capped", "with twisting 'capped'"),
                "move_step_size": (self.move_steps > 0, "with move_steps above 0")}

    @model_validator(mode="after")
    def _runs_share_the_particles(self) -> "SMCOptions":
        if self.num_particles is not None and self.num_particles % self.num_runs:
            raise ValueError(f"num_particles ({self.num_particles}) must be a multiple of num_runs ({self.num_runs}): "
                             f"each run gets num_particles / num_runs")
        if self.move_steps and self.resampling_threshold == 0:
            raise ValueError("move_steps moves the particles after a resampling, and resampling_threshold 0 never "
                             "resamples: set resampling_threshold above 0, or move_steps 0")
        return self


class SplitRunOptions(SMCOptions):
    """``SMCOptions`` with one run of all the particles before the independent runs (``split_time``) and the runs'
    restart from noised copies (``restart_time``; ``end_of_step`` carries both out): twisted_smc's and ve_smc's."""

    split_time: float | None = Field(None, gt=0, lt=1, description="with num_runs > 1: the particles move as one run "
                                     "until the first step at or below this time, then split into num_runs runs (the "
                                     "one run's weights choose among the modes, the runs keep the samples apart)")
    restart_time: float | None = Field(None, gt=0, lt=1, description="with split_time: right after the split, every "
                                       "particle is noised forward by the SDE to the last grid time at or above this "
                                       "one, and the runs go down from there (the steps between are run again)")

    @model_validator(mode="after")
    def _split_needs_runs(self) -> "SplitRunOptions":
        """Refuse ``split_time`` without runs to split into, and ``restart_time`` without a split below it (the grid's
        own limits: ``check_run_times``)."""
        if self.split_time is not None and self.num_runs == 1:
            raise ValueError("split_time splits one run into num_runs runs: set num_runs > 1 with it")
        if self.restart_time is not None and (self.split_time is None or self.restart_time <= self.split_time):
            raise ValueError("restart_time noises the particles back from split_time: set split_time below it")
        return self


def check_run_times(options: SplitRunOptions, grid: Tensor) -> None:
    """Refuse, on the run's time ``grid`` (decreasing), a ``split_time`` below its last noisy time (the split
    happens at the first step at or below it, never at the last, deterministic one, so the particles would stay one
    run) and a ``restart_time`` above its first (the SDE's end time)."""
    split_time, restart_time = options.split_time, options.restart_time
    if split_time is not None and (len(grid) < 3 or split_time < float(grid[-2])):
        smallest = f"at least {float(grid[-2]):.4g} (its last noisy time)" if len(grid) >= 3 else "num_steps above 1"
        raise UnsupportedProblem(f"split_time {split_time:g} is never reached on this run's grid of "
                                 f"{len(grid) - 1} steps, so the runs would not split: set split_time to {smallest}")
    if restart_time is not None and restart_time > float(grid[0]):
        raise UnsupportedProblem(f"restart_time {restart_time:g} is above the prior's end time T = "
                                 f"{float(grid[0]):g}: set restart_time between split_time and T")


def restart_index(grid: Tensor, restart_time: float) -> int:
    """The index of the last time of ``grid`` (decreasing) at or above ``restart_time``: where the runs go down
    again."""
    return int((grid >= restart_time).nonzero().max())


def restart_steps(grid: Tensor, split_time: float | None, restart_time: float | None) -> int:
    """The steps a restart adds on ``grid`` (0 without one): its own, then the steps from the restart's grid time
    down to the split's, run again. Run estimates count them. ``split_time`` is one the grid reaches before its last
    step (the samplers' ``check`` refuses others: ``check_run_times``)."""
    if restart_time is None:
        return 0
    split_index = int((grid[1:] <= split_time).nonzero().min())
    return split_index - restart_index(grid, restart_time) + 2


def restart_runs(weights: ParticleWeights, monitor: StepMonitor, grid: Tensor, index: int, x: Tensor,
                 log_twist: Tensor, evaluate: Callable[[Tensor, Tensor], tuple[Tensor, ...]], *, sde: SDE,
                 options: SplitRunOptions, generator: torch.Generator,
                 diagnostics: dict[str, float]) -> tuple[int, Tensor, tuple[Tensor, ...]]:
    """The restart, right after the split at step ``index`` (time ``s = grid[index + 1]``): record that step (with
    ``diagnostics``), noise the particles forward by the SDE to ``r``, the last grid time at or above
    ``options.restart_time``, evaluate them there, weigh them by ``p~_r(y | x_r) / p~_s(y | x_s)`` and record the
    restart as a step (the monitor told of the steps it adds, ``restart_steps``). ``evaluate(x, t)`` returns what the
    sampler carries with its particles, ``log p~_t(y | x)`` second (twisted_smc: denoised, log twist, gradient;
    ve_smc: score, log twist). Returns the grid index of ``r``, where the next step starts, the particles and what
    ``evaluate`` returned for them.

    The weight is exact: with the prior's reverse kernel as the backward kernel (an SMC sampler's L-kernel, Del Moral,
    Doucet and Jasra, JRSS B 2006), ``p_s(x_s) q(x_r | x_s) = p_r(x_r) p(x_s | x_r)`` cancels the rest, so the
    particles target the twisted ``p_r(x) p~_r(y | x)`` as a first pass does at ``r`` (restart sampling, Xu et al.,
    NeurIPS 2023, re-noises the same way, without weights)."""
    s = grid[index + 1]
    monitor.step(index, s, x, **weights.end_step(), **diagnostics)
    restart = restart_index(grid, options.restart_time)
    restarted = sde.forward_transition(x, s, grid[restart], generator=generator)
    carried = evaluate(restarted, grid[restart])
    weights.reweight(carried[1] - log_twist, where=f"the restart (t={float(grid[restart]):.4g})")
    monitor.add_steps(restart_steps(grid, options.split_time, options.restart_time))
    monitor.step(restart - 1, grid[restart], restarted, **weights.end_step())
    return restart, restarted, carried


def end_of_step(weights: ParticleWeights, monitor: StepMonitor, grid: Tensor, index: int, x: Tensor,
                carried: tuple[Tensor, ...], *, evaluate: Callable[[Tensor, Tensor], tuple[Tensor, ...]],
                mover: ResampleMove, target_point: Callable[[Tensor, Tensor, tuple[Tensor, ...]], TargetPoint],
                options: SplitRunOptions, sde: SDE,
                generator: torch.Generator) -> tuple[int, Tensor, tuple[Tensor, ...]]:
    """What follows step ``index``'s reweighting (it took the particles to ``s = grid[index + 1]``) in twisted_smc
    and ve_smc: resample the runs that need it and move the particles after a resampling (``mover``; not at the
    last step, whose weights stay with the particles they weigh), split the one run at ``options.split_time`` (a
    resampling too: its copies are moved unless the runs restart, ``restart_runs``), and tell the monitor.
    ``carried`` is what the sampler keeps per particle, ``log p~_s(y | x)`` second, and ``evaluate(x, t)``
    recomputes it; ``target_point`` turns it into a move's ``TargetPoint``. Returns the index of the next step, the
    particles and what they carry."""
    s = grid[index + 1]
    diagnostics = {}
    if index < len(grid) - 2:
        (x, *carried), resampled = weights.resample_if_needed(x, *carried)
        if resampled and mover.num_moves:
            x, carried, diagnostics["move_acceptance"] = mover.move(x, s, tuple(carried), evaluate, target_point)
            weights.record_move()
        if options.split_time is not None and weights.num_runs == 1 and float(s) <= options.split_time:
            x, *carried = weights.split(options.num_runs, x, *carried)
            if options.restart_time is not None:
                return restart_runs(weights, monitor, grid, index, x, carried[1], evaluate, sde=sde, options=options,
                                    generator=generator, diagnostics=diagnostics)
            if mover.num_moves and (not resampled or options.resampling == "multinomial"):
                # the split's copies (after a resampling the weights are equal, and all schemes but multinomial
                # only reorder the particles, which the moves above have moved)
                x, carried, diagnostics["move_acceptance"] = mover.move(x, s, tuple(carried), evaluate, target_point)
                weights.record_move()
    monitor.step(index, s, x, **weights.end_step(), **diagnostics)
    return index + 1, x, tuple(carried)


def particles_per_run(num_particles: int | None, num_samples: int, num_runs: int) -> int:
    """Particles in each of ``num_runs`` runs: ``num_particles`` (default: the samples) shared equally, rounded up."""
    return -(-(num_particles or num_samples) // num_runs)


def particle_weights(options: SMCOptions, num_samples: int, *, generator: torch.Generator,
                     device: torch.device | str, one_run: bool = False) -> ParticleWeights:
    """The weights of a sampling run with these options: ``num_particles`` (default: the samples) shared
    equally by ``num_runs`` runs, rounded up to a multiple of ``num_runs``; with ``one_run``, the same particles
    as one run, to be split into the ``num_runs`` runs later (``ParticleWeights.split``)."""
    per_run = particles_per_run(options.num_particles, num_samples, options.num_runs)
    runs = 1 if one_run else options.num_runs
    return ParticleWeights(per_run * options.num_runs // runs, num_runs=runs, scheme=options.resampling,
                           threshold=options.resampling_threshold, generator=generator, device=device)


def twisting_variance(sde: SDE, t: float | Tensor, options: SMCOptions) -> float:
    """``r_t^2``, the variance of ``x0`` given ``x_t`` in the prior's units, by the options' rule."""
    if options.twisting == "none":
        return 0.0
    spread = float(sde.sigma_t(t) ** 2 / sde.lambda_t(t) ** 2)
    if options.twisting == "capped":
        return spread * options.twisting_cap / (spread + options.twisting_cap)
    return spread


def unused_under_noise(options: SMCOptions, posterior) -> dict[str, str]:
    """``twisting`` and ``twisting_cap`` given explicitly under non-Gaussian noise, where ``MeasurementTwist`` is the
    plain likelihood at ``x0_hat`` whatever they say (``Sampler.unused_options``' entry for them)."""
    if isinstance(posterior.operator.noise, GaussianNoise) or options.twisting not in ("tweedie", "capped", "none"):
        return {}   # the other twists refuse such noise in the sampler's check
    return {name: "with Gaussian noise; under other noise the twist is the likelihood at x0_hat"
            for name in ("twisting", "twisting_cap") if name in options.model_fields_set}


class MeasurementTwist:
    """The twisting functions ``log p~_t(y | x)`` evaluated at a denoised estimate (ALGORITHMS.md section 5).

    Linear operator with Gaussian noise: ``N(y; G(x0_hat), sigma_y^2 I + r_t^2 A A^T)``, the predictive
    density of ``y`` if ``x0`` given ``x_t`` had covariance ``r_t^2 I``, computed in the operator's
    singular basis (``invdiff.spectral.LinearGaussianSVD``: masks, circular blurs and circular
    downsampling at any size, other linear operators up to ``DenseSVD.MAX_DIMENSION`` values). A linear
    operator with no known structure above that size gets the scalar form ``sigma_y^2 + s^2 r_t^2``
    (``s`` the operator's input scale), exact only where ``A A^T = s^2 I`` on the measurement, with a warning
    (no shipped problem gets there); non-Gaussian noise gets the plain likelihood at ``x0_hat``.
    """

    def __init__(self, posterior, options: SMCOptions):
        self.posterior = posterior
        self.options = options
        self.svd = LinearGaussianSVD.from_posterior(posterior)
        operator = posterior.operator
        if self.svd is None and operator.linear and isinstance(operator.noise, GaussianNoise):
            values = math.prod(posterior.prior.event_shape)
            warnings.warn(f"operator '{operator.name}' has no singular basis here (no known structure, {values} "
                          f"values, above {DenseSVD.MAX_DIMENSION}): the twist uses the scalar variance "
                          f"sigma_y^2 + s^2 r_t^2, exact only where A A^T = s^2 I",
                          stacklevel=2)

    def log_likelihood(self, denoised: Tensor, t: float | Tensor) -> Tensor:
        spread = twisting_variance(self.posterior.prior.sde, t, self.options)
        operator, measurement = self.posterior.operator, self.posterior.measurement
        clean = operator.forward(denoised)
        if self.svd is not None:
            return self.svd.log_likelihood(measurement, clean, spread)
        return operator.noise.inflated(operator.input_scale**2 * spread).log_likelihood(measurement, clean)


class TargetPoint(NamedTuple):
    """The twisted target ``gamma_t(x) ∝ p_t(x) p~_t(y | x)`` at a batch of particles, as a move needs it.

    ``score`` is the prior's ``s(x, t)``; ``log_twist`` is ``log p~_t(y | x)`` ``(B,)``;
    ``twist_gradient`` is the gradient of ``log_twist``, or any stand-in for it (it only shapes the
    Langevin proposal, which the accept step corrects).
    """

    score: Tensor
    log_twist: Tensor
    twist_gradient: Tensor


def operator_norm(posterior, svd: LinearGaussianSVD | None) -> float:
    """``||A||`` in the prior's units: the largest singular value where the SVD is built, else the
    operator's ``input_scale`` (exact for masks and unit-gain blurs, whose physics has norm 1)."""
    if svd is not None:
        return float(svd.singular_values.max())
    return abs(posterior.operator.input_scale)


def _select(accepted: Tensor, new: Tensor, old: Tensor) -> Tensor:
    """``new`` for the accepted particles (first axis), ``old`` for the others."""
    return torch.where(accepted.view(-1, *[1] * (new.dim() - 1)), new, old)


class ResampleMove:
    """Metropolis-adjusted Langevin moves of the particles after a resampling (resample-move).

    Each of ``options.move_steps`` moves proposes ``x' = x + h (s + g) + sqrt(2 h) xi`` (``s`` the
    prior's score, ``g`` the twist gradient of ``TargetPoint``) with ``h = c sigma_t^2 / (1 + ||A||^2)``
    (``c = options.move_step_size``: ``-Hess log p_t <= I / sigma_t^2``, and the twist adds at most
    about ``||A||^2 / sigma_t^2``) and accepts it with the Metropolis-Hastings probability for
    ``gamma_t(x) ∝ p_t(x) p~_t(y | x)``. The prior's part of the log-ratio is exact for a
    ``GaussianMixturePrior`` (``log_prob``), so the move leaves ``gamma_t`` exactly invariant; for a
    network prior it is the trapezoid rule ``(x' - x) . (s(x) + s(x')) / 2`` (Sjöberg et al. 2023):
    no network call beyond the proposal's, exact for a Gaussian ``p_t``, approximate otherwise. It was
    chosen over the unadjusted move (ULA, same cost) because it rejects the gross steps ULA takes
    and its acceptance rate tells whether ``c`` is too large.

    ``gamma_t`` uses the forward marginal ``p_t``, not the reverse chain's: the two differ by the
    discretisation, which the weights do not correct (ALGORITHMS.md).
    """

    def __init__(self, posterior, options: SMCOptions, svd: LinearGaussianSVD | None, generator: torch.Generator):
        self.prior = posterior.prior
        self.num_moves = options.move_steps
        self.step_scale = options.move_step_size / (1 + operator_norm(posterior, svd) ** 2)
        self.generator = generator

    def step_size(self, t: float | Tensor) -> float:
        """``h = c sigma_t^2 / (1 + ||A||^2)``."""
        return self.step_scale * float(self.prior.sde.sigma_t(t)) ** 2

    def _log_prior_ratio(self, x: Tensor, proposal: Tensor, t: float | Tensor, point: TargetPoint,
                         proposed: TargetPoint) -> Tensor:
        """``log p_t(x') - log p_t(x)``: exact for a mixture prior, else the score's trapezoid rule."""
        if isinstance(self.prior, GaussianMixturePrior):
            return self.prior.log_prob(proposal, t) - self.prior.log_prob(x, t)
        step = (proposal - x).flatten(1).to(torch.float64)
        return 0.5 * (step * (point.score + proposed.score).flatten(1).to(torch.float64)).sum(1)

    @staticmethod
    def _log_proposal_ratio(x: Tensor, proposal: Tensor, point: TargetPoint, proposed: TargetPoint,
                            step_size: float) -> Tensor:
        """``log q(x | x') - log q(x' | x)`` of the Langevin proposal ``N(x + h drift(x), 2 h)``."""
        forward = (proposal - x - step_size * (point.score + point.twist_gradient)).flatten(1).to(torch.float64)
        backward = (x - proposal - step_size * (proposed.score + proposed.twist_gradient)).flatten(1).to(torch.float64)
        return -((backward**2).sum(1) - (forward**2).sum(1)) / (4 * step_size)

    def move(self, x: Tensor, t: float | Tensor, carried: tuple[Tensor, ...],
             evaluate: Callable[[Tensor, float | Tensor], tuple[Tensor, ...]],
             target_point: Callable[[Tensor, float | Tensor, tuple[Tensor, ...]], TargetPoint],
             ) -> tuple[Tensor, tuple[Tensor, ...], float]:
        """Move the particles ``x`` at time ``t``; return them, their ``carried`` values and the acceptance rate.

        ``carried`` are what the sampler keeps per particle (network outputs at ``x``); ``evaluate(x, t)``
        computes them at new particles (the network call: one per particle per move), and
        ``target_point(x, t, carried)`` turns them into a ``TargetPoint`` without calling the network.
        """
        step_size = self.step_size(t)
        point = target_point(x, t, carried)
        accepted_total = 0
        for _ in range(self.num_moves):
            noise = torch.randn(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
            proposal = x + step_size * (point.score + point.twist_gradient) + math.sqrt(2 * step_size) * noise
            proposed_carried = evaluate(proposal, t)
            proposed = target_point(proposal, t, proposed_carried)
            log_ratio = (self._log_prior_ratio(x, proposal, t, point, proposed)
                         + (proposed.log_twist - point.log_twist).to(torch.float64)
                         + self._log_proposal_ratio(x, proposal, point, proposed, step_size))
            uniforms = torch.rand(len(x), generator=self.generator, dtype=torch.float64, device=x.device)
            accepted = torch.log(uniforms) < log_ratio     # a NaN ratio is a rejection
            accepted_total += int(accepted.sum())
            x = _select(accepted, proposal, x)
            carried = tuple(_select(accepted, new, old) for new, old in zip(proposed_carried, carried))
            point = TargetPoint(*(_select(accepted, new, old) for new, old in zip(proposed, point)))
        return x, carried, accepted_total / (self.num_moves * len(x))


def chunked(function: Callable[[Tensor], tuple[Tensor, ...]], x: Tensor, batch_size: int | None) -> tuple[Tensor, ...]:
    """``function`` applied to chunks of at most ``batch_size`` particles, outputs concatenated."""
    if batch_size is None or batch_size >= len(x):
        return function(x)
    pieces = [function(part) for part in torch.split(x, batch_size)]
    return tuple(torch.cat(outputs) for outputs in zip(*pieces))


def weighted_result(particles: Tensor, weights: ParticleWeights, num_samples: int, *,
                    last_step_deterministic: bool = False) -> SampleResult:
    """The final result: weighted particles, ``num_samples`` draws resampled from them, ``log Z_hat``, and
    the genealogy of the draws (``distinct_ancestors`` per step) and ``distinct_samples``, the number of different
    draws (counted by value: copies whose moves were all rejected are equal, whatever the genealogy says).

    The draws are shuffled: systematic and stratified schemes return ancestors in order, and the
    first few samples must be as good a pick as any. The samples differ where their paths through the
    last step differ. ``last_step_deterministic``: the last step moved the particles without noise
    (``x_0 = x0_hat(t_1, x_1)``), so copies made by the resampling before it stay equal: its
    distinct paths are those of the step before, unless that step moved them apart (resample-move).
    With independent runs the draws are spread evenly over the runs (the first ``num_samples mod R``
    runs give one more), each run's drawn from its own weights, and ``log_weights`` are the pooled ones;
    ``extras`` give each run's ``log Z_hat`` (``run_log_evidence``) and ``run_evidence_ess``, the effective
    number of runs were they weighted by their ``Z_hat`` (module docstring: why they are not).
    """
    draws_per_run, extra = divmod(num_samples, weights.num_runs)
    pieces = []
    for run in range(weights.num_runs):
        count = draws_per_run + (run < extra)
        if count:
            first = run * weights.num_particles
            run_log_weights = weights.log_weights[first:first + weights.num_particles]
            pieces.append(first + weights.resample_indices(run_log_weights, count, weights.generator))
    ancestors = torch.cat(pieces)
    ancestors = ancestors[torch.randperm(num_samples, generator=weights.generator, device=ancestors.device)]
    genealogy = distinct_ancestors(weights.ancestry, ancestors)
    if last_step_deterministic and len(genealogy) > 1 and not weights.moved[-2]:
        genealogy[-1] = genealogy[-2]
    samples = particles[ancestors]
    extras = {}
    if weights.num_runs > 1:
        extras = {"run_log_evidence": weights.run_log_evidence.clone(),
                  "run_evidence_ess": float(effective_sample_size(weights.run_log_evidence))}
    return SampleResult(samples=samples, particles=particles, log_weights=weights.pooled_log_weights,
                        log_evidence=weights.log_evidence, distinct_ancestors=genealogy,
                        distinct_samples=int(torch.unique(samples.flatten(1), dim=0).shape[0]), extras=extras)
