"""PSNR/SSIM of posterior sampling with the shipped priors against classical reconstructions, on held-out images.

For every case of problems/inpaint.yaml, deblur.yaml and superres.yaml whose prior is a shipped
UNet (``digits``, ``natural``), the operator and noise of the case are applied to several held-out
images (never trained on): 8 test digits, or 6 crops of the held-out photographs ``camera`` and
``coffee`` at 1/4 scale. For each image it reports

* the pseudo-inverse ``A^+ y`` and the TV reconstruction with the best ``lambda`` of a grid *for
  that image* (an oracle choice: it favours the baseline, so margins are conservative);
* each sampler's posterior mean (with the problem file's options), and the average PSNR of its
  single samples.

The margin column is the mean over images of (sampler PSNR - TV PSNR) with its standard error.
SSIM follows ``invdiff.metrics.SSIM_CONVENTION``. Run from the repository root:

    python benchmarks/imaging_table.py [--samplers dps] [--priors digits natural] [--images N]
        [--problems inpaint.yaml deblur.yaml superres.yaml] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from invdiff.baselines import best_tv_reconstruction, pseudo_inverse
from invdiff.metrics import SSIM_CONVENTION, psnr, ssim
from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.problems import DigitsTruthConfig, NaturalTruthConfig, build_problem, build_sampler, load_problem, \
    problem_cases

ROOT = Path(__file__).resolve().parent.parent
PROBLEM_FILES = ("inpaint.yaml", "deblur.yaml", "superres.yaml")


def natural_crops(positions: list[tuple[str, int, int]]) -> list[NaturalTruthConfig]:
    """32x32 crops of held-out photographs at 1/4 scale, at ``(image, top, left)``."""
    return [NaturalTruthConfig(source="natural", image=image, top=top, left=left, size=32, scale=4)
            for image, top, left in positions]


def posterior_images(sampler, problem, num_samples: int, seed: int) -> torch.Tensor:
    """``num_samples`` posterior draws as images clamped to [0, 1]; their mean is the posterior-mean estimate."""
    result = sample_posterior(sampler, problem.posterior, num_samples, generator=torch.Generator().manual_seed(seed))
    return problem.posterior.operator.to_image(result.samples).clamp(0, 1)

HELDOUT = {
    "digits": [DigitsTruthConfig(source="digits", index=index) for index in range(8)],
    "natural": natural_crops([("camera", 8, 40), ("camera", 40, 8), ("camera", 64, 64), ("camera", 90, 40),
                              ("coffee", 4, 48), ("coffee", 40, 90)]),
}


def evaluate_case(path: Path, case: str, samplers: list[str], registry, seed: int, images: int) -> list[dict]:
    template = load_problem(path, case)
    prior_name = template.config.prior.name
    rows = []
    for image_index, truth in enumerate(HELDOUT[prior_name][:images]):
        problem = build_problem(template.config.model_copy(update={"truth": truth}), path)
        operator, measurement = problem.posterior.operator, problem.posterior.measurement
        row = {"problem": template.config.name, "prior": prior_name, "image": image_index,
               "pseudo_inverse": psnr(pseudo_inverse(operator, measurement), problem.truth)}
        tv_image, tv_lambda = best_tv_reconstruction(operator, measurement, problem.truth)
        row.update(tv=psnr(tv_image, problem.truth), tv_ssim=ssim(tv_image, problem.truth), tv_lambda=tv_lambda)
        for name in samplers:
            sampler_class = registry.get(name).sampler_class
            sampler = build_sampler(sampler_class, template.config.sampler_options.get(name, {}))
            start = time.perf_counter()
            images = posterior_images(sampler, problem, template.config.num_samples, seed)
            mean = images.mean(0, keepdim=True)
            row[name] = psnr(mean, problem.truth)
            row[f"{name}_ssim"] = ssim(mean, problem.truth)
            row[f"{name}_single"] = sum(psnr(image[None], problem.truth) for image in images) / len(images)
            row[f"{name}_seconds"] = time.perf_counter() - start
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def _mean_and_error(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    variance = sum((value - mean) ** 2 for value in values) / max(len(values) - 1, 1)
    return mean, math.sqrt(variance / len(values))


def markdown(rows: list[dict], samplers: list[str]) -> str:
    lines = ["| problem | images | pseudo-inverse | TV (oracle lambda) | "
             + " | ".join(f"{name} mean (single) | {name} - TV" for name in samplers) + " |",
             "|---|---|---|---|" + "---|---|" * len(samplers)]
    for problem in dict.fromkeys(row["problem"] for row in rows):
        chosen = [row for row in rows if row["problem"] == problem]
        cells = [problem, str(len(chosen)), f"{_mean_and_error([r['pseudo_inverse'] for r in chosen])[0]:.2f}",
                 f"{_mean_and_error([r['tv'] for r in chosen])[0]:.2f} / {_mean_and_error([r['tv_ssim'] for r in chosen])[0]:.3f}"]
        for name in samplers:
            mean = _mean_and_error([r[name] for r in chosen])[0]
            single = _mean_and_error([r[f"{name}_single"] for r in chosen])[0]
            structural = _mean_and_error([r[f"{name}_ssim"] for r in chosen])[0]
            margin, error = _mean_and_error([r[name] - r["tv"] for r in chosen])
            cells += [f"{mean:.2f} / {structural:.3f} ({single:.2f})", f"{margin:+.2f} +- {error:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samplers", nargs="+", default=["dps"])
    parser.add_argument("--priors", nargs="+", default=["digits", "natural"], choices=sorted(HELDOUT))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=8, help="at most this many held-out images per case")
    parser.add_argument("--problems", nargs="+", default=list(PROBLEM_FILES), choices=PROBLEM_FILES)
    arguments = parser.parse_args()
    registry = load_registry()
    rows = []
    for file_name in arguments.problems:
        path = ROOT / "problems" / file_name
        for case in problem_cases(path):
            if case.split("-")[0] in arguments.priors and not case.startswith("digits-gmm"):
                rows += evaluate_case(path, case, arguments.samplers, registry, arguments.seed,
                                      arguments.images)
    arguments.out.mkdir(parents=True, exist_ok=True)
    name = "imaging_table_" + "_".join(arguments.priors)
    if arguments.problems != list(PROBLEM_FILES):
        name += "_" + "_".join(file_name.removesuffix(".yaml") for file_name in arguments.problems)
    (arguments.out / f"{name}.json").write_text(json.dumps(rows, indent=1))
    header = (f"PSNR (dB) / SSIM of posterior means on held-out images, problem files' options, seed "
              f"{arguments.seed}. Sampler cells: posterior-mean PSNR / SSIM (average single-sample PSNR). "
              f"SSIM: {SSIM_CONVENTION}.\n\n")
    (arguments.out / f"{name}.md").write_text(header + markdown(rows, arguments.samplers) + "\n")
    print(markdown(rows, arguments.samplers))


if __name__ == "__main__":
    main()
