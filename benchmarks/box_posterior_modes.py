"""Which held-out crops give natural_gmm's box inpainting a posterior of several modes: the exact posterior's
component weights for the case `natural-gmm-box-coffee` of `natural_gmm_other_crop.yaml` moved over the 16x16
crops of `coffee` (1/4 scale) on a 16-pixel grid. No sampler runs; seconds.

    python benchmarks/box_posterior_modes.py      # a line per crop: its top-left corner, pixel std, top 3 weights
"""

from __future__ import annotations

from pathlib import Path

import torch

from invdiff.exact import ExactPosterior
from invdiff.problems import ProblemConfig, build_problem, load_problem_config

FILE = Path(__file__).resolve().parent / "natural_gmm_other_crop.yaml"
HEIGHT, WIDTH, SIZE = 100, 150, 16   # coffee at 1/4 scale, the crop size


def main() -> None:
    template = load_problem_config(FILE, "natural-gmm-box-coffee").model_dump()
    for top in range(0, HEIGHT - SIZE + 1, SIZE):
        for left in range(0, WIDTH - SIZE + 1, SIZE):
            document = {**template, "truth": {**template["truth"], "top": top, "left": left}}
            problem = build_problem(ProblemConfig.model_validate(document), FILE)
            weights = ExactPosterior.from_posterior(problem.posterior).log_weights.exp()
            largest = torch.topk(weights, 3)
            print(top, left, f"std {float(problem.truth.std()):.3f}",
                  " ".join(f"{int(k)}: {float(w):.2f}" for w, k in zip(largest.values, largest.indices)), flush=True)


if __name__ == "__main__":
    main()
