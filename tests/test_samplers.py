"""Every registered sampler, built-in or third-party, against exact posteriors.

Each sampler is judged by ``invdiff.testing.check_sampler``, the same function ``invdiff check``
runs, so the suite and the command apply identical criteria: samplers that declare
``asymptotically_exact`` are held to exactness (z-scores of mean and covariance, sliced Wasserstein
against the exact-vs-exact distribution, evidence), the others to beating the trivial answers
(prior draws, a point mass at the exact mean) by a factor of two in sliced Wasserstein distance.
Their bias is measured in their own test files (e.g. test_dps.py). A failure prints the report.
"""

import warnings
from importlib import metadata

import pytest

from invdiff.plugins import BUILT_IN_PACKAGE, ENTRY_POINT_GROUP, load_registry
from invdiff.posterior import SamplingError, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.sde import VPSDE
from invdiff.testing import check_sampler, linear_gaussian

REGISTRY = load_registry()
#: deepinv's image samplers clip to [0, 1] images and ddrm needs deepinv's SVD physics: the vector test beds are
#: outside their scope; tests/test_peers.py judges them on an exact Gaussian image posterior
PEERS = {"ddrm", "diffpir", "deepinv_dps"}
SAMPLER_NAMES = sorted(set(REGISTRY.samplers) - PEERS)
#: smaller budgets than the defaults, to keep the suite fast; DPS at scale 0.1 (the scale of
#: test_dps.py and benchmarks/mixture_table.py): at its default 1.0 its samples on the linear-Gaussian
#: bed are 2-6 times too spread, further from the posterior than prior draws
TEST_OPTIONS = {"dps": {"num_steps": 100, "scale": 0.1}}


def make_sampler(name, **overrides):
    return REGISTRY.get(name).sampler_class(**{**TEST_OPTIONS.get(name, {}), **overrides})


def test_built_in_samplers_are_registered():
    """Every built-in (an entry point of the invdiff distribution) is registered; third-party plugins that
    fail are reported as warnings, not failures: the core's tests must not depend on other packages."""
    built_in_plugins = {entry_point.name for entry_point in metadata.distribution(BUILT_IN_PACKAGE).entry_points
                        if entry_point.group == ENTRY_POINT_GROUP}
    registered = {info.plugin for info in REGISTRY.samplers.values() if info.built_in}
    assert registered == built_in_plugins, f"built-in plugins without a registered sampler: " \
                                           f"{sorted(built_in_plugins - registered)}; failures: {REGISTRY.failures}"
    for failure in REGISTRY.failures:
        warnings.warn(f"third-party plugin '{failure.plugin}' (package {failure.package or '?'}): {failure.error}")


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_sampler_meets_its_standard(name):
    """check_sampler's verdict: exactness for asymptotically exact samplers, the weaker standard otherwise;
    the same seed gives the same draws."""
    check = check_sampler(REGISTRY.get(name).sampler_class, TEST_OPTIONS.get(name, {}))
    assert check.passed, str(check)


class NaNAfterHalfwayPrior(GaussianPrior):
    def _score(self, x, t):
        score = super()._score(x, t)
        return score * float("nan") if float(t) < 0.5 else score


def test_nan_during_sampling_names_the_step():
    posterior, _ = linear_gaussian()
    prior = posterior.prior
    posterior.prior = NaNAfterHalfwayPrior(prior.means[0], prior.covariances[0], VPSDE())
    with pytest.raises(SamplingError, match=r"dps: non-finite values in 8 of 8 chains at step \d+/100 \(t=0\.4"):
        sample_posterior(make_sampler("dps"), posterior, 8)


def test_result_reports_cost_and_diagnostics():
    posterior, _ = linear_gaussian()
    result = sample_posterior(make_sampler("dps"), posterior, 16)
    assert result.nfe == 100 and result.network_evaluations == 1600
    assert len(result.diagnostics) == 100 and "residual_norm" in result.diagnostics[0]
    assert result.wall_time > 0
