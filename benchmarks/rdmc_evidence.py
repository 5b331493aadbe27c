"""RDMC (Huang et al., ICLR 2024) against exact posteriors and DPS on the Gaussian-mixture test bed.

The MCGdiff mixture of invdiff.testing (ALGORITHMS.md section 6): 25 unit-covariance components
with means (8i, 8j, 8i, 8j, ...), a random operator with d_y rows, sigma_y = 1. For d in {8, 80} and
d_y in {1, 2, 4} it draws 1000 samples (seed 0) with

* RDMC with its default options (about 2100 target gradients per sample);
* RDMC with the paper's choices (uniform outer grid, Tweedie score estimate, Gaussian-factor
  importance warm start) and otherwise the same budget;
* RDMC at DPS's budget: 10 outer steps, 4 chains, 4 inner steps (at most 200 target gradients per
  sample, counting restarted chains);
* DPS (Chung et al. 2023) with scale 0.1 and 200 steps (200 network gradients per sample), and with
  as many steps as RDMC's default takes gradients per sample (2000),

and prints two markdown tables: the sliced Wasserstein distance to 1000 exact posterior draws next
to the exact-vs-exact floor and threshold (invdiff.testing.sliced_wasserstein_threshold: mean and
mean + 5 standard deviations over 12 pairs of exact sets), and, where the posterior has several modes
(d_y = 1), the fraction of samples nearest to each posterior component's mean against the exact
weights. The comparison with the SMC samplers at equal budgets is benchmarks/mixture_table.py's.
Run from the repository root (about 15 minutes on 2 CPU cores; ``--dimensions 8`` takes about 2):

    python benchmarks/rdmc_evidence.py [--dimensions 8,80] [--measurements 1,2,4]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mixture_table import SHOWN_MODES, mode_mass_error, mode_masses  # benchmarks/, beside this script

from invdiff.metrics import sliced_wasserstein
from invdiff.posterior import sample_posterior
from invdiff.testing import gaussian_mixture, sliced_wasserstein_threshold   # the test suite's test bed
from invdiff_plugins.dps import DPS
from invdiff_plugins.rdmc import RDMC

NUM_SAMPLES = 1000
SAMPLERS = {
    "RDMC default": lambda: RDMC(),
    "RDMC paper's choices": lambda: RDMC(time_grid="uniform", score_estimator="tweedie", warm_start="gaussian"),
    "RDMC at 200 gradients": lambda: RDMC(num_steps=10, num_chains=4, inner_steps=4),
    "DPS 200 steps": lambda: DPS(num_steps=200, scale=0.1),
    "DPS 2000 steps": lambda: DPS(num_steps=2000, scale=0.1),
}


def run_setting(dimension: int, measurements: int) -> tuple[list[dict], dict]:
    posterior, exact = gaussian_mixture(dimension=dimension, measurements=measurements)
    reference = exact.sample(NUM_SAMPLES, generator=torch.Generator().manual_seed(99))
    floor, threshold = sliced_wasserstein_threshold(exact, NUM_SAMPLES, repeats=12)
    weights = exact.log_weights.exp()
    order = weights.argsort(descending=True)[:SHOWN_MODES]
    rows, masses = [], {"exact": weights[order]}
    for name, make in SAMPLERS.items():
        start = time.perf_counter()
        result = sample_posterior(make(), posterior, NUM_SAMPLES, generator=torch.Generator().manual_seed(0))
        seconds = time.perf_counter() - start
        gradients = result.extras.get("target_gradient_evaluations", result.network_evaluations) / NUM_SAMPLES
        mass = mode_masses(result.samples, exact)
        masses[name] = mass[order]
        rows.append({"d": dimension, "d_y": measurements, "sampler": name, "gradients": gradients,
                     "sw": sliced_wasserstein(result.samples, reference), "floor": floor, "threshold": threshold,
                     "total_variation": mode_mass_error(mass, exact), "seconds": seconds})
        print(f"d={dimension} d_y={measurements} {name}: SW {rows[-1]['sw']:.3f} (floor {floor:.3f}), "
              f"{gradients:.0f} gradients per sample, {seconds:.0f} s", file=sys.stderr)
    return rows, masses


def distance_table(rows: list[dict]) -> str:
    lines = ["| d | d_y | sampler | gradients / sample | SW to exact | exact-vs-exact (threshold) "
             "| mode-mass TV | time (s) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['d']} | {row['d_y']} | {row['sampler']} | {row['gradients']:.0f} | {row['sw']:.3f} "
                     f"| {row['floor']:.3f} ({row['threshold']:.3f}) | {row['total_variation']:.3f} "
                     f"| {row['seconds']:.0f} |")
    return "\n".join(lines)


def mass_table(settings: dict[tuple[int, int], dict]) -> str:
    lines = [f"| d | d_y | sampler | mass on the {SHOWN_MODES} heaviest posterior modes | elsewhere |",
             "|---|---|---|---|---|"]
    for (dimension, measurements), masses in settings.items():
        for name, mass in masses.items():
            shown = ", ".join(f"{value:.3f}" for value in mass)
            lines.append(f"| {dimension} | {measurements} | {name} | {shown} | {1 - float(mass.sum()):.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dimensions", default="8,80", help="comma-separated d (default 8,80)")
    parser.add_argument("--measurements", default="1,2,4", help="comma-separated d_y (default 1,2,4)")
    arguments = parser.parse_args()
    rows, multimodal = [], {}
    for dimension in map(int, arguments.dimensions.split(",")):
        for measurements in map(int, arguments.measurements.split(",")):
            setting_rows, masses = run_setting(dimension, measurements)
            rows += setting_rows
            if masses["exact"][1] > 0.01:
                multimodal[(dimension, measurements)] = masses
    print(f"Gaussian-mixture test bed, {NUM_SAMPLES} samples, seed 0; SW: sliced Wasserstein distance to "
          f"{NUM_SAMPLES} exact posterior draws; TV: total variation between the fractions of samples per "
          "posterior mode and the exact weights.\n")
    print(distance_table(rows))
    if multimodal:
        print("\nMass per mode where the posterior has several (the exact row first):\n")
        print(mass_table(multimodal))


if __name__ == "__main__":
    main()
