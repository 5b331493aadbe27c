"""Singular value decompositions ``A = U diag(S) V^T`` of linear forward operators, given as transforms.

A linear operator with Gaussian noise, ``y = A x + b + N(0, sigma_y^2 I)`` (``b = G(0)``, the offset
of the affine input map ``image = input_scale * x + input_offset``), is diagonal in the coordinates
``V^T x`` and ``U^T y``: the twisting functions, ve_smc's closed-form proposal and MCGdiff all work
there. ``LinearGaussianSVD`` gives those coordinates as transforms of batches, never as matrices
unless the operator has no structure to use:

* ``MaskSVD``, masks (deepinv ``Inpainting``): the pixel basis, observed pixels first; any size.
* ``CircularFilterSVD``, circular filtering followed by decimation by ``factor`` (deepinv ``BlurFFT``,
  ``factor = 1``; ``Downsampling`` with circular padding): real orthonormal Fourier bases
  (ALGORITHMS.md, MCGdiff "No dense SVD"); any size, O(d log d) per image.
* ``DenseSVD``, any other linear operator: a dense SVD of ``ForwardOperator.matrix``, events of at
  most ``DenseSVD.MAX_DIMENSION`` values.

Conventions shared by all: ``singular_values`` has one entry per measurement value (``m``), sorted in
decreasing order; ``rotate_measurement`` gives ``U^T r`` ``(B, m)``; ``rotate_image`` gives ``V^T x``
``(B, d)``, whose first ``min(m, d)`` coordinates pair with the singular values (the rest span the
null space); ``image`` is ``V z``. Coordinates are float64 whatever the operator computes in.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from invdiff.noise import GaussianNoise

__all__ = ["LinearGaussianSVD", "DenseSVD", "MaskSVD", "CircularFilterSVD", "RealFourierBasis"]

#: a structured decomposition is used only if it reproduces the operator on a random image to this
#: relative error (the shipped float32 operators read through image = (x + 1) / 2 at 32x32: 5e-8 to 1.3e-5,
#: the rounding of G(x) - G(0) in float32; a wrong structure: order 1)
REPRODUCTION_TOLERANCE = 1e-3


class LinearGaussianSVD:
    """``y = A x + offset + N(0, sigma_y^2 I)`` with ``A = U diag(S) V^T`` as transforms (module docstring).

    ``from_posterior`` picks the implementation from the operator's physics.
    """

    singular_values: Tensor     # S, (m,), decreasing
    offset: Tensor              # G(0), shaped like one measurement with its batch axis
    sigma_y: float
    event_shape: tuple[int, ...]

    @property
    def dimension(self) -> int:
        """``d``, the number of values in one event."""
        return math.prod(self.event_shape)

    def rotate_measurement(self, residual: Tensor) -> Tensor:
        """``U^T r`` of a batch of measurement-shaped residuals: ``(B, m)``."""
        raise NotImplementedError

    def rotate_image(self, x: Tensor) -> Tensor:
        """``V^T x`` of a batch of events: ``(B, d)``."""
        raise NotImplementedError

    def image(self, rotated: Tensor) -> Tensor:
        """``V z`` of a batch of coordinates ``(B, d)``: events ``(B, *event_shape)``."""
        raise NotImplementedError

    def log_likelihood(self, measurement: Tensor, clean: Tensor, spread: float) -> Tensor:
        """``log N(y; clean, sigma_y^2 I + spread A A^T)`` per batch element of ``clean``."""
        variances = self.sigma_y**2 + spread * self.singular_values**2
        rotated = self.rotate_measurement(measurement - clean)
        return -0.5 * ((rotated**2 / variances).sum(1) + torch.log(2 * math.pi * variances).sum())

    @staticmethod
    def _structured_builder(operator, event_shape: tuple[int, ...]):
        """The builder ``device -> decomposition`` of a mask, circular blur or circular downsampling of
        ``(C, H, W)`` events; None for any other operator."""
        import deepinv   # here, not at the top: listing the samplers (which import this module) needs no deepinv

        physics = operator.physics
        if len(event_shape) != 3:
            return None
        if isinstance(physics, deepinv.physics.Inpainting):
            return lambda device: MaskSVD.from_operator(operator, event_shape, device)
        if isinstance(physics, deepinv.physics.BlurFFT):
            return lambda device: CircularFilterSVD.from_operator(operator, event_shape, 1, device)
        if (isinstance(physics, deepinv.physics.Downsampling) and physics.padding == "circular"
                and event_shape[1] % physics.factor == 0 and event_shape[2] % physics.factor == 0):
            return lambda device: CircularFilterSVD.from_operator(operator, event_shape, int(physics.factor), device)
        return None

    @classmethod
    def exists_for(cls, posterior) -> bool:
        """Whether ``from_posterior`` gives a decomposition, told without computing one (a cheap check): a
        linear operator with Gaussian noise, structured or on events of at most ``DenseSVD.MAX_DIMENSION``
        values. (A structured form that fails its reproduction check is then only used if it is small.)"""
        operator, event_shape = posterior.operator, tuple(posterior.prior.event_shape)
        return (operator.linear and isinstance(operator.noise, GaussianNoise)
                and (cls._structured_builder(operator, event_shape) is not None
                     or math.prod(event_shape) <= DenseSVD.MAX_DIMENSION))

    @classmethod
    def from_posterior(cls, posterior) -> "LinearGaussianSVD | None":
        """The decomposition of the posterior's operator: structured for masks, circular blurs and circular
        downsampling (any size), dense for other linear operators up to ``DenseSVD.MAX_DIMENSION`` values;
        None for a non-linear operator, non-Gaussian noise, or a large event with no known structure."""
        operator, event_shape = posterior.operator, tuple(posterior.prior.event_shape)
        if not (operator.linear and isinstance(operator.noise, GaussianNoise)):
            return None
        builder = cls._structured_builder(operator, event_shape)
        if builder is not None:
            structured = builder(posterior.measurement.device)
            error = structured.reproduction_error(operator)
            if error <= REPRODUCTION_TOLERANCE:
                return structured
            warnings.warn(f"the {type(structured).__name__} form of operator '{operator.name}' is off by "
                          f"{error:.2g} (relative) on a random image; it is not used", stacklevel=2)
        if math.prod(event_shape) > DenseSVD.MAX_DIMENSION:
            return None
        return DenseSVD.from_operator(operator, event_shape, posterior.measurement.device)

    def reproduction_error(self, operator) -> float:
        """``||U^T (G(x) - b) - S V^T x|| / ||G(x) - b||`` at a fixed random batch ``x``: 0 up to rounding
        when this decomposition is the operator's."""
        generator = torch.Generator().manual_seed(0)
        device = self.offset.device
        x = torch.randn((2, *self.event_shape), generator=generator, dtype=torch.float64).to(device)
        with torch.no_grad():
            linear_part = operator.forward(x.to(operator.dtype or torch.float64)) - self.offset
        rotated = self.rotate_measurement(linear_part)
        predicted = self.singular_values * self.rotate_image(x)[:, :len(self.singular_values)]
        error, size = torch.linalg.norm(rotated - predicted), torch.linalg.norm(linear_part.to(torch.float64))
        if size == 0:   # an operator whose linear part is zero (a mask that observes nothing) is reproduced or not
            return 0.0 if error == 0 else math.inf
        return float(error / size)


def _offset(operator, event_shape: tuple[int, ...], device) -> Tensor:
    """``G(0)`` in float64, with its batch axis."""
    zeros = torch.zeros((1, *event_shape), dtype=operator.dtype or torch.float64, device=device)
    with torch.no_grad():
        return operator.forward(zeros).to(torch.float64)


class DenseSVD(LinearGaussianSVD):
    """A dense SVD of the operator's matrix (``ForwardOperator.matrix``): any linear operator, events of at
    most ``MAX_DIMENSION`` values. Singular values beyond ``d`` (more measurements than values) are 0."""

    MAX_DIMENSION = 4096

    def __init__(self, matrix: Tensor, offset: Tensor, sigma_y: float, event_shape: tuple[int, ...]):
        left, singular_values, right_transposed = torch.linalg.svd(matrix, full_matrices=True)
        self.left, self.right = left, right_transposed.T            # U (m, m), V (d, d)
        self.singular_values = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
        self.singular_values[:len(singular_values)] = singular_values
        self.offset, self.sigma_y, self.event_shape = offset, sigma_y, tuple(event_shape)

    @classmethod
    def from_operator(cls, operator, event_shape: tuple[int, ...], device) -> "DenseSVD":
        matrix, _ = operator.matrix(event_shape, device=device)
        return cls(matrix, _offset(operator, event_shape, device), operator.noise.sigma_y, event_shape)

    def rotate_measurement(self, residual: Tensor) -> Tensor:
        return residual.flatten(1).to(self.left.dtype) @ self.left

    def rotate_image(self, x: Tensor) -> Tensor:
        return x.flatten(1).to(self.right.dtype) @ self.right

    def image(self, rotated: Tensor) -> Tensor:
        return (rotated @ self.right.T).reshape(len(rotated), *self.event_shape)


class MaskSVD(LinearGaussianSVD):
    """A diagonal operator ``(A x)_i = w_i x_i`` (a mask times ``input_scale``): ``V`` is the pixel basis
    ordered by decreasing ``|w_i|`` (observed pixels first, in pixel order), ``S = |w|``, and ``U`` is
    ``V`` with the signs of ``w``."""

    def __init__(self, weights: Tensor, offset: Tensor, sigma_y: float):
        flat = weights.flatten().to(torch.float64)
        self.order = torch.argsort(flat.abs(), descending=True, stable=True)
        self.singular_values = flat[self.order].abs()
        self.signs = torch.where(flat[self.order] < 0, -1.0, 1.0).to(flat)
        self.offset, self.sigma_y, self.event_shape = offset, sigma_y, tuple(weights.shape)

    @classmethod
    def from_operator(cls, operator, event_shape: tuple[int, ...], device) -> "MaskSVD":
        """The diagonal read off ``G(1) - G(0)``."""
        offset = _offset(operator, event_shape, device)
        ones = torch.ones((1, *event_shape), dtype=operator.dtype or torch.float64, device=device)
        with torch.no_grad():
            weights = operator.forward(ones).to(torch.float64) - offset
        return cls(weights[0], offset, operator.noise.sigma_y)

    def rotate_measurement(self, residual: Tensor) -> Tensor:
        return residual.flatten(1).to(torch.float64)[:, self.order] * self.signs

    def rotate_image(self, x: Tensor) -> Tensor:
        return x.flatten(1).to(torch.float64)[:, self.order]

    def image(self, rotated: Tensor) -> Tensor:
        pixels = torch.empty_like(rotated)
        pixels[:, self.order] = rotated
        return pixels.reshape(len(rotated), *self.event_shape)


class RealFourierBasis:
    """Real orthonormal coordinates of images on an ``rows x columns`` grid: the unitary DFT
    (``torch.fft.fft2(norm="ortho")``) ``X`` made real. A self-conjugate frequency ``k = -k`` (DC,
    Nyquist) gives one coordinate ``Re X(k)``; each pair ``k, -k`` gives ``sqrt(2) Re X(k)`` and
    ``sqrt(2) Im X(k)`` at its representative ``k`` (the lower flat index). Coordinates are ordered:
    self-conjugate frequencies, then the representatives' real parts, then their imaginary parts.

    ``index`` and ``coefficient`` ``(rows * columns, 2)`` express every frequency ``q`` (flat index
    ``q1 * columns + q2``) in those coordinates: ``X(q) = sum_j coefficient[q, j] z[index[q, j]]``.
    """

    def __init__(self, rows: int, columns: int, device=None):
        self.rows, self.columns = rows, columns
        frequencies = torch.arange(rows * columns, device=device)
        self.partner = ((-(frequencies // columns)) % rows) * columns + (-frequencies) % columns
        self.self_conjugate = frequencies[self.partner == frequencies]
        self.representatives = frequencies[frequencies < self.partner]
        num_self, num_pairs = len(self.self_conjugate), len(self.representatives)
        position = torch.empty_like(frequencies)
        position[self.self_conjugate] = torch.arange(num_self, device=device)
        position[self.representatives] = num_self + torch.arange(num_pairs, device=device)
        position[self.partner[self.representatives]] = num_self + torch.arange(num_pairs, device=device)
        pairs = self.partner != frequencies
        self.index = torch.stack([position, torch.where(pairs, position + num_pairs, position)], 1)
        half = 1 / math.sqrt(2)
        self.coefficient = torch.zeros((rows * columns, 2), dtype=torch.complex128, device=device)
        self.coefficient[self.self_conjugate, 0] = 1.0
        self.coefficient[pairs, 0] = half
        self.coefficient[self.representatives, 1] = 1j * half                  # X(k) = (a + i b) / sqrt(2)
        self.coefficient[self.partner[self.representatives], 1] = -1j * half   # X(-k) = (a - i b) / sqrt(2)

    def coordinates(self, images: Tensor) -> Tensor:
        """``(..., rows, columns)`` real images to their ``(..., rows * columns)`` coordinates (float64)."""
        spectrum = torch.fft.fft2(images.to(torch.float64), norm="ortho").flatten(-2)
        pairs = spectrum[..., self.representatives]
        return torch.cat([spectrum[..., self.self_conjugate].real, math.sqrt(2) * pairs.real,
                          math.sqrt(2) * pairs.imag], -1)

    def images(self, coordinates: Tensor) -> Tensor:
        """The inverse of ``coordinates``."""
        spectrum = (self.coefficient * coordinates[..., self.index]).sum(-1)
        spectrum = spectrum.reshape(*coordinates.shape[:-1], self.rows, self.columns)
        return torch.fft.ifft2(spectrum, norm="ortho").real


class CircularFilterSVD(LinearGaussianSVD):
    """Circular filtering then decimation by ``factor``: ``(A x)_c[i, j] = (g_c * x_c)[factor i, factor j]``
    per channel ``c``, ``*`` the circular convolution on the ``H x W`` grid; ``factor = 1`` is a circular blur.

    In unitary Fourier coordinates (``X`` of the image, ``Y`` of the ``h x w = H/factor x W/factor``
    measurement) the operator couples each measurement frequency ``k`` to its ``factor^2`` aliases
    ``q = k + (a h, b w)`` only: ``Y(k) = sum_q c_q X(q)``, ``c_q = ghat(q) / factor`` (``ghat`` the
    unnormalised DFT of ``g``). In the real coordinates of ``RealFourierBasis`` on both grids that is a
    block-diagonal matrix: per measurement frequency pair ``k, -k`` a ``2 x 2 factor^2`` block, per
    self-conjugate ``k`` a ``1 x factor^2`` block. ``U``, ``S`` and ``V`` are those blocks' SVDs: one
    nonzero singular value per measurement value, ``sqrt(sum_q |c_q|^2)`` (twice per pair); for a blur
    ``|ghat(k)|``, with ``U`` the Fourier basis turned by the filter's phase.

    ``g`` is read off the operator: ``G(delta_{a,b}) - G(0)`` at ``factor^2`` pixel impulses gives
    ``g[factor i - a, factor j - b]`` (decimation offset and ``input_scale`` included).
    """

    def __init__(self, response: Tensor, factor: int, offset: Tensor, sigma_y: float):
        channels, rows, columns = response.shape
        low_rows, low_columns = rows // factor, columns // factor
        device = response.device
        self.offset, self.sigma_y, self.event_shape = offset, sigma_y, (channels, rows, columns)
        self.image_basis = RealFourierBasis(rows, columns, device)
        self.measurement_basis = RealFourierBasis(low_rows, low_columns, device)
        gains = torch.fft.fft2(response.to(torch.float64)).flatten(-2) / factor    # c_q per channel, (C, H W)
        offsets_a, offsets_b = torch.meshgrid(torch.arange(factor, device=device), torch.arange(factor, device=device),
                                              indexing="ij")
        alias_shift = (offsets_a.flatten() * low_rows * columns + offsets_b.flatten() * low_columns)

        def aliases(frequencies: Tensor) -> Tensor:
            """The ``factor^2`` image frequencies of each measurement frequency: ``(len, factor^2)``."""
            high = (frequencies // low_columns) * columns + frequencies % low_columns
            return high[:, None] + alias_shift

        basis, low = self.image_basis, self.measurement_basis
        # measurement frequency pairs: rows sqrt(2) Re Y(k) and sqrt(2) Im Y(k) = Re(-i sqrt(2) Y(k))
        pair_aliases = aliases(low.representatives)                                   # (P, n)
        self.pair_columns = basis.index[pair_aliases].flatten(1)                      # (P, 2n), distinct
        row_factors = math.sqrt(2) * torch.tensor([1, -1j], dtype=torch.complex128, device=device)
        contributions = gains[:, pair_aliases, None] * basis.coefficient[pair_aliases]  # (C, P, n, 2)
        pair_blocks = (row_factors[:, None] * contributions.flatten(2)[:, :, None, :]).real  # (C, P, 2, 2n)
        self.pair_rows = low.index[low.representatives]                               # (P, 2): Re, Im
        # self-conjugate measurement frequencies: one row Re Y(k); the aliases' coordinates repeat (q and -q)
        self_aliases = aliases(low.self_conjugate)                                    # (Q, n)
        self.self_columns = torch.stack([torch.unique(basis.index[group]) for group in self_aliases])   # (Q, n)
        self_blocks = torch.zeros((channels, len(self_aliases), 1, self.self_columns.shape[1]),
                                  dtype=torch.float64, device=device)
        for group, frequencies in enumerate(self_aliases):
            local = torch.searchsorted(self.self_columns[group], basis.index[frequencies].flatten())
            values = (gains[:, frequencies, None] * basis.coefficient[frequencies]).real.flatten(1)
            self_blocks[:, group, 0].index_add_(1, local, values)
        self.self_rows = low.index[low.self_conjugate, 0]
        self.self_left, self_singular, self.self_right = torch.linalg.svd(self_blocks, full_matrices=True)
        self.pair_left, pair_singular, self.pair_right = torch.linalg.svd(pair_blocks, full_matrices=True)
        singular_values = torch.cat([self_singular.flatten(), pair_singular.flatten()])
        self.order = torch.argsort(singular_values, descending=True, stable=True)
        self.singular_values = singular_values[self.order]

    @classmethod
    def from_operator(cls, operator, event_shape: tuple[int, ...], factor: int, device) -> "CircularFilterSVD":
        channels, rows, columns = event_shape
        offset = _offset(operator, event_shape, device)
        impulses = torch.zeros((factor * factor, *event_shape), dtype=operator.dtype or torch.float64, device=device)
        shifts = [(a, b) for a in range(factor) for b in range(factor)]
        for number, (a, b) in enumerate(shifts):
            impulses[number, :, a, b] = 1.0
        with torch.no_grad():
            responses = operator.forward(impulses).to(torch.float64) - offset
        response = torch.zeros(event_shape, dtype=torch.float64, device=device)
        low_rows = torch.arange(rows // factor, device=device)[:, None]
        low_columns = torch.arange(columns // factor, device=device)[None, :]
        for number, (a, b) in enumerate(shifts):
            response[:, (factor * low_rows - a) % rows, (factor * low_columns - b) % columns] = responses[number]
        return cls(response, factor, offset, operator.noise.sigma_y)

    def _paired(self, self_values: Tensor, pair_values: Tensor) -> Tensor:
        """The coordinates that pair with the singular values, ``(B, m)``, from the blocks' first rows."""
        return torch.cat([self_values.flatten(1), pair_values.flatten(1)], 1)[:, self.order]

    def rotate_measurement(self, residual: Tensor) -> Tensor:
        coordinates = self.measurement_basis.coordinates(residual)                   # (B, C, h w)
        self_part = torch.einsum("bcqj,cqji->bcqi", coordinates[..., self.self_rows, None], self.self_left)
        pair_part = torch.einsum("bcpj,cpji->bcpi", coordinates[..., self.pair_rows], self.pair_left)
        return self._paired(self_part, pair_part)

    def rotate_image(self, x: Tensor) -> Tensor:
        coordinates = self.image_basis.coordinates(x)                                # (B, C, H W)
        self_part = torch.einsum("bcqj,cqij->bcqi", coordinates[..., self.self_columns], self.self_right)
        pair_part = torch.einsum("bcpj,cpij->bcpi", coordinates[..., self.pair_columns], self.pair_right)
        return torch.cat([self._paired(self_part[..., :1], pair_part[..., :2]),
                          self_part[..., 1:].flatten(1), pair_part[..., 2:].flatten(1)], 1)

    def image(self, rotated: Tensor) -> Tensor:
        batch = len(rotated)
        channels, groups_self, width_self = self.self_right.shape[:3]
        groups_pairs = self.pair_right.shape[1]
        rank = len(self.singular_values)
        paired = torch.empty_like(rotated[:, :rank])
        paired[:, self.order] = rotated[:, :rank]
        self_first, pair_first = paired.split([channels * groups_self, channels * groups_pairs * 2], 1)
        self_null_size = channels * groups_self * (width_self - 1)
        self_null, pair_null = rotated[:, rank:].split([self_null_size, rotated.shape[1] - rank - self_null_size], 1)
        self_part = torch.cat([self_first.reshape(batch, channels, groups_self, 1),
                               self_null.reshape(batch, channels, groups_self, width_self - 1)], -1)
        pair_part = torch.cat([pair_first.reshape(batch, channels, groups_pairs, 2),
                               pair_null.reshape(batch, channels, groups_pairs, self.pair_right.shape[-1] - 2)], -1)
        coordinates = torch.zeros((batch, channels, self.image_basis.rows * self.image_basis.columns),
                                  dtype=torch.float64, device=rotated.device)
        coordinates[..., self.self_columns] = torch.einsum("bcqi,cqij->bcqj", self_part, self.self_right)
        coordinates[..., self.pair_columns] = torch.einsum("bcpi,cpij->bcpj", pair_part, self.pair_right)
        return self.image_basis.images(coordinates)
