"""How far the discretised reverse process's posterior is from the exact one: the bias a particle sampler keeps
however many particles it has, by the reverse step's variance and the time grid.

Under a Gaussian prior every reverse step is affine plus Gaussian noise, so the discretised model's posterior is
closed form (``invdiff.testing.discretised_model_posterior``), and its posterior variance along each of the exact
posterior's principal directions can be set against the exact variance (the ratio ``c^2``: 1 is exact). Two beds:

* ``linear-gaussian``: ``invdiff check``'s linear-Gaussian bed (d = 4, d_y = 2, ``invdiff.testing.linear_gaussian``);
  the ratio at 100 steps, against the covariance z-score limit of 5 at the effective draws of twisted_smc's check run
  (1274): a ratio ``r`` is worth a z-score of about ``|r - 1| sqrt(n / 2)``;
* ``gmm-fit-box``: d = 256, the Gaussian with ``natural_gmm``'s mean and covariance (the patch GMM's moments), box
  inpainting as in ``natural-gmm-box`` (its mask, crop and ``sigma_y``): the mean ``c^2`` over the 16 narrowest
  principal directions, over all 256, and its smallest.

Reverse steps (``kernel_variance`` of ``discretised_model_posterior``): ``ddpm``, the samplers'
(``SDE.reverse_kernel``, which leaves out the spread of ``x_0`` given ``x_t``); ``analytic``, Analytic-DPM's
isotropic correction (Bao et al., ICLR 2022); ``exact``, the Gaussian's exact transition. Grids: the samplers'
uniform grid ``t_i = T (1 - i / N)`` (``SDE.time_grid``) and ``T (1 - i / N)^p`` for ``p`` = 2, 3, finer near 0.
``--samplers`` also runs twisted_smc and ve_smc on ``tests/test_image_dimension.py``'s problem (``natural_gmm``,
2 observed pixels, sigma_y 0.1; 10 runs of 32 particles, 300 steps, the test's setting) on the uniform and the
quadratic grid, and prints the runs' weighted ``c^2`` pooled over the exact posterior's 256 principal directions and
its 16 narrowest, mean +- standard error: what the samplers themselves do with the model's deficit.
``--unet-proxy`` measures four UNet cases with their prior replaced by the Gaussian of its training data
(``unet_fit_coverage``); ``--natural-gmm`` runs ve_smc's problem-file configuration on the four natural-gmm cases on
the uniform and the quadratic grid (``shipped_case_row``). Run from the repository root (about a minute on one
thread; ``--samplers`` adds about six, ``--unet-proxy`` about two, ``--natural-gmm`` about eight):

    python benchmarks/discretisation_bias.py [--steps 100 200 400] [--out benchmarks/results/discretisation_bias.md]
        [--samplers] [--unet-proxy] [--natural-gmm]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import Tensor

from invdiff.checkpoints import natural_gaussian_mixture
from invdiff.evaluation import posterior_moments, run_summary
from invdiff.exact import ExactPosterior
from invdiff.noise import GaussianNoise
from invdiff.operators import inpainting
from invdiff.plugins import load_registry
from invdiff.posterior import Posterior, sample_posterior
from invdiff.prior import GaussianPrior
from invdiff.problems import build_sampler, load_problem
from invdiff.sde import VPSDE
from invdiff.testing import discretised_model_posterior, linear_gaussian

CHECK_EFFECTIVE_DRAWS = 1274
KERNELS = ("ddpm", "analytic", "exact")
GRID_POWERS = (1, 2, 3)


class PowerGridVPSDE(VPSDE):
    """The VP SDE with the grid ``t_i = t_min + (T - t_min) (1 - i / N)^power`` and a last step to 0 (power 1 and
    ``t_min`` 0: ``SDE.time_grid``; ``t_min``: the smallest time a network was trained at)."""

    def __init__(self, sde: VPSDE, power: float, t_min: float = 0.0):
        super().__init__(sde.beta_min, sde.beta_max, sde.T)
        self.power, self.t_min = power, t_min

    def time_grid(self, num_steps):
        fractions = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64) ** self.power
        grid = self.t_min + (self.T - self.t_min) * fractions
        grid[-1] = 0.0
        return grid


def unet_fit_coverage(case: str, problem_file: str, num_steps: int = 200) -> list[str]:
    """``--unet-proxy``: the UNet case's prior replaced by the Gaussian of its training data's moments (the
    shipped ``natural`` prior's ``data_mean`` / ``data_covariance``, d = 1024), its discretised model's per-pixel
    posterior variance against the exact one's, and the coverage_90 of infinitely many draws were the marginals
    Gaussian: what the grid alone does to a calibrated sampler's coverage on that case (the UNet was trained down to
    t = 0.001, so the finer grid stops there)."""
    posterior = load_problem(problem_file, case).posterior
    prior = posterior.prior
    rows = []
    exact_variances = None
    for label, sde in (("uniform", VPSDE()), ("quadratic from t = 0.001", PowerGridVPSDE(VPSDE(), 2, 0.001))):
        fit = GaussianPrior(prior.data_mean(), prior.data_covariance(), sde, prior.event_shape)
        fitted = Posterior(fit, posterior.operator, posterior.measurement.to(torch.float64))
        if exact_variances is None:
            exact_variances = torch.diagonal(ExactPosterior.from_posterior(fitted).covariance)
        ratios = torch.diagonal(discretised_model_posterior(fitted, num_steps).covariance) / exact_variances
        coverage = float(torch.erf(1.6448536 * ratios.sqrt() / 2**0.5).mean())
        rows.append(f"| {case} | {label} | {float(ratios.mean()):.3f} ({float(ratios.min()):.3f}) | {coverage:.3f} |")
    return rows


def beds() -> dict[str, Posterior]:
    """The two Gaussian-prior posteriors (module docstring)."""
    check_bed, _ = linear_gaussian()
    box = load_problem("problems/inpaint.yaml", "natural-gmm-box").posterior
    mixture = box.prior
    fit = GaussianPrior(mixture.data_mean(), mixture.data_covariance(), mixture.sde, mixture.event_shape)
    return {"linear-gaussian": check_bed, "gmm-fit-box": Posterior(fit, box.operator, box.measurement)}


def with_grid(posterior: Posterior, power: float) -> Posterior:
    """The same posterior, its prior's SDE stepped on the power grid."""
    prior = posterior.prior
    gridded = GaussianPrior(prior.means[0], prior.covariances[0], PowerGridVPSDE(prior.sde, power), prior.event_shape)
    return Posterior(gridded, posterior.operator, posterior.measurement)


def variance_ratios(posterior: Posterior, exact: ExactPosterior, num_steps: int, kernel: str) -> Tensor:
    """``c^2`` along the exact posterior's principal directions, narrowest first."""
    variances, directions = torch.linalg.eigh(exact.covariance)
    model = discretised_model_posterior(posterior, num_steps, kernel)
    return torch.diagonal(directions.T @ model.covariance @ directions) / variances


def sampler_ratios(name: str, power: float, num_runs: int = 10, num_particles: int = 32,
                   num_steps: int = 300) -> str:
    """``--samplers``: the runs' weighted ``c^2`` pooled over all principal directions and the 16 narrowest."""
    prior = natural_gaussian_mixture(PowerGridVPSDE(VPSDE(), power))
    mask = torch.zeros(prior.event_shape)
    mask[0, 5, [3, 14]] = 1.0
    operator = inpainting(prior.event_shape, GaussianNoise(0.1), mask=mask, dtype=torch.float64)
    truth = prior.sample_clean(1, generator=torch.Generator().manual_seed(1))
    posterior = Posterior(prior, operator, operator.measure(truth, torch.Generator().manual_seed(2)))
    exact = ExactPosterior.from_posterior(posterior)
    variances, directions = torch.linalg.eigh(exact.covariance)
    sampler_class = load_registry().get(name).sampler_class
    pooled = []
    for seed in range(num_runs):
        result = sample_posterior(sampler_class(num_steps=num_steps, num_particles=num_particles), posterior,
                                  num_particles, generator=torch.Generator().manual_seed(seed))
        weights = torch.softmax(result.log_weights.to(torch.float64), 0)
        centred = result.particles.reshape(num_particles, -1).to(torch.float64) - exact.mean.flatten()
        squares = (centred @ directions / variances.sqrt()) ** 2
        pooled.append(torch.stack([weights @ squares.mean(1), weights @ squares[:, :16].mean(1)]))
    pooled = torch.stack(pooled)
    means, errors = pooled.mean(0), pooled.std(0) / num_runs**0.5
    return (f"| {name} | {power:g} | {float(means[0]):.2f} +- {float(errors[0]):.2f} | "
            f"{float(means[1]):.2f} +- {float(errors[1]):.2f} |")


def shipped_case_row(case: str, problem_file: str, power: float, sampler_name: str = "ve_smc") -> str:
    """``--natural-gmm``: the problem file's configuration of ``sampler_name`` on a natural-gmm case (64 samples,
    seed 0) with the prior's SDE stepped on the power grid, against the exact posterior as ``invdiff solve`` reports
    it (power 1 is ``invdiff solve problems/... --case CASE --sampler ve_smc --num-samples 64``)."""
    problem = load_problem(problem_file, case)
    problem.posterior.prior.sde = PowerGridVPSDE(problem.posterior.prior.sde, power)
    info = load_registry().get(sampler_name)
    sampler = build_sampler(info.sampler_class, problem.config.sampler_options.get(sampler_name, {}))
    result = sample_posterior(sampler, problem.posterior, 64, generator=torch.Generator().manual_seed(0))
    images, mean, _ = posterior_moments(problem, result)
    summary = run_summary(problem, info, sampler, result, seed=0, device="cpu", num_samples=64, images=images,
                          mean=mean)
    exact, metrics = summary["exact_posterior"], summary["metrics"]
    ratio = exact["sliced_wasserstein_to_exact"] / exact["sliced_wasserstein_noise_floor"]
    return (f"| {case} | {sampler_name} | {power:g} | {ratio:.2f} | {metrics['psnr_posterior_mean']:.2f} "
            f"({exact['psnr_exact_mean']:.2f}) | {metrics['coverage_90']:.3f} ({exact['coverage_90_exact']:.3f}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--out", type=Path, default=None, help="also write the tables to this markdown file")
    parser.add_argument("--samplers", action="store_true", help="also run twisted_smc and ve_smc (docstring)")
    parser.add_argument("--unet-proxy", action="store_true", help="also the UNet cases' Gaussian-fit proxy (docstring)")
    parser.add_argument("--natural-gmm", action="store_true",
                        help="also ve_smc's file configuration on the four natural-gmm cases on both grids (docstring)")
    arguments = parser.parse_args()
    lines = ["# Discretisation bias of the reverse process (`python benchmarks/discretisation_bias.py`)", ""]
    for name, posterior in beds().items():
        exact = ExactPosterior.from_posterior(posterior)
        if name == "linear-gaussian":
            lines += [f"## {name}: c^2 smallest-largest of 4 (z-score at {CHECK_EFFECTIVE_DRAWS} effective draws)", "",
                      "| steps | grid power | " + " | ".join(KERNELS) + " |", "|---|---|" + "---|" * len(KERNELS)]
        else:
            lines += [f"## {name}: mean c^2 of the 16 narrowest / all 256 directions, smallest", "",
                      "| steps | grid power | " + " | ".join(KERNELS) + " |", "|---|---|" + "---|" * len(KERNELS)]
        for num_steps in arguments.steps:
            for power in GRID_POWERS:
                cells = []
                for kernel in KERNELS:
                    ratios = variance_ratios(with_grid(posterior, power), exact, num_steps, kernel)
                    if name == "linear-gaussian":
                        worst = float((ratios - 1).abs().max())
                        z = worst * (CHECK_EFFECTIVE_DRAWS / 2) ** 0.5
                        cells.append(f"{float(ratios.min()):.3f}-{float(ratios.max()):.3f} (z {z:.1f})")
                    else:
                        cells.append(f"{float(ratios[:16].mean()):.2f} / {float(ratios.mean()):.2f}, "
                                     f"{float(ratios.min()):.2f}")
                lines.append(f"| {num_steps} | {power} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
        lines.append("")
    if arguments.unet_proxy:
        lines += ["## UNet cases, their prior replaced by its data's Gaussian fit (d = 1024), 200 steps", "",
                  "| case | grid | pixel variance / exact: mean (smallest) | coverage_90 of the model, Gaussian "
                  "marginals (exact: 0.900) |", "|---|---|---|---|"]
        for case, problem_file in (("natural-x4", "problems/superres.yaml"), ("natural-x2", "problems/superres.yaml"),
                                   ("natural-gaussian", "problems/deblur.yaml"),
                                   ("natural-box", "problems/inpaint.yaml")):
            for row in unet_fit_coverage(case, problem_file):
                lines.append(row)
                print(row, flush=True)
        lines.append("")
    if arguments.natural_gmm:
        lines += ["## ve_smc, the problem files' configuration, on the natural-gmm cases (64 samples, seed 0)", "",
                  "| case | sampler | grid power | SW / floor | PSNR mean (exact) | coverage_90 (exact) |",
                  "|---|---|---|---|---|---|"]
        for case, problem_file in (("natural-gmm-gaussian", "problems/deblur.yaml"),
                                   ("natural-gmm-x2", "problems/superres.yaml"),
                                   ("natural-gmm-random", "problems/inpaint.yaml"),
                                   ("natural-gmm-box", "problems/inpaint.yaml")):
            for power in (1, 2):
                lines.append(shipped_case_row(case, problem_file, power))
                print(lines[-1], flush=True)
        lines.append("")
    if arguments.samplers:
        lines += ["## twisted_smc and ve_smc at d = 256 (tests/test_image_dimension.py's problem, 10 runs of 32, 300 "
                  "steps): c^2 pooled", "", "| sampler | grid power | all 256 principal directions | 16 narrowest |",
                  "|---|---|---|---|"]
        for name in ("twisted_smc", "ve_smc"):
            for power in (1, 2):
                lines.append(sampler_ratios(name, power))
                print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if arguments.out:
        arguments.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
