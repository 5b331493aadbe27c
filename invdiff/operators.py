"""Forward operators ``G`` with their measurement noise ``p_eta``: ``y = G(x) + eta``.

The operators wrap deepinv physics (``A``, ``A_adjoint``); the noise models are in ``invdiff.noise``
(and importable from here).

Samplers work in the prior's native space (for example ``[-1, 1]``) while images, operators and
noise levels speak ``[0, 1]``: a ``ForwardOperator`` composes the physics with the affine map
``image = input_scale * x + input_offset`` once, so no sampler converts ranges.
"""

from __future__ import annotations

import math

import deepinv
import numpy as np
import torch
from deepinv.physics.functional import gaussian_blur as gaussian_blur_filter
from torch import Tensor

from invdiff.noise import GaussianNoise, NoiseModel, PoissonNoise

__all__ = [
    "NoiseModel", "GaussianNoise", "PoissonNoise", "ForwardOperator",
    "gaussian_blur", "motion_blur", "inpainting", "box_mask", "random_mask", "super_resolution", "matrix_operator",
]


class ForwardOperator:
    """``G(x) = A(input_scale * x + input_offset)`` with a noise model: the likelihood of a problem.

    ``physics`` is a deepinv ``Physics`` (``A``, and ``A_adjoint`` when linear); ``x`` is in the
    prior's native space. All log-likelihoods have shape ``(B,)``: chains never mix.
    """

    def __init__(self, physics: deepinv.physics.Physics, noise: NoiseModel, *, name: str,
                 input_scale: float = 1.0, input_offset: float = 0.0, settings: dict | None = None,
                 dtype: torch.dtype | None = None):
        self.physics = physics
        #: the dtype the physics computes in (None: any)
        self.dtype = dtype
        self.noise = noise
        self.name = name
        self.input_scale = float(input_scale)
        self.input_offset = float(input_offset)
        self._settings = dict(settings or {})

    @property
    def linear(self) -> bool:
        return isinstance(self.physics, deepinv.physics.LinearPhysics)

    def settings(self) -> dict:
        return {"type": self.name, **self._settings, "noise": self.noise.settings(),
                "input_scale": self.input_scale, "input_offset": self.input_offset}

    def with_input_map(self, input_scale: float, input_offset: float) -> "ForwardOperator":
        """The same operator, reading its input through ``image = input_scale * x + input_offset``."""
        return ForwardOperator(self.physics, self.noise, name=self.name, input_scale=input_scale,
                               input_offset=input_offset, settings=self._settings, dtype=self.dtype)

    def to_image(self, x: Tensor) -> Tensor:
        """Map from the prior's native space to the operator's image space."""
        return self.input_scale * x + self.input_offset

    def forward(self, x: Tensor) -> Tensor:
        """The noise-free measurement ``G(x)``, in ``x``'s dtype."""
        image = self.to_image(x)
        if not self._computes_in_own_dtype(image):
            return self.physics.A(image)
        return self.physics.A(image.to(self.dtype)).to(image.dtype)

    def _computes_in_own_dtype(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` must be cast to the operator's dtype: deepinv's downsampling convolution refuses a
        float64 image with its float32 filter, where masks and FFT blurs promote to the wider dtype (a float32
        operator under a float64 prior then computes in float64, as before)."""
        return (self.dtype is not None and tensor.dtype != self.dtype
                and isinstance(self.physics, deepinv.physics.Downsampling))

    def adjoint(self, v: Tensor) -> Tensor:
        """The adjoint of the linear part of ``G``: ``input_scale * A^T v``."""
        if not self.linear:
            raise TypeError(f"operator '{self.name}' is not linear: it has no adjoint")
        if not self._computes_in_own_dtype(v):
            return self.input_scale * self.physics.A_adjoint(v)
        return self.input_scale * self.physics.A_adjoint(v.to(self.dtype)).to(v.dtype)

    def measure(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw a measurement ``y = G(x) + eta``."""
        return self.noise.sample(self.forward(x), generator)

    def log_likelihood(self, y: Tensor, x: Tensor) -> Tensor:
        """``log p_eta(y | G(x))`` per batch element of ``x``; ``y`` has batch size 1 or ``B``."""
        return self.noise.log_likelihood(y, self.forward(x))

    def log_likelihood_grad(self, y: Tensor, x: Tensor) -> Tensor:
        """``grad_x log p_eta(y | G(x))`` per batch element, by automatic differentiation."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(True)
            (gradient,) = torch.autograd.grad(self.log_likelihood(y, x).sum(), x)
        return gradient

    def matrix(self, event_shape: tuple[int, ...], chunk_size: int = 256,
               device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """Dense float64 ``(matrix, offset)`` with ``G(x).flatten() = matrix @ x.flatten() + offset``.

        Built by applying ``G`` (in its own dtype, on the physics' ``device``) to the basis vectors,
        for exact posteriors and SVD-based proposals; meant for small events (a few thousand values).
        """
        if not self.linear:
            raise TypeError(f"operator '{self.name}' is not linear: it has no matrix")
        dimension = math.prod(event_shape)
        dtype = self.dtype or torch.float64
        with torch.no_grad():
            offset = self.forward(torch.zeros((1, *event_shape), dtype=dtype, device=device)).flatten()
            columns = []
            for start in range(0, dimension, chunk_size):
                stop = min(start + chunk_size, dimension)
                basis = torch.zeros((stop - start, dimension), dtype=dtype, device=device)
                basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
                columns.append(self.forward(basis.reshape(-1, *event_shape)).flatten(1) - offset)
        return torch.cat(columns).T.contiguous().to(torch.float64), offset.to(torch.float64)


def _image_size(image_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(image_shape) != 3:
        raise ValueError(f"image operators need an event shape (C, H, W), got {tuple(image_shape)}")
    return tuple(int(size) for size in image_shape)


def gaussian_blur(image_shape, noise: NoiseModel, *, sigma: float, dtype=torch.float32) -> ForwardOperator:
    """Circular Gaussian blur with standard deviation ``sigma`` pixels (deepinv ``BlurFFT``).

    deepinv sizes the kernel ``2 * int(sigma / 0.3 + 1) + 1`` and cuts what exceeds the image, so
    the blur is refused unless its central +-3 sigma fits: ``6 * sigma + 1 <= min(height, width)`` (at that
    limit the cut tails hold about 1% of the kernel's mass: the blur is the cut kernel's).
    """
    _, rows, columns = _image_size(image_shape)
    if 6 * sigma + 1 > min(rows, columns):
        widest = math.floor((min(rows, columns) - 1) / 6 * 100) / 100
        raise ValueError(f"sigma {sigma} is too wide for the {rows}x{columns} image: the kernel's central "
                         f"+-3 sigma spans {6 * sigma + 1:.3g} pixels; allowed: sigma <= {widest} "
                         f"(6 sigma + 1 <= {min(rows, columns)})")
    kernel = gaussian_blur_filter(sigma=(sigma, sigma)).to(dtype)
    physics = deepinv.physics.BlurFFT(img_size=_image_size(image_shape), filter=kernel)
    return ForwardOperator(physics, noise, name="gaussian_blur", settings={"sigma": sigma}, dtype=dtype)


def motion_blur(image_shape, noise: NoiseModel, *, kernel_size: int, seed: int, length: float = 0.3,
                dtype=torch.float32) -> ForwardOperator:
    """Circular blur with a random motion kernel (deepinv ``MotionBlurGenerator``), fixed by ``seed``.

    The ``kernel_size`` x ``kernel_size`` kernel must fit in the image.
    """
    _, rows, columns = _image_size(image_shape)
    if kernel_size > min(rows, columns):
        raise ValueError(f"kernel_size {kernel_size} is larger than the {rows}x{columns} image; allowed: "
                         f"kernel_size <= {min(rows, columns)}")
    generator = torch.Generator().manual_seed(seed)
    kernels = deepinv.physics.generator.MotionBlurGenerator(psf_size=(kernel_size, kernel_size), rng=generator,
                                                           l=length, dtype=torch.float64)
    kernel = kernels.step(batch_size=1, seed=seed)["filter"].to(dtype)
    physics = deepinv.physics.BlurFFT(img_size=_image_size(image_shape), filter=kernel)
    return ForwardOperator(physics, noise, name="motion_blur",
                           settings={"kernel_size": kernel_size, "seed": seed, "length": length}, dtype=dtype)


def box_mask(image_shape, top: int, left: int, height: int, width: int) -> Tensor:
    """A mask of ones with a zero box (the missing pixels), shape ``(C, H, W)``."""
    channels, rows, columns = _image_size(image_shape)
    if not (0 <= top < top + height <= rows and 0 <= left < left + width <= columns):
        raise ValueError(f"box (top={top}, left={left}, height={height}, width={width}) "
                         f"does not fit in an image of {rows}x{columns}")
    mask = torch.ones(channels, rows, columns)
    mask[:, top:top + height, left:left + width] = 0.0
    return mask


def random_mask(image_shape, fraction_observed: float, seed: int) -> Tensor:
    """A mask keeping each pixel (all channels together) with probability ``fraction_observed``.

    Drawn from numpy's PCG64 stream of ``seed``, not torch's: torch's generator of the same seed draws the
    measurement noise (``noise_seed``), and a mask drawn by its ``rand`` keeps the pixels whose ``randn`` noise is
    small and positive (with both seeds 0 on 32x32 at 20%: noise of mean +0.35 sigma_y and standard deviation
    0.63 sigma_y on the kept pixels, a biased measurement the noise model does not describe). The uniforms are
    the bit generator's raw stream, which numpy keeps stable across versions (NEP 19), mapped to [0, 1) as
    ``numpy.random.Generator.random`` does.
    """
    channels, rows, columns = _image_size(image_shape)
    if not 0 < fraction_observed <= 1:
        raise ValueError(f"fraction_observed must be in (0, 1], got {fraction_observed}")
    uniforms = (np.random.PCG64(seed).random_raw(rows * columns) >> np.uint64(11)) * 2.0**-53
    kept = torch.as_tensor(uniforms.reshape(1, rows, columns) < fraction_observed)
    return kept.float().expand(channels, rows, columns).clone()


def inpainting(image_shape, noise: NoiseModel, *, mask: Tensor, dtype=torch.float32,
               settings: dict | None = None) -> ForwardOperator:
    """Masking (deepinv ``Inpainting``): missing pixels read as zero, the shape is kept."""
    physics = deepinv.physics.Inpainting(img_size=_image_size(image_shape), mask=mask.to(dtype))
    settings = {"observed_fraction": float(mask.mean()), **(settings or {})}
    return ForwardOperator(physics, noise, name="inpainting", settings=settings, dtype=dtype)


def super_resolution(image_shape, noise: NoiseModel, *, factor: int, filter: str = "bicubic",
                     dtype=torch.float32) -> ForwardOperator:
    """Anti-aliased downsampling by ``factor`` with circular padding (deepinv ``Downsampling``)."""
    filters = {"bicubic": deepinv.physics.functional.bicubic_filter,
               "bilinear": deepinv.physics.functional.bilinear_filter,
               "gaussian": lambda factor: gaussian_blur_filter(sigma=(factor, factor))}
    if filter not in filters:
        raise ValueError(f"filter must be one of {', '.join(filters)}, got '{filter}'")
    kernel = filters[filter](factor).to(dtype)   # built in dtype: casting the module would drop its complex buffers
    _, rows, columns = _image_size(image_shape)
    if min(rows, columns) < kernel.shape[-1] // 2:   # circular padding by half the kernel wraps at most once
        raise ValueError(f"the {filter} filter of factor {factor} is {kernel.shape[-1]} pixels wide, too wide for "
                         f"the {rows}x{columns} image; allowed: height and width of at least {kernel.shape[-1] // 2}")
    physics = deepinv.physics.Downsampling(img_size=_image_size(image_shape), factor=factor, filter=kernel,
                                           padding="circular")
    return ForwardOperator(physics, noise, name="super_resolution", settings={"factor": factor, "filter": filter},
                           dtype=dtype)


def matrix_operator(matrix: Tensor, noise: NoiseModel) -> ForwardOperator:
    """``G(x) = matrix @ x`` on vectors ``(B, d)``: the test beds' operator."""
    matrix = torch.as_tensor(matrix)
    physics = deepinv.physics.LinearPhysics(A=lambda x: x @ matrix.to(x).T, A_adjoint=lambda y: y @ matrix.to(y))
    return ForwardOperator(physics, noise, name="matrix", settings={"shape": list(matrix.shape)})
