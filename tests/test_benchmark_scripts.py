"""The benchmark scripts that subclass or call a sampler's internals keep up with them: a change of signature there
fails here in seconds instead of in a README command that runs for minutes (``benchmarks/twist_families.py``'s
mixed twists once broke on ``TwistedSMC._twist``'s guidance argument, and its pilot on ``PilotGuidance``'s list)."""
import importlib
import sys
from pathlib import Path

import pytest
import torch

from invdiff.posterior import sample_posterior
from invdiff.problems import build_sampler
from invdiff.testing import gaussian_mixture

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def import_benchmark(name: str):
    """A script of ``benchmarks/`` as a module (the scripts import each other by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def twist_families():
    return import_benchmark("twist_families")


@pytest.mark.parametrize("config", ["tweedie/pilot", "exact/exact", "moment/tweedie", "row_sums/row_sums"])
def test_twist_families_mixes_a_value_and_a_gradient_into_twisted_smc(twist_families, config):
    posterior, _ = gaussian_mixture(dimension=4, measurements=2)
    families = twist_families.TwistFamilies(posterior, draws=4)
    value, _, gradient = config.partition("/")
    sampler = build_sampler(twist_families.mixed_twisted_smc(families, value, gradient),
                            {"num_steps": 10, "num_particles": 8, "num_runs": 2, "move_steps": 1})
    result = sample_posterior(sampler, posterior, 8, generator=torch.Generator().manual_seed(0))
    assert result.samples.shape == (8, 4) and torch.isfinite(result.samples).all()


@pytest.mark.parametrize("gradient", ["tweedie", "pilot", "moment"])
def test_twist_families_alignment_is_a_finite_cosine_and_error(twist_families, gradient):
    posterior, _ = gaussian_mixture(dimension=4, measurements=2)
    cosine, error = twist_families.alignment(posterior, twist_families.TwistFamilies(posterior, draws=4), gradient,
                                             0.3, states=4)
    assert -1.0 <= cosine <= 1.0 and error >= 0.0


def test_posterior_modes_reports_the_smallest_mass_on_the_annealing_path():
    posterior_modes = import_benchmark("posterior_modes")
    posterior, _ = gaussian_mixture(dimension=4, measurements=2)
    mass, level, largest, weight = posterior_modes.path_low(posterior)
    assert 0 < mass <= 1 and level in posterior_modes.LEVELS and 0 <= largest < len(posterior.prior.means)
    assert 0 <= weight <= 1


def test_the_discretisation_benchmark_s_power_one_grid_is_the_samplers_grid():
    """``benchmarks/discretisation_bias.py`` compares grids: its power 1 must be ``SDE.time_grid``, the samplers', and
    a ``t_min`` grid must start at T and stay above t_min until its last step to 0."""
    from invdiff.sde import VPSDE

    module = import_benchmark("discretisation_bias")
    assert torch.equal(module.PowerGridVPSDE(VPSDE(), 1).time_grid(50), VPSDE().time_grid(50))
    clamped = module.PowerGridVPSDE(VPSDE(), 2, t_min=0.001).time_grid(200)
    assert float(clamped[0]) == 1.0 and 0.001 < float(clamped[-2]) < 0.0011 and float(clamped[-1]) == 0.0
    assert bool((clamped[1:] < clamped[:-1]).all())
