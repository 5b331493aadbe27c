"""Fit the patch-GMM prior ``natural_gmm`` (EPLL's image prior, Zoran and Weiss, ICCV 2011) and ship it.

A full-covariance Gaussian mixture over 16x16 grayscale patches (d = 256) in [-1, 1] of the
training photographs (``NATURAL_SPLIT['train']``; camera and coffee are never seen) at the natural
prior's scales 1, 1/2, 1/4, with its random flips and rotations. Patch GMMs are usually fitted to
mean-removed patches; this one models the full patch, mean included, because the problems observe
absolute intensities.

Each training photograph is cut into two bands of columns: the left 80% gives the fitting patches,
the right 20% the validation patches, which choose the regularisation ``reg_covar`` (at the
smallest number of components) and then the number of components, by held-out log-likelihood. The
held-out test crops are never used. The ``reg_covar`` grid stops at 1e-5, twice the variance of
8-bit quantisation in [-1, 1] ((2/255)^2 / 12 = 5e-6): below it the likelihood of flat and
saturated patches grows without bound by fitting the quantisation levels. Everything is seeded and
runs on one thread, so a rerun (same scikit-learn and numpy) rewrites the same parameters (a refit
of the chosen settings gave the shipped means bit for bit). Run from the repository root:

    OMP_NUM_THREADS=1 python benchmarks/fit_natural_gmm.py   # writes invdiff/priors/natural_gmm.safetensors
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from invdiff.data import NATURAL_SPLIT, natural_images, random_patches
from invdiff.checkpoints import NATURAL_GMM_PATH, save_gaussian_mixture

PATCH_SIZE = 16
SCALES = (1, 2, 4)
#: the fraction of each training photograph's columns (from the left) whose patches are fitted
FIT_COLUMNS = 0.8
SETTINGS = {"fit_patches": 20000, "validation_patches": 5000, "seed": 0, "max_iter": 25,
            "reg_covar_grid": [1e-5, 1e-4, 1e-3], "components_grid": [8, 16, 32]}


def column_bands(images: dict[str, np.ndarray], fraction: float) -> tuple[dict, dict]:
    """Each photograph split into its left ``fraction`` of columns and the rest."""
    left, right = {}, {}
    for name, image in images.items():
        split = int(round(fraction * image.shape[1]))
        left[name], right[name] = image[:, :split], image[:, split:]
    return left, right


def patch_sets(fit_count: int, validation_count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Fitting and validation patches, flattened ``(N, 256)``, in [-1, 1], float64."""
    fitting_band, validation_band = column_bands(natural_images("train"), FIT_COLUMNS)
    generator = torch.Generator().manual_seed(seed)
    sets = []
    for band, count in ((fitting_band, fit_count), (validation_band, validation_count)):
        patches = random_patches(band, PATCH_SIZE, SCALES).sample(count, generator)
        sets.append((patches * 2 - 1).reshape(count, -1).numpy())
    return sets[0], sets[1]


def fit_mixture(patches: np.ndarray, components: int, reg_covar: float, seed: int, max_iter: int):
    """scikit-learn's EM for a full-covariance mixture (k-means initialisation, one start)."""
    from sklearn.mixture import GaussianMixture

    return GaussianMixture(components, covariance_type="full", reg_covar=reg_covar, max_iter=max_iter,
                           random_state=seed).fit(patches)


def search(fitting: np.ndarray, validation: np.ndarray, settings: dict) -> tuple[object, list[dict]]:
    """``reg_covar`` by validation log-likelihood at the fewest components, then the number of components.

    Returns the best mixture and one record per fit (validation and training log-likelihood per patch).
    """
    records, mixtures = [], {}

    def fit(components: int, reg_covar: float) -> float:
        if (components, reg_covar) not in mixtures:
            start = time.process_time()
            mixture = fit_mixture(fitting, components, reg_covar, settings["seed"], settings["max_iter"])
            mixtures[components, reg_covar] = mixture
            records.append({"components": components, "reg_covar": reg_covar,
                            "validation_log_likelihood": float(mixture.score(validation)),
                            "fit_log_likelihood": float(mixture.score(fitting)),
                            "iterations": int(mixture.n_iter_), "converged": bool(mixture.converged_),
                            "cpu_seconds": round(time.process_time() - start, 1)})
            print(records[-1], flush=True)
        return next(record["validation_log_likelihood"] for record in records
                    if (record["components"], record["reg_covar"]) == (components, reg_covar))

    fewest = min(settings["components_grid"])
    reg_covar = max(settings["reg_covar_grid"], key=lambda value: fit(fewest, value))
    components = max(settings["components_grid"], key=lambda value: fit(value, reg_covar))
    return mixtures[components, reg_covar], records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=NATURAL_GMM_PATH)
    arguments = parser.parse_args()

    import sklearn

    torch.set_num_threads(1)
    start = time.process_time()
    fitting, validation = patch_sets(SETTINGS["fit_patches"], SETTINGS["validation_patches"], SETTINGS["seed"])
    mixture, records = search(fitting, validation, SETTINGS)
    chosen = next(record for record in records if (record["components"], record["reg_covar"])
                  == (mixture.n_components, mixture.reg_covar))
    metadata = {
        "name": "natural_gmm",
        "event_shape": [1, PATCH_SIZE, PATCH_SIZE],
        "data_range": [-1.0, 1.0],
        "data": {"source": "natural", "images": NATURAL_SPLIT["train"], "heldout_images": NATURAL_SPLIT["test"],
                 "patch_size": PATCH_SIZE, "scales": list(SCALES), "augmentation": "flips and 90-degree rotations",
                 "fit_patches": f"{SETTINGS['fit_patches']} from the left {FIT_COLUMNS:.0%} of each photograph's "
                                f"columns",
                 "validation_patches": f"{SETTINGS['validation_patches']} from the remaining columns"},
        "fit": {"method": "sklearn.mixture.GaussianMixture, covariance_type full, k-means init, one start",
                "script": "benchmarks/fit_natural_gmm.py", "components": int(mixture.n_components),
                "reg_covar": float(mixture.reg_covar), "seed": SETTINGS["seed"], "max_iter": SETTINGS["max_iter"],
                "validation_log_likelihood": chosen["validation_log_likelihood"],
                "selection": "reg_covar at the fewest components, then components, by validation log-likelihood "
                             "(nats per patch)",
                "grid": records, "cpu_seconds": round(time.process_time() - start, 1)},
        "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__, "torch": torch.__version__},
    }
    save_gaussian_mixture(arguments.out, torch.from_numpy(mixture.weights_), torch.from_numpy(mixture.means_),
                          torch.from_numpy(mixture.covariances_), metadata)
    print(f"wrote {arguments.out} ({arguments.out.stat().st_size / 1e6:.1f} MB): {mixture.n_components} components, "
          f"reg_covar {mixture.reg_covar:g}, {metadata['fit']['cpu_seconds']} s of CPU")


if __name__ == "__main__":
    main()
