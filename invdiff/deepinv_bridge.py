"""Running deepinv's samplers (DDRM, DiffPIR, DPS) on an invdiff posterior: the prior and the measurement handed over.

deepinv's samplers take a denoiser ``D(image, sigma)`` on [0, 1] images and a deepinv physics whose
noise model states ``sigma_y``. Here both come from the posterior, in one place:

* the denoiser is ``prior.as_denoiser()`` (Tweedie's estimate of the prior, ``PriorDenoiser``), on
  images ``u = image_scale * x + image_offset`` with the map that sends the prior's ``data_range`` onto
  [0, 1];
* the physics is the operator's, copied, with deepinv's ``GaussianNoise(sigma_y)`` in place of the
  ``ZeroNoise`` an invdiff operator carries (its noise lives in ``operator.noise``); without that,
  deepinv's samplers silently assume their own default noise level (DEEPINV_NOTES.md). Only
  Gaussian noise is handed over; other noise models are refused.

The operator reads its input through its own map ``image = input_scale * x + input_offset``; problem
files use the denoiser's map, so the physics acts on ``u`` directly. Where the maps differ (a
``Posterior.from_arrays`` matrix reads ``x`` itself), a linear operator is rewritten exactly on ``u``:
``y = A(s x + o) + eta`` with ``x = (u - b) / a`` is ``y' = (a / s) (y - G(-b / a)) = A u + (a / s) eta``.

``DeepinvSampler`` is the base of the three plugins: it seeds deepinv (whose DDRM and DiffPIR draw
from torch's global generator) from the ``generator`` it is given, runs all draws as one batch, and
returns the samples in the prior's native space. deepinv is imported only when a sampler runs, so
loading the plugins stays cheap.
"""

from __future__ import annotations

import copy
from abc import abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from invdiff.noise import GaussianNoise
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor, UnsupportedProblem
from invdiff.prior import PriorDenoiser

if TYPE_CHECKING:  # deepinv is imported only when a sampler runs
    import deepinv

__all__ = ["DeepinvProblem", "deepinv_problem", "DeepinvSampler", "seeded_global_generator"]


@dataclass
class DeepinvProblem:
    """A posterior as deepinv's samplers see it: the prior's denoiser, a physics with the problem's noise,
    and the measurement, all on images ``u = denoiser.image_scale * x + denoiser.image_offset``."""

    denoiser: PriorDenoiser
    physics: deepinv.physics.Physics
    measurement: Tensor

    def to_native(self, images: Tensor) -> Tensor:
        """Images ``u`` back to the prior's native space ``x``."""
        return (images - self.denoiser.image_offset) / self.denoiser.image_scale


def deepinv_problem(posterior: Posterior, sampler_name: str) -> DeepinvProblem:
    """The posterior's prior, operator and measurement in deepinv's terms (module docstring).

    Raises ``UnsupportedProblem`` for noise other than Gaussian, and for a non-linear operator whose
    input map differs from the prior's (its rewriting on ``[0, 1]`` images would not be a physics).
    """
    import deepinv

    operator = posterior.operator
    if not isinstance(operator.noise, GaussianNoise):
        raise UnsupportedProblem(f"{sampler_name} (deepinv) takes Gaussian measurement noise only; this problem has "
                                 f"{operator.noise.settings()['type']} noise")
    denoiser = posterior.prior.as_denoiser()
    scale, offset = denoiser.image_scale, denoiser.image_offset
    measurement, sigma_y = posterior.measurement, operator.noise.sigma_y
    if (operator.input_scale, operator.input_offset) != (scale, offset):
        if not operator.linear:
            raise UnsupportedProblem(f"{sampler_name} (deepinv): the non-linear operator '{operator.name}' reads its "
                                     f"input through image = {operator.input_scale:g} x + {operator.input_offset:g}, "
                                     f"not the prior's [0, 1] map {scale:g} x + {offset:g}")
        zero_image = torch.full((1, *posterior.prior.event_shape), -offset / scale, dtype=posterior.dtype,
                                device=posterior.device)
        with torch.no_grad():
            measurement = (scale / operator.input_scale) * (measurement - operator.forward(zero_image))
        sigma_y = sigma_y * scale / operator.input_scale
    physics = copy.deepcopy(operator.physics)
    physics.set_noise_model(deepinv.physics.GaussianNoise(sigma=sigma_y).to(posterior.device))
    return DeepinvProblem(denoiser, physics, measurement)


@contextmanager
def seeded_global_generator(seed: int, device: torch.device):
    """Seed torch's global generator of the CPU (and of ``device`` if it is a GPU) with ``seed`` inside
    the block, and restore its previous state afterwards, so the caller's random stream is untouched."""
    gpus = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus, device_type="cuda"):
        torch.random.default_generator.manual_seed(seed)
        for gpu in gpus:
            with torch.cuda.device(gpu):
                torch.cuda.manual_seed(seed)
        yield


class _MonitoredDenoiser(torch.nn.Module):
    """The prior's denoiser reporting each call to the step monitor (progress, NaN guard): deepinv's
    sampling loops have no hooks, and each of their steps calls the denoiser once."""

    def __init__(self, denoiser: PriorDenoiser, monitor: StepMonitor):
        super().__init__()
        self.denoiser = denoiser
        self.monitor = monitor
        self.calls = 0

    def forward(self, image: Tensor, sigma: float | Tensor) -> Tensor:
        output = self.denoiser(image, sigma)
        time = self.denoiser.diffusion_time(torch.as_tensor(sigma, dtype=torch.float64).max())
        self.monitor.step(self.calls, time, output.detach(), sigma=torch.as_tensor(sigma).max())
        self.calls += 1
        return output


class DeepinvSampler(Sampler):
    """A deepinv sampler on an invdiff posterior; subclasses build and run it in ``reconstruct``.

    All ``num_samples`` draws run as one batch (the measurement repeated): deepinv's samplers treat
    batch elements independently. Randomness: one seed is drawn from ``generator``; deepinv's own
    generator (where it takes one) and torch's global generator (which DDRM and DiffPIR use) are
    seeded with it for the run, and the global state is restored afterwards. So a seed fixes every draw.
    """

    asymptotically_exact = False
    #: the deepinv physics class (in ``deepinv.physics``) the sampler needs, None for any; and the refusal's words
    required_physics: ClassVar[str | None] = None
    physics_requirement: ClassVar[str] = ""

    def check(self, posterior: Posterior) -> None:
        """The problem in deepinv's terms (Gaussian noise, the prior's input map), with a ``required_physics``."""
        import deepinv

        physics = deepinv_problem(posterior, self.name).physics
        if self.required_physics and not isinstance(physics, getattr(deepinv.physics, self.required_physics)):
            raise UnsupportedProblem(f"{self.name} needs {self.physics_requirement}; got {type(physics).__name__}")

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        problem = deepinv_problem(posterior, self.name)
        denoiser = _MonitoredDenoiser(problem.denoiser, monitor)
        measurements = problem.measurement.expand(num_samples, *problem.measurement.shape[1:]).clone()
        seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
        with seeded_global_generator(seed, posterior.device):
            images = self.reconstruct(denoiser, problem.physics, measurements, seed, posterior.device)
        return SampleResult(samples=problem.to_native(images.detach()).to(posterior.dtype))

    @abstractmethod
    def reconstruct(self, denoiser: torch.nn.Module, physics, measurements: Tensor, seed: int,
                    device: torch.device) -> Tensor:
        """Run the deepinv sampler: one sample per measurement (a batch), images in [0, 1] units."""
