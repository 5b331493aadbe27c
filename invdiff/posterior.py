"""The posterior ``p(x | y) ∝ p_eta(y | G(x)) p(x)``, the sampler interface and its result.

A sampler plugin subclasses ``Sampler``: it declares its options as a pydantic model (so that a
wrong option in a problem file names the field) and implements ``sample``. The core runs it
through ``sample_posterior``, which owns what every sampler needs and none should rewrite: the
step monitor (progress bar, per-step diagnostics, the NaN guard that names the step), the count of
network evaluations and the wall time.
"""

from __future__ import annotations

import math
import numbers
import time
import types
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Union, get_args, get_origin

import torch
from pydantic import BaseModel, ConfigDict, model_validator
from torch import Tensor

from invdiff.noise import GaussianNoise, NoiseModel
from invdiff.prior import Prior

if TYPE_CHECKING:  # the operators need deepinv, which the plugin registry should not load
    from invdiff.operators import ForwardOperator

__all__ = ["Posterior", "Sampler", "SamplerOptions", "SampleResult", "StepMonitor", "SamplingError",
           "UnsupportedProblem", "sample_posterior"]


class SamplingError(RuntimeError):
    """Sampling produced something unusable (NaN, infinity); the message names the step."""


class UnsupportedProblem(ValueError):
    """A sampler cannot handle this posterior (its SDE, operator or noise); the message says why."""


@dataclass
class Posterior:
    """A prior, a forward operator with its noise model, and one measurement ``y``.

    The measurement is stored with a batch axis of size 1, ``(1, *output_shape)``, where
    ``output_shape`` is what the operator gives for one event of the prior; a ``y`` without the batch
    axis (``(m,)`` for a matrix operator) gets it added. Samplers work in ``dtype`` and on ``device``,
    the measurement's: a floating torch tensor keeps its dtype, anything else (numpy arrays, lists,
    integer tensors) is converted to ``prior.dtype``, which ``from_arrays`` always uses.
    """

    prior: Prior
    operator: ForwardOperator
    measurement: Tensor

    def __post_init__(self):
        from invdiff.operators import ForwardOperator

        if not isinstance(self.operator, ForwardOperator):
            raise ValueError(f"operator: Posterior(prior, operator, y) takes an invdiff ForwardOperator, got "
                             f"{type(self.operator).__name__}; Posterior.from_arrays takes a matrix or a deepinv "
                             "physics")
        measurement = self.measurement
        if not (isinstance(measurement, Tensor) and measurement.is_floating_point()):
            measurement = _as_tensor(measurement, "the measurement").to(self.prior.dtype)
        given_shape = tuple(measurement.shape)
        expected = self._output_shape(measurement.device, measurement.dtype)
        if measurement.dim() == len(expected) - 1:
            measurement = measurement[None]
        if tuple(measurement.shape[1:]) != expected[1:]:
            raise ValueError(f"the measurement has shape {given_shape}, but the operator maps one event of the "
                             f"prior {self.prior.event_shape} to shape {expected[1:]} (the batch axis of size 1 may be "
                             "left out)")
        if measurement.shape[0] != 1:
            raise ValueError(f"the measurement must have batch size 1 (one y per posterior), got shape "
                             f"{tuple(measurement.shape)}")
        if not torch.isfinite(measurement).all():
            raise ValueError("the measurement contains NaN or infinite values")
        self.measurement = measurement

    def _output_shape(self, device: torch.device, dtype: torch.dtype) -> tuple[int, ...]:
        """The shape of ``G(x)`` for one event ``x`` of the prior, with its batch axis: ``(1, ...)``."""
        zeros = torch.zeros((1, *self.prior.event_shape), dtype=self.operator.dtype or dtype, device=device)
        try:
            with torch.no_grad():
                return tuple(self.operator.forward(zeros).shape)
        except (RuntimeError, ValueError, TypeError, IndexError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"the operator '{self.operator.name}' cannot take the prior's events of shape "
                             f"{self.prior.event_shape}: {reason}") from None

    @classmethod
    def from_arrays(cls, prior: Prior, operator: Any, measurement: Any, *, noise: NoiseModel | float | None = None
                    ) -> "Posterior":
        """A posterior from arrays, for use from Python (the CLI builds its posteriors from problem files).

        ``operator`` is a ``ForwardOperator`` (it has its noise: leave ``noise`` out), a deepinv
        ``Physics`` acting on the prior's native space, or a matrix ``(m, d)`` (numpy or torch) for a
        prior over vectors of shape ``(d,)``. ``noise`` is a ``NoiseModel`` or ``sigma_y`` (a number:
        Gaussian noise). ``measurement`` (numpy or torch, with or without the batch axis) is converted
        to ``prior.dtype``, the dtype sampling then uses. Every mismatch raises one ``ValueError``.
        """
        import deepinv

        from invdiff.operators import ForwardOperator, matrix_operator

        if isinstance(operator, ForwardOperator):
            if noise is not None:
                raise ValueError("noise: this ForwardOperator already has its noise model "
                                 f"({operator.noise.settings()}); give noise only with a matrix or a deepinv physics")
        elif isinstance(operator, deepinv.physics.Physics):
            operator = ForwardOperator(operator, _noise_model(noise), name=type(operator).__name__)
        else:
            operator = matrix_operator(_vector_matrix(operator, prior), _noise_model(noise))
        return cls(prior, operator, _as_tensor(measurement, "the measurement").to(prior.dtype))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype samplers work in: the measurement's."""
        return self.measurement.dtype

    @property
    def device(self) -> torch.device:
        """The device samplers work on: the measurement's."""
        return self.measurement.device

    def log_likelihood(self, x: Tensor) -> Tensor:
        """``log p_eta(y | G(x))`` per batch element: shape ``(B,)``."""
        return self.operator.log_likelihood(self.measurement, x)

    def log_likelihood_grad(self, x: Tensor) -> Tensor:
        """``grad_x log p_eta(y | G(x))``, batched, shape of ``x``; gradients are enabled inside, so it
        works under ``torch.no_grad()``, and the result carries no graph."""
        return self.operator.log_likelihood_grad(self.measurement, x)


def _as_tensor(values: Any, what: str) -> Tensor:
    """``values`` (numpy, torch, nested lists of numbers) as a tensor, or one ``ValueError`` naming ``what``."""
    try:
        tensor = torch.as_tensor(values)
    except (TypeError, ValueError, RuntimeError):
        message = f"{what}: expected numbers (a numpy array or torch tensor), got {type(values).__name__}"
        raise ValueError(message) from None
    if tensor.is_complex():
        raise ValueError(f"{what}: expected real numbers, got {tensor.dtype}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return tensor


def _noise_model(noise: NoiseModel | float | None) -> NoiseModel:
    """A noise model from a ``NoiseModel`` or ``sigma_y`` (Gaussian)."""
    if isinstance(noise, NoiseModel):
        return noise
    if noise is None:
        raise ValueError("noise: required with a matrix or a deepinv physics: give sigma_y (a number, Gaussian "
                         "noise) or a NoiseModel (invdiff.noise.GaussianNoise, PoissonNoise)")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real):
        raise ValueError(f"noise: expected sigma_y (a positive number) or a NoiseModel, got {type(noise).__name__}")
    if not math.isfinite(noise):
        raise ValueError(f"noise: sigma_y must be a finite positive number, got {noise}")
    return GaussianNoise(float(noise))


def _vector_matrix(matrix: Any, prior: Prior) -> Tensor:
    """``matrix`` as a 2-D tensor whose columns match the prior's vector events; float64 unless floating."""
    matrix = _as_tensor(matrix, "operator (a ForwardOperator, a deepinv Physics or a matrix)")
    if not matrix.is_floating_point():
        matrix = matrix.to(torch.float64)
    if matrix.dim() != 2:
        raise ValueError(f"operator: a matrix must be 2-D (measurements, dimension), got shape {tuple(matrix.shape)}")
    if len(prior.event_shape) != 1:
        raise ValueError(f"operator: a matrix acts on vectors, but the prior's events have shape {prior.event_shape}; "
                         "use a prior over vectors or a deepinv physics")
    if matrix.shape[1] != prior.event_shape[0]:
        raise ValueError(f"operator: the matrix has {matrix.shape[1]} columns, but the prior's events have "
                         f"{prior.event_shape[0]} values")
    return matrix


def _number_types(annotation: Any) -> set[type]:
    """The plain types a field's annotation admits (the members of a union, ``X | None`` included)."""
    if get_origin(annotation) in (Union, types.UnionType):
        return set().union(*(_number_types(member) for member in get_args(annotation)))
    return {annotation} if isinstance(annotation, type) else set()


def refuse_boolean_numbers(model: type[BaseModel], data: Any) -> Any:
    """A ``model_validator(mode="before")``: ``true`` / ``false`` where a number belongs is an error (pydantic would
    read them as 1 / 0: ``num_steps: true`` ran one step)."""
    if isinstance(data, dict):
        for name, value in data.items():
            if isinstance(value, bool) and name in model.model_fields:
                admitted = _number_types(model.model_fields[name].annotation)
                if bool not in admitted and admitted & {int, float}:
                    raise ValueError(f"{name}: a number is needed, not {str(value).lower()}")
    return data


#: the most steps a sampler's option allows: a typo of a few zeros would fill the memory with the time grid first
MAX_STEPS = 100_000


class SamplerOptions(BaseModel):
    """Base of every sampler's options: unknown keys, wrong values, non-finite numbers and true / false for numbers
    are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_not_booleans(cls, data: Any) -> Any:
        return refuse_boolean_numbers(cls, data)

    def usage(self) -> dict[str, tuple[bool, str]]:
        """The options that only some configurations use: ``name -> (used by this one, when an option applies)``.
        Subclasses add theirs to their parent's."""
        return {}

    def unused_options(self) -> dict[str, str]:
        """Options given explicitly (not left at their defaults) that this configuration does not use, each with
        when it applies: ``invdiff solve`` prints them as a note (a problem file's pilot options, say, with
        ``-o guidance=twist``)."""
        return {name: when for name, (used, when) in self.usage().items() if name in self.model_fields_set and not used}


@dataclass
class SampleResult:
    """What a sampler returns; ``sample_posterior`` fills in the cost and the diagnostics.

    ``samples`` are equally weighted draws in the prior's native space, ``(N, *event_shape)``.
    Particle samplers also give their weighted ``particles`` ``(K, *event_shape)`` with normalised
    ``log_weights`` ``(K,)`` (the samples are resampled from them), ``log_evidence``, an
    estimate of ``log p(y)``, and the genealogy of the samples: ``distinct_ancestors``, for each
    step, how many distinct particles of that step the samples descend from, and
    ``distinct_samples``, how many of the samples differ (None: count them with
    ``invdiff.metrics.distinct_samples``).
    """

    samples: Tensor
    particles: Tensor | None = None
    log_weights: Tensor | None = None
    log_evidence: float | None = None
    network_evaluations: int = 0
    wall_time: float = 0.0
    diagnostics: list[dict[str, float]] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)
    distinct_ancestors: list[int] | None = None
    distinct_samples: int | None = None

    @property
    def nfe(self) -> float:
        """Network evaluations per chain: per particle for particle samplers, else per sample."""
        count = len(self.particles) if self.particles is not None else len(self.samples)
        return self.network_evaluations / max(count, 1)

    @property
    def network_evaluations_per_sample(self) -> float:
        """Network evaluations per returned sample: the total over ``len(samples)``, whatever made them."""
        return self.network_evaluations / max(len(self.samples), 1)

    @property
    def network_evaluations_per_particle(self) -> float | None:
        """Network evaluations per particle, for particle samplers (else None)."""
        return None if self.particles is None else self.network_evaluations / max(len(self.particles), 1)

    @property
    def ess_history(self) -> list[float]:
        """The effective sample size at each step before resampling, for particle samplers (else empty)."""
        return [record["ess"] for record in self.diagnostics if "ess" in record]


class StepMonitor:
    """Called by a sampler once per step: checks the state, records diagnostics, moves the progress bar."""

    def __init__(self, sampler_name: str, num_steps: int, progress: bool = False,
                 callback: Callable[[int, dict[str, float]], None] | None = None):
        self.sampler_name = sampler_name
        self.num_steps = num_steps
        self.diagnostics: list[dict[str, float]] = []
        self.callback = callback
        self.progress = progress and num_steps > 0
        #: the progress bar, drawn at the first step: a sampler that refuses the problem before it prints one line
        self.bar = None

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
        if self.progress and self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.num_steps, desc=self.sampler_name, unit="step", leave=False)
        if self.bar is not None:
            self.bar.update(1)
            shown = {name: f"{value:.3g}" for name, value in record.items() if name not in ("step", "time")}
            self.bar.set_postfix(shown, refresh=False)
        if self.callback is not None:
            self.callback(index, record)

    def add_steps(self, count: int) -> None:
        """``count`` more calls of ``step`` than announced: a sampler that runs some steps again (twisted_smc's
        ``restart_time``) says so when it knows."""
        self.num_steps += count
        if self.bar is not None:
            self.bar.total = self.num_steps
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Sampler(ABC):
    """A posterior sampler. Subclasses set ``name``, an ``Options`` model, and implement ``sample``; a sampler
    that handles only some problems says which in ``check``.

    ``num_steps`` says how many times ``sample`` will call ``monitor.step`` (for the progress bar).
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type[SamplerOptions]] = SamplerOptions
    #: True when the samples converge to the exact posterior as the sample/particle count grows
    #: (the test suite then requires it to pass the exact-posterior checks; False means a known bias)
    asymptotically_exact: ClassVar[bool] = False
    #: False when the sampler only runs the network forward (no backpropagation through it): the
    #: memory estimate of ``invdiff.resources`` then counts no activations kept for the backward pass
    needs_network_gradient: ClassVar[bool] = True

    def __init__(self, **options: Any):
        self.options = self.Options(**options)

    @property
    def num_steps(self) -> int:
        return int(getattr(self.options, "num_steps", 0))

    def unused_options(self, posterior: Posterior) -> dict[str, str]:
        """Options given explicitly that this configuration does not use on ``posterior``, each with when it applies
        (``invdiff solve`` prints them as a note): ``SamplerOptions.unused_options``, and what the problem decides
        for samplers that override this."""
        return self.options.unused_options()

    def check(self, posterior: Posterior) -> None:
        """Raise ``UnsupportedProblem`` (one line: what this posterior lacks, what is allowed) if this sampler
        cannot run on ``posterior``; the default accepts every posterior. Called by ``sample_posterior`` and by
        ``invdiff solve`` before any work (before the run's time estimate), so it must be cheap: no network
        evaluation, no large decomposition. ``sample`` may assume it passed."""

    @abstractmethod
    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        """Draw ``num_samples`` approximate posterior samples."""


def sample_posterior(sampler: Sampler, posterior: Posterior, num_samples: int, *,
                     generator: torch.Generator | None = None, progress: bool = False,
                     callback: Callable[[int, dict[str, float]], None] | None = None) -> SampleResult:
    """Run ``sampler`` on ``posterior``: the one entry point, used by the CLI, tests and benchmarks."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if generator is None:
        generator = torch.Generator(device=posterior.measurement.device).manual_seed(0)
    sampler.check(posterior)
    monitor = StepMonitor(sampler.name or type(sampler).__name__, sampler.num_steps, progress, callback)
    evaluations_before = posterior.prior.evaluations
    start = time.perf_counter()
    try:
        result = sampler.sample(posterior, num_samples, generator=generator, monitor=monitor)
    finally:
        monitor.close()
    wall_time = time.perf_counter() - start
    result = _checked_result(result, posterior, num_samples, monitor.sampler_name)
    return replace(result, network_evaluations=posterior.prior.evaluations - evaluations_before,
                   wall_time=wall_time, diagnostics=monitor.diagnostics)


def _checked_result(result: Any, posterior: Posterior, num_samples: int, name: str) -> SampleResult:
    """``result`` if it is what a sampler must return: a ``SampleResult`` with ``num_samples`` real floating-point
    samples of the posterior's event shape on its device, finite, weighted particles with one log-weight each, an
    evidence that is a number or None; else ``SamplingError`` saying what is wrong (a third-party sampler's mistake
    would otherwise be scored as a run: one sample for 64, samples cut to integers, a NaN evidence in the summary)."""
    if not isinstance(result, SampleResult):
        raise SamplingError(f"{name}: sample returned {type(result).__name__}, not an invdiff SampleResult")
    expected = (num_samples, *posterior.prior.event_shape)
    for what, values, first in (("samples", result.samples, num_samples), ("particles", result.particles, None)):
        if values is None and what == "particles":
            continue
        if not (isinstance(values, Tensor) and values.is_floating_point()):
            kind = values.dtype if isinstance(values, Tensor) else type(values).__name__
            raise SamplingError(f"{name}: the {what} are {kind}, not a real floating-point tensor")
        if values.shape[1:] != expected[1:] or (first is not None and len(values) != first):
            raise SamplingError(f"{name}: the {what} have shape {tuple(values.shape)}, expected "
                                f"{(first if first is not None else 'K', *expected[1:])}")
        if values.device.type != posterior.measurement.device.type:
            raise SamplingError(f"{name}: the {what} are on {values.device}, the posterior on "
                                f"{posterior.measurement.device}")
        if not torch.isfinite(values).all():
            raise SamplingError(f"{name}: the final {what} contain NaN or infinite values")
    if (result.particles is None) != (result.log_weights is None) or (
            result.log_weights is not None and tuple(result.log_weights.shape) != (len(result.particles),)):
        raise SamplingError(f"{name}: particles and log_weights go together, one log-weight per particle")
    if result.log_evidence is not None and not (isinstance(result.log_evidence, numbers.Real)
                                                and math.isfinite(result.log_evidence)):
        raise SamplingError(f"{name}: log_evidence is {result.log_evidence!r}, not a finite number (or None)")
    return result
