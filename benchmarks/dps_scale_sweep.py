"""Choose DPS's ``scale`` for the natural cases on validation crops, not on the test crops.

For each named case of the problem files and each crop of ``VALIDATION`` (crops of the held-out
photographs other than those of ``imaging_table.HELDOUT``; one overlaps a test crop by 12x22
pixels), it reports the PSNR of TV with the oracle lambda (as in imaging_table.py) and the margin
of the DPS posterior mean over it, for every scale. The problem files' natural cases share the
scale with the best mean margin over these cases. Run from the repository root:

    python benchmarks/dps_scale_sweep.py [--cases inpaint.yaml:natural-box ...] [--scales 0.5 1 2 4]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from imaging_table import natural_crops, posterior_images  # benchmarks/, beside this: the same conventions

from invdiff.baselines import best_tv_reconstruction
from invdiff.metrics import psnr
from invdiff.plugins import load_registry
from invdiff.problems import build_problem, build_sampler, load_problem

ROOT = Path(__file__).resolve().parent.parent
VALIDATION = natural_crops([("camera", 10, 90), ("coffee", 60, 100), ("camera", 96, 0), ("coffee", 30, 10)])
CASES = ("inpaint.yaml:natural-box", "superres.yaml:natural-x4", "inpaint.yaml:natural-random")


def sweep(file_name: str, case: str, scales: list[float], seed: int) -> list[dict]:
    path = ROOT / "problems" / file_name
    template = load_problem(path, case)
    dps_class = load_registry().get("dps").sampler_class
    rows = []
    for truth in VALIDATION:
        problem = build_problem(template.config.model_copy(update={"truth": truth}), path)
        operator, measurement = problem.posterior.operator, problem.posterior.measurement
        tv_image, _ = best_tv_reconstruction(operator, measurement, problem.truth)
        row = {"case": case, "crop": f"{truth.image} ({truth.top}, {truth.left})", "tv": psnr(tv_image, problem.truth)}
        for scale in scales:
            options = {**template.config.sampler_options.get("dps", {}), "scale": scale}
            images = posterior_images(build_sampler(dps_class, options), problem, template.config.num_samples, seed)
            mean = images.mean(0, keepdim=True)
            row[f"scale {scale:g}"] = psnr(mean, problem.truth) - row["tv"]
        print(json.dumps(row), file=sys.stderr)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="FILE:CASE of problems/")
    parser.add_argument("--scales", nargs="+", type=float, default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dps_scale_sweep_natural.md")
    arguments = parser.parse_args()
    columns = [f"scale {scale:g}" for scale in arguments.scales]
    lines = ["| case | validation crop | TV (oracle lambda) | " + " | ".join(f"DPS {c} - TV" for c in columns) + " |",
             "|---|---|---|" + "---|" * len(columns)]
    for spec in arguments.cases:
        file_name, case = spec.split(":")
        rows = sweep(file_name, case, arguments.scales, arguments.seed)
        for row in rows:
            lines.append(f"| {case} | {row['crop']} | {row['tv']:.2f} | "
                         + " | ".join(f"{row[c]:+.2f}" for c in columns) + " |")
        lines.append(f"| {case} | mean | | " + " | ".join(f"{sum(r[c] for r in rows) / len(rows):+.2f}"
                                                       for c in columns) + " |")
    header = (f"DPS posterior-mean PSNR minus TV (oracle lambda) PSNR, dB, on validation crops (not the test crops; "
              f"coffee (60, 100) overlaps the test crop coffee (40, 90) by 12x22 pixels), problem files' DPS options "
              f"with `scale` replaced, seed {arguments.seed}.\n\n")
    arguments.out.write_text(header + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
