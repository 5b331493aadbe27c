"""DPS against exact posteriors: its bias is measured and shown, not hidden behind a loose tolerance.

Measured (n = 4000, 200 steps, linear-Gaussian d = 4, d_y = 2): the largest mean z-score is 13-21
and the largest covariance z-score 24-1572 for scales 0.05-1.0; on the MCGdiff mixture (d = 8,
d_y = 2, 1000 samples) the sliced Wasserstein distance is 0.12 at scale 0.1 against an
exact-vs-exact 0.073 (threshold 0.099), and 0.48 at scale 1.0.
"""

import pytest
import torch

from invdiff.metrics import sliced_wasserstein
from invdiff.operators import PoissonNoise, matrix_operator
from invdiff.posterior import Posterior, sample_posterior
from invdiff.sde import VESDE, VPSDE, DDPMSchedule
from invdiff.testing import Z_SCORE, gaussian_mixture, linear_gaussian, mean_z_scores, sliced_wasserstein_threshold
from invdiff_plugins.dps import DPS


def test_dps_bias_on_a_linear_gaussian_posterior():
    posterior, exact = linear_gaussian(dimension=4, measurements=2)
    result = sample_posterior(DPS(num_steps=200, scale=0.1), posterior, 4000,
                              generator=torch.Generator().manual_seed(0))
    z_score = float(mean_z_scores(result.samples, exact).max())
    # the bias is real and detected at this sample size ...
    assert z_score > Z_SCORE, f"largest mean z-score {z_score:.2f}: DPS's bias went undetected (limit > {Z_SCORE})"
    # ... and bounded: DPS lands far closer to the posterior mean than the prior mean is
    error = float((result.samples.mean(0) - exact.mean).norm())
    prior_error = float((posterior.prior.means[0] - exact.mean).norm())
    assert error < 0.25 * prior_error, f"DPS mean {error:.3f} from the exact mean; the prior mean is {prior_error:.3f}"


def test_dps_bias_on_the_gaussian_mixture():
    posterior, exact = gaussian_mixture(dimension=8, measurements=2)
    result = sample_posterior(DPS(num_steps=200, scale=0.1), posterior, 1000,
                              generator=torch.Generator().manual_seed(0))
    distance = sliced_wasserstein(result.samples, exact.sample(1000, generator=torch.Generator().manual_seed(99)))
    floor, threshold = sliced_wasserstein_threshold(exact, 1000)
    assert threshold < distance < 2.5 * threshold, f"DPS {distance:.3f}, exact-vs-exact {floor:.3f}"


def test_chains_never_interact(monkeypatch):
    """Changing one chain's start leaves the others' trajectories bit-for-bit unchanged
    (the reference code's batch-wide residual norm would couple them)."""
    posterior, _ = linear_gaussian()
    starts = torch.randn(3, 4, dtype=torch.float64)
    finals = []
    for replacement in (0.0, 5.0):
        start = starts.clone()
        start[2] = replacement
        monkeypatch.setattr(posterior.prior, "terminal_sample", lambda *args, start=start, **kwargs: start.clone())
        finals.append(sample_posterior(DPS(num_steps=50), posterior, 3, generator=torch.Generator().manual_seed(1)).samples)
    assert torch.equal(finals[0][:2], finals[1][:2]), "moving chain 2's start changed chains 0 and 1"
    assert not torch.equal(finals[0][2], finals[1][2]), "moving chain 2's start did not change chain 2"


@pytest.mark.parametrize("sde", [VPSDE(), VPSDE(2.0, 2.0, T=5.0), VESDE(0.01, 20.0), DDPMSchedule()],
                         ids=["vp", "ou", "ve", "ddpm"])
@pytest.mark.parametrize("step_rule", ["residual_norm", "kernel_variance"])
def test_dps_works_with_every_sde(sde, step_rule):
    """(kernel_variance at scale 1 is unstable on OU with T = 5: its mean error is 0.34-1.48 of the
    prior mean's over seeds 0-2, against 0.07-0.13 at scale 0.5; a DPS limitation, not tested here.)"""
    posterior, exact = linear_gaussian(sde=sde)
    scale = 0.1 if step_rule == "residual_norm" else 0.5
    result = sample_posterior(DPS(num_steps=100, scale=scale, step_rule=step_rule), posterior, 1000,
                              generator=torch.Generator().manual_seed(0))
    error = float((result.samples.mean(0) - exact.mean).norm())
    prior_error = float((posterior.prior.means[0] - exact.mean).norm())
    assert error < 0.25 * prior_error, f"DPS mean {error:.3f} from the exact mean; the prior mean is {prior_error:.3f}"


def test_kernel_variance_rule_handles_poisson_noise():
    posterior, _ = linear_gaussian()
    operator = matrix_operator(torch.rand(3, 4, dtype=torch.float64), PoissonNoise(0.1)).with_input_map(0.1, 1.0)
    measurement = operator.measure(torch.zeros(1, 4, dtype=torch.float64), torch.Generator().manual_seed(0))
    poisson = Posterior(posterior.prior, operator, measurement)
    result = sample_posterior(DPS(num_steps=50, step_rule="kernel_variance"), poisson, 16)
    assert torch.isfinite(result.samples).all(), "DPS with Poisson noise returned NaN or infinite samples"


def test_batch_size_splits_the_gradient_without_changing_the_samples():
    """Each chain's guidance depends on that chain alone, so chunking the gradient (a memory budget) is exact."""
    posterior, _ = linear_gaussian()
    whole, chunked = (sample_posterior(DPS(num_steps=30, scale=0.1, batch_size=size), posterior, 7,
                                       generator=torch.Generator().manual_seed(2)).samples for size in (None, 3))
    difference = float((whole - chunked).abs().max())
    assert difference < 1e-10, f"batch_size 3 changed the samples by {difference:.3g}"
