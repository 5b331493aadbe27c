"""The posterior ``p(x | y) ∝ p_eta(y | G(x)) p(x)``, the sampler interface and its result.

A sampler plugin subclasses ``Sampler``: it declares its options as a pydantic model (so that a
wrong option in a problem file names the field) and implements ``sample``. The core runs it
through ``sample_posterior``, which owns what every sampler needs and none should rewrite: the
step monitor (progress bar, per-step diagnostics, the NaN guard that names the step), the count of
network evaluations and the wall time.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from invdiff.operators import ForwardOperator
from invdiff.prior import Prior

__all__ = ["Posterior", "Sampler", "SamplerOptions", "SampleResult", "StepMonitor", "SamplingError",
           "UnsupportedProblem", "sample_posterior"]


class SamplingError(RuntimeError):
    """Sampling produced something unusable (NaN, infinity); the message names the step."""


class UnsupportedProblem(ValueError):
    """A sampler cannot handle this posterior (its SDE, operator or noise); the message says why."""


@dataclass
class Posterior:
    """A prior, a forward operator with its noise model, and one measurement ``y`` (batch size 1)."""

    prior: Prior
    operator: ForwardOperator
    measurement: Tensor

    def __post_init__(self):
        if self.measurement.shape[0] != 1:
            raise ValueError(f"the measurement must have batch size 1, got shape {tuple(self.measurement.shape)}")
        if not torch.isfinite(self.measurement).all():
            raise ValueError("the measurement contains NaN or infinite values")

    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log p_eta(y | G(x))`` per batch element: shape ``(B,)``."""
        return self.operator.log_likelihood(self.measurement, x)

    def log_likelihood_grad(self, x: Tensor) -> Tensor:
        """``grad_x log p_eta(y | G(x))``, batched."""
        return self.operator.log_likelihood_grad(self.measurement, x)


class SamplerOptions(BaseModel):
    """Base of every sampler's options: unknown keys are errors, values are validated."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class SampleResult:
    """What a sampler returns; ``sample_posterior`` fills in the cost and the diagnostics.

    ``samples`` are equally weighted draws in the prior's native space, ``(N, *event_shape)``.
    Particle samplers also give their weighted ``particles`` ``(K, *event_shape)`` with normalised
    ``log_weights`` ``(K,)`` (the samples are resampled from them) and ``log_evidence``, an
    estimate of ``log p(y)``.
    """

    samples: Tensor
    particles: Tensor | None = None
    log_weights: Tensor | None = None
    log_evidence: float | None = None
    network_evaluations: int = 0
    wall_time: float = 0.0
    diagnostics: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def nfe(self) -> float:
        """Network evaluations per sample (per particle for particle samplers)."""
        count = len(self.particles) if self.particles is not None else len(self.samples)
        return self.network_evaluations / max(count, 1)

    @property
    def ess_history(self) -> list[float]:
        """The effective sample size after each step, for particle samplers (else empty)."""
        return [record["ess"] for record in self.diagnostics if "ess" in record]


class StepMonitor:
    """Called by a sampler once per step: checks the state, records diagnostics, moves the progress bar."""

    def __init__(self, sampler_name: str, num_steps: int, progress: bool = False,
                 callback: Callable[[int, dict[str, float]], None] | None = None):
        self.sampler_name = sampler_name
        self.num_steps = num_steps
        self.diagnostics: list[dict[str, float]] = []
        self.callback = callback
        self.bar = None
        if progress and num_steps > 0:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=num_steps, desc=sampler_name, unit="step", leave=False)

    def step(self, index: int, time: float | Tensor, state: Tensor, **diagnostics: float | Tensor) -> None:
        """Record step ``index`` (0-based) that reached diffusion time ``time`` with ``state``.

        Raises ``SamplingError`` naming the step when ``state`` or a diagnostic is not finite.
        """
        record = {"step": index, "time": float(time)}
        record.update({name: float(torch.as_tensor(value).detach()) for name, value in diagnostics.items()})
        if not torch.isfinite(state).all():
            bad = int((~torch.isfinite(state)).flatten(1).any(1).sum())
            raise SamplingError(f"{self.sampler_name}: non-finite values in {bad} of {state.shape[0]} chains "
                                f"at step {index + 1}/{self.num_steps} (t={float(time):.4g})")
        for name, value in record.items():
            if not math.isfinite(value):
                raise SamplingError(f"{self.sampler_name}: diagnostic '{name}' is {value} "
                                    f"at step {index + 1}/{self.num_steps} (t={float(time):.4g})")
        self.diagnostics.append(record)
        if self.bar is not None:
            self.bar.update(1)
            shown = {name: f"{value:.3g}" for name, value in record.items() if name not in ("step", "time")}
            self.bar.set_postfix(shown, refresh=False)
        if self.callback is not None:
            self.callback(index, record)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sampler(ABC):
    """A posterior sampler. Subclasses set ``name``, an ``Options`` model, and implement ``sample``.

    ``num_steps`` says how many times ``sample`` will call ``monitor.step`` (for the progress bar).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SamplerOptions]] = SamplerOptions
    #: True when the samples converge to the exact posterior as the sample/particle count grows
    #: (the test suite then requires it to pass the exact-posterior checks; False means a known bias)
    asymptotically_exact: ClassVar[bool] = False

    def __init__(self, **options: Any):
        self.options = self.Options(**options)

    @property
    def num_steps(self) -> int:
        return int(getattr(self.options, "num_steps", 0))

    @abstractmethod
    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        """Draw ``num_samples`` approximate posterior samples."""


def sample_posterior(sampler: Sampler, posterior: Posterior, num_samples: int, *,
                     generator: torch.Generator | None = None, progress: bool = False,
                     callback: Callable[[int, dict[str, float]], None] | None = None) -> SampleResult:
    """Run ``sampler`` on ``posterior``: the one entry point, used by the CLI, tests and benchmarks."""
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if generator is None:
        generator = torch.Generator(device=posterior.measurement.device).manual_seed(0)
    monitor = StepMonitor(sampler.name or type(sampler).__name__, sampler.num_steps, progress, callback)
    evaluations_before = posterior.prior.evaluations
    start = time.perf_counter()
    try:
        result = sampler.sample(posterior, num_samples, generator=generator, monitor=monitor)
    finally:
        monitor.close()
    wall_time = time.perf_counter() - start
    if not torch.isfinite(result.samples).all() or (result.particles is not None
                                                    and not torch.isfinite(result.particles).all()):
        raise SamplingError(f"{monitor.sampler_name}: the final samples contain NaN or infinite values")
    return replace(result, network_evaluations=posterior.prior.evaluations - evaluations_before,
                   wall_time=wall_time, diagnostics=monitor.diagnostics)
