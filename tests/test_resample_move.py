"""Resample-move (invdiff.smc.ResampleMove): the Langevin moves leave the exact twisted target invariant,
the samplers with moves stay exact, the moves pull copies apart, and the options are checked."""

import math
from functools import partial

import pytest
import torch

from invdiff.exact import ExactPosterior
from invdiff.metrics import distinct_samples
from invdiff.posterior import sample_posterior
from invdiff.problems import ProblemError, build_sampler
from invdiff.smc import MeasurementTwist, ResampleMove, SMCOptions
from invdiff.testing import (Z_SCORE, covariance_z_scores, discretised_model_posterior, linear_gaussian,
                             mean_z_scores, weighted_runs_z_scores)
from invdiff_plugins.twisted_smc import TwistedSMC, _tweedie_twist
from invdiff_plugins.ve_smc import VESMC

#: with 10 replicates the z-score follows Student's t with 9 degrees of freedom: P(|t| > 6) = 2e-4
REPLICATE_Z = 6.0


def twisted_target(posterior, twist: MeasurementTwist, t: float) -> ExactPosterior:
    """``gamma_t(x) ∝ p_t(x) p~_t(y | x)`` for a Gaussian prior and a linear operator: Gaussian, as
    ``log gamma_t`` is quadratic (Tweedie's estimate is affine in x); read off its Hessian and gradient."""
    prior = posterior.prior

    def log_target(flat):
        x = flat.reshape(1, *prior.event_shape)
        return (prior.log_prob(x, t) + twist.log_likelihood(prior.denoise(x, t), t)).sum()

    origin = torch.zeros(math.prod(prior.event_shape), dtype=torch.float64)
    precision = -torch.autograd.functional.hessian(log_target, origin)
    gradient = torch.autograd.functional.jacobian(log_target, origin)
    covariance = torch.linalg.inv(precision)
    covariance = (covariance + covariance.T) / 2
    return ExactPosterior(torch.zeros(1, dtype=torch.float64), (covariance @ gradient)[None], covariance[None], 0.0,
                          prior.event_shape)


def move_functions(sampler: str, posterior, twist: MeasurementTwist):
    """``(evaluate, target_point)`` of a sampler, as it passes them to ``ResampleMove.move``."""
    if sampler == "twisted_smc":
        return (partial(TwistedSMC._twist, posterior, partial(_tweedie_twist, twist)),
                partial(TwistedSMC._target_point, posterior))
    sde = posterior.prior.sde

    def evaluate(x, t):
        score = posterior.prior.score(x, t)
        return score, twist.log_likelihood((x + sde.sigma_t(t) ** 2 * score) / sde.lambda_t(t), t)
    return evaluate, partial(VESMC._target_point, posterior, twist)


def moved_draws(sampler: str, t: float, *, adjusted: bool = True):
    """4000 exact draws of the Gaussian twisted target at time ``t`` and those draws after 10 moves of a
    step ``h`` of 0.6 times the target's smallest variance (far above the default ``c``, so that the draws
    travel: their correlation with the start falls to 0.3 or less), by the given sampler's move functions.
    ``adjusted=False`` accepts every proposal (ULA): the negative control. Returns (target, start,
    moved, carried, acceptance, evaluate)."""
    posterior, _ = linear_gaussian()
    options = SMCOptions(move_steps=10)
    twist = MeasurementTwist(posterior, options)
    target = twisted_target(posterior, twist, t)
    start = target.sample(4000, generator=torch.Generator().manual_seed(0))
    mover = ResampleMove(posterior, options, twist.svd, torch.Generator().manual_seed(1))
    smallest_variance = float(torch.linalg.eigvalsh(target.covariance).min())
    mover.step_scale = 0.6 * smallest_variance / float(posterior.prior.sde.sigma_t(t)) ** 2
    if not adjusted:
        mover._log_proposal_ratio = lambda *arguments: torch.full((len(start),), math.inf, dtype=torch.float64)
    evaluate, target_point = move_functions(sampler, posterior, twist)
    moved, carried, acceptance = mover.move(start, t, evaluate(start, t), evaluate, target_point)
    return target, start, moved, carried, acceptance, evaluate


@pytest.mark.parametrize("sampler", ["twisted_smc", "ve_smc"])
@pytest.mark.parametrize("t", [0.05, 0.5])
def test_moves_leave_the_exact_twisted_target_invariant(sampler, t):
    """The moved draws still have the target's mean and covariance (largest z-score below Z_SCORE);
    most moved, and the values carried for the sampler are those at the moved draws."""
    target, start, moved, carried, acceptance, evaluate = moved_draws(sampler, t)
    changed = float((moved != start).any(1).to(torch.float64).mean())
    assert changed > 0.9 and 0.5 < acceptance <= 1, f"{changed:.0%} of the draws moved, acceptance {acceptance:.2f}"
    for position, (carried_now, carried_fresh) in enumerate(zip(carried, evaluate(moved, t))):
        assert torch.allclose(carried_now, carried_fresh), f"carried value {position} is not the one at the moved x"
    largest = {"mean": float(mean_z_scores(moved, target).max()),
               "covariance": float(covariance_z_scores(moved, target).max())}
    assert max(largest.values()) < Z_SCORE, f"largest z-scores of the moved draws {largest} (limit {Z_SCORE})"


@pytest.mark.parametrize("t", [0.05, 0.5])
def test_a_move_that_is_not_invariant_is_caught(t):
    """The check above can fail: the same steps unadjusted (ULA, every proposal accepted) inflate the
    covariance beyond Z_SCORE standard errors."""
    target, _, moved, _, _, _ = moved_draws("twisted_smc", t, adjusted=False)
    assert float(covariance_z_scores(moved, target).max()) > Z_SCORE, "unadjusted Langevin steps went unnoticed"


SAMPLERS = {"twisted_smc": TwistedSMC, "ve_smc_closed_form": lambda **o: VESMC(proposal="closed_form", **o),
            "ve_smc_gradient": lambda **o: VESMC(proposal="gradient", **o)}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_samplers_with_moves_match_the_exact_linear_gaussian_posterior(sampler):
    """Resampling at every step, each followed by 2 moves (c = 1, the largest allowed): the weighted means and
    covariances of 10 runs (K = 256, 50 steps) average to the 50-step model's posterior within REPLICATE_Z standard
    errors, and Z_hat / Z to 1. (Measured: a move that left the carried network outputs at the old particles
    put Z_hat / Z 8-17 standard errors off.)"""
    posterior, _ = linear_gaussian()
    exact = discretised_model_posterior(posterior, 50)
    results, acceptances = [], []
    for seed in range(10):
        result = sample_posterior(SAMPLERS[sampler](num_steps=50, num_particles=256, resampling_threshold=1.0,
                                                    move_steps=2, move_step_size=1.0), posterior, 16,
                                  generator=torch.Generator().manual_seed(seed))
        results.append(result)
        acceptances += [record["move_acceptance"] for record in result.diagnostics if "move_acceptance" in record]
    assert len(acceptances) == 10 * 49, f"moves ran at {len(acceptances)} steps of 10 runs (expected 10 x 49)"
    assert min(acceptances) > 0.5, f"lowest acceptance rate {min(acceptances):.2f}"
    largest = weighted_runs_z_scores(results, exact)
    assert max(largest.values()) < REPLICATE_Z, f"largest z-scores over 10 runs {largest} (limit {REPLICATE_Z})"


@pytest.mark.parametrize("sampler", ["twisted_smc", "ve_smc"])
def test_moves_pull_resampled_copies_apart(sampler):
    """K = 64, resampling at every step (sigma_y = 0.1): without moves the last resampling's copies stay
    equal through the deterministic last step, so fewer than 48 of the 64 final particles differ; with
    2 moves after each resampling all 64 do. The reported distinct_samples is the count of distinct
    samples either way."""
    posterior, _ = linear_gaussian(sigma_y=0.1)
    sampler_class = {"twisted_smc": TwistedSMC, "ve_smc": VESMC}[sampler]
    distinct_particles = {}
    for move_steps in (0, 2):
        result = sample_posterior(sampler_class(num_steps=30, num_particles=64, resampling_threshold=1.0,
                                                move_steps=move_steps), posterior, 64,
                                  generator=torch.Generator().manual_seed(0))
        distinct_particles[move_steps] = distinct_samples(result.particles)
        counted = distinct_samples(result.samples)
        assert result.distinct_samples == counted, \
            f"move_steps {move_steps}: reported {result.distinct_samples} distinct samples, counted {counted}"
    assert distinct_particles[0] < 48 and distinct_particles[2] == 64, \
        f"distinct final particles of 64 without and with moves: {distinct_particles}"


def test_moves_cost_one_network_evaluation_per_particle_and_run_only_after_resampling():
    posterior, _ = linear_gaussian()
    sometimes = sample_posterior(TwistedSMC(num_steps=20, num_particles=32, resampling_threshold=0.3, move_steps=3),
                                 posterior, 8)
    moved = [("move_acceptance" in record) for record in sometimes.diagnostics]
    assert moved == [record["resampled"] == 1.0 for record in sometimes.diagnostics], "moves without a resampling"
    assert 0 < sum(moved) < 19 and sometimes.network_evaluations == (20 + 3 * sum(moved)) * 32
    with pytest.raises(ProblemError, match="resampling_threshold 0 never resamples"):
        build_sampler(TwistedSMC, {"move_steps": 3, "resampling_threshold": 0.0})
    always = sample_posterior(VESMC(num_steps=20, num_particles=32, resampling_threshold=1.0, move_steps=3),
                              posterior, 8)
    assert always.network_evaluations == (20 + 3 * 19) * 32, \
        f"{always.network_evaluations} network evaluations (expected 20 steps + 3 moves at 19 resamplings, x 32)"


@pytest.mark.parametrize("sampler", [TwistedSMC, VESMC])
@pytest.mark.parametrize("option, value", [("move_steps", -1), ("move_steps", 1.5), ("move_step_size", 0.0),
                                           ("move_step_size", 2.0)])
def test_invalid_move_options_are_refused(sampler, option, value):
    with pytest.raises(ProblemError, match=option):
        build_sampler(sampler, {option: value})
