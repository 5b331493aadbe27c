"""Every sampler at image dimension: the four ``natural-gmm-*`` cases (exact patch-GMM prior
``natural_gmm``, 16x16 = 256 values, noise 0.02, 64 samples) against their exact posteriors, and the
shipped UNet cases ``natural-*`` (32x32 crops of held-out photographs, 16 samples); on request the
``digits-gmm-*`` cases (the exact 8x8 digits mixture, d = 64), where one run and many small runs meet.

For each case and sampler configuration it runs ``invdiff solve``'s pipeline (the same problem, the
same measurement, the same metric functions: ``invdiff.evaluation.run_summary``) and reports the PSNR
of the posterior mean, single-sample PSNR, coverage_90, distinct samples, ``log Z_hat``, network
evaluations per returned sample and wall / CPU time; on the exact cases also the sliced Wasserstein
distance to exact posterior draws next to its exact-vs-exact floor and the exact posterior's own
PSNR, coverage and ``log p(y)``, and for a mixture prior which components the samples land in (the
component that explains each best) next to as many exact draws' (tables from before that column lack
it). Particle configurations use at most 256 particles in all and 200 steps on the exact cases, at
most 64 particles and 100 steps on the UNet cases (issue 10's bars).
Run from the repository root (one thread; the exact cases take about 15 minutes, the UNet cases
about 40):

    OMP_NUM_THREADS=1 python benchmarks/image_dimension_table.py [--cases natural-gmm-box ...]
        [--configs "twisted_smc 64 runs x 4" ...] [--seeds 0 1] [--out benchmarks/results] [--name NAME]

``EXACT_VARIANTS`` (variations of the best exact-case configuration) run only when named with ``--configs``.
The shipped results (``benchmarks/results/image_dimension_exact.md``, ``image_dimension_unet.md``):

    OMP_NUM_THREADS=1 python benchmarks/image_dimension_table.py --name image_dimension_exact
    OMP_NUM_THREADS=1 python benchmarks/image_dimension_table.py --name image_dimension_unet \
        --cases natural-box natural-random natural-gaussian --configs dps "twisted_smc K=64" \
        "twisted_smc 16 runs x 4" "twisted_smc 16 runs x 4, moves" "ve_smc 16 runs x 4, moves" "mcgdiff 16 runs x 4"
    OMP_NUM_THREADS=1 python benchmarks/image_dimension_table.py --name image_dimension_unet_more \
        --cases natural-motion natural-x2 natural-x4 --configs dps "twisted_smc K=64" "twisted_smc 16 runs x 4, moves"
    OMP_NUM_THREADS=1 python benchmarks/image_dimension_table.py --name image_dimension_digits \
        --cases digits-gmm-box digits-gmm-gaussian digits-gmm-x2 --configs exact "twisted_smc K=256" \
        "twisted_smc 64 runs x 4" "twisted_smc 64 runs x 4, moves" "ve_smc K=256" "ve_smc 64 runs x 4"
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from invdiff.evaluation import posterior_moments, run_summary
from invdiff.exact import ExactPosterior
from invdiff.plugins import load_registry
from invdiff.prior import GaussianMixturePrior
from invdiff.posterior import sample_posterior
from invdiff.problems import build_sampler, load_problem

ROOT = Path(__file__).resolve().parent.parent
EXACT_CASES = {"natural-gmm-box": "inpaint.yaml", "natural-gmm-random": "inpaint.yaml",
               "natural-gmm-gaussian": "deblur.yaml", "natural-gmm-x2": "superres.yaml"}
#: the 8x8 digits mixture (d = 64): where one run and many small runs meet
DIGITS_CASES = {"digits-gmm-box": "inpaint.yaml", "digits-gmm-gaussian": "deblur.yaml", "digits-gmm-x2": "superres.yaml"}
UNET_CASES = {"natural-box": "inpaint.yaml", "natural-random": "inpaint.yaml", "natural-gaussian": "deblur.yaml",
              "natural-motion": "deblur.yaml", "natural-x2": "superres.yaml", "natural-x4": "superres.yaml"}
MIXTURE_CASES = {**EXACT_CASES, **DIGITS_CASES}
CASES = {**MIXTURE_CASES, **UNET_CASES}
MOVES = {"move_steps": 3, "move_step_size": 0.2}


def _particle_configs(steps: int, particles: int, runs: int) -> dict[str, tuple[str, dict]]:
    """The particle samplers with ``particles`` particles in all: one run, ``runs`` independent runs,
    each with and without resample-move."""
    each = particles // runs
    one = {"num_steps": steps, "num_particles": particles}
    split = {"num_steps": steps, "num_runs": runs, "num_particles": particles}
    configs = {}
    for sampler in ("twisted_smc", "ve_smc"):
        configs[f"{sampler} K={particles}"] = (sampler, one)
        configs[f"{sampler} K={particles}, moves"] = (sampler, {**one, **MOVES})
        configs[f"{sampler} {runs} runs x {each}"] = (sampler, split)
        configs[f"{sampler} {runs} runs x {each}, moves"] = (sampler, {**split, **MOVES})
    configs[f"mcgdiff K={particles}"] = ("mcgdiff", one)
    configs[f"mcgdiff {runs} runs x {each}"] = ("mcgdiff", split)
    return configs


#: label -> (sampler, options): at most 256 particles and 200 steps, 64 samples
EXACT_CONFIGS = {"exact": ("exact", {}), "dps": ("dps", {"num_steps": 200, "scale": 1.0}), "rdmc": ("rdmc", {}),
                 **_particle_configs(200, 256, 64)}
_BEST_EXACT = {"num_steps": 200, "num_runs": 64, "num_particles": 256, **MOVES}
#: the second-order twist with a DPS pilot refitted twice (README, "The second-order twist with a refitted pilot")
_SECOND_ORDER_PILOT = {**_BEST_EXACT, "twisting": "second_order", "guidance": "pilot", "pilot_rounds": 3}
#: variations of the best exact-case configuration, run only when named with --configs: more or larger moves,
#: moves at every step (resampling every step), larger runs, 1000 steps (beyond the bar's 200: a diagnostic
#: of the time discretisation), the oracle twist p(y | x_t) (twisting: exact; a mixture prior's only), the
#: second-order twist with pilots, refitted, of doubled variance (pilot_inflation)
EXACT_VARIANTS = {
    "twisted_smc 64 runs x 4, 10 moves": ("twisted_smc", {**_BEST_EXACT, "move_steps": 10}),
    "twisted_smc 64 runs x 4, moves c=0.5": ("twisted_smc", {**_BEST_EXACT, "move_step_size": 0.5}),
    "twisted_smc 64 runs x 4, moves every step": ("twisted_smc", {**_BEST_EXACT, "resampling_threshold": 1.0}),
    "twisted_smc 16 runs x 16, moves every step": ("twisted_smc", {**_BEST_EXACT, "num_runs": 16,
                                                                    "resampling_threshold": 1.0}),
    "twisted_smc 64 runs x 4, 1000 steps": ("twisted_smc", {"num_steps": 1000, "num_runs": 64, "num_particles": 256}),
    "twisted_smc 64 runs x 4, moves, exact twist": ("twisted_smc", {**_BEST_EXACT, "twisting": "exact"}),
    "twisted_smc 64 runs x 4, exact twist": ("twisted_smc", {"num_steps": 200, "num_runs": 64, "num_particles": 256,
                                                             "twisting": "exact"}),
    "twisted_smc K=256, exact twist": ("twisted_smc", {"num_steps": 200, "num_particles": 256, "twisting": "exact"}),
    "twisted_smc 64 runs x 4, moves, second order": ("twisted_smc", {**_BEST_EXACT, "twisting": "second_order"}),
    "twisted_smc 64 runs x 4, moves, second order, pilot": ("twisted_smc", {**_SECOND_ORDER_PILOT, "pilot_rounds": 1}),
    "twisted_smc 64 runs x 4, moves, second order, refitted pilot": ("twisted_smc", _SECOND_ORDER_PILOT),
    "twisted_smc 16 runs x 16, moves, second order, refitted pilot": ("twisted_smc", {**_SECOND_ORDER_PILOT,
                                                                                      "num_runs": 16}),
    "twisted_smc 64 runs x 4, moves, second order, inflated pilot": ("twisted_smc", {**_SECOND_ORDER_PILOT,
                                                                                     "pilot_inflation": 2.0}),
}
#: at most 64 particles and 100 steps, 16 samples; DPS and RDMC with the problem files' options
UNET_CONFIGS = {"dps": ("dps", None), "rdmc": ("rdmc", None), **_particle_configs(100, 64, 16)}
#: every configuration a mixture case accepts
MIXTURE_CONFIGS = {**EXACT_CONFIGS, **EXACT_VARIANTS}
CONFIGS = {**MIXTURE_CONFIGS, **UNET_CONFIGS}


def component_counts(prior, samples: torch.Tensor) -> list[int]:
    """How many of the samples each component of the mixture ``prior`` explains best (largest responsibility)."""
    best = prior.responsibilities(samples.reshape(samples.shape[0], -1)).argmax(1)
    return torch.bincount(best, minlength=len(prior.log_weights)).tolist()


def landing(counts: list[int]) -> str:
    """``component_counts`` as text: "component (samples)" for each component that explains some."""
    return ", ".join(f"{k} ({n})" for k, n in enumerate(counts) if n)


def measure(case: str, label: str, seed: int, registry) -> dict:
    """One run of one configuration on one case: the table's row."""
    problem = load_problem(ROOT / "problems" / CASES[case], case)
    name, options = (MIXTURE_CONFIGS if case in MIXTURE_CASES else UNET_CONFIGS)[label]
    if options is None:
        options = problem.config.sampler_options.get(name, {})
    info = registry.get(name)
    row, _ = measure_sampler(problem, case, label, build_sampler(info.sampler_class, options), info, options, seed)
    return row


def measure_sampler(problem, case: str, label: str, sampler, info, options: dict, seed: int) -> tuple[dict, object]:
    """One run of ``sampler`` (the registry's ``info``) on the loaded ``problem``: the table's row, and the run's
    ``SampleResult``."""
    name = info.name
    num_samples = problem.config.num_samples
    cpu_start = time.process_time()
    result = sample_posterior(sampler, problem.posterior, num_samples, generator=torch.Generator().manual_seed(seed))
    cpu = time.process_time() - cpu_start
    images, mean, _ = posterior_moments(problem, result)
    summary = run_summary(problem, info, sampler, result, seed=seed, device="cpu", num_samples=num_samples,
                          images=images, mean=mean)
    metrics, exact = summary["metrics"], summary.get("exact_posterior", {})
    return {"case": case, "config": label, "sampler": name, "options": options, "seed": seed,
            "num_samples": num_samples,
            "sliced_wasserstein": exact.get("sliced_wasserstein_to_exact"),
            "floor": exact.get("sliced_wasserstein_noise_floor"),
            "psnr_mean": metrics["psnr_posterior_mean"], "psnr_exact_mean": exact.get("psnr_exact_mean"),
            "psnr_single": metrics["psnr_samples_average"],
            "coverage_90": metrics["coverage_90"], "coverage_90_exact": exact.get("coverage_90_exact"),
            "distinct_samples": metrics["distinct_samples"],
            "log_evidence": result.log_evidence, "log_evidence_exact": exact.get("log_evidence"),
            "network_evaluations_per_sample": result.network_evaluations_per_sample,
            "wall_seconds": result.wall_time, "cpu_seconds": cpu,
            **_landings(problem, result, num_samples, seed)}, result


def _landings(problem, result, num_samples: int, seed: int) -> dict:
    """For a mixture prior: where the samples land, and where as many exact posterior draws land (``landing``)."""
    prior = problem.posterior.prior
    if not isinstance(prior, GaussianMixturePrior):
        return {"lands_in": None, "exact_lands_in": None}
    draws = ExactPosterior.from_posterior(problem.posterior).sample(
        num_samples, generator=torch.Generator().manual_seed(seed))
    return {"lands_in": landing(component_counts(prior, result.samples)),
            "exact_lands_in": landing(component_counts(prior, draws))}


def _cell(value, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(rows: list[dict]) -> str:
    """Markdown: one table per case, seeds shown side by side (a / b)."""
    lines = []
    for case in dict.fromkeys(row["case"] for row in rows):
        case_rows = [row for row in rows if row["case"] == case]
        first = case_rows[0]
        heading = f"#### {case} ({first['num_samples']} samples)"
        if first["floor"] is not None:
            heading += (f": exact posterior mean PSNR {first['psnr_exact_mean']:.2f}, coverage_90 "
                        f"{first['coverage_90_exact']:.2f}, log p(y) {first['log_evidence_exact']:.1f}, "
                        f"sliced-Wasserstein floor {first['floor']:.3f}")
        if first.get("exact_lands_in"):
            heading += f"; exact draws land in {first['exact_lands_in']}"
        lines += [heading, "",
                  "| sampler | SW to exact | SW / floor | PSNR mean | PSNR single | coverage_90 | distinct | "
                  "log Z_hat | NFE / sample | wall s | CPU s | samples land in |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label in dict.fromkeys(row["config"] for row in case_rows):
            runs = [row for row in case_rows if row["config"] == label]

            def joined(key, digits):
                return " / ".join(_cell(row[key], digits) for row in runs)
            ratio = " / ".join("–" if row["floor"] is None else f"{row['sliced_wasserstein'] / row['floor']:.1f}"
                               for row in runs)
            lines.append(f"| {label} | {joined('sliced_wasserstein', 3)} | {ratio} | {joined('psnr_mean', 2)} | "
                         f"{joined('psnr_single', 2)} | {joined('coverage_90', 2)} | {joined('distinct_samples', 0)} | "
                         f"{joined('log_evidence', 1)} | {joined('network_evaluations_per_sample', 0)} | "
                         f"{joined('wall_seconds', 1)} | {joined('cpu_seconds', 1)} | "
                         f"{' / '.join(row.get('lands_in') or '–' for row in runs)} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(EXACT_CASES), choices=list(CASES))
    parser.add_argument("--configs", nargs="+", default=None, choices=list(CONFIGS),
                        help="default: every configuration of the cases' family but EXACT_VARIANTS")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--name", help="file name of the outputs, without extension (default image_dimension_table)")
    arguments = parser.parse_args()
    registry = load_registry()
    rows = []
    for case in arguments.cases:
        default, family = (EXACT_CONFIGS, MIXTURE_CONFIGS) if case in MIXTURE_CASES else (UNET_CONFIGS, UNET_CONFIGS)
        for label in [label for label in arguments.configs or default if label in family]:
            for seed in arguments.seeds:
                rows.append(measure(case, label, seed, registry))
                print(json.dumps(rows[-1]), flush=True)
    arguments.out.mkdir(parents=True, exist_ok=True)
    name = arguments.name or "image_dimension_table"
    (arguments.out / f"{name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (arguments.out / f"{name}.md").write_text(table(rows))
    print(table(rows))


if __name__ == "__main__":
    main()
