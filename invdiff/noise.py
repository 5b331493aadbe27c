"""Measurement-noise models ``p_eta(y | clean)``, with ``clean = A(image)`` in [0, 1] units.

Written here rather than taken from deepinv: every draw takes a ``torch.Generator`` and every
log-likelihood is exact, normalised and per batch element (deepinv 0.5's Poisson likelihood mixes
batch elements, see DEEPINV_NOTES.md). Kept apart from ``invdiff.operators`` so that the modules
that only need the noise (the posterior, SMC, exact posteriors) do not import deepinv.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["NoiseModel", "GaussianNoise", "PoissonNoise"]


def _sum_per_element(values: Tensor) -> Tensor:
    return values.flatten(1).sum(1)


class NoiseModel(ABC):
    """A measurement-noise density ``p_eta(y | clean)``, with ``clean = A(image)``."""

    @abstractmethod
    def sample(self, clean: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``y ~ p_eta(. | clean)``."""

    @abstractmethod
    def log_likelihood(self, y: Tensor, clean: Tensor) -> Tensor:
        """Normalised ``log p_eta(y | clean)`` per batch element: shape ``(B,)``."""

    @abstractmethod
    def settings(self) -> dict:
        """Type and parameters, for summaries."""

    def inflated(self, extra_variance: float) -> "NoiseModel":
        """This noise with ``extra_variance`` added, for twisting functions; by default unchanged."""
        return self


class GaussianNoise(NoiseModel):
    """``y = clean + sigma_y * N(0, I)``."""

    def __init__(self, sigma_y: float):
        if not sigma_y > 0:
            raise ValueError(f"sigma_y must be > 0, got {sigma_y}")
        self.sigma_y = float(sigma_y)

    def sample(self, clean, generator=None):
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype, device=clean.device)
        return clean + self.sigma_y * noise

    def log_likelihood(self, y, clean):
        squared = _sum_per_element((y - clean) ** 2)
        count = clean[0].numel()
        return -0.5 * squared / self.sigma_y**2 - count * (math.log(self.sigma_y) + 0.5 * math.log(2 * math.pi))

    def settings(self):
        return {"type": "gaussian", "sigma_y": self.sigma_y}

    def inflated(self, extra_variance):
        return GaussianNoise(math.sqrt(self.sigma_y**2 + extra_variance))


class PoissonNoise(NoiseModel):
    """``y = gain * Poisson(clean / gain)``: photon counts ``k = y / gain`` with rate ``clean / gain``.

    The log-likelihood is that of the counts, ``sum(k log lam - lam - lgamma(k + 1))``; it needs
    ``clean > 0`` wherever it is evaluated (rates are clamped at ``1e-12``).
    """

    def __init__(self, gain: float):
        if not gain > 0:
            raise ValueError(f"gain must be > 0, got {gain}")
        self.gain = float(gain)

    def sample(self, clean, generator=None):
        if (clean < 0).any():
            raise ValueError("Poisson noise needs a non-negative clean measurement")
        return self.gain * torch.poisson(clean / self.gain, generator=generator)

    def log_likelihood(self, y, clean):
        counts = y / self.gain
        rate = (clean / self.gain).clamp(min=1e-12)
        return _sum_per_element(counts * torch.log(rate) - rate - torch.lgamma(counts + 1))

    def settings(self):
        return {"type": "poisson", "gain": self.gain}
