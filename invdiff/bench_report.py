"""The reports of ``invdiff bench``: results.csv/json (one row per cell), tables.md, tuning.md/json, figures.

Tables give, per problem case, one row per method and the mean +- standard error over the test
images of each metric, the seeds (replicates) of an image averaged first. On cases with an exact
posterior a ceiling row gives what the exact posterior itself scores (its mean's PSNR/SSIM, the
coverage of as many exact draws), and the sliced Wasserstein column's ceiling entry is the
exact-vs-exact floor (the component TV column's: that of as many exact draws). A ranking table orders
the methods by PSNR of the posterior mean in each case.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import defaultdict

import numpy as np

from invdiff.evaluation import show_image
from invdiff.metrics import SSIM_CONVENTION, calibrated_coverage

__all__ = ["write_reports", "aggregate", "CEILING", "ORACLE"]

CEILING = "exact posterior (ceiling)"
#: the suffix of a method's row tuned on each test image itself (``oracle: true``): not a fair score
ORACLE = "(oracle-tuned)"
#: (column title, row field, format, scale)
COLUMNS = [("PSNR mean (dB)", "psnr_posterior_mean", ".2f", 1), ("SSIM mean", "ssim_posterior_mean", ".3f", 1),
           ("PSNR single (dB)", "psnr_samples_average", ".2f", 1), ("std", "posterior_std_average", ".3f", 1),
           ("coverage 90%", "coverage_90", ".2f", 1), ("distinct", "distinct_samples", ".0f", 1),
           ("NFE / sample", "network_evaluations_per_sample", ".0f", 1), ("wall (s)", "wall_time_seconds", ".2f", 1),
           ("CPU (s)", "cpu_time_seconds", ".2f", 1), ("peak memory (MB)", "peak_memory_bytes", ".0f", 1e-6),
           ("SW to exact", "sliced_wasserstein_to_exact", ".3f", 1),
           ("component TV", "component_tv_to_exact", ".2f", 1)]
#: the fields of the ceiling row, in the columns of the sampler fields
CEILING_FIELDS = {"psnr_posterior_mean": "psnr_exact_mean", "ssim_posterior_mean": "ssim_exact_mean",
                  "coverage_90": "coverage_90_exact", "sliced_wasserstein_to_exact": "sliced_wasserstein_noise_floor",
                  "component_tv_to_exact": "component_tv_noise_floor"}


def aggregate(rows: list[dict], field: str) -> tuple[float, float, int] | None:
    """Mean and standard error over images of ``field``, the seeds of an image averaged first; None if absent."""
    per_image = defaultdict(list)
    for row in rows:
        if row.get(field) is not None:
            per_image[row["image_index"]].append(float(row[field]))
    values = [sum(seeds) / len(seeds) for seeds in per_image.values()]
    if not values:
        return None
    error = float(np.std(values, ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return float(np.mean(values)), error, len(values)


def _shown(statistics: tuple[float, float, int] | None, format_spec: str, scale: float) -> str:
    if statistics is None:
        return "-"
    mean, error, _ = statistics
    text = f"{mean * scale:{format_spec}}"
    return text if math.isnan(error) or error == 0 else f"{text} ± {error * scale:{format_spec}}"


def _by_problem(rows: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["problem"]].append(row)
    return grouped


def _method_rows(rows: list[dict]) -> dict[str, list[dict]]:
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["method"]].append(row)
    return grouped


def _ceiling_rows(rows: list[dict]) -> list[dict]:
    """The exact posterior's own scores as rows in the sampler fields (from the sampler cells' exact blocks)."""
    return [{"image_index": row["image_index"], **{field: row.get(source) for field, source in CEILING_FIELDS.items()}}
            for row in rows if row.get("psnr_exact_mean") is not None]


def _case_table(rows: list[dict]) -> str:
    ok = [row for row in rows if row["status"] == "ok"]
    methods = _method_rows(ok)
    ceiling = _ceiling_rows(ok)
    columns = [column for column in COLUMNS if any(row.get(column[1]) is not None for row in ok)]
    images = max((aggregate(method, "psnr_posterior_mean") or (0, 0, 0))[2] for method in methods.values()) \
        if methods else 0
    lines = [f"| method | {' | '.join(title for title, *_ in columns)} |", "|---" * (len(columns) + 1) + "|"]
    entries = list(methods.items()) + ([(CEILING, ceiling)] if ceiling else [])
    for label, method_rows in entries:
        cells = [_shown(aggregate(method_rows, field), format_spec, scale) for _, field, format_spec, scale in columns]
        lines.append(f"| {label} | {' | '.join(cells)} |")
    refused = {(row["method"], row["status"], row["message"]) for row in rows if row["status"] != "ok"}
    notes = [f"* not in the table: {method}: {status}: {message}" for method, status, message in sorted(refused)]
    return "\n".join([f"{images} test image(s)", "", *lines, *([""] + notes if notes else [])])


def _ranking(test_rows: list[dict]) -> str:
    """Each method's rank by mean PSNR of the posterior mean in each case (1 = best), and its mean rank; the
    oracle-tuned rows are not ranked (they are not fair scores)."""
    problems = _by_problem([row for row in test_rows if row["status"] == "ok" and not row["method"].endswith(ORACLE)])
    ranks: dict[str, dict[str, int]] = defaultdict(dict)
    for problem, rows in problems.items():
        scores = {method: aggregate(method_rows, "psnr_posterior_mean")[0]
                  for method, method_rows in _method_rows(rows).items()}
        # a method without a number (NaN) ranks last, whatever the order of the rows
        best_first = sorted(scores, key=lambda method: (math.isnan(scores[method]), -scores[method]))
        for rank, method in enumerate(best_first, start=1):
            ranks[method][problem] = rank
    order = sorted(ranks, key=lambda method: np.mean(list(ranks[method].values())))
    lines = [f"| method | {' | '.join(problems)} | mean rank |", "|---" * (len(problems) + 2) + "|"]
    for method in order:
        cells = [str(ranks[method].get(problem, "-")) for problem in problems]
        lines.append(f"| {method} | {' | '.join(cells)} | {np.mean(list(ranks[method].values())):.2f} |")
    return "\n".join(lines)


def _tables(name: str, test_rows: list[dict], tuning: list[dict]) -> str:
    parts = [f"# Benchmark `{name}`", "",
             "Per problem case: mean ± standard error over the test images (the seeds of an image averaged first). "
             "PSNR and SSIM of the posterior mean (baselines: of their reconstruction), images in [0, 1]; SSIM: "
             f"{SSIM_CONVENTION}. Single: the average PSNR of single samples. std: mean per-pixel posterior std. "
             f"Coverage: of the 90% per-pixel credible intervals{_calibrated_coverage_note(test_rows)}. "
             "NFE: network evaluations per returned sample. "
             "Peak memory: growth of the resident set (CPU) or torch.cuda.max_memory_allocated (GPU). SW: sliced "
             f"Wasserstein distance to exact posterior draws (prior space); the '{CEILING}' row gives the exact "
             "posterior's own scores, and in the SW column the exact-vs-exact floor. Component TV (mixture priors): "
             "total variation between the mixture components' shares of the samples and their exact posterior "
             "weights; in the ceiling row, the same for as many exact draws."]
    if tuning:
        parts.append("Tuned options were chosen on the validation images (tuning.md), never on the test images.")
    if any(row["method"].endswith(ORACLE) for row in test_rows):
        parts.append(f"Except the rows marked '{ORACLE}': their value was chosen on each test image itself (tuning.md), "
                     "an upper bound for that method, not a fair score; they are left out of the ranking.")
    for problem, rows in _by_problem(test_rows).items():
        parts += ["", f"## {problem}", "", _case_table(rows)]
    parts += ["", "## Ranking by PSNR of the posterior mean", "", _ranking(test_rows), ""]
    return "\n".join(parts)


def _calibrated_coverage_note(rows: list[dict]) -> str:
    """What a calibrated sampler's coverage is expected to be at the cells' numbers of samples."""
    counts = sorted({int(row["num_samples"]) for row in rows if int(row.get("num_samples") or 0) >= 2})
    if not counts:
        return ""
    expected = ", ".join(f"{calibrated_coverage(count):.3f} at {count} samples" for count in counts)
    return (f" (a calibrated sampler, truth drawn from its prior, is expected to score {expected} where the "
            "posterior's marginals are Gaussian: invdiff.metrics.calibrated_coverage)")


def _tuning_markdown(tuning: list[dict]) -> str:
    lines = ["# Tuning on validation images", "",
             "Per problem case and method: every value of the grid, scored by the mean over the validation images "
             "of the PSNR of the posterior mean (seeds averaged per image first); the best is used on the test "
             "images. '-': some cell of that value did not run.", ""]
    for record in tuning:
        lines += [f"## {record['problem']}: {record['method']} (chosen {_values(record['chosen'])}, "
                  f"{record['validation_images']} validation cell(s) per value)", "", "| values | mean PSNR (dB) |",
                  "|---|---|"]
        lines += [f"| {_values(point['values'])} | {_number(point['mean_psnr'])} |" for point in record["grid"]]
        if "oracle_chosen" in record:
            lines += ["", "Oracle-tuned row (chosen on each test image itself): " + "; ".join(
                f"image {image}: {_values(values)}" for image, values in record["oracle_chosen"].items())]
        lines.append("")
    return "\n".join(lines)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _values(values: dict) -> str:
    return ", ".join(f"{key}={value}" for key, value in values.items())


def _csv(rows: list[dict]) -> str:
    fields = list(dict.fromkeys(field for row in rows for field in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: json.dumps(value) if isinstance(value, (dict, list)) else value
                         for key, value in row.items()})
    return buffer.getvalue()


def _figures(folder, test_rows: list[dict]) -> None:
    """Per case: truth, measurement, each method's estimate and std (first test image, first seed); and
    PSNR of the posterior mean against NFE per sample, baselines and the ceiling as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (folder.out / "figures").mkdir(exist_ok=True)
    for problem, rows in _by_problem([row for row in test_rows if row["status"] == "ok"]).items():
        first = {}
        for row in rows:
            if row["image_index"] == 0 and row["method"] not in first:
                first[row["method"]] = row
        some = next(iter(first.values()))["images"]
        inputs = [("truth", some["truth"])] + ([("measurement", some["measurement"])] if "measurement" in some else [])
        columns = len(inputs) + len(first)
        figure, axes = plt.subplots(2, columns, figsize=(1.9 * columns, 4.0), squeeze=False)
        for axis in axes.flat:
            axis.axis("off")
        for column, (title, image) in enumerate(inputs):
            _show(axes[0, column], image, title)
        for column, (method, row) in enumerate(first.items(), start=len(inputs)):
            _show(axes[0, column], row["images"]["mean"], method)
            if "std" in row["images"]:
                _show(axes[1, column], row["images"]["std"], f"{method} std", std=True)
        figure.suptitle(f"{problem}: test image 0 (means, then per-pixel std)", fontsize=9)
        figure.tight_layout()
        figure.savefig(folder.out / "figures" / f"{problem}.png", dpi=110)
        plt.close(figure)
        _psnr_against_cost(plt, folder.out / "figures" / f"{problem}-psnr-nfe.png", problem, rows)


def _psnr_against_cost(plt, path, problem: str, rows: list[dict]) -> None:
    figure, axis = plt.subplots(figsize=(5.5, 3.8))
    ceiling = aggregate(_ceiling_rows(rows), "psnr_posterior_mean")
    if ceiling is not None:
        axis.axhline(ceiling[0], color="black", linestyle="--", label=CEILING)
    for index, (method, method_rows) in enumerate(_method_rows(rows).items()):
        score = aggregate(method_rows, "psnr_posterior_mean")
        cost = aggregate(method_rows, "network_evaluations_per_sample")
        if cost is None or cost[0] == 0:
            axis.axhline(score[0], color=f"C{index}", linestyle=":", label=f"{method} (no network)")
        else:
            axis.errorbar(cost[0], score[0], yerr=0 if math.isnan(score[1]) else score[1], marker="o",
                          color=f"C{index}", label=method)
    axis.set_xscale("log")
    axis.set_xlabel("network evaluations per returned sample")
    axis.set_ylabel("PSNR of the posterior mean (dB)")
    axis.set_title(problem, fontsize=9)
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _show(axis, image, title: str, std: bool = False) -> None:
    show_image(axis, image, std=std)
    axis.set_title(title, fontsize=8)


def write_reports(folder, bench, rows: list[dict], tuning: list[dict]) -> None:
    """Write every report of a benchmark into its ``BenchFolder``."""
    records = [{key: value for key, value in row.items() if key != "images"} for row in rows]
    test_rows = [row for row in rows if row["role"] == "test"]
    folder.write("results.json", json.dumps({"name": bench.config.name, "config": bench.config.model_dump(mode="json"),
                                             "rows": records}, indent=1) + "\n")
    folder.write("results.csv", _csv(records))
    folder.write("tuning.json", json.dumps(tuning, indent=1) + "\n")
    folder.write("tuning.md", _tuning_markdown(tuning))
    folder.write("tables.md", _tables(bench.config.name, test_rows, tuning))
    _figures(folder, test_rows)
