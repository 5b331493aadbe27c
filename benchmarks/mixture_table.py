"""The Gaussian-mixture benchmark of MCGdiff (Cardoso et al., ICLR 2024; ALGORITHMS.md section 6).

25 unit-covariance components with means (8i, 8j, 8i, 8j, ...), i, j in -2..2, random weights, a
random Gaussian operator with d_y rows and sigma_y = 1, a VP prior with its exact score. For each
dimension d in {8, 80}, d_y in {1, 2, 4}, sampler and particle count K, it reports the sliced
Wasserstein distance to 2000 exact posterior draws (weighted particles for SMC samplers) next to the
exact-vs-exact floor at the same size, and the error of log Z_hat. Run from the repository root:

    python benchmarks/mixture_table.py [--out benchmarks/results/mixture_table.md]

Every sampler runs 100 steps (one network evaluation per particle per step); DPS uses the paper's
rule with scale 0.1 (the best of 0.1-3.0 on this bed at d = 8, d_y = 2).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import gaussian_mixture  # noqa: E402  (the same test bed as the test suite)

from invdiff.metrics import sliced_wasserstein  # noqa: E402
from invdiff.plugins import load_registry  # noqa: E402
from invdiff.posterior import sample_posterior  # noqa: E402

SAMPLER_OPTIONS = {"twisted_smc": {"num_steps": 100}, "ve_smc": {"num_steps": 100},
                   "dps": {"num_steps": 100, "scale": 0.1}}
PARTICLE_COUNTS = (16, 64, 256, 1024)
REFERENCE_SIZE = 2000


def run_setting(dimension: int, measurements: int, registry) -> list[dict]:
    posterior, exact = gaussian_mixture(dimension=dimension, measurements=measurements)
    reference = exact.sample(REFERENCE_SIZE, generator=torch.Generator().manual_seed(1))
    rows = []
    for count in PARTICLE_COUNTS:
        floor = sliced_wasserstein(exact.sample(count, generator=torch.Generator().manual_seed(2)), reference)
        for name, options in SAMPLER_OPTIONS.items():
            sampler_class = registry.get(name).sampler_class
            if "num_particles" in sampler_class.Options.model_fields:
                options = {**options, "num_particles": count}
            result = sample_posterior(sampler_class(**options), posterior, count,
                                      generator=torch.Generator().manual_seed(0))
            if result.particles is not None:
                distance = sliced_wasserstein(result.particles, reference, first_log_weights=result.log_weights)
            else:
                distance = sliced_wasserstein(result.samples, reference)
            evidence_error = (result.log_evidence - exact.log_evidence) if result.log_evidence is not None else None
            rows.append({"d": dimension, "d_y": measurements, "K": count, "sampler": name, "sw": distance,
                         "floor": floor, "log_evidence_error": evidence_error})
            print(f"d={dimension} d_y={measurements} K={count} {name}: SW {distance:.3f} (floor {floor:.3f})",
                  file=sys.stderr)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| d | d_y | K | sampler | sliced W. | exact floor | log Z error |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        error = "" if row["log_evidence_error"] is None else f"{row['log_evidence_error']:+.3f}"
        lines.append(f"| {row['d']} | {row['d_y']} | {row['K']} | {row['sampler']} | {row['sw']:.3f} | "
                     f"{row['floor']:.3f} | {error} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixture_table.md"))
    arguments = parser.parse_args()
    registry = load_registry()
    rows = [row for dimension in (8, 80) for measurements in (1, 2, 4)
            for row in run_setting(dimension, measurements, registry)]
    table = markdown(rows)
    arguments.out.parent.mkdir(parents=True, exist_ok=True)
    arguments.out.write_text(f"torch {torch.__version__}, seed 0, {REFERENCE_SIZE} exact reference draws\n\n{table}")
    print(table)


if __name__ == "__main__":
    main()
