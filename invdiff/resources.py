"""What a run will need, estimated before sampling: refuse one that cannot fit in memory, warn about a long one.

``estimate_run`` adds up the peak memory of a run from two parts:

* the sampler's state: every image it holds at once (samples, particles, inner chains, a pool of
  prior draws) times ``STATE_COPIES`` working copies (the state, its denoised estimate, the
  gradient, the proposal, the noise, resampled copies, the CLI's images and moments afterwards);
* the network's activations for one network call, measured rather than guessed: the prior's
  denoiser is called on one image and on a small batch (of the real size, or 64x64 for a fully
  convolutional network, whose cost grows with the pixels), counting the bytes that stay alive;
  the difference is one image's cost, the rest the call's. A sampler that
  backpropagates through the network keeps every tensor saved for the backward pass
  (``torch.autograd.graph.saved_tensors_hooks`` counts them) for all the images of one gradient
  (the prior's ``batch_size`` chunks do not help: the graph spans them); a forward-only sampler
  needs the peak of the live tensors of one forward pass (counted by a ``TorchDispatchMode``) for
  one chunk of at most the prior's ``batch_size`` images. The allocator keeps freed blocks, so the
  counted bytes are multiplied by ``ALLOCATOR_MARGIN``.

The probe's batch is timed, and on the CPU its seconds per image pixel, times the pixels and the
network evaluations of the run, give the run's time (within a factor 1.5 of the runs measured where the network's
calls dominate, at the machine's load of the moment); it counts no other work, so it is low where that matters:
4x on natural-gmm-box's second-order pilot (the twist's m x m factors), 1.6-1.8x for 64 particles on 64x64 RGB
images (a batch of 64 costs more per image than the probe's 2); on a GPU small calls are bound by kernel launches,
so there is no time estimate there. A pilot (``guidance: pilot``) runs first on its own states and batches: the
run's memory is the larger of its estimate and the run's.

What a sampler asks of the network is read from its options by their conventional names:
``num_particles`` (default: the number of samples, rounded up to a multiple of ``num_runs``), ``num_chains`` per sample, ``inner_steps``
(network calls per chain and step, plus one to start the chains), a sampler's ``prior_pool(prior)`` (rdmc: the
draws of its warm start's pool and their network cost), ``batch_size`` or ``chunk_size`` (images per call),
``num_steps``, ``move_steps``, ``twisting: second_order`` and ``guidance: pilot`` with ``pilot_rounds``
(``_network_images``). A sampler class declares ``needs_network_gradient = False`` when it only calls the
network forward; without it, backpropagation is assumed.
"""

from __future__ import annotations

import math
import os
import time
import weakref
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from invdiff.posterior import Posterior, Sampler, UnsupportedProblem
from invdiff.prior import NetworkPrior, Prior
from invdiff.smc import particles_per_run, restart_steps

__all__ = ["ResourceError", "RunEstimate", "estimate_run", "available_memory", "check_run",
           "STATE_COPIES", "LONG_RUN_SECONDS"]

#: state-sized copies alive at the peak of a run (state, denoised estimate, gradient, proposal, noise,
#: resampled copies, float64 rotations, the images and moments written afterwards): measured 10 for
#: twisted_smc and 29 for ve_smc's closed-form proposal (README)
STATE_COPIES = 32
#: measured RSS growth over the bytes counted alive: the allocator keeps freed blocks (README: 0.98-1.32)
ALLOCATOR_MARGIN = 1.25
#: a run estimated to take longer than this gets a warning
LONG_RUN_SECONDS = 300.0
#: a fully convolutional network larger than this is probed at this size and its cost scaled by the pixels
PROBE_SIZE = 64
#: the probe's batch holds at most this many pixels (small images are timed in batches, as they run)
PROBE_PIXELS = 2 * PROBE_SIZE**2
#: the diffusion time of the probe (the cost of a network does not depend on it)
PROBE_TIME = 0.5


class ResourceError(ValueError):
    """A run that cannot fit in the memory available; the message names the estimate and what to lower."""


@dataclass(frozen=True)
class RunEstimate:
    """The peak memory of a run in bytes, in parts, and its time in seconds (None where not estimated)."""

    image_shape: tuple[int, ...]
    states: int                  # images the sampler holds at once
    state_bytes: int             # the state with its working copies
    images_per_call: int         # images whose activations are alive at once
    bytes_per_call: int          # activations of one network call that do not grow with the images
    bytes_per_image: int         # activations of one image in a network call
    needs_gradient: bool
    network_images: int          # images passed through the network over the run
    seconds: float | None

    @property
    def activation_bytes(self) -> int:
        """The network's activations for ``images_per_call`` images."""
        return self.bytes_per_call + self.bytes_per_image * self.images_per_call

    @property
    def total_bytes(self) -> int:
        return self.state_bytes + self.activation_bytes

    def describe(self) -> str:
        """``about 41.2 GB (16 images of 1x2048x2048 held by the sampler: ...)``: the estimate and its parts."""
        kind = "activations kept for backpropagation" if self.needs_gradient else "activations"
        return (f"about {_gigabytes(self.total_bytes)} ({self.states} images of {_shape(self.image_shape)} held "
                f"by the sampler: {_gigabytes(self.state_bytes)}; network calls on {self.images_per_call} images "
                f"at once: {_gigabytes(self.activation_bytes)} of {kind})")

    def warning(self) -> str | None:
        """One line when the run is estimated to take longer than ``LONG_RUN_SECONDS``, else None."""
        if self.seconds is None or self.seconds <= LONG_RUN_SECONDS:
            return None
        return (f"this run will take about {_duration(self.seconds)} on this machine ({self.network_images} network "
                f"evaluations on {_shape(self.image_shape)} images, timed on a small call); fewer samples or "
                f"steps, or a smaller image, shorten it")


def estimate_run(posterior: Posterior, sampler: Sampler, num_samples: int,
                 device: torch.device | str = "cpu") -> RunEstimate:
    """The peak memory and the time of ``sampler`` drawing ``num_samples`` from ``posterior`` (see the module)."""
    prior, measurement = posterior.prior, posterior.measurement
    states = _held_states(sampler, prior, num_samples)
    needs_gradient = sampler.needs_network_gradient
    images_per_call = _images_per_call(sampler, prior, states, needs_gradient)
    fixed_bytes, bytes_per_pixel, seconds_per_pixel = _probe_network(prior, needs_gradient, images_per_call,
                                                                      measurement.device)
    pixels = math.prod(prior.event_shape[1:])
    image_bytes = math.prod(prior.event_shape) * measurement.element_size()
    network_images = _network_images(sampler, posterior, num_samples)
    on_cpu = torch.device(device).type == "cpu"
    estimate = RunEstimate(
        image_shape=prior.event_shape, states=states, state_bytes=STATE_COPIES * states * image_bytes,
        images_per_call=images_per_call, bytes_per_call=round(ALLOCATOR_MARGIN * fixed_bytes),
        bytes_per_image=round(ALLOCATOR_MARGIN * bytes_per_pixel * pixels),
        needs_gradient=needs_gradient, network_images=network_images,
        seconds=seconds_per_pixel * pixels * network_images if on_cpu else None)
    pilot = sampler.build_pilot() if hasattr(sampler, "build_pilot") else None
    if pilot is not None:   # the pilot runs first, on its own states and batches: the run's peak is the larger one
        pilot_estimate = estimate_run(posterior, pilot, _option(sampler, "pilot_samples"), device)
        if pilot_estimate.total_bytes > estimate.total_bytes:
            estimate = replace(pilot_estimate, network_images=network_images, seconds=estimate.seconds)
    return estimate


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that a run may still allocate on ``device``: the free GPU memory, or the available RAM
    (``MemAvailable`` of ``/proc/meminfo``, within a cgroup's limit); None where unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    candidates = [value for value in (_meminfo_available(), _cgroup_available()) if value is not None]
    return min(candidates) if candidates else None


def check_run(posterior: Posterior, sampler: Sampler, num_samples: int, device: torch.device | str = "cpu",
              available: int | None = None) -> str | None:
    """Refuse a run that cannot fit (``ResourceError``, one line); return a warning when it will be long.

    ``available``: the bytes the run may use (default: ``available_memory(device)``).
    """
    estimate = estimate_run(posterior, sampler, num_samples, device)
    if available is None:
        available = available_memory(device)
    if available is not None and estimate.total_bytes > available:
        raise ResourceError(f"this run needs {estimate.describe()} but {_gigabytes(available)} are available; "
                            f"{_remedy(estimate, sampler, posterior.prior, available)}")
    return estimate.warning()


# --- what the sampler asks of the network ------------------------------------------------------------

def _option(sampler: Sampler, name: str):
    return getattr(getattr(sampler, "options", None), name, None)


def _chains(sampler: Sampler, num_samples: int) -> int:
    """The states the sampler moves: its particles (default: the samples) times its inner chains per state."""
    runs = _option(sampler, "num_runs") or 1
    particles = runs * particles_per_run(_option(sampler, "num_particles"), num_samples, runs)
    return particles * (_option(sampler, "num_chains") or 1)


def _pool(sampler: Sampler, prior: Prior) -> tuple[int, int]:
    """(images a sampler's pool of prior draws holds, network evaluations drawing them): its ``prior_pool(prior)``
    where it has one (rdmc's warm start), else none."""
    pool = getattr(sampler, "prior_pool", None)
    return pool(prior) if pool is not None else (0, 0)


def _held_states(sampler: Sampler, prior: Prior, num_samples: int) -> int:
    """Images held at once: the chains, or a pool of prior draws if larger."""
    return max(_chains(sampler, num_samples), _pool(sampler, prior)[0])


def _network_images(sampler: Sampler, posterior: Posterior, num_samples: int) -> int:
    """Images passed through the network over the run: chains x steps x calls per step, plus the pool's draws.

    Resample-move's ``move_steps`` are counted as if every step but the last (which never resamples) resampled
    (an upper bound), once more for a ``split_time`` with multinomial resampling and no restart (whose split can
    copy the particles again on a step that resampled: ``invdiff.smc.end_of_step``). ``twisting: second_order`` on
    a prior without a closed-form covariance adds one Jacobian-vector product per measured value to every call (an
    upper bound: only the observed ones are made);
    ``guidance: pilot`` adds the pilot sampler's ``pilot_count`` runs of ``pilot_samples`` (a sampler's
    ``build_pilot``) and ``pilot_rounds - 1`` runs of this sampler for ``pilot_samples`` samples; steps a sampler
    runs again are added (``restart_time``'s, ``invdiff.smc.restart_steps``)."""
    inner_steps = _option(sampler, "inner_steps")
    steps = max(sampler.num_steps, 1)
    if _option(sampler, "restart_time") is not None:
        steps += restart_steps(posterior.prior.sde.time_grid(sampler.num_steps), _option(sampler, "split_time"),
                               _option(sampler, "restart_time"))
    moves = _option(sampler, "move_steps") or 0
    move_rounds = steps - 1 + (_option(sampler, "split_time") is not None and _option(sampler, "restart_time") is None
                               and _option(sampler, "resampling") == "multinomial")
    calls_per_state = steps * (inner_steps + 1 if inner_steps else 1) + move_rounds * moves
    if (_option(sampler, "twisting") == "second_order"
            and type(posterior.prior).measured_covariance is Prior.measured_covariance):
        calls_per_state *= 1 + posterior.measurement[0].numel()
    pool = _pool(sampler, posterior.prior)[1]
    images = calls_per_state * _chains(sampler, num_samples) + pool
    pilot = sampler.build_pilot() if hasattr(sampler, "build_pilot") else None
    if pilot is not None:
        pilot_samples = _option(sampler, "pilot_samples")
        images += _option(sampler, "pilot_count") * _network_images(pilot, posterior, pilot_samples)
        images += (_option(sampler, "pilot_rounds") - 1) * (calls_per_state * _chains(sampler, pilot_samples) + pool)
    return images


def _images_per_call(sampler: Sampler, prior: Prior, states: int, needs_gradient: bool) -> int:
    """Images whose activations are alive at once: one gradient's (the sampler's chunk), or one forward's."""
    chunks = [states, _option(sampler, "batch_size") or states, _option(sampler, "chunk_size") or states]
    if not needs_gradient:
        chunks.append(getattr(prior, "batch_size", None) or states)
    return min(chunks)


# --- the probe: one small network call, measured ------------------------------------------------------

def _probe_prior(prior: Prior) -> Prior:
    """The prior itself, or the same fully convolutional network at ``PROBE_SIZE`` when the image is larger."""
    height, width = prior.event_shape[-2:] if len(prior.event_shape) == 3 else (0, 0)
    fully_convolutional = isinstance(prior, NetworkPrior) and prior.metadata.get("fully_convolutional")
    if fully_convolutional and height * width > PROBE_SIZE**2:
        return prior.resized((prior.event_shape[0], PROBE_SIZE, PROBE_SIZE))
    return prior


def _probe_network(prior: Prior, needs_gradient: bool, images_per_call: int,
                   device: torch.device) -> tuple[float, float, float]:
    """``(bytes per call, bytes per image pixel, seconds per image pixel)`` of the prior's denoiser,
    from calls on one image and on a batch like the run's (at most ``PROBE_PIXELS`` pixels in all).

    A run whose calls take one image at a time, on the prior's own image size, is measured by one call on one
    image (all its bytes counted per image): that is the run's call, and at 256x256 with a network of a hundred
    million parameters every probe call costs seconds."""
    probe = _probe_prior(prior)
    pixels = math.prod(probe.event_shape[1:])
    batch = max(2, min(images_per_call, PROBE_PIXELS // pixels))
    evaluations = prior.evaluations
    if images_per_call == 1 and probe is prior:
        try:
            bytes_one = _peak_bytes(prior, 1, needs_gradient, device)
            seconds_one = network_call_seconds(prior, 1, needs_gradient, device)
        except (RuntimeError, ValueError) as error:
            raise _unfit_network(probe, error) from None
        finally:
            prior.evaluations = evaluations
        return 0.0, bytes_one / pixels, seconds_one / pixels
    try:
        bytes_one, bytes_batch = (_peak_bytes(probe, size, needs_gradient, device) for size in (1, batch))
        seconds_batch = network_call_seconds(probe, batch, needs_gradient, device)  # after the calls above: warmed up
    except (RuntimeError, ValueError) as error:
        raise _unfit_network(probe, error) from None
    finally:
        prior.evaluations = evaluations
    per_image = max(bytes_batch - bytes_one, 0) / (batch - 1)
    return max(bytes_one - per_image, 0), per_image / pixels, seconds_batch / (batch * pixels)


def _unfit_network(prior: Prior, error: Exception) -> Exception:
    """The probe's first network call failed: the network does not take images of the prior's event shape (an
    ``image_size`` a loaded checkpoint's architecture cannot pad or pool, say), a one-line ``UnsupportedProblem``
    naming it; running out of memory is not that, and is raised as it was."""
    if isinstance(error, torch.OutOfMemoryError):
        return error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UnsupportedProblem(f"the prior's network fails on images of shape {tuple(prior.event_shape)} "
                              f"({type(error).__name__}: {message}); use an image size its architecture takes")


def _probe_input(prior: Prior, batch: int, device: torch.device) -> Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn((batch, *prior.event_shape), generator=generator).to(device)


def _peak_bytes(prior: Prior, batch: int, needs_gradient: bool, device: torch.device) -> int:
    """The bytes kept for the backward pass of one denoiser call on ``batch`` images (when
    ``needs_gradient``), or the bytes alive at the peak of its forward pass."""
    x = _probe_input(prior, batch, device)
    if needs_gradient:
        saved = _SavedBytes()
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
            x.requires_grad_(True)
            denoised = prior.denoise(x, PROBE_TIME)
        torch.autograd.grad(denoised.sum(), x)
        return saved.bytes
    with torch.no_grad(), _LiveBytes() as live:
        prior.denoise(x, PROBE_TIME)
    return live.peak


def network_call_seconds(prior: Prior, batch: int, needs_gradient: bool, device: torch.device) -> float:
    """The wall time of one denoiser call on ``batch`` images (with its backward pass when
    ``needs_gradient``), without the byte counting, whose per-operation hooks would dominate it."""
    x = _probe_input(prior, batch, device)
    start = time.perf_counter()
    with torch.enable_grad() if needs_gradient else torch.no_grad():
        x.requires_grad_(needs_gradient)
        denoised = prior.denoise(x, PROBE_TIME)
        if needs_gradient:
            torch.autograd.grad(denoised.sum(), x)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def _storage_key(tensor: Tensor) -> tuple[int, int]:
    storage = tensor.untyped_storage()
    return storage.data_ptr(), storage.nbytes()


class _SavedBytes:
    """Saved-tensor hooks that add up the bytes of the distinct storages kept for the backward pass."""

    def __init__(self):
        self.storages: set[tuple[int, int]] = set()
        self.bytes = 0

    def pack(self, tensor: Tensor) -> Tensor:
        key = _storage_key(tensor)
        if key not in self.storages:
            self.storages.add(key)
            self.bytes += key[1]
        return tensor

    @staticmethod
    def unpack(tensor: Tensor) -> Tensor:
        return tensor


class _LiveBytes(TorchDispatchMode):
    """Follows every storage that an operation creates until its tensor is freed; ``peak`` is the most
    bytes alive at once (inputs and weights that existed before are not counted)."""

    def __init__(self):
        super().__init__()
        self.alive: set[int] = set()
        self.bytes = 0
        self.peak = 0

    def _free(self, pointer: int, size: int) -> None:
        self.alive.discard(pointer)
        self.bytes -= size

    def __torch_dispatch__(self, function, types, arguments=(), keyword_arguments=None):
        output = function(*arguments, **(keyword_arguments or {}))
        for tensor in tree_leaves(output):
            if isinstance(tensor, Tensor):
                pointer, size = _storage_key(tensor)
                if pointer not in self.alive:   # a new storage, not a view or an in-place result
                    self.alive.add(pointer)
                    self.bytes += size
                    self.peak = max(self.peak, self.bytes)
                    weakref.finalize(tensor, self._free, pointer, size)
        return output


# --- memory of the machine ---------------------------------------------------------------------------

def _meminfo_available() -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes, or the free physical pages where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def _cgroup_available() -> int | None:
    """What a cgroup v2 memory limit leaves (a container's limit), or None without one."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(int(limit) - used, 0)


# --- words -------------------------------------------------------------------------------------------

def _remedy(estimate: RunEstimate, sampler: Sampler, prior: Prior, available: int) -> str:
    """What to lower: the images the sampler holds, the images per network call, or the image itself."""
    if estimate.state_bytes >= available:
        pool = " or the pool's pool_size" if _pool(sampler, prior)[0] >= estimate.states else ""
        return f"lower --num-samples (or --num-particles, num_chains{pool})"
    fitting = (available - estimate.state_bytes - estimate.bytes_per_call) // max(estimate.bytes_per_image, 1)
    if fitting < 1:
        return "one image's network call alone does not fit: use a smaller image"
    if estimate.needs_gradient and hasattr(getattr(sampler, "options", None), "batch_size"):
        return f"lower the sampler's batch_size to at most {fitting} (-o batch_size={fitting}), or use a smaller image"
    if not estimate.needs_gradient and isinstance(prior, NetworkPrior):
        return f"lower batch_size (prior option) to at most {fitting}, or use a smaller image"
    return f"lower --num-samples (or --num-particles) to at most {fitting}, or use a smaller image"


def _gigabytes(size: float) -> str:
    if size >= 1e12:
        return f"{size / 1e12:.1f} TB"
    return f"{size / 1e9:.1f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
