"""Unconditional samples of a shipped prior next to training images, and a nearest-neighbour check.

A prior that memorised its training set would draw near-copies of training images. For every
sample the script finds the closest training image (Euclidean distance in [0, 1], over all
training digits, or over a large pool of random training patches for ``natural``, ``natural_gmm`` and the colour
``natural_rgb``) and compares
those distances with the same distances for held-out images, which are certainly not copies:
samples at least as far from the training set as held-out images are not copies. Writes
``benchmarks/results/prior_samples_NAME.png`` and ``.md``. ``natural_gmm`` (the patch-GMM prior,
exact) is drawn exactly rather than by reverse steps. Run from the repository root:

    python benchmarks/prior_samples.py digits [--samples 64 --steps 200]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from invdiff.checkpoints import load_prior
from invdiff.data import digits, natural_images, random_patches
from invdiff.checkpoints import natural_gaussian_mixture
from invdiff.prior import GaussianMixturePrior
from invdiff.sde import VPSDE

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    """The shipped prior called ``name`` (``natural_gmm`` under the default VP SDE)."""
    return natural_gaussian_mixture(VPSDE()) if name == "natural_gmm" else load_prior(name)


def draw(prior, count: int, steps: int, generator: torch.Generator) -> torch.Tensor:
    """Unconditional samples in [0, 1]: exact draws for a Gaussian mixture, else ``steps`` reverse steps."""
    if isinstance(prior, GaussianMixturePrior):
        samples = prior.sample_clean(count, generator=generator).float()
    else:
        samples = prior.sample(count, num_steps=steps, generator=generator)
    return ((samples + 1) / 2).clamp(0, 1)


def describe(name: str, prior, steps: int) -> str:
    """The figure's title: how the prior was made and how it was sampled."""
    if isinstance(prior, GaussianMixturePrior):
        fit = prior.metadata["fit"]
        return (f"prior '{name}': {fit['components']}-component Gaussian mixture (reg_covar {fit['reg_covar']:g}), "
                f"exact draws")
    return f"prior '{name}': {prior.settings()['training']['steps']} training steps, {steps} ancestral sampling steps"


def reference_sets(name: str, prior, pool_size: int, count: int, generator: torch.Generator):
    """Training images (the nearest-neighbour pool) and ``count`` held-out images, in [0, 1]."""
    if name == "digits":
        return digits("train").float(), digits("test")[:count].float()
    patch_size, colour = prior.event_shape[-1], prior.event_shape[0] == 3
    training = random_patches(natural_images("train", colour), patch_size).sample(pool_size, generator).float()
    heldout = random_patches(natural_images("test", colour), patch_size).sample(count, generator).float()
    return training, heldout


def nearest_neighbours(images: torch.Tensor, pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image: the distance to its nearest neighbour in ``pool`` per pixel (RMS), and its index."""
    distances = torch.cdist(images.flatten(1).double(), pool.flatten(1).double()).min(1)
    return distances.values / images[0].numel() ** 0.5, distances.indices


def grid(images: torch.Tensor, columns: int) -> np.ndarray:
    """The images ``(N, C, H, W)`` tiled on a white canvas: ``(rows, columns)``, or ``(rows, columns, 3)`` in colour."""
    rows = -(-len(images) // columns)
    channels, height, width = images.shape[-3:]
    canvas = np.ones((rows * (height + 1) - 1, columns * (width + 1) - 1, channels))
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        canvas[row * (height + 1):row * (height + 1) + height, column * (width + 1):column * (width + 1) + width] = \
            image.clamp(0, 1).permute(1, 2, 0).numpy()
    return canvas[..., 0] if channels == 1 else canvas


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prior", choices=["digits", "natural", "natural_gmm", "natural_rgb"])
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--pool", type=int, default=20000, help="training patches searched (natural priors)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    arguments = parser.parse_args()

    prior = load(arguments.prior)
    generator = torch.Generator().manual_seed(0)
    samples = draw(prior, arguments.samples, arguments.steps, generator)
    training, heldout = reference_sets(arguments.prior, prior, arguments.pool, arguments.samples, generator)
    sample_distances, nearest = nearest_neighbours(samples, training)
    heldout_distances, _ = nearest_neighbours(heldout, training)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = training[torch.randperm(len(training), generator=generator)[:arguments.samples]]
    closest = training[nearest]
    columns = 8
    figure, axes = plt.subplots(1, 3, figsize=(13, 4.8))
    for axis, images, title in zip(axes, (samples, closest, shown),
                                   ("unconditional samples", "nearest training image of each sample",
                                    "random training images")):
        axis.imshow(grid(images, columns), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        axis.set_title(title, fontsize=10)
        axis.axis("off")
    figure.suptitle(describe(arguments.prior, prior, arguments.steps), fontsize=11)
    figure.tight_layout()
    arguments.out.mkdir(parents=True, exist_ok=True)
    figure.savefig(arguments.out / f"prior_samples_{arguments.prior}.png", dpi=110)

    def quantiles(values: torch.Tensor) -> str:
        return " / ".join(f"{float(values.quantile(q)):.3f}" for q in (0.0, 0.1, 0.5, 0.9))

    table = (f"Nearest-neighbour distance (RMS per pixel, images in [0, 1]) to {len(training)} training "
             f"images; quantiles min / 10% / median / 90%.\n\n"
             f"| images | count | distance to nearest training image |\n|---|---|---|\n"
             f"| unconditional samples | {len(samples)} | {quantiles(sample_distances)} |\n"
             f"| held-out images | {len(heldout)} | {quantiles(heldout_distances)} |\n")
    (arguments.out / f"prior_samples_{arguments.prior}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
