import pytest
import torch

from invdiff import operators
from invdiff.operators import GaussianNoise, PoissonNoise

SHAPE = (1, 16, 16)
DTYPE = torch.float64


def all_operators(noise):
    """Every operator the package builds, in float64, reading inputs in [-1, 1]."""
    built = {
        "gaussian_blur": operators.gaussian_blur(SHAPE, noise, sigma=1.5, dtype=DTYPE),
        "motion_blur": operators.motion_blur(SHAPE, noise, kernel_size=7, seed=3, dtype=DTYPE),
        "inpainting_box": operators.inpainting(SHAPE, noise, mask=operators.box_mask(SHAPE, 4, 4, 6, 8), dtype=DTYPE),
        "inpainting_random": operators.inpainting(SHAPE, noise, mask=operators.random_mask(SHAPE, 0.3, 1),
                                                  dtype=DTYPE),
        "super_resolution_x2": operators.super_resolution(SHAPE, noise, factor=2, dtype=DTYPE),
        "super_resolution_x4": operators.super_resolution(SHAPE, noise, factor=4, filter="gaussian", dtype=DTYPE),
        "matrix": operators.matrix_operator(torch.randn(5, 256, dtype=DTYPE), noise),
    }
    return {name: operator.with_input_map(0.5, 0.5) for name, operator in built.items()}


def random_input(name):
    generator = torch.Generator().manual_seed(0)
    shape = (3, 256) if name == "matrix" else (3, *SHAPE)
    return torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1


OPERATOR_NAMES = list(all_operators(GaussianNoise(0.1)))


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_adjoint(name):
    operator = all_operators(GaussianNoise(0.1))[name]
    x = random_input(name)
    v = torch.randn_like(operator.forward(x))
    linear_part = operator.forward(x) - operator.forward(torch.zeros_like(x))
    left = (linear_part * v).flatten(1).sum(1)
    right = (x * operator.adjoint(v)).flatten(1).sum(1)
    assert torch.allclose(left, right, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_gaussian_likelihood_gradient_matches_the_closed_form(name):
    noise = GaussianNoise(0.1)
    operator = all_operators(noise)[name]
    x = random_input(name)
    y = operator.measure(x[:1], torch.Generator().manual_seed(1))
    closed_form = operator.adjoint(y - operator.forward(x)) / noise.sigma_y**2
    assert torch.allclose(operator.log_likelihood_grad(y, x), closed_form, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("name", OPERATOR_NAMES)
def test_poisson_likelihood_gradient_matches_the_closed_form(name):
    noise = PoissonNoise(gain=0.05)
    operator = all_operators(noise)[name]
    x = random_input(name) * 0.4 + 0.5          # images in [0.55, 0.95]: positive rates everywhere
    if name == "matrix":
        operator = operators.matrix_operator(torch.rand(5, 256, dtype=DTYPE), noise).with_input_map(0.5, 0.5)
    y = operator.measure(x[:1], torch.Generator().manual_seed(1))
    rate = (operator.forward(x) / noise.gain).clamp(min=1e-12)   # masked pixels: rate 0, count 0
    closed_form = operator.adjoint((y / noise.gain / rate - 1) / noise.gain)
    assert torch.allclose(operator.log_likelihood_grad(y, x), closed_form, rtol=1e-8, atol=1e-8)


def test_gaussian_log_likelihood_is_normalised_per_element():
    noise = GaussianNoise(0.3)
    y, clean = torch.randn(1, 1, 4, 4, dtype=DTYPE), torch.randn(3, 1, 4, 4, dtype=DTYPE)
    expected = torch.distributions.Normal(clean, 0.3).log_prob(y).flatten(1).sum(1)
    assert torch.allclose(noise.log_likelihood(y, clean), expected)


def test_poisson_log_likelihood_is_that_of_the_counts():
    noise = PoissonNoise(gain=0.1)
    clean = torch.rand(3, 1, 4, 4, dtype=DTYPE) + 0.1
    y = noise.sample(clean, torch.Generator().manual_seed(0))
    expected = torch.distributions.Poisson(clean / 0.1, validate_args=False).log_prob(y / 0.1).flatten(1).sum(1)
    assert torch.allclose(noise.log_likelihood(y, clean), expected)


def test_log_likelihood_never_mixes_batch_elements():
    operator = all_operators(GaussianNoise(0.1))["gaussian_blur"]
    x = random_input("gaussian_blur")
    y = operator.measure(x[:1], torch.Generator().manual_seed(1))
    batched = operator.log_likelihood(y, x)
    one_by_one = torch.cat([operator.log_likelihood(y, x[index:index + 1]) for index in range(len(x))])
    assert batched.shape == (3,) and torch.allclose(batched, one_by_one)


def test_measurements_are_reproducible_with_a_generator():
    operator = all_operators(GaussianNoise(0.1))["super_resolution_x2"]
    x = random_input("super_resolution_x2")[:1]
    first = operator.measure(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, operator.measure(x, torch.Generator().manual_seed(5)))
    assert first.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("seed", range(10))
def test_noise_on_a_random_mask_is_the_noise_model_when_both_seeds_are_equal(seed):
    """Problem files draw the mask from ``mask_seed`` and the noise from ``noise_seed``, both 0 by default: on the
    pixels the mask keeps, the noise must still be N(0, sigma_y^2). A mask drawn by torch's ``rand`` from the
    noise's seed kept noise of mean +4.2 to +6.2 standard errors and standard deviation 0.55-0.66 sigma_y (seeds 0-5,
    32x32, 20% kept). Here: the mean within 4 standard errors of 0, the standard deviation within 20% of sigma_y
    (about 4 standard errors at 200 pixels)."""
    shape = (1, 32, 32)
    operator = operators.inpainting(shape, GaussianNoise(0.02), mask=operators.random_mask(shape, 0.2, seed))
    clean = torch.zeros((1, *shape))
    noise = operator.measure(clean, torch.Generator().manual_seed(seed))[operator.forward(clean + 1) != 0] / 0.02
    assert abs(float(noise.mean())) < 4 / len(noise) ** 0.5
    assert 0.8 < float(noise.std()) < 1.2


def test_matrix_of_an_operator_reproduces_it():
    operator = all_operators(GaussianNoise(0.1))["gaussian_blur"]
    matrix, offset = operator.matrix(SHAPE)
    x = random_input("gaussian_blur")
    assert torch.allclose(x.flatten(1) @ matrix.T + offset, operator.forward(x).flatten(1), atol=1e-12)


@pytest.mark.parametrize("bad", [0.0, -0.1])
def test_noise_levels_must_be_positive(bad):
    with pytest.raises(ValueError, match="sigma_y must be > 0"):
        GaussianNoise(bad)
    with pytest.raises(ValueError, match="gain must be > 0"):
        PoissonNoise(bad)


def test_box_mask_must_fit():
    with pytest.raises(ValueError, match="does not fit"):
        operators.box_mask(SHAPE, 10, 10, 8, 2)


def test_a_float32_downsampling_serves_a_float64_prior():
    """A float32 downsampling (the default dtype) under a float64 prior: deepinv's convolution refuses mixed
    precision, so ``forward`` and ``adjoint`` compute in the operator's dtype and return the input's."""
    float32 = operators.super_resolution(SHAPE, GaussianNoise(0.1), factor=2).with_input_map(0.5, 0.5)
    float64 = all_operators(GaussianNoise(0.1))["super_resolution_x2"]
    x = random_input("super_resolution_x2")
    measured = float32.forward(x)
    assert measured.dtype == torch.float64
    assert torch.allclose(measured, float64.forward(x), atol=1e-6)
    adjoint = float32.adjoint(measured)
    assert adjoint.dtype == torch.float64 and torch.allclose(adjoint, float64.adjoint(measured), atol=1e-6)


@pytest.mark.parametrize("filter, factor, smallest", [("gaussian", 4, 14), ("gaussian", 2, 7), ("bicubic", 4, 8)])
def test_a_super_resolution_filter_must_fit_the_image(filter, factor, smallest):
    """Circular padding by half the kernel wraps around at most once (deepinv's error otherwise, from the first
    measurement): refused when built, naming the smallest image allowed."""
    too_small = smallest - 1 - (smallest - 1) % factor
    with pytest.raises(ValueError, match=f"too wide for the {too_small}x{too_small} image; allowed: height and "
                                         f"width of at least {smallest}"):
        operators.super_resolution((1, too_small, too_small), GaussianNoise(0.1), factor=factor, filter=filter)
    fits = smallest + (-smallest) % factor
    operator = operators.super_resolution((1, fits, fits), GaussianNoise(0.1), factor=factor, filter=filter)
    assert operator.forward(torch.zeros(1, 1, fits, fits)).shape == (1, 1, fits // factor, fits // factor)
