"""Which held-out crops give a natural_gmm case a posterior of several modes: the exact posterior's component
weights for a case of `natural_gmm_other_crop.yaml` moved over the 16x16 crops of a held-out photograph (1/4
scale) on a grid. No sampler runs; seconds.

    python benchmarks/posterior_modes.py      # box inpainting over coffee on a 16-pixel grid
    python benchmarks/posterior_modes.py --case natural-gmm-random-coffee --image camera --step 8 [--path]
        [--mask-seed 2]

A line per crop: its top-left corner, pixel std, the three largest component weights; with ``--path``, also the
smallest mass that the components holding the exact posterior (weight above 0.1) keep on the annealing path of
``path_bottleneck.py`` (its noise levels), the level where it is smallest and the component largest there with its
weight in the exact posterior: crops whose path hands the mass to another component before it comes back (a few
seconds a crop).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from path_bottleneck import LEVELS, path_weights

from invdiff.data import NATURAL_SPLIT, natural_images
from invdiff.exact import ExactPosterior
from invdiff.problems import ProblemConfig, build_problem, load_problem_config

FILE = Path(__file__).resolve().parent / "natural_gmm_other_crop.yaml"
SIZE, SCALE = 16, 4   # the crop size, the natural prior's scale
HOLDS = 0.1           # with --path: a component holds the exact posterior above this weight


def path_low(posterior) -> tuple[float, float, int, float]:
    """The smallest mass of the components holding the exact posterior along the annealing path, the level where it
    is smallest, the component largest there and that component's weight in the exact posterior."""
    weights = path_weights(posterior)
    holding = (weights[0] > HOLDS).nonzero().flatten()
    masses = [float(level[holding].sum()) for level in weights]
    low = min(range(len(LEVELS)), key=masses.__getitem__)
    taker = int(weights[low].argmax())
    return masses[low], LEVELS[low], taker, float(weights[0][taker])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="natural-gmm-box-coffee", help="a case of natural_gmm_other_crop.yaml")
    parser.add_argument("--image", default="coffee", choices=NATURAL_SPLIT["test"],
                        help="the held-out photograph the crops are cut from")
    parser.add_argument("--step", type=int, default=16, help="the grid's spacing in pixels")
    parser.add_argument("--path", action="store_true", help="also the smallest mass on the annealing path")
    parser.add_argument("--mask-seed", type=int, help="random masks: this mask_seed instead of the case's")
    arguments = parser.parse_args()
    template = load_problem_config(FILE, arguments.case).model_dump()
    if arguments.mask_seed is not None:
        template["operator"]["mask_seed"] = arguments.mask_seed
    height, width = (length // SCALE for length in natural_images("test")[arguments.image].shape)
    for top in range(0, height - SIZE + 1, arguments.step):
        for left in range(0, width - SIZE + 1, arguments.step):
            truth = {**template["truth"], "image": arguments.image, "top": top, "left": left}
            problem = build_problem(ProblemConfig.model_validate({**template, "truth": truth}), FILE)
            weights = ExactPosterior.from_posterior(problem.posterior).log_weights.exp()
            largest = torch.topk(weights, 3)
            path = ""
            if arguments.path:
                mass, level, taker, taker_weight = path_low(problem.posterior)
                path = (f"| path: mass {mass:.1e} at rho {level:g}, largest there {taker} "
                        f"(exact weight {taker_weight:.3f})")
            print(top, left, f"std {float(problem.truth.std()):.3f}",
                  " ".join(f"{int(k)}: {float(w):.3f}" for w, k in zip(largest.values, largest.indices)), path,
                  flush=True)


if __name__ == "__main__":
    main()
