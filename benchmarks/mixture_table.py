"""The Gaussian-mixture benchmark of MCGdiff (Cardoso et al., ICLR 2024; ALGORITHMS.md section 6).

25 unit-covariance components with means (8i, 8j, 8i, 8j, ...), i, j in -2..2, random weights, a
random Gaussian operator with d_y rows and sigma_y = 1, a VP prior with its exact score. For each
dimension d in {8, 80}, d_y in {1, 2, 4}, budget, sampler and sample (particle) count K it reports

* the sliced Wasserstein distance to 2000 exact posterior draws (weighted particles for the SMC
  samplers) next to the exact-vs-exact floor at the same size;
* the mode-mass error: total variation between the fraction of samples (particle weight) nearest to
  each posterior component's mean and the exact component weights, next to the same error of K
  exact draws. The modes are >= 16 (d = 8) or >= 50 (d = 80) apart with unit variance; at d_y = 1
  the posterior has several modes of real weight (the strongly multimodal case), elsewhere one;
* the error of log Z_hat (SMC samplers).

Every sampler gets the same budget of network (prior-score) evaluations per sample, the cost that
dominates with a network prior; every one of them is a gradient (DPS and twisted SMC backpropagate
through the network, RDMC evaluates the target's gradient, ve_smc takes one forward pass):

* budget 100, K = 16, 64, 256, 1024: twisted_smc, ve_smc and dps 100 steps; rdmc 10 outer steps,
  2 chains, 4 MALA steps (at most 100 target gradients per sample counting restarted chains);
* budget 1000, K = 1024 only (CPU time): the same samplers with 1000 steps; rdmc 25 outer steps,
  8 chains, 4 MALA steps (at most 1000).

The table gives the measured evaluations per sample. DPS uses the paper's rule with scale 0.1 (the
best of 0.1-3.0 on this bed at d = 8, d_y = 2). RDMC's default options (about 2000 target gradients
per sample) are in benchmarks/rdmc_evidence.py. Run from the repository root (about 25 minutes on
2 busy CPU cores; ``--budgets 100`` about 8):

    python benchmarks/mixture_table.py [--budgets 100,1000] [--out benchmarks/results/mixture_table.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from invdiff.metrics import sliced_wasserstein
from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.testing import gaussian_mixture   # the same test bed as the test suite

#: per budget of network evaluations per sample: the sample counts K and every sampler's options
BUDGETS = {
    100: {"counts": (16, 64, 256, 1024),
          "samplers": {"twisted_smc": {"num_steps": 100}, "ve_smc": {"num_steps": 100},
                       "dps": {"num_steps": 100, "scale": 0.1},
                       "rdmc": {"num_steps": 10, "num_chains": 2, "inner_steps": 4}}},
    1000: {"counts": (1024,),
           "samplers": {"twisted_smc": {"num_steps": 1000}, "ve_smc": {"num_steps": 1000},
                        "dps": {"num_steps": 1000, "scale": 0.1},
                        "rdmc": {"num_steps": 25, "num_chains": 8, "inner_steps": 4}}},
}
REFERENCE_SIZE = 2000
SHOWN_MODES = 4


def mode_masses(samples: torch.Tensor, exact, log_weights: torch.Tensor | None = None) -> torch.Tensor:
    """The (weighted) fraction of samples nearest to each posterior component's mean, shape ``(25,)``."""
    flat = samples.reshape(len(samples), -1).to(torch.float64)
    weights = (torch.full((len(flat),), 1.0 / len(flat), dtype=torch.float64) if log_weights is None
               else torch.softmax(log_weights.to(torch.float64), 0))
    nearest = torch.cdist(flat, exact.means).argmin(1)
    return torch.zeros(len(exact.means), dtype=torch.float64).scatter_add_(0, nearest, weights)


def mode_mass_error(masses: torch.Tensor, exact) -> float:
    """Total variation between masses per mode and the exact component weights."""
    return float(0.5 * (masses - exact.log_weights.exp()).abs().sum())


def run_setting(dimension: int, measurements: int, budget: int, registry) -> tuple[list[dict], dict]:
    posterior, exact = gaussian_mixture(dimension=dimension, measurements=measurements)
    reference = exact.sample(REFERENCE_SIZE, generator=torch.Generator().manual_seed(1))
    weights = exact.log_weights.exp()
    order = weights.argsort(descending=True)[:SHOWN_MODES]
    rows, masses = [], {}
    settings = BUDGETS[budget]
    for count in settings["counts"]:
        exact_draws = exact.sample(count, generator=torch.Generator().manual_seed(2))
        floor = sliced_wasserstein(exact_draws, reference)
        mode_floor = mode_mass_error(mode_masses(exact_draws, exact), exact)
        masses[("exact", count)] = weights[order]
        for name, options in settings["samplers"].items():
            sampler_class = registry.get(name).sampler_class
            if "num_particles" in sampler_class.Options.model_fields:
                options = {**options, "num_particles": count}
            start = time.perf_counter()
            result = sample_posterior(sampler_class(**options), posterior, count,
                                      generator=torch.Generator().manual_seed(0))
            seconds = time.perf_counter() - start
            if result.particles is not None:
                distance = sliced_wasserstein(result.particles, reference, first_log_weights=result.log_weights)
                mass = mode_masses(result.particles, exact, result.log_weights)
            else:
                distance = sliced_wasserstein(result.samples, reference)
                mass = mode_masses(result.samples, exact)
            masses[(name, count)] = mass[order]
            evidence_error = (result.log_evidence - exact.log_evidence) if result.log_evidence is not None else None
            rows.append({"d": dimension, "d_y": measurements, "budget": budget, "K": count, "sampler": name,
                         "evaluations": result.nfe, "sw": distance, "floor": floor,
                         "mode_error": mode_mass_error(mass, exact), "mode_floor": mode_floor,
                         "log_evidence_error": evidence_error, "seconds": seconds})
            print(f"d={dimension} d_y={measurements} budget={budget} K={count} {name}: SW {distance:.3f} "
                  f"(floor {floor:.3f}), mode TV {rows[-1]['mode_error']:.3f}, {result.nfe:.0f} evaluations per "
                  f"sample, {seconds:.0f} s", file=sys.stderr, flush=True)
    return rows, masses


def distance_table(rows: list[dict]) -> str:
    lines = ["| d | d_y | budget | K | sampler | evaluations / sample | sliced W. | exact floor | mode-mass TV "
             "| exact TV | log Z error | time (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        error = "" if row["log_evidence_error"] is None else f"{row['log_evidence_error']:+.3f}"
        lines.append(f"| {row['d']} | {row['d_y']} | {row['budget']} | {row['K']} | {row['sampler']} "
                     f"| {row['evaluations']:.0f} | {row['sw']:.3f} | {row['floor']:.3f} | {row['mode_error']:.3f} "
                     f"| {row['mode_floor']:.3f} | {error} | {row['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def mass_table(settings: dict[tuple[int, int, int], dict]) -> str:
    lines = [f"| d | d_y | budget | K | sampler | mass on the {SHOWN_MODES} heaviest posterior modes | elsewhere |",
             "|---|---|---|---|---|---|---|"]
    for (dimension, measurements, budget), masses in settings.items():
        for (name, count), mass in masses.items():
            shown = ", ".join(f"{value:.3f}" for value in mass)
            lines.append(f"| {dimension} | {measurements} | {budget} | {count} | {name} | {shown} "
                         f"| {1 - float(mass.sum()):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixture_table.md"))
    parser.add_argument("--budgets", default="100,1000", help="comma-separated budgets (default 100,1000)")
    arguments = parser.parse_args()
    budgets = [int(budget) for budget in arguments.budgets.split(",")]
    registry = load_registry()
    rows, multimodal = [], {}
    for budget in budgets:
        for dimension in (8, 80):
            for measurements in (1, 2, 4):
                setting_rows, masses = run_setting(dimension, measurements, budget, registry)
                rows += setting_rows
                if measurements == 1:   # several posterior modes: show where the mass went at the largest K
                    largest = max(BUDGETS[budget]["counts"])
                    multimodal[(dimension, measurements, budget)] = {
                        key: value for key, value in masses.items() if key[1] == largest}
    header = (f"torch {torch.__version__}, seed 0, {REFERENCE_SIZE} exact reference draws, one CPU thread. "
              "Equal budgets of network (prior-score) evaluations per sample: 100 at every K; 1000 only at "
              "K = 1024 (a reduced table: the CPU time of 1000-step SMC at smaller K was not spent). "
              "Mode-mass TV: total variation between the mass per posterior mode and the exact weights "
              "(exact TV: the same for K exact draws).\n\n")
    table = distance_table(rows)
    masses = mass_table(multimodal)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(f"{header}{table}\nMass per mode on the multimodal posteriors (d_y = 1), "
                             f"largest K of each budget (the exact weights first):\n\n{masses}")
    print(table)
    print(masses)


if __name__ == "__main__":
    main()
