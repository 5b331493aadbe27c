"""One run of K particles against R independent runs sharing them, at low dimension with many modes.

On the MCGdiff mixture bed (``invdiff.testing.gaussian_mixture``: 25 components, d_y = 2), twisted_smc
with 1024 particles and 100 steps, split into 1, 16, 64 and 256 runs: the sliced Wasserstein distance
of the pooled weighted particles to 2000 exact posterior draws, seeds 0-2 (README, "Independent
runs"). Run from the repository root (one thread, about 15 minutes):

    OMP_NUM_THREADS=1 python benchmarks/runs_table.py
"""

import torch

from invdiff.metrics import sliced_wasserstein
from invdiff.posterior import sample_posterior
from invdiff.testing import gaussian_mixture
from invdiff_plugins.twisted_smc import TwistedSMC

PARTICLES, STEPS, SEEDS = 1024, 100, (0, 1, 2)


def main() -> None:
    print("| d, d_y | " + " | ".join(f"{runs} run(s)" for runs in (1, 16, 64, 256)) + " |")
    print("|---|---|---|---|---|")
    for dimension in (8, 80):
        posterior, exact = gaussian_mixture(dimension, 2)
        reference = exact.sample(2000, generator=torch.Generator().manual_seed(100))
        cells = []
        for runs in (1, 16, 64, 256):
            distances = []
            for seed in SEEDS:
                result = sample_posterior(TwistedSMC(num_steps=STEPS, num_particles=PARTICLES, num_runs=runs),
                                          posterior, 256, generator=torch.Generator().manual_seed(seed))
                distances.append(sliced_wasserstein(result.particles, reference, first_log_weights=result.log_weights))
            cells.append(" / ".join(f"{distance:.3f}" for distance in distances))
        print(f"| {dimension}, 2 | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
