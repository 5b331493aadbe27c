"""RDMC against exact posteriors: its bias is measured and shown, and so is the failure of the paper's warm start.

Measured with the default options (seeds 0-2, CPU):

* linear-Gaussian (d = 4, d_y = 2, n = 2000): largest mean z-score 1.2-3.5, so the mean is right at
  this sample size; the variances are 17-53% too large (largest covariance z-score 16-17; the
  paper's configuration, uniform grid, Tweedie estimate and Gaussian warm start, gives 2-11 times
  the variances); sliced Wasserstein 0.055-0.057 against an exact-vs-exact 0.021 (threshold 0.032).
* mixture (d = 8, d_y = 2, one posterior mode, n = 1000): sliced Wasserstein 0.071-0.089 against
  an exact-vs-exact 0.073 (threshold 0.099).
* mixture (d = 8, d_y = 1, four modes weighing 0.48, 0.31, 0.17, 0.035, n = 1000): the mass per
  mode is off by 0.027-0.074 in total variation (the exact score with the same 25-step grid gives
  0.041; 1000 exact draws give 0.019 on average); with the paper's Gaussian-factor warm start it is
  0.75-0.77 (n = 400).
* a network prior (a small torch module holding the Gaussian's exact diffused score, epsilon
  parametrisation), MALA with the trapezoidal ratio and the score at t = 0.001: mean right at
  n = 1000 (largest z-score 2.7), variances 15-47% too large; the score at t = 0.5 instead
  (prior_steps=2) gives a mean z-score of 20 and variances up to 3 times too large.
"""

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from invdiff.metrics import sliced_wasserstein
from invdiff.posterior import SamplingError, UnsupportedProblem, sample_posterior
from invdiff.prior import NetworkPrior, Prior
from invdiff.problems import load_problem
from invdiff.sde import DDPMSchedule
from invdiff.testing import (Z_SCORE, covariance_z_scores, gaussian_mixture, linear_gaussian, mean_z_scores,
                             sliced_wasserstein_threshold)
from invdiff_plugins.rdmc import RDMC, remaining_times

SMALL = {"num_steps": 5, "num_chains": 4, "inner_steps": 3}


def mode_masses(samples: torch.Tensor, exact) -> torch.Tensor:
    """Fraction of samples nearest to each posterior component's mean (the modes are >= 16 apart,
    a component's draws lie within about 3 of its mean)."""
    distances = torch.cdist(samples.reshape(len(samples), -1).to(torch.float64), exact.means)
    return torch.bincount(distances.argmin(1), minlength=len(exact.means)).to(torch.float64) / len(samples)


def mode_mass_error(samples: torch.Tensor, exact) -> float:
    """Total variation between the fractions of samples per mode and the exact weights."""
    return float(0.5 * (mode_masses(samples, exact) - exact.log_weights.exp()).abs().sum())


def mode_mass_threshold(exact, num_samples: int, repeats: int = 30) -> tuple[float, float]:
    """The total variation of ``num_samples`` exact draws (pure sampling noise): mean and mean + 5 sd."""
    generator = torch.Generator().manual_seed(100)
    errors = torch.tensor([mode_mass_error(exact.sample(num_samples, generator=generator), exact)
                           for _ in range(repeats)])
    return float(errors.mean()), float(errors.mean() + 5 * errors.std())


def test_linear_gaussian_mean_is_right_and_variance_inflated():
    posterior, exact = linear_gaussian(dimension=4, measurements=2)
    result = sample_posterior(RDMC(), posterior, 2000, generator=torch.Generator().manual_seed(0))
    mean_z_score = float(mean_z_scores(result.samples, exact).max())
    assert mean_z_score < Z_SCORE, f"largest mean z-score {mean_z_score:.2f} (limit {Z_SCORE})"
    # the covariance bias is real and detected at this sample size ...
    covariance_z_score = float(covariance_z_scores(result.samples, exact).max())
    assert covariance_z_score > Z_SCORE, f"largest covariance z-score {covariance_z_score:.2f}: bias undetected"
    variance_ratio = torch.cov(result.samples.T).diagonal() / exact.covariance.diagonal()
    assert (variance_ratio > 1).all() and (variance_ratio < 2).all(), \
        f"variances / exact variances {[round(ratio, 3) for ratio in variance_ratio.tolist()]}, expected in (1, 2)"
    # ... and bounded in distribution
    reference = exact.sample(2000, generator=torch.Generator().manual_seed(99))
    floor, threshold = sliced_wasserstein_threshold(exact, 2000, repeats=12)
    distance = sliced_wasserstein(result.samples, reference)
    assert threshold < distance < 3 * threshold, f"RDMC {distance:.3f}, exact-vs-exact {floor:.3f}"


def test_one_mode_mixture_posterior():
    posterior, exact = gaussian_mixture(dimension=8, measurements=2)
    result = sample_posterior(RDMC(), posterior, 1000, generator=torch.Generator().manual_seed(0))
    distance = sliced_wasserstein(result.samples, exact.sample(1000, generator=torch.Generator().manual_seed(99)))
    floor, threshold = sliced_wasserstein_threshold(exact, 1000, repeats=12)
    assert distance < 1.25 * threshold, f"RDMC {distance:.3f}, exact-vs-exact {floor:.3f}"


#: RDMC's allowed bias in mode mass (total variation): the outer discretisation alone, with the exact
#: score on the default 25-step grid, gives 0.041 on the d = 8, d_y = 1 mixture
MODE_MASS_BIAS = 0.05


def test_mass_per_mode_on_a_multimodal_posterior():
    posterior, exact = gaussian_mixture(dimension=8, measurements=1)
    weights = exact.log_weights.exp()
    assert int((weights > 0.03).sum()) == 4, f"posterior modes weighing > 0.03: {int((weights > 0.03).sum())}, " \
                                             "expected 4 (16 or more apart)"
    result = sample_posterior(RDMC(), posterior, 1000, generator=torch.Generator().manual_seed(0))
    noise, threshold = mode_mass_threshold(exact, 1000)
    error = mode_mass_error(result.samples, exact)
    assert error < MODE_MASS_BIAS + threshold, f"RDMC {error:.3f}, exact draws {noise:.3f} (threshold {threshold:.3f})"


def test_the_papers_warm_start_misplaces_the_modes():
    """Gaussian-factor draws at large remaining time land in arbitrary basins of f*, which
    Langevin chains cannot leave: most of the mass goes to modes the posterior does not have."""
    posterior, exact = gaussian_mixture(dimension=8, measurements=1)
    result = sample_posterior(RDMC(warm_start="gaussian"), posterior, 400, generator=torch.Generator().manual_seed(0))
    error = mode_mass_error(result.samples, exact)
    assert error > 0.5, f"mode-mass error of the Gaussian warm start {error:.3f}, expected above 0.5"


@pytest.mark.parametrize("options", [{}, {"warm_start": "gaussian"}, {"inner_sampler": "ula", "reuse_chains": False}],
                         ids=["default", "gaussian", "ula"])
def test_a_seed_fixes_every_draw(options):
    posterior, _ = gaussian_mixture(dimension=8, measurements=1)
    runs = [sample_posterior(RDMC(**SMALL, **options), posterior, 8, generator=torch.Generator().manual_seed(seed))
            for seed in (3, 3, 4)]
    assert torch.equal(runs[0].samples, runs[1].samples), "seed 3 twice gave different draws"
    assert not torch.equal(runs[0].samples, runs[2].samples), "seeds 3 and 4 gave the same draws"


def test_gradient_count_without_chain_reuse():
    """ULA restarting every step: per outer step, one gradient per chain at its start and per inner step."""
    posterior, _ = linear_gaussian()
    options = {**SMALL, "inner_sampler": "ula", "warm_start": "gaussian", "importance_draws": 1, "reuse_chains": False}
    result = sample_posterior(RDMC(**options), posterior, 16, generator=torch.Generator().manual_seed(0))
    gradients = 16 * 4 * 5 * (3 + 1)
    assert result.extras == {"target_gradient_evaluations": gradients, "target_log_density_evaluations": 0,
                             "inner_sampler": "ula"}
    assert result.network_evaluations == gradients   # each target gradient is one prior score
    assert len(result.diagnostics) == RDMC(**options).num_steps == 5
    assert [record["target_gradients_per_sample"] for record in result.diagnostics] == [16, 32, 48, 64, 80]


def test_gradient_and_density_count_of_mala_with_importance_start():
    posterior, _ = linear_gaussian()
    options = {**SMALL, "warm_start": "gaussian", "importance_draws": 32}
    result = sample_posterior(RDMC(**options), posterior, 16, generator=torch.Generator().manual_seed(0))
    chains = 16 * 4
    assert result.extras["inner_sampler"] == "mala"
    assert result.extras["target_gradient_evaluations"] == chains * (1 + 5 * 3)
    assert result.extras["target_log_density_evaluations"] == chains * 32 + chains * (1 + 5 * 3)
    assert "importance_ess_fraction" in result.diagnostics[0]
    assert 0 < result.diagnostics[-1]["acceptance_rate"] <= 1


def test_gradient_count_of_the_default_counts_restarted_chains():
    posterior, _ = gaussian_mixture(dimension=8, measurements=1)
    result = sample_posterior(RDMC(**SMALL), posterior, 16, generator=torch.Generator().manual_seed(0))
    restarts = round(sum(record["restarted"] for record in result.diagnostics) * 16)
    assert result.diagnostics[0]["restarted"] == 1.0
    assert result.extras["target_gradient_evaluations"] == 4 * (restarts + 16 * 5 * 3)
    assert result.extras["prior_pool_draws"] == 4096


def test_outer_time_grids():
    assert remaining_times(4.0, 4, "uniform") == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert remaining_times(4.0, 4, "quadratic") == [4.0, 2.25, 1.0, 0.25, 0.0]


def test_float32_image_problem():
    problem = load_problem("problems/inpaint.yaml", "digits-gmm-box")
    result = sample_posterior(RDMC(**SMALL), problem.posterior, 4, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (4, 1, 8, 8) and result.samples.dtype == torch.float32
    assert torch.isfinite(result.samples).all(), "RDMC returned NaN or infinite samples on the image problem"
    assert result.extras["inner_sampler"] == "mala"


class ScoreOnlyPrior(Prior):
    """A Gaussian prior seen only through its score, as a network prior is: no log-density."""

    def __init__(self, gaussian):
        super().__init__(gaussian.sde, gaussian.event_shape, gaussian.data_range)
        self.gaussian = gaussian
        self.times = []

    def _score(self, x, t):
        self.times.append(float(t))
        return self.gaussian._score(x, t)

    def settings(self):
        return {"kind": "score_only"}


@pytest.mark.parametrize("inner_sampler", ["mala", "ula"])
def test_a_prior_without_log_density(inner_sampler):
    """A Gaussian seen only through its score: MALA's ratio by the trapezoidal rule is exact for it."""
    posterior, exact = linear_gaussian()
    gaussian = posterior.prior
    posterior.prior = ScoreOnlyPrior(gaussian)
    with pytest.raises(UnsupportedProblem, match="importance_draws=1"):
        sample_posterior(RDMC(warm_start="gaussian"), posterior, 4)
    options = {"warm_start": "gaussian", "importance_draws": 1, "prior_steps": 100, "inner_sampler": inner_sampler}
    result = sample_posterior(RDMC(**options), posterior, 1000, generator=torch.Generator().manual_seed(0))
    assert result.extras["inner_sampler"] == inner_sampler and result.extras["target_log_density_evaluations"] == 0
    assert posterior.prior.times and set(posterior.prior.times) == {float(gaussian.sde.time_grid(100)[-2])}   # 0.01
    mean_z_score = float(mean_z_scores(result.samples, exact).max())
    assert mean_z_score < Z_SCORE, f"largest mean z-score {mean_z_score:.2f} (limit {Z_SCORE})"


class GaussianEpsilonNetwork(nn.Module):
    """A tiny "network" predicting the noise of a Gaussian prior's diffused density exactly:
    ``eps(x, t) = -sigma_t s(x, t)``, called with float64 times ``(B,)`` as a UNet is (all equal here)."""

    def __init__(self, gaussian):
        super().__init__()
        self.gaussian = gaussian
        self.unused = nn.Parameter(torch.zeros((), dtype=torch.float64))   # gives the module its dtype
        self.times = set()

    def forward(self, x, times):
        assert times.shape == (len(x),) and times.dtype == torch.float64 and (times == times[0]).all()
        self.times.add(float(times[0]))
        return -self.gaussian.sde.sigma_t(times[0]).to(x) * self.gaussian._score(x, times[0])


def test_a_network_prior_uses_its_score_at_the_smallest_noise_level():
    """The default options on a NetworkPrior: MALA with the score at t = 0.001 and the trapezoidal
    Metropolis ratio, a pool drawn by the network's own reverse steps (counted as network
    evaluations); the mean right within 5 standard errors, the variances inflated as on the exact prior."""
    posterior, exact = linear_gaussian()
    gaussian = posterior.prior
    network = GaussianEpsilonNetwork(gaussian)
    posterior.prior = NetworkPrior(network, gaussian.sde, gaussian.event_shape, "epsilon")
    result = sample_posterior(RDMC(pool_steps=20), posterior, 1000, generator=torch.Generator().manual_seed(0))
    assert result.extras["inner_sampler"] == "mala" and result.extras["prior_pool_draws"] == 512
    assert result.extras["target_log_density_evaluations"] == 0 and 0.3 < result.diagnostics[-1]["acceptance_rate"]
    assert min(network.times) == float(gaussian.sde.time_grid(1000)[-2]) == pytest.approx(0.001)
    assert result.network_evaluations == result.extras["target_gradient_evaluations"] + 512 * 20
    mean_z_score = float(mean_z_scores(result.samples, exact).max())
    assert mean_z_score < Z_SCORE, f"largest mean z-score {mean_z_score:.2f} (limit {Z_SCORE})"
    variance_ratio = torch.cov(result.samples.T).diagonal() / exact.covariance.diagonal()
    assert (variance_ratio > 0.8).all() and (variance_ratio < 2).all(), \
        f"variances / exact variances {[round(ratio, 3) for ratio in variance_ratio.tolist()]}, expected in (0.8, 2)"


def test_prior_steps_beyond_a_ddpm_schedule_are_refused():
    posterior, _ = linear_gaussian(sde=DDPMSchedule(num_timesteps=100))
    posterior.prior = ScoreOnlyPrior(posterior.prior)
    options = {"inner_sampler": "ula", "warm_start": "gaussian", "importance_draws": 1}
    with pytest.raises(UnsupportedProblem, match="prior_steps=1000"):
        sample_posterior(RDMC(**options), posterior, 4)
    assert sample_posterior(RDMC(**SMALL, **options, prior_steps=100), posterior, 4).samples.shape == (4, 4)


def test_options_are_validated():
    with pytest.raises(ValidationError, match="inner_sampler"):
        RDMC(inner_sampler="hmc")
    with pytest.raises(ValidationError, match="refresh_ess"):
        RDMC(refresh_ess=0.5)


def test_options_the_configuration_does_not_use_are_named():
    """``invdiff solve`` notes them (``SamplerOptions.usage``): MALA's target with ULA chains, the pool's options
    with the Gaussian warm start, and the other way round."""
    from invdiff_plugins.rdmc import RDMC

    unused = RDMC(inner_sampler="ula", target_acceptance=0.9, pool_size=16, importance_draws=7).options.unused_options()
    assert unused == {"target_acceptance": "with inner_sampler 'mala'",
                      "importance_draws": "with warm_start 'gaussian'"}
    unused = RDMC(warm_start="gaussian", pool_size=16, pool_steps=5, refresh_ess=3.0).options.unused_options()
    assert set(unused) == {"pool_size", "pool_steps", "refresh_ess"}
    assert RDMC(num_steps=10, pool_size=128, pool_steps=50).options.unused_options() == {}


def test_starts_drawn_far_outside_the_prior_stop_the_run_with_a_reason():
    """ULA with 5 outer steps throws the outer chain far out (|x| ~ 1e25); without reused chains the next step's
    Gaussian starts all have prior log-density -inf, and their weights were a torch traceback: now
    the run stops as a diverged sampler does, saying what to change."""
    posterior = load_problem("problems/inpaint.yaml", "digits-gmm-box").posterior
    sampler = RDMC(num_steps=5, inner_sampler="ula", warm_start="gaussian", reuse_chains=False)
    with pytest.raises(SamplingError, match="importance weights are not finite.*importance_draws=1"):
        sample_posterior(sampler, posterior, 4, generator=torch.Generator().manual_seed(0))
