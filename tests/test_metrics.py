"""The posterior metrics against simulations: the expected coverage of a calibrated sampler's intervals."""

import pytest
import torch

from invdiff.metrics import calibrated_coverage, coverage

PIXELS = 200 * 200   # each pixel an independent trial: the truth and the samples drawn from one law


@pytest.mark.parametrize("num_samples", [4, 16, 64])
@pytest.mark.parametrize("law, tolerance", [("uniform", 0.0), ("normal", 0.015), ("exponential", 0.015)])
def test_coverage_of_a_calibrated_sampler_is_calibrated_coverage(num_samples, law, tolerance):
    generator = torch.Generator().manual_seed(num_samples)
    shape = (num_samples + 1, 1, 200, 200)
    if law == "uniform":
        draws = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif law == "normal":
        draws = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        draws = -torch.log(torch.rand(shape, generator=generator, dtype=torch.float64))
    expected = calibrated_coverage(num_samples, 0.9)
    measured = coverage(draws[:-1], draws[-1], 0.9)
    standard_error = (expected * (1 - expected) / PIXELS) ** 0.5
    assert abs(measured - expected) <= tolerance + 4 * standard_error, (law, num_samples, measured, expected)


def test_calibrated_coverage_values_and_refusal():
    assert calibrated_coverage(16) == pytest.approx(0.9 * 15 / 17)
    assert calibrated_coverage(64, 0.5) == pytest.approx(0.5 * 63 / 65)
    with pytest.raises(ValueError, match="at least 2 samples"):
        calibrated_coverage(1)
