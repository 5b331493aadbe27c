"""The structured singular value decompositions (invdiff/spectral.py) against dense SVDs of the same
operators, to float64 rounding; and the samplers that use them running above the dense limit."""

import math

import deepinv
import pytest
import torch

from invdiff.operators import (ForwardOperator, GaussianNoise, gaussian_blur, inpainting, motion_blur, random_mask,
                               super_resolution)
from invdiff.posterior import Posterior, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.sde import VPSDE
from invdiff.smc import MeasurementTwist, SMCOptions
from invdiff.spectral import CircularFilterSVD, DenseSVD, LinearGaussianSVD, MaskSVD
from invdiff_plugins.mcgdiff import MCGdiff
from invdiff_plugins.ve_smc import VESMC

#: float64 operators: every comparison holds to rounding (measured: at most 3e-15)
PRECISION = 1e-12
NOISE = GaussianNoise(0.1)


def _operator(case: str, shape: tuple[int, int, int]) -> ForwardOperator:
    """The shipped operators in float64, read through ``image = 0.7 x + 0.2`` (a mask through
    ``-0.5 x + 0.5``, so that its singular vectors carry signs)."""
    if case == "mask":
        mask = random_mask(shape, 0.5, seed=1)
        return inpainting(shape, NOISE, mask=mask, dtype=torch.float64).with_input_map(-0.5, 0.5)
    if case == "gaussian_blur":
        operator = gaussian_blur(shape, NOISE, sigma=1.0, dtype=torch.float64)
    elif case == "motion_blur":   # a non-symmetric kernel: complex filter phases
        operator = motion_blur(shape, NOISE, kernel_size=5, seed=3, dtype=torch.float64)
    else:
        operator = super_resolution(shape, NOISE, factor=int(case.removeprefix("super_resolution_x")),
                                    dtype=torch.float64)
    return operator.with_input_map(0.7, 0.2)


def _posterior(operator: ForwardOperator, shape: tuple[int, ...]) -> Posterior:
    """A diagonal Gaussian prior over ``shape`` and a measurement simulated from it."""
    generator = torch.Generator().manual_seed(0)
    dimension = math.prod(shape)
    prior = GaussianPrior(torch.zeros(dimension), torch.full((dimension,), 0.3), VPSDE(), event_shape=shape)
    return Posterior(prior, operator, operator.measure(prior.sample_clean(1, generator=generator), generator))


CASES = [("mask", (2, 7, 9)), ("gaussian_blur", (1, 8, 8)), ("motion_blur", (1, 12, 12)), ("motion_blur", (2, 7, 9)),
         ("super_resolution_x2", (1, 8, 8)), ("super_resolution_x2", (1, 12, 6)),
         ("super_resolution_x3", (2, 12, 12)), ("super_resolution_x3", (1, 9, 15)),
         ("super_resolution_x4", (1, 8, 8)),   # a 2x2 measurement: every frequency self-conjugate, no pairs
         # colour (RGB) images: each operator acts per channel and masks every channel of a missing pixel
         ("mask", (3, 4, 4)), ("gaussian_blur", (3, 8, 8)), ("motion_blur", (3, 8, 8)),
         ("super_resolution_x2", (3, 8, 8)), ("super_resolution_x4", (3, 8, 8))]


@pytest.mark.parametrize("case, shape", CASES, ids=[f"{case}-{'x'.join(map(str, shape))}" for case, shape in CASES])
def test_structured_decomposition_is_the_dense_one(case, shape):
    """Same singular values (as multisets); ``V^T`` and ``U^T`` orthonormal with ``image`` the inverse
    of ``rotate_image``; ``U S V^T`` the operator's matrix; the twist's log-likelihood the dense one's."""
    operator = _operator(case, shape)
    posterior = _posterior(operator, shape)
    structured = LinearGaussianSVD.from_posterior(posterior)
    assert isinstance(structured, MaskSVD if case == "mask" else CircularFilterSVD)
    dense = DenseSVD.from_operator(operator, shape, "cpu")
    matrix, offset = operator.matrix(shape)
    dimension, measurements = matrix.shape[1], matrix.shape[0]

    values = structured.singular_values
    assert values.shape == (measurements,) and bool((values[:-1] >= values[1:]).all()), "not sorted decreasing"
    assert torch.allclose(values, torch.sort(dense.singular_values, descending=True).values, atol=PRECISION, rtol=0)

    identity = torch.eye(dimension, dtype=torch.float64)
    right_transposed = structured.rotate_image(identity.reshape(dimension, *shape)).T     # V^T, (d, d)
    assert torch.allclose(right_transposed @ right_transposed.T, identity, atol=PRECISION, rtol=0)
    assert torch.allclose(structured.image(right_transposed.T.contiguous()).reshape(dimension, dimension),
                          identity, atol=PRECISION, rtol=0), "image is not V"
    measurement_identity = torch.eye(measurements, dtype=torch.float64)
    measurement_shape = structured.offset.shape[1:]
    left_transposed = structured.rotate_measurement(measurement_identity.reshape(measurements, *measurement_shape)).T
    assert torch.allclose(left_transposed @ left_transposed.T, measurement_identity, atol=PRECISION, rtol=0)
    product = left_transposed.T @ torch.diag(values) @ right_transposed[:measurements]
    assert torch.allclose(product, matrix, atol=PRECISION, rtol=0), "U S V^T is not G(x) - G(0)"
    assert torch.allclose(structured.offset.flatten(), offset, atol=PRECISION, rtol=0)

    generator = torch.Generator().manual_seed(1)
    clean = operator.forward(torch.randn((3, *shape), generator=generator, dtype=torch.float64))
    for spread in (0.0, 0.3):
        assert torch.allclose(structured.log_likelihood(posterior.measurement, clean, spread),
                              dense.log_likelihood(posterior.measurement, clean, spread), atol=1e-9, rtol=0)


@pytest.mark.parametrize("case, shape", [("mask", (2, 7, 9)), ("motion_blur", (1, 8, 8)),
                                         ("super_resolution_x2", (1, 8, 8))])
def test_closed_form_proposal_has_the_dense_gaussian_density(case, shape):
    """ve_smc's closed-form proposal in structured coordinates returns, with each draw, the density at
    it of ``N(x; m, v) N(y; A (x + shift) / lambda + b, sigma_y^2 I + spread A A^T)`` normalised,
    computed densely: the draws come from the right Gaussian whatever the basis."""
    operator = _operator(case, shape)
    posterior = _posterior(operator, shape)
    structured = LinearGaussianSVD.from_posterior(posterior)
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn((4, *shape), generator=generator, dtype=torch.float64)
    shift = torch.randn((4, *shape), generator=generator, dtype=torch.float64)
    variance, lambda_s, spread = torch.tensor(0.2, dtype=torch.float64), 0.8, 0.05
    draw, log_density = VESMC._closed_form_step(structured, posterior, mean, variance, shift, lambda_s, spread,
                                                generator)

    matrix, _ = operator.matrix(shape)
    noise_covariance = NOISE.sigma_y**2 * torch.eye(len(matrix), dtype=torch.float64) + spread * matrix @ matrix.T
    gain = matrix.T @ torch.linalg.inv(noise_covariance)
    precision = torch.eye(matrix.shape[1], dtype=torch.float64) / variance + gain @ matrix / lambda_s**2
    residual = (posterior.measurement - operator.forward(shift / lambda_s)).flatten(1)
    information = mean.flatten(1) / variance + residual @ gain.T / lambda_s
    proposal_mean = torch.linalg.solve(precision, information.T).T
    expected = torch.distributions.MultivariateNormal(proposal_mean, precision_matrix=precision)
    assert torch.allclose(log_density, expected.log_prob(draw.flatten(1)), atol=1e-8, rtol=0)


class _NotCircular(deepinv.physics.BlurFFT):
    """A blur times a pixel-dependent gain: a BlurFFT that is not a circular convolution."""

    def A(self, x, **kwargs):
        return super().A(x, **kwargs) * torch.linspace(0.5, 1.5, x.shape[-1], dtype=x.dtype)


def test_a_physics_that_breaks_its_structure_falls_back_to_the_dense_svd():
    shape = (1, 8, 8)
    physics = _NotCircular(img_size=shape, filter=deepinv.physics.functional.gaussian_blur(sigma=(1.0, 1.0)).double())
    operator = ForwardOperator(physics, NOISE, name="not_circular", dtype=torch.float64)
    with pytest.warns(UserWarning, match="CircularFilterSVD form of operator 'not_circular' is off by"):
        svd = LinearGaussianSVD.from_posterior(_posterior(operator, shape))
    assert isinstance(svd, DenseSVD)


LARGE = (1, 72, 72)   # 5184 values, above DenseSVD.MAX_DIMENSION


@pytest.mark.parametrize("case", ["mask", "gaussian_blur", "super_resolution_x2"])
def test_samplers_run_above_the_dense_limit(case):
    """Above ``DenseSVD.MAX_DIMENSION`` the twist, ve_smc's closed-form proposal and mcgdiff use the
    structured decomposition (a dense one would need a 5184 x 5184 SVD)."""
    assert math.prod(LARGE) > DenseSVD.MAX_DIMENSION
    posterior = _posterior(_operator(case, LARGE), LARGE)
    assert isinstance(MeasurementTwist(posterior, SMCOptions()).svd, MaskSVD if case == "mask" else CircularFilterSVD)
    for sampler in (VESMC(proposal="closed_form", num_steps=3, num_particles=4), MCGdiff(num_steps=3)):
        result = sample_posterior(sampler, posterior, 4, generator=torch.Generator().manual_seed(0))
        assert result.samples.shape == (4, *LARGE) and bool(torch.isfinite(result.samples).all())
        assert math.isfinite(result.log_evidence)


def test_the_twist_warns_where_it_falls_back_to_the_scalar_variance():
    """A linear operator with Gaussian noise, no known structure and more values than a dense SVD takes gets the
    scalar variance ``sigma_y^2 + s^2 r_t^2``, exact only where ``A A^T = s^2 I``: not silently (here, 4x
    downsampling of a 66x66 image, which the factor does not divide: its ``A A^T`` is far from ``s^2 I``)."""
    shape = (1, 66, 66)
    operator = super_resolution(shape, NOISE, factor=4, dtype=torch.float64).with_input_map(0.5, 0.5)
    posterior = Posterior(GaussianPrior(torch.zeros(math.prod(shape)), torch.full((math.prod(shape),), 0.3), VPSDE(),
                                        event_shape=shape), operator, torch.zeros(1, 1, 17, 17))
    with pytest.warns(UserWarning, match="no singular basis here .* the twist uses the scalar variance"):
        assert MeasurementTwist(posterior, SMCOptions()).svd is None


def test_a_mask_that_observes_nothing_is_reproduced_by_its_structured_form():
    """``reproduction_error`` of an operator whose linear part is zero: 0, not 0 / 0 (which warned 'off by nan')."""
    shape = (1, 3, 3)
    operator = inpainting(shape, NOISE, mask=torch.zeros(shape), dtype=torch.float64)
    svd = MaskSVD.from_operator(operator, shape, "cpu")
    assert svd.reproduction_error(operator) == 0.0
