"""``invdiff bench``: a tiny matrix runs and reports, the cache, tuning on validation images only, bad configs."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import invdiff.bench
from cli_helpers import error_of
from invdiff.bench import BenchFolder, load_bench, run_bench
from invdiff.cli import main

ROOT = Path(__file__).resolve().parent.parent
INPAINT = ROOT / "problems" / "inpaint.yaml"

#: digits-gmm-box (exact posterior known) with exact and DPS at 5 steps, 2 test images, 2 seeds
TINY = f"""
name: tiny
problems:
  - {{file: {INPAINT}, cases: [digits-gmm-box]}}
images:
  digits_gmm:
    test: [{{source: digits, index: 7}}, {{source: digits, index: 1}}]
samplers:
  exact:
  dps: {{options: {{num_steps: 5}}}}
baselines:
  pseudo_inverse:
seeds: [0, 1]
num_samples: 8
"""


def write_config(tmp_path, text, name="bench.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def rows_of(out, role="test"):
    return [row for row in json.loads((out / "results.json").read_text())["rows"] if row["role"] == role]


def computed_cells(monkeypatch) -> list[dict]:
    """The specs of the cells computed from now on (a cached cell is not computed), as a list that fills up."""
    calls = []
    original = invdiff.bench.run_cell
    monkeypatch.setattr(invdiff.bench, "run_cell", lambda spec: calls.append(spec) or original(spec))
    return calls


def test_tiny_matrix_writes_every_output_with_the_cells_of_solve(tmp_path):
    out = tmp_path / "out"
    assert main(["bench", str(write_config(tmp_path, TINY)), "--out", str(out), "--quiet"]) == 0
    rows = rows_of(out)
    # 2 images x 2 seeds per sampler, one row per image for the deterministic baseline
    assert sorted((row["method"], row["image_index"], row["seed"]) for row in rows) == sorted(
        [(method, image, seed) for method in ("exact", "dps") for image in (0, 1) for seed in (0, 1)]
        + [("pseudo_inverse", image, None) for image in (0, 1)])
    assert all(row["status"] == "ok" for row in rows)
    for row in rows:
        if row["kind"] == "sampler":
            assert row["sliced_wasserstein_to_exact"] > 0 and row["sliced_wasserstein_noise_floor"] > 0
            assert 0 <= row["component_tv_to_exact"] <= 1 and row["component_weights_exact"]
            assert 0 <= row["coverage_90"] <= 1 and row["distinct_samples"] == 8
            assert row["cpu_time_seconds"] > 0 and row["versions"]["invdiff"] and row["version"]
    assert {row["network_evaluations_per_sample"] for row in rows if row["method"] == "dps"} == {5}
    assert {row["options"]["num_steps"] for row in rows if row["method"] == "dps"} == {5}
    with (out / "results.csv").open() as file:
        assert len(list(csv.DictReader(file))) == len(rows)
    tables = (out / "tables.md").read_text()
    assert "## inpaint-digits-gmm-box" in tables and "| exact posterior (ceiling) |" in tables
    assert "| dps |" in tables and "| pseudo_inverse |" in tables and "## Ranking" in tables
    assert "| component TV |" in tables
    assert {path.name for path in (out / "figures").iterdir()} == {"inpaint-digits-gmm-box.png",
                                                                  "inpaint-digits-gmm-box-psnr-nfe.png"}
    # a cell is what `invdiff solve` computes for the same problem, image (index 7: the file's), seed and options
    assert main(["solve", str(INPAINT), "--case", "digits-gmm-box", "--sampler", "dps", "-o", "num_steps=5",
                 "--num-samples", "8", "--seed", "1", "--out", str(tmp_path / "solve"), "--quiet"]) == 0
    summary = json.loads((tmp_path / "solve" / "summary.json").read_text())
    cell = next(row for row in rows if row["method"] == "dps" and row["image_index"] == 0 and row["seed"] == 1)
    assert cell["psnr_posterior_mean"] == summary["metrics"]["psnr_posterior_mean"]
    assert cell["sliced_wasserstein_to_exact"] == summary["exact_posterior"]["sliced_wasserstein_to_exact"]
    assert cell["psnr_exact_mean"] == summary["exact_posterior"]["psnr_exact_mean"]
    assert cell["component_tv_to_exact"] == summary["exact_posterior"]["component_tv_to_exact"]


def test_a_rerun_computes_nothing_and_force_recomputes_everything(tmp_path, monkeypatch):
    config, out = write_config(tmp_path, TINY), tmp_path / "out"
    assert main(["bench", str(config), "--out", str(out), "--quiet"]) == 0
    first = rows_of(out)
    calls = computed_cells(monkeypatch)
    assert main(["bench", str(config), "--out", str(out), "--quiet"]) == 0
    assert calls == [] and rows_of(out) == first
    assert main(["bench", str(config), "--out", str(out), "--quiet", "--force"]) == 0
    assert len(calls) == len(first) == len(list((out / "cells").iterdir()))
    assert [row["psnr_posterior_mean"] for row in rows_of(out)] == [row["psnr_posterior_mean"] for row in first]
    # a changed option is a new cell; the others are still cached
    calls.clear()
    assert main(["bench", str(write_config(tmp_path, TINY.replace("num_steps: 5", "num_steps: 6"))), "--out",
                 str(out), "--quiet"]) == 0
    assert {spec["sampler"] for spec in calls} == {"dps"} and len(calls) == 4


def _tuning_config(validation: list[int], test: list[int]) -> str:
    """TV's regularisation tuned over 0.001, 0.01, 0.1 (50 iterations). Measured PSNR on digits-gmm-box:
    digit 7 is best at 0.1 (12.40 dB against 11.52 at 0.01); digits 0 and 1 are best at 0.01."""
    return f"""
problems: [{{file: {INPAINT}, cases: [digits-gmm-box]}}]
images:
  digits_gmm:
    test: {[{"source": "digits", "index": index} for index in test]}
    validation: {[{"source": "digits", "index": index} for index in validation]}
baselines:
  tv: {{options: {{iterations: 50}}, tune: {{regularisation: [0.001, 0.01, 0.1]}}}}
"""


def test_tuning_chooses_on_the_validation_images_only(tmp_path):
    out = tmp_path / "out"
    bench = load_bench(write_config(tmp_path, _tuning_config(validation=[7], test=[0])))
    rows, tuning = run_bench(bench, BenchFolder(out), progress=False)
    (record,) = tuning
    assert record["chosen"] == {"regularisation": 0.1}
    scores = {point["values"]["regularisation"]: point["mean_psnr"] for point in record["grid"]}
    assert max(scores, key=scores.get) == 0.1 and len(rows_of(out, "validation")) == 3
    (test_row,) = rows_of(out)
    assert test_row["options"]["regularisation"] == 0.1 and test_row["truth"]["index"] == 0
    assert "regularisation=0.1" in (out / "tuning.md").read_text()
    # on the test image itself the best value is another one: choosing there would have picked it
    on_test = load_bench(write_config(tmp_path, _tuning_config(validation=[0], test=[7]), "on_test.yaml"))
    _, (record_on_test,) = run_bench(on_test, BenchFolder(out), progress=False)
    assert record_on_test["chosen"] == {"regularisation": 0.01}


def test_a_name_given_twice_in_samplers_or_cases_is_refused(tmp_path, capsys):
    config = write_config(tmp_path, TINY)
    assert "--samplers: dps given twice" in error_of(["bench", str(config), "--out", str(tmp_path / "out"),
                                                      "--samplers", "dps,dps"], capsys)
    assert "--cases: digits-gmm-box given twice" in error_of(["bench", str(config), "--out", str(tmp_path / "out"),
                                                              "--cases", "digits-gmm-box,digits-gmm-box"], capsys)
    assert not (tmp_path / "out").exists()


def test_a_ray_address_ray_cannot_use_is_refused_before_the_folder_is_written(tmp_path, capsys):
    """An audit: a traceback (exit 1) after the folder and its cells/ were made."""
    config = write_config(tmp_path, TINY)
    error = error_of(["bench", str(config), "--out", str(tmp_path / "out"), "--ray", "notanaddress"], capsys)
    assert error.startswith("invdiff: error: --ray"), error
    assert not (tmp_path / "out").exists()


def test_validation_images_that_are_test_images_are_refused(tmp_path, capsys):
    """Tuning on a test image is what the split prevents (it ran, and picked that image's own best value)."""
    config = write_config(tmp_path, _tuning_config(validation=[3, 0], test=[7, 0]))
    error = error_of(["bench", str(config), "--out", str(tmp_path / "out")], capsys)
    assert "images.digits_gmm.validation.1 is also a test image (test.1)" in error, error
    assert not (tmp_path / "out").exists()


def test_an_oracle_row_is_tuned_on_each_test_image_and_labelled(tmp_path):
    config = _tuning_config(validation=[1], test=[7, 0]).replace("regularisation: [0.001, 0.01, 0.1]}}",
                                                                 "regularisation: [0.001, 0.01, 0.1]}, oracle: true}")
    out = tmp_path / "out"
    rows, (record,) = run_bench(load_bench(write_config(tmp_path, config)), BenchFolder(out), progress=False)
    test_rows = rows_of(out)
    fair = {row["truth"]["index"]: row["options"]["regularisation"] for row in test_rows if row["method"] == "tv"}
    oracle = {row["truth"]["index"]: row["options"]["regularisation"] for row in test_rows
              if row["method"] == "tv (oracle-tuned)"}
    assert fair == {7: 0.01, 0: 0.01} and oracle == {7: 0.1, 0: 0.01}  # digit 7 is best at 0.1 on itself
    assert record["oracle_chosen"] == {0: {"regularisation": 0.1}, 1: {"regularisation": 0.01}}
    tables = (out / "tables.md").read_text()
    assert "| tv (oracle-tuned) |" in tables and "an upper bound" in tables
    assert "oracle" not in tables.split("## Ranking")[1]  # not a fair score: not ranked
    assert "image 0: regularisation=0.1" in (out / "tuning.md").read_text()


@pytest.mark.parametrize("change, expected", [
    (("  exact:\n", "  exactt:\n"), "samplers.exactt: unknown sampler 'exactt'; available:"),
    (("cases: [digits-gmm-box]", "cases: [nope]"), "unknown case 'nope'; allowed: natural-box-quick, digits-box"),
    (("num_steps: 5", "num_stepz: 5"), "num_stepz: unknown key; allowed: batch_size, num_steps"),
    (("dps: {options: {num_steps: 5}}", "dps: {tune: {scale: [1, -1]}}"), "has no validation images"),
    (("  pseudo_inverse:\n", "  wiener:\n"), "baselines.wiener: unknown baseline; allowed: pseudo_inverse, tv"),
    (("  pseudo_inverse:\n", "  pseudo_inverse: {oracle: true}\n"), "oracle: true needs a tune grid"),
    (("seeds: [0, 1]", "seeds: [0, 1]\ncolour: red"), "colour: unknown key; allowed: baselines"),
    ((str(INPAINT), str(INPAINT.with_name("missing.yaml"))), "missing.yaml does not exist"),
    (("{source: digits, index: 7}", "{source: digitz}"), "images.digits_gmm.test.0.source: unknown value 'digitz'"),
    (("{source: digits, index: 1}", "{source: file, path: nope.png}"), "images.digits_gmm.test.1: path: "),
    (("{source: digits, index: 1}", "{source: digits, index: 9999}"),
     "images.digits_gmm.test.1: index: the test split has 300 images, so index must be < 300 (got 9999)"),
    (("  digits_gmm:\n", "  digitsgmm:\n"),
     "images.digitsgmm: no case of this configuration has the prior 'digitsgmm'; its cases' priors: digits_gmm"),
    (("seeds: [0, 1]", "seeds: [0, 1, 1]"), "seeds: 1 given twice"),
    (("dps: {options: {num_steps: 5}}", "dps: {options: {num_steps: 5}, tune: {scale: [1, 1]}}"),
     "samplers.dps.tune: scale: 1 is given twice; give each value once"),
])
def test_a_bad_config_is_one_line_and_exit_2_before_any_work(tmp_path, capsys, change, expected):
    config = write_config(tmp_path, TINY.replace(*change))
    assert expected in error_of(["bench", str(config), "--out", str(tmp_path / "out")], capsys)
    assert not (tmp_path / "out").exists()


def test_an_unsafe_out_is_refused(tmp_path, capsys, monkeypatch):
    config = write_config(tmp_path, TINY)
    monkeypatch.chdir(tmp_path)
    assert "working directory or one of its parents" in error_of(["bench", str(config), "--out", "."], capsys)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert "was not written by invdiff bench" in error_of(["bench", str(config), "--out", "mine"], capsys)
    assert "is a file" in error_of(["bench", str(config), "--out", "bench.yaml"], capsys)
    assert [path.name for path in (tmp_path / "mine").iterdir()] == ["notes.txt"]


#: the fields that measure the machine, not the sampler: they differ between any two runs
TIMINGS = ("wall_time_seconds", "cpu_time_seconds", "peak_memory_bytes")


def test_ray_tasks_give_the_cells_of_an_in_process_run(tmp_path):
    """A local Ray instance with two workers runs the tiny matrix; every metric equals that of a run without
    Ray under the same thread settings (a task gets OMP_NUM_THREADS = its CPUs, 1 here): the thread count,
    fixed when torch loads, changes float sums in the last bits, which DPS amplifies to 1e-4 dB in five steps."""
    ray = pytest.importorskip("ray", reason="ray is not installed: pip install 'invdiff[ray]'")
    config = _one_thread_bench(tmp_path, "local")   # what a 1-CPU Ray task gets
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert main(["bench", str(config), "--out", str(tmp_path / "ray"), "--quiet", "--ray", "auto"]) == 0
        # fresh_process on Ray: a new worker per task
        assert main(["bench", str(_one_cell(tmp_path, True)), "--out", str(tmp_path / "ray-fresh"), "--quiet",
                     "--ray", "auto"]) == 0
    finally:
        ray.shutdown()
    (fresh,) = rows_of(tmp_path / "ray-fresh")
    assert fresh["status"] == "ok" and _same_but_cost(fresh, rows_of(tmp_path / "local")[0])
    _assert_same_cells(rows_of(tmp_path / "local"), rows_of(tmp_path / "ray"))


def test_worker_processes_give_the_cells_of_an_in_process_run(tmp_path):
    """``--workers 2`` runs the tiny matrix in two local processes of one torch thread each (cpus_per_cell):
    every metric equals that of a one-thread run in one process; with ``fresh_process`` a new process per
    cell gives the same too."""
    config = _one_thread_bench(tmp_path, "local")
    assert main(["bench", str(config), "--out", str(tmp_path / "workers"), "--quiet", "--workers", "2"]) == 0
    assert main(["bench", str(_one_cell(tmp_path, True)), "--out", str(tmp_path / "fresh"), "--quiet",
                 "--workers", "2"]) == 0
    (fresh,) = rows_of(tmp_path / "fresh")
    assert fresh["status"] == "ok" and _same_but_cost(fresh, rows_of(tmp_path / "local")[0])
    _assert_same_cells(rows_of(tmp_path / "local"), rows_of(tmp_path / "workers"))


def _one_thread_bench(tmp_path, out: str):
    """The tiny matrix with one seed, run by ``invdiff bench`` in a new process of one torch thread into
    ``tmp_path / out``; returns the configuration's path."""
    config = write_config(tmp_path, TINY.replace("seeds: [0, 1]", "seeds: [0]"))
    one_thread = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "invdiff", "bench", str(config), "--out", str(tmp_path / out), "--quiet"],
                   env=one_thread, check=True)
    return config


def _assert_same_cells(local: list[dict], other: list[dict]) -> None:
    """The six test rows of the tiny matrix (one seed) are the same in both runs, but for their cost."""
    assert len(local) == len(other) == 6
    for first, second in zip(local, other):
        assert {key: _rounded(value) for key, value in first.items() if key not in TIMINGS} == \
            {key: _rounded(value) for key, value in second.items() if key not in TIMINGS}


@pytest.mark.parametrize("arguments, expected", [
    (["--workers", "0"], "--workers 0: the number of processes must be at least 1"),
    (["--workers", "2", "--ray", "auto"], "--workers and --ray both say where the cells run"),
    (["--cases", "digits-box"], "--cases digits-box: digits-box is not a case of bench.yaml; allowed: digits-gmm-box"),
    (["--cases", ","], "--cases ',': names no case; allowed: digits-gmm-box"),
    (["--samplers", ""], "--samplers '': names no sampler; give 'all' or some of"),
])
def test_bad_workers_and_cases_are_one_line_and_exit_2(tmp_path, capsys, arguments, expected):
    config = write_config(tmp_path, TINY)
    assert expected in error_of(["bench", str(config), "--out", str(tmp_path / "out"), *arguments], capsys)
    assert not (tmp_path / "out").exists()


def test_cases_runs_only_those_cases_and_shares_the_cache_of_the_whole(tmp_path, monkeypatch):
    deblur = INPAINT.with_name("deblur.yaml")
    text = TINY.replace("seeds: [0, 1]", "seeds: [0]").replace("baselines:\n  pseudo_inverse:\n", "")
    second = f"\n  - {{file: {deblur}, cases: [digits-gmm-gaussian]}}"
    text = text.replace("cases: [digits-gmm-box]}", "cases: [digits-gmm-box]}" + second)
    config, out = write_config(tmp_path, text), tmp_path / "out"
    assert main(["bench", str(config), "--out", str(out), "--cases", "digits-gmm-gaussian", "--quiet"]) == 0
    assert {row["case"] for row in rows_of(out)} == {"digits-gmm-gaussian"} and len(rows_of(out)) == 4
    calls = computed_cells(monkeypatch)
    assert main(["bench", str(config), "--out", str(out), "--quiet"]) == 0
    assert {spec["case"] for spec in calls} == {"digits-gmm-box"} and len(calls) == 4
    assert {row["case"] for row in rows_of(out)} == {"digits-gmm-box", "digits-gmm-gaussian"}


def _one_cell(tmp_path, fresh: bool):
    """TINY cut to one cell (exact, digit 7, seed 0), optionally with ``fresh_process: true``."""
    text = TINY.replace("seeds: [0, 1]", "seeds: [0]").replace("  dps: {options: {num_steps: 5}}\n", "")
    text = text.replace("{source: digits, index: 7}, {source: digits, index: 1}", "{source: digits, index: 7}")
    text = text.replace("baselines:\n  pseudo_inverse:\n", "")
    return write_config(tmp_path, text + ("fresh_process: true\n" if fresh else ""), f"one-{fresh}.yaml")


def _same_but_cost(first: dict, second: dict) -> bool:
    unmeasured = TIMINGS + ("cell",)
    return ({key: _rounded(value) for key, value in first.items() if key not in unmeasured}
            == {key: _rounded(value) for key, value in second.items() if key not in unmeasured})


def test_fresh_process_cells_give_the_same_results_under_their_own_key(tmp_path):
    """``fresh_process: true`` runs each cell in a new process (its peak memory its own): the same metrics,
    cached apart from cells that shared a process."""
    assert main(["bench", str(_one_cell(tmp_path, False)), "--out", str(tmp_path / "shared"), "--quiet"]) == 0
    assert main(["bench", str(_one_cell(tmp_path, True)), "--out", str(tmp_path / "fresh"), "--quiet"]) == 0
    (shared,), (fresh,) = rows_of(tmp_path / "shared"), rows_of(tmp_path / "fresh")
    assert fresh["status"] == "ok" and shared["cell"] != fresh["cell"] and _same_but_cost(shared, fresh)


def _rounded(value):
    """Floats to 12 significant digits: the exact posterior's float64 linear algebra differs in the last bits
    between a worker process and this one (LAPACK's own threads); anything else as it is."""
    return float(f"{value:.12g}") if isinstance(value, float) else value


def test_cells_are_keyed_by_the_files_a_problem_names_not_by_their_spelling(tmp_path, monkeypatch):
    """The same relative checkpoint path in two folders, or a checkpoint rewritten in place, is another cell; a
    shipped prior is keyed by its checkpoint's content, so a problem file moved keeps its key and a shipped prior
    replaced in place (the cache served the old prior's numbers) does not."""
    import shutil

    import invdiff.bench
    from invdiff.bench import cell_key
    from invdiff.checkpoints import SHIPPED_PRIORS_DIRECTORY

    def spec(folder):
        problem = {"name": "p", "prior": {"name": "checkpoint", "path": "prior.safetensors"},
                   "truth": {"source": "digits", "index": 0}}
        return {"problem": problem, "problem_file": str(folder / "problem.yaml"), "kind": "sampler", "sampler": "dps",
                "version": "1", "options": {}, "seed": 0, "num_samples": 2, "device": "cpu", "invdiff_version": "0"}

    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "prior.safetensors").write_bytes(b"weights")
    first = cell_key(spec(tmp_path / "one"))
    assert first != cell_key(spec(tmp_path / "two"))
    (tmp_path / "one" / "prior.safetensors").write_bytes(b"retrained weights")
    assert cell_key(spec(tmp_path / "one")) != first
    shipped = spec(tmp_path / "one")
    shipped["problem"]["prior"] = {"name": "digits"}
    moved = {**shipped, "problem_file": str(tmp_path / "two" / "problem.yaml")}
    assert cell_key(shipped) == cell_key(moved)
    priors = tmp_path / "priors"
    shutil.copytree(SHIPPED_PRIORS_DIRECTORY, priors)
    monkeypatch.setattr(invdiff.bench, "SHIPPED_PRIORS_DIRECTORY", priors)
    before = cell_key(shipped)
    checkpoint = priors / "digits.safetensors"
    checkpoint.write_bytes(checkpoint.read_bytes() + b" ")   # other bytes, the same name
    assert cell_key(shipped) != before


SHIPPED_BENCHMARKS = sorted(path for path in (ROOT / "benchmarks").glob("*.yaml")
                            if "problems" in yaml.safe_load(path.read_text()))   # not sizes_problems.yaml, a problem file


@pytest.mark.parametrize("path", SHIPPED_BENCHMARKS, ids=lambda path: path.name)
def test_shipped_benchmark_configurations_load(path):
    """Every configuration under benchmarks/ is valid as shipped: its problem files, cases, images, samplers
    and options (a renamed case or option would otherwise surface only when someone runs it)."""
    bench = load_bench(path)
    assert bench.cases and bench.methods


def test_a_method_without_a_number_ranks_last_whatever_the_row_order():
    """A NaN PSNR (one seed's failed metric) ranked first or second depending on the order of the rows."""
    from invdiff.bench_report import _ranking

    def rows(method, value):
        return [{"problem": "case", "method": method, "status": "ok", "image_index": 0, "psnr_posterior_mean": value}]

    for order in ([("broken", float("nan")), ("good", 20.0), ("fair", 10.0)],
                  [("good", 20.0), ("fair", 10.0), ("broken", float("nan"))]):
        table = _ranking([row for method, value in order for row in rows(method, value)])
        assert [line.split("|")[1].strip() for line in table.splitlines()[2:]] == ["good", "fair", "broken"], table
