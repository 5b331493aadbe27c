"""Independent runs of the particle samplers (option ``num_runs``): runs never exchange particles, the
samples are spread evenly over them, ``log Z_hat`` is the log of the runs' mean ``Z_hat``, and the
pooled weighted particles stay exact as the particles per run grow."""

import math

import pytest
import torch

from invdiff.posterior import UnsupportedProblem, sample_posterior
from invdiff.smc import ParticleWeights, ResampleMove, SMCOptions, particle_weights, weighted_result
from invdiff.testing import discretised_model_posterior, linear_gaussian, weighted_runs_z_scores
from invdiff_plugins.twisted_smc import TwistedSMC
from invdiff_plugins.ve_smc import VESMC

#: with 10 replicates the z-score follows Student's t with 9 degrees of freedom: P(|t| > 6) = 2e-4
REPLICATE_Z = 6.0


def _weights(num_particles: int, num_runs: int, seed: int = 0) -> ParticleWeights:
    return ParticleWeights(num_particles, num_runs=num_runs, generator=torch.Generator().manual_seed(seed))


def test_each_run_is_weighted_and_resampled_on_its_own():
    weights = _weights(num_particles=6, num_runs=3)
    generator = torch.Generator().manual_seed(1)
    increments = 4 * torch.randn(18, generator=generator, dtype=torch.float64)
    weights.reweight(increments, "a step")
    by_run = weights.log_weights.view(3, 6)
    assert torch.allclose(torch.logsumexp(by_run, 1), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    run_totals = torch.logsumexp(increments.view(3, 6) - math.log(6), 1)
    assert torch.allclose(weights.run_log_evidence, run_totals)
    assert weights.log_evidence == pytest.approx(float(torch.logsumexp(run_totals, 0) - math.log(3)))

    labels = torch.arange(18)
    (resampled,), happened = weights.resample_if_needed(labels)
    assert happened
    assert all(resampled[run * 6:(run + 1) * 6].div(6, rounding_mode="floor").eq(run).all() for run in range(3)), \
        f"a resampling copied particles across runs: {resampled.tolist()}"


def test_only_the_runs_that_need_it_resample():
    weights = _weights(num_particles=4, num_runs=2)
    flat_then_peaked = torch.tensor([0.0, 0.0, 0.0, 0.0, 50.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    weights.reweight(flat_then_peaked, "a step")
    (labels,), happened = weights.resample_if_needed(torch.arange(8))
    assert happened
    assert labels[:4].tolist() == [0, 1, 2, 3] and labels[4:].tolist() == [4, 4, 4, 4]
    assert torch.allclose(weights.log_weights, torch.full((8,), -math.log(4), dtype=torch.float64))


def test_samples_are_spread_evenly_over_the_runs():
    weights = _weights(num_particles=5, num_runs=4)
    weights.reweight(torch.randn(20, generator=torch.Generator().manual_seed(2), dtype=torch.float64), "a step")
    weights.end_step()
    particles = torch.arange(20, dtype=torch.float64)[:, None]
    result = weighted_result(particles, weights, num_samples=10)
    runs = result.samples[:, 0].long().div(5, rounding_mode="floor")
    assert sorted(torch.bincount(runs, minlength=4).tolist()) == [2, 2, 3, 3]
    assert torch.allclose(torch.logsumexp(result.log_weights, 0), torch.zeros((), dtype=torch.float64))


def test_the_runs_evidence_is_reported_with_its_effective_number_of_runs():
    weights = _weights(num_particles=3, num_runs=4)
    increments = torch.tensor([0.0, 0, 0, 0, 0, 0, 5, 5, 5, -5, -5, -5], dtype=torch.float64)
    weights.reweight(increments, "a step")
    weights.end_step()
    extras = weighted_result(torch.zeros(12, 1), weights, num_samples=4).extras
    assert extras["run_log_evidence"].tolist() == [0.0, 0.0, 5.0, -5.0]
    run_weights = torch.softmax(torch.tensor([0.0, 0, 5, -5]), 0)
    assert extras["run_evidence_ess"] == pytest.approx(float(1 / (run_weights**2).sum()))
    assert weighted_result(torch.zeros(3, 1), _weights(num_particles=3, num_runs=1), num_samples=2).extras == {}


def test_the_runs_share_the_particles():
    generator = torch.Generator()
    assert particle_weights(SMCOptions(num_runs=4), 10, generator=generator, device="cpu").num_particles == 3
    shared = particle_weights(SMCOptions(num_runs=4, num_particles=28), 10, generator=generator, device="cpu")
    assert (shared.num_particles, shared.total_particles) == (7, 28)
    with pytest.raises(ValueError, match=r"num_particles \(30\) must be a multiple of num_runs \(4\)"):
        SMCOptions(num_runs=4, num_particles=30)


def test_one_run_splits_into_runs_that_start_equally_weighted_on_its_copies():
    weights = _weights(num_particles=8, num_runs=1)
    peaked = torch.tensor([0.0, 60.0, 0.0, 0.0, 0.0, 0.0, 60.0, 0.0], dtype=torch.float64)
    weights.reweight(peaked, "a step")
    evidence = weights.log_evidence
    (labels,) = weights.split(4, torch.arange(8))
    assert set(labels.tolist()) == {1, 6}, "the split resamples from the one run's weights"
    assert (weights.num_runs, weights.num_particles) == (4, 2)
    assert torch.allclose(weights.log_weights, torch.full((8,), -math.log(2), dtype=torch.float64))
    assert torch.allclose(weights.run_log_evidence, torch.full((4,), evidence, dtype=torch.float64))
    diagnostics = weights.end_step()
    assert diagnostics["ess"] == pytest.approx(2.0), "the step reports the one run's weights"
    assert diagnostics["log_weight_spread"] == pytest.approx(60.0), "the one run's spread, not one new run's"
    assert weights.ancestry[-1].tolist() == labels.tolist()
    with pytest.raises(ValueError, match="only one run"):
        weights.split(2, labels)


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_split_time_needs_runs(sampler_class):
    with pytest.raises(ValueError, match="num_runs > 1"):
        sampler_class(split_time=0.3)


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_split_and_restart_times_off_the_grid_are_refused_before_sampling(sampler_class):
    """The split happens at the first step at or below split_time but never at the last (deterministic) one: a
    split_time below the last noisy grid time would leave one run; a restart_time above T has no grid time."""
    posterior, _ = linear_gaussian()
    last_noisy = float(posterior.prior.sde.time_grid(10)[-2])
    with pytest.raises(UnsupportedProblem, match=f"split_time 0.05 is never reached.*at least {last_noisy:.4g}"):
        sampler_class(num_steps=10, num_runs=4, split_time=0.05).check(posterior)
    with pytest.raises(UnsupportedProblem, match="num_steps above 1"):
        sampler_class(num_steps=1, num_runs=4, split_time=0.5).check(posterior)
    sampler_class(num_steps=10, num_runs=4, split_time=last_noisy).check(posterior)
    posterior.prior.sde.T = 0.5
    with pytest.raises(UnsupportedProblem, match="restart_time 0.8 is above the prior's end time T = 0.5"):
        sampler_class(num_steps=10, num_runs=4, split_time=0.2, restart_time=0.8).check(posterior)


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_a_split_run_matches_the_exact_linear_gaussian_posterior(sampler_class):
    """One run of 512 particles split at t = 0.5 into 4 runs: pooled weighted mean, covariance and Z_hat / Z of
    10 independent calls within REPLICATE_Z standard errors of the exact values of the 60-step model."""
    posterior, _ = linear_gaussian()
    exact = discretised_model_posterior(posterior, 60)
    sampler = sampler_class(num_steps=60, num_particles=512, num_runs=4, split_time=0.5)
    results = [sample_posterior(sampler, posterior, 8, generator=torch.Generator().manual_seed(seed))
               for seed in range(10)]
    assert all(result.distinct_ancestors[0] < 512 for result in results)
    split_step = next(index for index, record in enumerate(results[0].diagnostics) if record["time"] <= 0.5)
    assert results[0].diagnostics[split_step]["resampled"] == 1.0, "the split resamples the one run"
    largest = weighted_runs_z_scores(results, exact)
    assert max(largest.values()) < REPLICATE_Z, f"largest z-scores over 10 calls {largest} (limit {REPLICATE_Z})"


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
@pytest.mark.parametrize("threshold, resampling", [(1e-9, "systematic"), (1.0, "multinomial")])
def test_the_split_copies_are_moved(sampler_class, threshold, resampling):
    """The split resamples the one run; with moves its copies are moved like those of any resampling: on a step
    whose weights did not call for one (a threshold so low that nothing else resamples), and after a multinomial
    resampling on the same step (whose equal weights the split's multinomial draw copies again)."""
    posterior, _ = linear_gaussian()
    sampler = sampler_class(num_steps=20, num_particles=64, num_runs=4, split_time=0.5, move_steps=1,
                            resampling_threshold=threshold, resampling=resampling)
    times = []   # of each move
    original = ResampleMove.move
    def recorded_move(self, x, t, *args, **kwargs):
        times.append(float(t))
        return original(self, x, t, *args, **kwargs)
    ResampleMove.move = recorded_move
    try:
        result = sample_posterior(sampler, posterior, 8, generator=torch.Generator().manual_seed(0))
    finally:
        ResampleMove.move = original
    split_step = next(index for index, record in enumerate(result.diagnostics) if record["time"] <= 0.5)
    resampled = [record["resampled"] for record in result.diagnostics[:split_step + 1]]
    assert resampled == [float(threshold == 1.0)] * split_step + [1.0]
    split_moves = times.count(result.diagnostics[split_step]["time"])
    assert split_moves == 1 + (threshold == 1.0), f"{split_moves} moves on the split's step"


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_restart_time_needs_a_split_below_it(sampler_class):
    with pytest.raises(ValueError, match="set split_time below it"):
        sampler_class(num_runs=4, restart_time=0.3)
    with pytest.raises(ValueError, match="set split_time below it"):
        sampler_class(num_runs=4, split_time=0.3, restart_time=0.2)


@pytest.mark.parametrize("sampler_class", [TwistedSMC, VESMC])
def test_a_split_run_restarted_from_noised_copies_matches_the_exact_linear_gaussian_posterior(sampler_class):
    """Split at t = 0.2 (the first grid time at or below 0.21), every particle noised forward to t = 0.6 (the last
    at or above 0.59) and the 4 runs down again: pooled weighted mean, covariance and Z_hat / Z of 10 calls within
    REPLICATE_Z standard errors of the 60-step model's. Without the restart's weight p~_r(y | x_r) / p~_s(y | x_s),
    Z_hat / Z is some 50 standard errors off."""
    posterior, _ = linear_gaussian()
    exact = discretised_model_posterior(posterior, 60)
    sampler = sampler_class(num_steps=60, num_particles=512, num_runs=4, split_time=0.21, restart_time=0.59)
    results = [sample_posterior(sampler, posterior, 8, generator=torch.Generator().manual_seed(seed))
               for seed in range(10)]
    times = [record["time"] for record in results[0].diagnostics]
    assert len(times) == 60 + 25 and times[47] == pytest.approx(0.2) and times[48] == pytest.approx(0.6), \
        "the run goes down to t = 0.2, back to t = 0.6 and down again"
    largest = weighted_runs_z_scores(results, exact)
    assert max(largest.values()) < REPLICATE_Z, f"largest z-scores over 10 calls {largest} (limit {REPLICATE_Z})"


@pytest.mark.parametrize("sampler", [TwistedSMC, VESMC], ids=["twisted_smc", "ve_smc"])
def test_one_sample_per_run_gives_distinct_paths(sampler):
    """However the weights collapse within a run, samples from different runs share no ancestor."""
    posterior, _ = linear_gaussian(sigma_y=0.05)
    result = sample_posterior(sampler(num_steps=20, num_particles=128, num_runs=16), posterior, 16,
                              generator=torch.Generator().manual_seed(0))
    assert result.particles.shape == (128, 4)
    assert result.distinct_samples == 16 and result.distinct_ancestors[0] == 16


@pytest.mark.parametrize("sampler", [TwistedSMC, VESMC], ids=["twisted_smc", "ve_smc"])
def test_pooled_runs_match_the_exact_linear_gaussian_posterior(sampler):
    """Pooled weighted mean, covariance and Z_hat / Z of 10 independent calls (512 particles in 4 runs)
    within REPLICATE_Z standard errors of the exact values of the 60-step model."""
    posterior, _ = linear_gaussian()
    exact = discretised_model_posterior(posterior, 60)
    results = [sample_posterior(sampler(num_steps=60, num_particles=512, num_runs=4), posterior, 8,
                                generator=torch.Generator().manual_seed(seed)) for seed in range(10)]
    largest = weighted_runs_z_scores(results, exact)
    assert max(largest.values()) < REPLICATE_Z, f"largest z-scores over 10 calls {largest} (limit {REPLICATE_Z})"
