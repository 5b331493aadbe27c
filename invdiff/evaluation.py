"""What a run is worth, and what it leaves on disk: moments, metrics, the summary, samples.npz, the figure.

Shared by ``invdiff solve`` and anything else that evaluates a sampler's output on a problem, so
that every number is computed by one function under one convention: images in [0, 1], the
posterior mean and per-pixel standard deviation from the weighted particles when a sampler has
them, PSNR/SSIM of the mean (``invdiff.metrics``), coverage of the 90% per-pixel intervals and,
when the posterior is tractable, the sliced Wasserstein distance to exact draws next to its floor and
the exact posterior's own PSNR/SSIM and coverage (the ceiling), and under a mixture prior each
component's share of the samples against its exact posterior weight (``component_masses``). A run
whose samples collapsed onto a few paths gets a warning (``degeneracy_warning``), recorded in the summary.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from invdiff.exact import ExactPosterior, NotTractable
from invdiff.metrics import (SSIM_CONVENTION, calibrated_coverage, coverage, distinct_samples, psnr,
                             sliced_wasserstein, ssim)
from invdiff.plugins import SamplerInfo
from invdiff.posterior import SampleResult
from invdiff.prior import GaussianMixturePrior
from invdiff.problems import Problem

__all__ = ["run_images", "posterior_moments", "count_distinct_samples", "degeneracy_warning", "component_masses",
           "run_summary", "show_image", "write_run"]

#: warn when fewer than this fraction of the returned samples are distinct
DISTINCT_FRACTION_WARNING = 0.25
#: warn when the final ESS of a particle sampler (before the draw of the samples) is below this fraction of K
FINAL_ESS_FRACTION_WARNING = 0.05

REPORTED_PACKAGES = ("invdiff", "torch", "numpy", "deepinv", "scikit-image", "scikit-learn", "pluggy", "pydantic")


def run_images(problem: Problem, x: torch.Tensor) -> torch.Tensor:
    """Prior-space tensors as [0, 1] images on the CPU."""
    return problem.posterior.operator.to_image(x).detach().cpu()


def _weighted_moments(images: torch.Tensor, log_weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if log_weights is None:
        weights = torch.full((len(images),), 1.0 / len(images), dtype=torch.float64)
    else:
        weights = torch.softmax(log_weights.to(torch.float64).cpu(), 0)
    images = images.to(torch.float64)
    shape = (-1,) + (1,) * (images.dim() - 1)
    mean = (weights.reshape(shape) * images).sum(0)
    variance = (weights.reshape(shape) * (images - mean) ** 2).sum(0)
    return mean, variance.sqrt()


def _versions(info: SamplerInfo) -> dict[str, str]:
    versions = {"python": platform.python_version(), "platform": platform.platform()}
    for package in REPORTED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    versions["invdiff source"] = _source_revision()
    versions[f"sampler package {info.package or '?'}"] = info.version or "?"
    return versions


@lru_cache(maxsize=None)
def _device_name(device: str) -> str:
    """The GPU's or the CPU's model (timings and float sums depend on it), "unknown" where the system does not say."""
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@lru_cache(maxsize=1)
def _source_revision() -> str:
    """The git commit of invdiff's source where it runs from its own git checkout (an editable install), with a
    note of uncommitted changes to its code (``invdiff``, ``plugins``): the version string stays the same over many
    commits. An installed copy (site-packages, perhaps inside a user's own repository) is "not a git checkout"."""
    source = Path(__file__).resolve().parents[1]
    environment = {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}
    environment["GIT_OPTIONAL_LOCKS"] = "0"   # git status must not take the index lock from a user's git

    def git(*arguments: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(source), *arguments], capture_output=True, text=True,
                                  timeout=10, env=environment)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None or Path(top).resolve() != source:
        return "not a git checkout"
    commit, changes = git("rev-parse", "HEAD"), git("status", "--porcelain", "--untracked-files=no", "--",
                                                    "invdiff", "plugins")
    if commit is None or changes is None:
        return "not a git checkout"
    return commit + (" with uncommitted changes" if changes else "")


def posterior_moments(problem: Problem, result: SampleResult) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The samples as [0, 1] images, and the posterior mean and per-pixel std (weighted particles when given)."""
    images = run_images(problem, result.samples)
    if result.particles is not None:   # moments from the weighted particles, not from the resampled draws
        mean, std = _weighted_moments(run_images(problem, result.particles), result.log_weights)
    else:
        mean, std = _weighted_moments(images, None)
    return images, mean, std


def count_distinct_samples(result: SampleResult) -> int:
    """Distinct returned samples: from the genealogy of a particle sampler, else by comparing the samples."""
    return result.distinct_samples if result.distinct_samples is not None else distinct_samples(result.samples)


def degeneracy_warning(result: SampleResult) -> str | None:
    """One line when the samples collapsed (fewer than a quarter distinct, or a particle sampler's final
    ESS below 5% of K): what it means and what to try; None for a healthy run."""
    num_samples = len(result.samples)
    distinct = count_distinct_samples(result)
    reasons = []
    if distinct < DISTINCT_FRACTION_WARNING * num_samples:
        reasons.append(f"only {distinct} of the {num_samples} samples are distinct")
    if result.particles is not None and result.ess_history:
        num_particles, final_ess = len(result.particles), result.ess_history[-1]
        if final_ess < FINAL_ESS_FRACTION_WARNING * num_particles:
            reasons.append(f"the final ESS is {final_ess:.1f} of {num_particles} particles")
    if not reasons:
        return None
    advice = ("try independent runs (-o num_runs=N: samples from N runs share no path), resample-move "
              "(-o move_steps=3) or more particles (--num-particles)" if result.particles is not None
              else "try more samples or other sampler options")
    return (f"{' and '.join(reasons)}: the 'posterior' is close to a point estimate, so its std, coverage and "
            f"sample spread mean little; {advice}")


def _diagnostics(result: SampleResult) -> list[dict]:
    """The per-step diagnostics, with each step's ``distinct_ancestors`` for particle samplers."""
    if result.distinct_ancestors is None or len(result.distinct_ancestors) != len(result.diagnostics):
        return result.diagnostics
    return [{**record, "distinct_ancestors": count}
            for record, count in zip(result.diagnostics, result.distinct_ancestors)]


def _metrics(problem: Problem, result: SampleResult, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """``distinct_samples``, and when the truth is known PSNR/SSIM of the mean, single samples' PSNR, coverage."""
    metrics = {"distinct_samples": count_distinct_samples(result)}
    if problem.truth is None:
        return metrics
    truth = problem.truth[0].cpu()
    sample_psnrs = [psnr(image, truth) for image in images]
    return {
        "psnr_posterior_mean": psnr(mean, truth),
        "ssim_posterior_mean": ssim(mean, truth),
        "psnr_samples_average": float(np.mean(sample_psnrs)),
        "coverage_90": coverage(images, truth, 0.9),
        **({"coverage_90_calibrated": calibrated_coverage(len(images), 0.9)} if len(images) >= 2 else {}),
        **metrics,
        "ssim_convention": SSIM_CONVENTION,
    }


def _exact_block(problem: Problem, result: SampleResult, exact: ExactPosterior, *, seed: int, num_samples: int) -> dict:
    """Distance of the samples to exact draws next to its floor, the exact evidence, and (truth known) the
    exact posterior's own PSNR/SSIM of the mean and coverage from as many exact draws: the ceiling."""
    draws = torch.Generator().manual_seed(seed)
    reference, second = exact.sample(num_samples, generator=draws), exact.sample(num_samples, generator=draws)
    block = {
        "sliced_wasserstein_to_exact": sliced_wasserstein(result.samples, reference),
        "sliced_wasserstein_noise_floor": sliced_wasserstein(second, reference),
        "log_evidence": exact.log_evidence,
    }
    if problem.truth is not None:
        truth, exact_mean = problem.truth[0].cpu(), run_images(problem, exact.mean)
        reference_images = run_images(problem, reference)
        draws_mean = reference_images.mean(0)
        block.update({"psnr_exact_mean": psnr(exact_mean, truth), "ssim_exact_mean": ssim(exact_mean, truth),
                      "psnr_exact_draws_mean": psnr(draws_mean, truth),
                      "ssim_exact_draws_mean": ssim(draws_mean, truth),
                      "coverage_90_exact": coverage(reference_images, truth, 0.9)})
    prior = problem.posterior.prior
    if isinstance(prior, GaussianMixturePrior) and len(prior.log_weights) > 1:
        block.update(component_masses(prior, exact, result.samples, reference))
    block["note"] = ("distances in the prior's native space, at this number of samples; the floor is exact vs "
                     "exact; psnr/ssim_exact_mean are the exact posterior mean's (infinitely many draws), "
                     "psnr/ssim_exact_draws_mean and coverage_90_exact those of as many exact draws as samples (the "
                     "reference of the floor): what an exact sampler scores at this number of samples; under a "
                     "mixture prior "
                     "component_weights_samples/_exact are each component's share of the samples (mean "
                     "responsibility) and its exact posterior weight, component_tv their total variation, with the "
                     "same for as many exact draws as its floor")
    return block


def component_masses(prior: GaussianMixturePrior, exact: ExactPosterior, samples: torch.Tensor,
                     reference: torch.Tensor) -> dict:
    """Where a mixture posterior's mass went: each component's weight in the exact posterior, ``P(k | y)``, next to
    the samples' mean responsibility ``(1/N) sum_n P(k | x_n)`` (``P(k | x, y) = P(k | x)``: ``y`` depends on the
    component only through ``x``, so over exact draws this mean is an unbiased estimate of ``P(k | y)``), and the
    total variation between the two, next to its floor: the same for ``reference``, as many exact draws.

    A sampler whose samples sit in the wrong component (a broad one that wins along the annealing path) can still
    score the mean's PSNR and coverage; this says so. Components listed: those holding at least 1% of either."""
    exact_weights = exact.log_weights.exp().cpu()

    def mean_responsibilities(draws: torch.Tensor) -> torch.Tensor:
        return prior.responsibilities(draws.to(prior.means.device)).mean(0).cpu()

    sample_weights = mean_responsibilities(samples)
    listed = torch.nonzero((exact_weights >= 0.01) | (sample_weights >= 0.01))[:, 0].tolist()
    return {"component_weights_exact": {str(k): float(exact_weights[k]) for k in listed},
            "component_weights_samples": {str(k): float(sample_weights[k]) for k in listed},
            "component_tv_to_exact": float(0.5 * (sample_weights - exact_weights).abs().sum()),
            "component_tv_noise_floor": float(0.5 * (mean_responsibilities(reference) - exact_weights).abs().sum())}


def run_summary(problem: Problem, info: SamplerInfo, sampler, result: SampleResult, *, seed: int, device: str,
                num_samples: int, images: torch.Tensor, mean: torch.Tensor) -> dict:
    """The summary.json document of a run: settings, versions, cost, diagnostics, metrics, warnings, exact block."""
    operator = problem.posterior.operator
    warning = degeneracy_warning(result)
    summary = {
        "problem": problem.config.model_dump(mode="json"),
        "problem_file": str(problem.path),
        "problem_file_resolved": str(Path(problem.path).resolve()),
        "working_directory": os.getcwd(),
        "prior": problem.posterior.prior.settings(),
        "operator": operator.settings(),
        "sampler": {"name": info.name, "package": info.package, "version": info.version,
                    "options": sampler.options.model_dump(mode="json")},
        "num_samples": num_samples,
        "seed": seed,
        "device": device,
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "network_evaluations": result.network_evaluations,
        "network_evaluations_per_sample": result.network_evaluations_per_sample,
        "network_evaluations_per_particle": result.network_evaluations_per_particle,
        "wall_time_seconds": result.wall_time,
        "log_evidence": result.log_evidence,
        "versions": _versions(info),
        "ess_trace": result.ess_history or None,
        "diagnostics": _diagnostics(result),
        "extras": _json_scalars(result.extras),
        "image_range": [0.0, 1.0],
        "notes": problem.notes,
        "warnings": [warning] if warning is not None else [],
        "metrics": _metrics(problem, result, images, mean),
    }
    try:
        exact = ExactPosterior.from_posterior(problem.posterior)
    except NotTractable:
        return summary
    summary["exact_posterior"] = _exact_block(problem, result, exact, seed=seed, num_samples=num_samples)
    return summary


def _json_scalars(extras: dict) -> dict:
    """The numbers, strings and flags among a sampler's extras (tensors stay in samples.npz)."""
    return {key: value for key, value in (extras or {}).items() if isinstance(value, (int, float, str, bool))}


def show_image(axis, image, *, std: bool = False):
    """Draw a ``(C, H, W)`` image in [0, 1] on a matplotlib axis, clipped to [0, 1]: one channel in gray, three
    in colour (RGB). A per-pixel std map (``std``) is drawn in the ``magma`` colormap on its own scale; a
    colour one shows the mean of its channels' stds. Returns the ``AxesImage`` (for a colorbar)."""
    array = np.asarray(image, dtype=np.float64)
    if std:
        return axis.imshow(array.mean(0), cmap="magma", interpolation="nearest")
    if array.shape[0] == 1:
        return axis.imshow(np.clip(array[0], 0, 1), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    return axis.imshow(np.clip(np.moveaxis(array, 0, -1), 0, 1), interpolation="nearest")


def _figure(path: Path, problem: Problem, images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measurement = problem.posterior.measurement[0].detach().cpu()
    std_title = "posterior std" if std.shape[0] == 1 else "posterior std\n(mean over R, G, B)"
    panels = []
    if problem.truth is not None:
        panels.append(("truth", problem.truth[0].cpu(), False))
    if measurement.dim() == 3:
        panels.append(("measurement y", measurement, False))
    panels += [("posterior mean", mean, False), (std_title, std, True)]
    panels += [(f"sample {index + 1}", image, False) for index, image in enumerate(images[:4])]
    figure, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.6))
    for axis, (title, image, is_std) in zip(axes, panels):
        shown = show_image(axis, image, std=is_std)
        if is_std:
            figure.colorbar(shown, ax=axis, fraction=0.046, pad=0.04)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle(f"{problem.config.name}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_run(folder: Path, problem: Problem, result: SampleResult, summary: dict,
              images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write samples.npz, summary.json and figure.png into ``folder`` (a run's staging folder)."""
    arrays = {"samples": images.numpy(), "posterior_mean": mean.numpy(), "posterior_std": std.numpy(),
              "measurement": problem.posterior.measurement.detach().cpu().numpy()}
    if problem.truth is not None:
        arrays["truth"] = problem.truth.cpu().numpy()
    if result.particles is not None:
        arrays["particles"] = run_images(problem, result.particles).numpy()
        arrays["log_weights"] = result.log_weights.detach().cpu().numpy()
    np.savez_compressed(folder / "samples.npz", **arrays)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _figure(folder / "figure.png", problem, images, mean, std)
