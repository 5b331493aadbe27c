"""Forward noising processes (ALGORITHMS.md section 1) and the one reverse kernel every sampler uses.

Every SDE here is linear, ``dX = f(t) X dt + g(t) dW``, so its marginal given the clean data is

    X_t = lambda_t X_0 + sigma_t Z,   Z ~ N(0, I),

with ``lambda_0 = 1`` and ``sigma_0 = 0``. Time is continuous in ``[0, T]``; a discrete DDPM
schedule is a VP process read on its grid ``t_i = i / N``. Samplers take the time grid from
``time_grid`` and move between grid points with ``reverse_kernel``; none of them asks which SDE
it has.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

__all__ = ["SDE", "VPSDE", "VESDE", "DDPMSchedule", "ScheduleError", "gaussian_log_density", "sde_from_settings"]


class ScheduleError(ValueError):
    """A sampler asked a noise schedule for something it cannot give (the message says what is allowed)."""


def _as_tensor(t: float | Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def gaussian_log_density(x: Tensor, mean: Tensor, variance: Tensor | float) -> Tensor:
    """Log-density of ``N(mean, variance I)`` at ``x``, summed over all but the batch axis: shape ``(B,)``."""
    variance = torch.as_tensor(variance, dtype=x.dtype, device=x.device)
    squared = ((x - mean) ** 2 / variance).flatten(1).sum(1)
    dimension = x[0].numel()
    return -0.5 * (squared + dimension * torch.log(2 * math.pi * variance))


class SDE(ABC):
    """A linear forward SDE, described by its marginal coefficients ``lambda_t`` and ``sigma_t``."""

    #: the terminal time; sampling starts there
    T: float = 1.0

    @abstractmethod
    def lambda_t(self, t: float | Tensor) -> Tensor:
        """The signal coefficient ``lambda_t = exp(int_0^t f)`` (float64)."""

    @abstractmethod
    def sigma_t(self, t: float | Tensor) -> Tensor:
        """The noise standard deviation ``sigma_t`` of ``X_t`` given ``X_0`` (float64)."""

    @abstractmethod
    def settings(self) -> dict:
        """The SDE's type and parameters, for summaries and checkpoint metadata."""

    def time_grid(self, num_steps: int) -> Tensor:
        """``num_steps + 1`` decreasing times from ``T`` to ``0`` (float64)."""
        return torch.linspace(self.T, 0.0, num_steps + 1, dtype=torch.float64)

    def terminal_std(self) -> float:
        """Standard deviation used to start sampling at ``T``, assuming data of unit scale."""
        return float(torch.sqrt(self.sigma_t(self.T) ** 2 + self.lambda_t(self.T) ** 2))

    def terminal_sample(self, shape: tuple[int, ...], *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Tensor:
        """Draw ``x_T ~ N(0, terminal_std^2 I)``: the reference start, which ``Prior.terminal_sample`` (what
        samplers call) uses unless the prior knows its own marginal at ``T``."""
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
        return self.terminal_std() * noise

    def _forward_coefficients(self, s: float | Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """``lambda_ts = lambda_t / lambda_s`` and ``variance_ts = sigma_t^2 - lambda_ts^2 sigma_s^2``: the forward
        process's Markov kernel ``x_t | x_s ~ N(lambda_ts x_s, variance_ts)`` for ``t > s``."""
        lambda_ts = self.lambda_t(t) / self.lambda_t(s)
        return lambda_ts, self.sigma_t(t) ** 2 - lambda_ts**2 * self.sigma_t(s) ** 2

    def forward_transition(self, x_s: Tensor, s: float | Tensor, t: float | Tensor, *,
                           generator: torch.Generator | None = None) -> Tensor:
        """Draw ``x_t`` given ``x_s`` for ``t > s`` from the forward process's Markov kernel."""
        lambda_ts, variance_ts = self._forward_coefficients(s, t)
        noise = torch.randn(x_s.shape, generator=generator, dtype=x_s.dtype, device=x_s.device)
        return lambda_ts.to(x_s.dtype) * x_s + variance_ts.clamp(min=0).sqrt().to(x_s.dtype) * noise

    def reverse_kernel(self, x_t: Tensor, denoised: Tensor, t: float | Tensor,
                       s: float | Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of the reverse step from time ``t`` to ``s < t``.

        This is the Gaussian ``q(x_s | x_t, x_0 = denoised)`` of the forward process (the DDPM
        ancestral step, Ho et al. 2020, written for any linear SDE as in Kingma et al. 2021), with
        ``denoised`` the Tweedie estimate of ``x_0``. With the network score it is the DDPM step;
        for VE it is ``x_t + (sigma_t^2 - sigma_s^2) score``. At ``s = 0`` the variance is zero and
        the mean is ``denoised``. The variance is returned as a 0-dim tensor.
        """
        lambda_s, sigma_t, sigma_s = self.lambda_t(s), self.sigma_t(t), self.sigma_t(s)
        lambda_ts, variance_ts = self._forward_coefficients(s, t)
        x_coefficient = lambda_ts * sigma_s**2 / sigma_t**2
        denoised_coefficient = lambda_s * variance_ts / sigma_t**2
        variance = variance_ts * sigma_s**2 / sigma_t**2
        mean = x_coefficient.to(x_t.dtype) * x_t + denoised_coefficient.to(x_t.dtype) * denoised
        return mean, variance.to(dtype=x_t.dtype, device=x_t.device)


class VPSDE(SDE):
    """Variance-preserving SDE ``dX = -beta(t)/2 X dt + sqrt(beta(t)) dW`` with a linear ``beta(t)``.

    Song et al. (ICLR 2021); the continuous limit of DDPM. ``beta_min = beta_max = 2`` gives the
    Ornstein-Uhlenbeck process ``dX = -X dt + sqrt(2) dW`` of ALGORITHMS.md, ``lambda_t = e^{-t}``.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, T: float = 1.0):
        if not 0 < beta_min <= beta_max:
            raise ValueError(f"VP SDE needs 0 < beta_min <= beta_max, got {beta_min}, {beta_max}")
        self.beta_min, self.beta_max, self.T = float(beta_min), float(beta_max), float(T)

    def _beta_integral(self, t):
        t = _as_tensor(t)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def lambda_t(self, t):
        return torch.exp(-0.5 * self._beta_integral(t))

    def sigma_t(self, t):
        return torch.sqrt(-torch.expm1(-self._beta_integral(t)))

    def settings(self):
        return {"type": "vp", "beta_min": self.beta_min, "beta_max": self.beta_max, "T": self.T}


class VESDE(SDE):
    """Variance-exploding SDE ``dX = sqrt(d sigma^2(t)/dt) dW`` with geometric noise levels.

    Song et al. (ICLR 2021), NCSN's noise levels (seed 003). ``sigma(t) = sigma_min (sigma_max /
    sigma_min)^t`` and the marginal variance is the exact ``sigma(t)^2 - sigma(0)^2``, so that
    ``sigma_0 = 0`` as for every SDE here.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, T: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"VE SDE needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.T = float(sigma_min), float(sigma_max), float(T)

    def lambda_t(self, t):
        return torch.ones_like(_as_tensor(t))

    def sigma_t(self, t):
        t = _as_tensor(t)
        ratio = math.log(self.sigma_max / self.sigma_min)
        return self.sigma_min * torch.sqrt(torch.expm1(2 * ratio * t / self.T))

    def settings(self):
        return {"type": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "T": self.T}


class DDPMSchedule(SDE):
    """The discrete DDPM schedule (Ho et al., NeurIPS 2020) as a VP process on the grid ``t_i = i/N``.

    ``abar_i = prod_{j <= i} (1 - beta_j)`` with linear betas; ``lambda_t = sqrt(abar)``,
    interpolated log-linearly between grid points; ``time_grid`` returns grid points only, so a
    checkpoint trained on integer timesteps is only ever evaluated where it was trained.
    """

    def __init__(self, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
        if num_timesteps < 1 or not 0 < beta_start <= beta_end < 1:
            raise ValueError("DDPM schedule needs num_timesteps >= 1 and 0 < beta_start <= beta_end < 1")
        self.num_timesteps = int(num_timesteps)
        self.beta_start, self.beta_end = float(beta_start), float(beta_end)
        betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
        log_alpha_bar = torch.cumsum(torch.log1p(-betas), 0)
        self.log_alpha_bar = torch.cat([torch.zeros(1, dtype=torch.float64), log_alpha_bar])
        self.T = 1.0

    def timestep(self, t: float | Tensor) -> Tensor:
        """The (fractional) DDPM timestep index ``t N`` of a continuous time."""
        return _as_tensor(t) * self.num_timesteps

    def _interpolated_log_alpha_bar(self, t):
        position = self.timestep(t).clamp(0, self.num_timesteps)
        lower = position.floor().long().clamp(max=self.num_timesteps - 1)
        fraction = position - lower
        log_alpha_bar = self.log_alpha_bar.to(position.device)
        return (1 - fraction) * log_alpha_bar[lower] + fraction * log_alpha_bar[lower + 1]

    def lambda_t(self, t):
        return torch.exp(0.5 * self._interpolated_log_alpha_bar(t))

    def sigma_t(self, t):
        return torch.sqrt(-torch.expm1(self._interpolated_log_alpha_bar(t)))

    def time_grid(self, num_steps: int) -> Tensor:
        if num_steps > self.num_timesteps:
            raise ScheduleError(f"the DDPM schedule has {self.num_timesteps} timesteps, so it cannot take {num_steps} "
                                f"steps; use num_steps <= {self.num_timesteps}")
        indices = torch.linspace(self.num_timesteps, 0, num_steps + 1, dtype=torch.float64).round()
        return indices / self.num_timesteps

    def settings(self):
        return {"type": "ddpm", "num_timesteps": self.num_timesteps,
                "beta_start": self.beta_start, "beta_end": self.beta_end}


def sde_from_settings(settings: dict) -> SDE:
    """Rebuild an SDE from its ``settings()`` dictionary (as stored in summaries and checkpoints)."""
    kinds = {"vp": VPSDE, "ve": VESDE, "ddpm": DDPMSchedule}
    settings = dict(settings)
    kind = settings.pop("type", None)
    if kind not in kinds:
        raise ValueError(f"unknown SDE type '{kind}'; allowed: {', '.join(kinds)}")
    try:
        return kinds[kind](**settings)
    except TypeError as error:
        raise ValueError(f"bad settings for the {kind} SDE: {error}") from None
