"""The posteriors along the samplers' annealing path on the exact patch-GMM cases: how little mass they give
the exact posterior's components on the way, and so how many particles a sampler following that path needs.

A sampler that anneals towards ``p(x | y)`` (twisted_smc, ve_smc and DPS through time, plug-and-play and
tempering samplers through a noise level) passes through likelihoods with inflated noise. At level ``rho``
(prior units) the target is

    p_rho(x | y) ∝ p(x) N(y; A x + b, sigma_y^2 I + rho^2 A A^T),

the posterior given the measurement of ``x + rho * noise``: TDS's twist at time ``t`` has this form with
``x0_hat`` for ``x`` and ``rho = r_t = sigma_t / lambda_t`` (ALGORITHMS.md section 5). For a Gaussian-mixture
prior it is again a mixture (``ExactPosterior.from_posterior(posterior, noise_level=rho)``), whose component
``k`` has weight ``∝ w_k N(y; A mu_k + b, A Sigma_k A^T + sigma_y^2 I + rho^2 A A^T)``. Where the components
that hold the exact posterior (weight above 1% at ``rho = 0``) hold a mass ``m`` at some level, a population
of ``K`` particles that follows the path keeps about ``K m`` particles in them there, and none once
``K m << 1``: resampling removes them, and no move that leaves a high-dimensional component reaches them
again before the weights turn. ``1 / min m`` is the order of particles needed.

``--prior-draws SEED ...`` repeats the path (not the samplers) with exact draws of the prior as truths instead
of the photograph crops (the truths of ``calibration_gmm64.yaml``, seeds 1-6), whose measured distances to the
exact posteriors it can be set against. ``--samplers`` also runs configurations of ``image_dimension_table.py``
(64 samples, seed 0) and counts, for exact draws and each sampler's samples, the prior component that explains
each sample best (largest prior responsibility at ``t = 0``): where the samples ended up. Run from the
repository root (about a minute on one thread; the five samplers of the README's command add about 17):

    python benchmarks/path_bottleneck.py [--cases natural-gmm-box ...] [--out benchmarks/results/path_bottleneck.md]
        [--samplers exact dps "twisted_smc 64 runs x 4, moves"] [--prior-draws 1 2 3 4 5 6]
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from image_dimension_table import EXACT_CASES, MIXTURE_CONFIGS, component_counts, landing
from invdiff.exact import ExactPosterior
from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.problems import PriorTruthConfig, build_problem, build_sampler, load_problem, load_problem_config

ROOT = Path(__file__).resolve().parent.parent
#: noise levels rho (prior units; the prior's values span [-1, 1]); the first, 0, is the exact posterior
LEVELS = (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0, 2.0, 5.0)
#: a component "holds" the exact posterior above this weight
MAIN_WEIGHT = 0.01


def landing_components(problem, label: str, registry, num_samples: int = 64) -> list[int]:
    """How many of a configuration's samples each prior component explains best (seed 0)."""
    name, options = MIXTURE_CONFIGS[label]
    sampler = build_sampler(registry.get(name).sampler_class, options)
    result = sample_posterior(sampler, problem.posterior, num_samples, generator=torch.Generator().manual_seed(0))
    return component_counts(problem.posterior.prior, result.samples)


def case_problem(case: str, prior_draw: int | None = None):
    """The problem file's case, or the same case with an exact prior draw (its seed) as the truth."""
    path = ROOT / "problems" / EXACT_CASES[case]
    if prior_draw is None:
        return load_problem(path, case)
    config = load_problem_config(path, case)
    return build_problem(config.model_copy(update={"truth": PriorTruthConfig(source="prior", seed=prior_draw)}), path)


def path_weights(posterior) -> list[torch.Tensor]:
    """The mixture components' weights in ``p_rho(x | y)`` at each of ``LEVELS`` (the first, 0: the exact
    posterior's)."""
    return [ExactPosterior.from_posterior(posterior, noise_level=rho).log_weights.exp() for rho in LEVELS]


def path_rows(case: str, samplers: list[str], registry, prior_draw: int | None = None) -> dict:
    """The path of one case: its main components and, per level, their mass and the largest component; where
    the ``samplers``' samples land."""
    problem = case_problem(case, prior_draw)
    weights = path_weights(problem.posterior)
    exact = weights[0]
    main = (exact > MAIN_WEIGHT).nonzero().flatten()
    sde = problem.posterior.prior.sde
    times = torch.linspace(0, sde.T, 100001, dtype=torch.float64)
    twist_scale = sde.sigma_t(times) / sde.lambda_t(times)     # r_t, increasing from 0
    levels = [{"rho": rho, "time": float(times[(twist_scale - rho).abs().argmin()]), "mass": float(level[main].sum()),
               "largest": int(level.argmax()), "largest_weight": float(level.max())}
              for rho, level in zip(LEVELS, weights)]
    bottleneck = min(levels, key=lambda level: level["mass"])
    landing = {label: landing_components(problem, label, registry) for label in samplers}
    name = case if prior_draw is None else f"{case}, prior draw {prior_draw}"
    return {"case": name, "main": main.tolist(), "main_weights": exact[main].tolist(), "levels": levels,
            "bottleneck": bottleneck, "landing": landing}


def report(paths: list[dict], draws: list[dict], command: str) -> str:
    lines = ["### The annealing path's bottleneck on the exact patch-GMM cases", "",
             f"Made by `{command}` (module docstring: what is computed). Main components:",
             f"those with weight above {MAIN_WEIGHT:g} in the exact posterior. Mass: their weight in `p_rho(x | y)`;",
             "t: the prior's diffusion time where TDS's twist variance `sigma_t^2 / lambda_t^2` equals `rho^2`.", "",
             "| case | main components (exact weights) | smallest mass on the path | at rho (t) "
             "| particles needed ~ 1 / mass |",
             "|---|---|---|---|---|"]
    for path in paths + draws:
        main = ", ".join(f"{k} ({w:.2f})" for k, w in zip(path["main"], path["main_weights"]))
        low = path["bottleneck"]
        lines.append(f"| {path['case']} | {main} | {low['mass']:.1e} | {low['rho']:g} ({low['time']:.3f}) | "
                     f"{1 / low['mass']:.0f} |")
    if any(path["landing"] for path in paths):
        lines += ["", "Where the samples land (64 samples, seed 0): component (number of samples it explains best).",
                  "", "| case | configuration | components |", "|---|---|---|"]
        for path in paths:
            for label, counts in path["landing"].items():
                lines.append(f"| {path['case']} | {label} | {landing(counts)} |")
    for path in paths:
        lines += ["", f"#### {path['case']}", "",
                  "| rho | t | mass of the main components | largest component (weight) |", "|---|---|---|---|"]
        lines += [f"| {level['rho']:g} | {level['time']:.4f} | {level['mass']:.2e} | {level['largest']} "
                  f"({level['largest_weight']:.3f}) |" for level in path["levels"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(EXACT_CASES), choices=list(EXACT_CASES))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "path_bottleneck.md")
    parser.add_argument("--samplers", nargs="*", default=[], choices=list(MIXTURE_CONFIGS),
                        help="configurations of image_dimension_table.py whose samples' components to count")
    parser.add_argument("--prior-draws", nargs="*", type=int, default=[],
                        help="also the path with these exact prior draws (seeds) as truths; summary rows only")
    args = parser.parse_args()
    registry = load_registry()
    paths = [path_rows(case, args.samplers, registry) for case in args.cases]
    draws = [path_rows(case, [], registry, seed) for case in args.cases for seed in args.prior_draws]
    command = " ".join(["python benchmarks/path_bottleneck.py", *map(shlex.quote, sys.argv[1:])])
    text = report(paths, draws, command)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
