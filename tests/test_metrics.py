"""The posterior metrics against simulations: the expected coverage of a calibrated sampler's intervals."""

import pytest
import torch

from invdiff.metrics import calibrated_coverage, coverage

PIXELS = 200 * 200   # each pixel an independent trial: the truth and the samples drawn from one law


def _coverage_of_one_law(law: str, num_samples: int) -> tuple[float, float]:
    """Coverage of intervals from ``num_samples`` draws of ``law`` for one more draw, over PIXELS trials, and its
    standard error."""
    generator = torch.Generator().manual_seed(num_samples)
    shape = (num_samples + 1, 1, 200, 200)
    if law == "uniform":
        draws = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif law == "normal":
        draws = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        draws = -torch.log(torch.rand(shape, generator=generator, dtype=torch.float64))
    measured = coverage(draws[:-1], draws[-1], 0.9)
    return measured, (measured * (1 - measured) / PIXELS) ** 0.5


@pytest.mark.parametrize("num_samples", [4, 8, 16, 64])
def test_coverage_of_a_calibrated_sampler_is_calibrated_coverage(num_samples):
    """Gaussian draws: calibrated_coverage to the simulation's standard error (and its own 5e-4)."""
    measured, standard_error = _coverage_of_one_law("normal", num_samples)
    expected = calibrated_coverage(num_samples, 0.9)
    assert abs(measured - expected) <= 4 * standard_error + 5e-4, (num_samples, measured, expected)


@pytest.mark.parametrize("num_samples", [4, 16])
def test_the_expected_coverage_depends_on_the_law(num_samples):
    """``0.9 (n - 1) / (n + 1)`` is the uniform law's (the interpolated quantiles commute with its distribution
    function), below the Gaussian law's; a skewed law scores otherwise again."""
    uniform_rule = 0.9 * (num_samples - 1) / (num_samples + 1)
    measured, standard_error = _coverage_of_one_law("uniform", num_samples)
    assert abs(measured - uniform_rule) <= 4 * standard_error
    assert calibrated_coverage(num_samples) - uniform_rule > 0.01   # 0.018 at 4 samples, 0.012 at 16
    exponential, _ = _coverage_of_one_law("exponential", num_samples)
    assert abs(exponential - calibrated_coverage(num_samples)) < 0.03


def test_calibrated_coverage_values_and_refusal():
    assert calibrated_coverage(16) == pytest.approx(0.8065, abs=1e-3)
    assert calibrated_coverage(64) == pytest.approx(0.873, abs=1e-3)
    assert calibrated_coverage(1024) == pytest.approx(0.9 * 1023 / 1025)
    assert calibrated_coverage(64, 0.5) == pytest.approx(0.5 * 63 / 65, abs=2e-3)
    with pytest.raises(ValueError, match="at least 2 samples"):
        calibrated_coverage(1)
