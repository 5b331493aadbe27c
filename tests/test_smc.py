"""The SMC engine: resampling is unbiased, the ESS formula, the evidence estimate, degeneracy errors."""

import math

import pytest
import torch

from invdiff.posterior import SamplingError
from invdiff.smc import RESAMPLING_SCHEMES, ParticleWeights, effective_sample_size, weighted_result


@pytest.mark.parametrize("scheme", sorted(RESAMPLING_SCHEMES))
def test_resampling_is_unbiased(scheme):
    """E[copies of particle k] = K W_k; checked over R repetitions with 5 standard errors of the
    multinomial count variance K W (1 - W), an upper bound for the other schemes."""
    weights = torch.tensor([0.05, 0.3, 0.02, 0.13, 0.5], dtype=torch.float64)
    num_draws, repetitions = 7, 4000
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(5, dtype=torch.float64)
    for _ in range(repetitions):
        ancestors = RESAMPLING_SCHEMES[scheme](weights.log(), num_draws, generator)
        assert ancestors.shape == (num_draws,) and 0 <= int(ancestors.min()) and int(ancestors.max()) < 5
        counts += torch.bincount(ancestors, minlength=5)
    standard_error = torch.sqrt(num_draws * weights * (1 - weights) / repetitions)
    z_scores = (counts / repetitions - num_draws * weights).abs() / standard_error
    assert z_scores.max() < 5, f"{scheme}: mean copies per particle {(counts / repetitions).tolist()}, expected " \
                               f"{(num_draws * weights).tolist()}: z-score {float(z_scores.max()):.2f} (limit 5)"


@pytest.mark.parametrize("scheme", ["systematic", "residual"])
@pytest.mark.parametrize("seed", range(5))
def test_low_variance_schemes_keep_at_least_the_integer_part(scheme, seed):
    weights = torch.tensor([0.55, 0.3, 0.15], dtype=torch.float64)
    ancestors = RESAMPLING_SCHEMES[scheme](weights.log(), 10, torch.Generator().manual_seed(seed))
    copies = torch.bincount(ancestors, minlength=3)
    assert (copies >= torch.floor(10 * weights)).all(), \
        f"{scheme} gave copies {copies.tolist()} for 10 x weights {(10 * weights).tolist()}: below the integer parts"


@pytest.mark.parametrize("num_particles", [48, 49, 98, 100])
def test_residual_resampling_of_equal_weights_keeps_every_particle(num_particles):
    """K equal weights: K W_k is 1 up to rounding (below 1 for K = 49 or 98), one copy each, nothing drawn."""
    log_weights = torch.full((num_particles,), -math.log(num_particles), dtype=torch.float64)
    ancestors = RESAMPLING_SCHEMES["residual"](log_weights, num_particles, torch.Generator().manual_seed(0))
    assert sorted(ancestors.tolist()) == list(range(num_particles))


def test_distinct_samples_are_counted_by_value():
    """Copies that a move left equal (every proposal rejected) count once, though the step is marked moved and the
    genealogy through a deterministic last step then counts the paths apart."""
    weights = ParticleWeights(8, generator=torch.Generator().manual_seed(0))
    weights.reweight(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 50.0]), where="a step")
    particles = torch.arange(8, dtype=torch.float64)[:, None]
    (particles,), resampled = weights.resample_if_needed(particles)
    assert resampled and particles.unique().tolist() == [7.0]
    weights.record_move()
    weights.end_step()
    weights.reweight(torch.zeros(8), where="the last step")
    weights.end_step()
    result = weighted_result(particles, weights, num_samples=4, last_step_deterministic=True)
    assert result.distinct_ancestors[-1] > 1 and result.distinct_samples == 1


def test_effective_sample_size():
    assert float(effective_sample_size(torch.zeros(8))) == pytest.approx(8.0)
    assert float(effective_sample_size(torch.tensor([0.0, -math.inf, -math.inf]))) == pytest.approx(1.0)
    weights = torch.tensor([1.0, 2.0, 3.0])
    assert float(effective_sample_size(weights.log())) == pytest.approx(36 / 14)


def test_evidence_of_constant_increments_is_exact():
    weights = ParticleWeights(16, generator=torch.Generator().manual_seed(0))
    for step in range(5):
        weights.reweight(torch.full((16,), -0.7), where=f"step {step}")
    assert weights.log_evidence == pytest.approx(-3.5)


@pytest.mark.parametrize("scheme", sorted(RESAMPLING_SCHEMES))
def test_evidence_of_a_tempered_gaussian(scheme):
    """Particles x ~ N(0, 1), 50 increments exp(-x^2 / 100), resampled at every step: Z = E[exp(-x^2/2)]
    = 1/sqrt(2). The mean over 10 runs must lie within 5 standard errors of the runs' spread."""
    estimates = []
    for seed in range(10):
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(1000, generator=generator, dtype=torch.float64)
        weights = ParticleWeights(1000, scheme=scheme, threshold=1.0, generator=generator)
        for step in range(50):
            weights.reweight(-x**2 / 100, where=f"step {step}")
            (x,), resampled = weights.resample_if_needed(x)
            assert resampled
        estimates.append(weights.log_evidence)
    estimates = torch.tensor(estimates)
    standard_error = float(estimates.std()) / math.sqrt(len(estimates))
    error = abs(float(estimates.mean()) + 0.5 * math.log(2))
    assert error < 5 * standard_error + 1e-3, f"mean log Z_hat off by {error:.4f}; limit 5 standard errors " \
                                              f"{5 * standard_error:.4f} + 1e-3"


def test_resampling_is_adaptive():
    weights = ParticleWeights(4, threshold=0.5, generator=torch.Generator().manual_seed(0))
    weights.reweight(torch.tensor([0.0, 0.0, 0.0, -0.1]), where="step 1")
    (_,), resampled = weights.resample_if_needed(torch.arange(4))
    assert not resampled and weights.end_step()["resampled"] == 0.0
    weights.reweight(torch.tensor([0.0, -50.0, -50.0, -50.0]), where="step 2")
    (survivors,), resampled = weights.resample_if_needed(torch.arange(4))
    assert resampled and survivors.tolist() == [0, 0, 0, 0]
    assert weights.ess == pytest.approx(4.0)


def test_degenerate_or_nan_weights_name_the_step():
    weights = ParticleWeights(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(SamplingError, match="weight degeneracy at step 7/9: every particle has weight zero"):
        weights.reweight(torch.full((3,), -math.inf), where="step 7/9")
    with pytest.raises(SamplingError, match="NaN in 1 of 3 incremental weights at step 8/9"):
        weights.reweight(torch.tensor([0.0, math.nan, 0.0]), where="step 8/9")


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="unknown resampling scheme 'magic'; allowed: systematic"):
        ParticleWeights(3, scheme="magic", generator=torch.Generator())
