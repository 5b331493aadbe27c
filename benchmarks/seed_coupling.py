"""Does a sampler seeded with the measurement noise's seed lean on that noise?

The CLI's ``--seed`` and a problem's ``noise_seed`` both seed torch's generator, so with equal seeds the first
chain's starting noise ``x_T`` equals the measurement noise divided by ``sigma_y`` (where the measurement has the
image's shape). Measured on ``natural-gmm-gaussian`` (exact posterior, d = 256): for noise seeds 0..N-1, the
measurement is redrawn, and the sampler runs with the same seed (coupled) and with that seed + 1000 (uncoupled),
16 samples each. Per sample, the correlation between its error to the exact posterior mean and the noise vector;
an exact sampler's is 0 on average, and coupling would show as the first sample's average moving away from the
others'. Prints the averages with their standard errors.

    OMP_NUM_THREADS=1 python benchmarks/seed_coupling.py --sampler dps --runs 40      # under 2 minutes
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from invdiff.exact import ExactPosterior
from invdiff.plugins import load_registry
from invdiff.posterior import Posterior, sample_posterior
from invdiff.problems import load_problem

PROBLEM_FILE = Path(__file__).resolve().parent.parent / "problems" / "deblur.yaml"
OPTIONS = {"dps": {"num_steps": 100, "scale": 1.0}, "ve_smc": {"num_steps": 100, "num_particles": 16},
           "twisted_smc": {"num_steps": 100, "num_particles": 16}}
NUM_SAMPLES = 16


def noise_correlations(sampler, posterior: Posterior, mean: torch.Tensor, noise: torch.Tensor,
                       seed: int) -> list[float]:
    """Per sample, the correlation between (sample - ``mean``, the exact posterior mean) and the measurement noise."""
    samples = sample_posterior(sampler, posterior, NUM_SAMPLES, generator=torch.Generator().manual_seed(seed)).samples
    errors = samples.flatten(1).to(torch.float64) - mean
    return [float(torch.corrcoef(torch.stack([error, noise]))[0, 1]) for error in errors]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sampler", default="dps", choices=sorted(OPTIONS))
    parser.add_argument("--runs", type=int, default=40)
    arguments = parser.parse_args()
    problem = load_problem(PROBLEM_FILE, "natural-gmm-gaussian")
    base = problem.posterior
    clean = base.operator.physics.A(problem.truth)
    sampler = load_registry().get(arguments.sampler).sampler_class(**OPTIONS[arguments.sampler])
    found: dict[str, list[float]] = {}
    for seed in range(arguments.runs):
        measurement = base.operator.noise.sample(clean, torch.Generator().manual_seed(seed))
        posterior = Posterior(base.prior, base.operator, measurement)
        noise = (measurement - clean).flatten().to(torch.float64)
        mean = ExactPosterior.from_posterior(posterior).mean.flatten()
        for label, sampler_seed in (("coupled", seed), ("uncoupled", seed + 1000)):
            first, *others = noise_correlations(sampler, posterior, mean, noise, sampler_seed)
            found.setdefault(f"{label}, first sample", []).append(first)
            found.setdefault(f"{label}, other samples", []).extend(others)
    for label, values in found.items():
        error = statistics.stdev(values) / len(values) ** 0.5
        print(f"{arguments.sampler}, {label}: correlation {statistics.mean(values):+.4f} +- {error:.4f} "
              f"({len(values)} samples)")


if __name__ == "__main__":
    main()
