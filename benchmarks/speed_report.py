"""The speed report: runs the speed suite (``benchmarks/test_speed.py``) once and writes its ratios as markdown.

    OMP_NUM_THREADS=1 python benchmarks/speed_report.py [--out benchmarks/results/speed.md] [-- PYTEST_ARGS]

Three tables, every number from the one run (medians over the suite's rounds, wall time and the
process's CPU time, ``time.process_time``):

* overhead per sampler: the run's time over the time of its network calls alone, each call timed
  at the run's batch, forward only or with the backward pass for samplers that backpropagate
  through the network (``Sampler.needs_network_gradient``); calls = network evaluations / batch;
* particle throughput: particle-steps per second of the samplers run at several particle counts;
* invdiff's ``dps`` against deepinv's (``deepinv_dps``) at equal network calls: the time ratio.

The header names the machine, its load average before and after, and the samplers the suite
skipped with their reasons. ``--out`` also keeps pytest-benchmark's JSON next to the markdown
(same name, ``.json``). Arguments after ``--`` go to pytest (e.g. ``-k natural``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from xml.etree import ElementTree

import torch

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "benchmarks" / "test_speed.py"


def run_suite(json_path: Path, junit_path: Path, pytest_arguments: list[str]) -> float:
    """Run the suite under pytest-benchmark, writing its JSON and JUnit files; returns the wall seconds."""
    command = [sys.executable, "-m", "pytest", str(SUITE), "-q", "-p", "no:cacheprovider", "--benchmark-only",
               f"--benchmark-json={json_path}", f"--junitxml={junit_path}", *pytest_arguments]
    start = time.perf_counter()
    completed = subprocess.run(command, cwd=ROOT)
    if completed.returncode != 0:
        raise SystemExit(f"the speed suite failed (pytest exit status {completed.returncode}); see its output above")
    return time.perf_counter() - start


def skipped_tests(junit_path: Path) -> list[tuple[str, str]]:
    """``(test name, reason)`` of every skipped test, from pytest's JUnit XML."""
    return [(case.get("name"), skipped.get("message", "").removeprefix("Skipped: "))
            for case in ElementTree.parse(junit_path).iter("testcase")
            for skipped in case.iter("skipped")]


def median_seconds(benchmark: dict) -> tuple[float, float]:
    """The median wall seconds (pytest-benchmark's) and the median CPU seconds of a benchmark's rounds."""
    return benchmark["stats"]["median"], statistics.median(benchmark["extra_info"]["cpu_seconds"])


def network_seconds(benchmarks: list[dict]) -> dict[tuple[str, int, bool], tuple[float, float]]:
    """``(prior, batch, gradient) -> (wall, CPU)`` median seconds of one network call."""
    return {(info["prior"], info["batch"], info["gradient"]): median_seconds(benchmark)
            for benchmark in benchmarks if (info := benchmark["extra_info"])["kind"] == "network"}


def sampler_runs(benchmarks: list[dict], network: dict) -> list[dict]:
    """One record per sampler run: its settings, median times and the time of its network calls alone."""
    runs = []
    for benchmark in benchmarks:
        info = benchmark["extra_info"]
        if info["kind"] != "sampler":
            continue
        wall, cpu = median_seconds(benchmark)
        calls = info["network_evaluations"] / info["batch"]
        reference = network.get((info["prior"], info["batch"], info["gradient"]))  # absent if deselected (-k)
        runs.append({**info, "wall": wall, "cpu": cpu, "calls": calls,
                     "overhead_wall": reference and wall / (calls * reference[0]),
                     "overhead_cpu": reference and cpu / (calls * reference[1])})
    return runs


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def milliseconds(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def overhead_table(runs: list[dict]) -> str:
    rows = [[run["prior"], run["sampler"], run["batch"], run["steps"], f"{run['calls']:g}",
             "forward+backward" if run["gradient"] else "forward", milliseconds(run["wall"] / run["steps"]),
             milliseconds(run["cpu"] / run["steps"]), ratio(run["overhead_wall"]), ratio(run["overhead_cpu"])]
            for run in runs]
    return markdown_table(["prior", "sampler", "chains", "steps", "network calls", "network pass",
                           "wall / step (ms)", "CPU / step (ms)", "overhead (wall)", "overhead (CPU)"], rows)


def throughput_table(runs: list[dict]) -> str:
    """The samplers run at more than one batch on a prior: particle-steps per second at each."""
    batches: dict[tuple[str, str], list[dict]] = {}
    for run in runs:
        batches.setdefault((run["prior"], run["sampler"]), []).append(run)
    rows = [[prior, sampler, run["batch"], milliseconds(run["wall"] / run["steps"]),
             f"{run['batch'] * run['steps'] / run['wall']:.0f}", f"{run['batch'] * run['steps'] / run['cpu']:.0f}",
             ratio(run["overhead_cpu"])]
            for (prior, sampler), group in batches.items() if len(group) > 1
            for run in sorted(group, key=lambda run: run["batch"])]
    return markdown_table(["prior", "sampler", "particles K", "wall / step (ms)", "particle-steps / s (wall)",
                           "particle-steps / s (CPU)", "overhead (CPU)"], rows)


def dps_table(runs: list[dict]) -> str:
    """invdiff's dps against deepinv's on the same prior, batch and number of network calls."""
    by_setting = {(run["sampler"], run["prior"], run["batch"], run["calls"]): run for run in runs}
    rows = []
    for (sampler, prior, batch, calls), ours in by_setting.items():
        theirs = by_setting.get(("deepinv_dps", prior, batch, calls))
        if sampler == "dps" and theirs is not None:
            rows.append([prior, batch, f"{calls:g}", f"{ours['wall']:.2f}", f"{theirs['wall']:.2f}",
                         ratio(theirs["wall"] / ours["wall"]), ratio(theirs["cpu"] / ours["cpu"])])
    return markdown_table(["prior", "chains", "network calls", "dps wall (s)", "deepinv_dps wall (s)",
                           "deepinv_dps / dps (wall)", "deepinv_dps / dps (CPU)"], rows)


def machine_lines(machine_info: dict, loads: tuple[tuple[float, ...], tuple[float, ...]]) -> list[str]:
    cpu = machine_info.get("cpu", {})
    before, after = (", ".join(f"{value:.2f}" for value in load) for load in loads)
    return [f"Machine: {cpu.get('brand_raw', platform.processor() or 'unknown CPU')}, {os.cpu_count()} logical "
            f"cores, torch {torch.__version__} on {torch.get_num_threads()} thread(s) "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), Python {platform.python_version()}; "
            f"load average (1, 5, 15 min) {before} before the run, {after} after.",
            "The machine is shared and noisy: other jobs may run on its cores, and wall times then include "
            "waiting for a core. The CPU time of the process (`time.process_time`) does not, so the CPU "
            "columns are the steadier ones; every ratio is of two numbers measured in this one run."]


def report(results: dict, skipped: list[tuple[str, str]], elapsed: float, command: str,
           loads: tuple[tuple[float, ...], tuple[float, ...]]) -> str:
    benchmarks = results["benchmarks"]
    runs = sampler_runs(benchmarks, network_seconds(benchmarks))
    rounds = sorted({benchmark["stats"]["rounds"] for benchmark in benchmarks})
    sections = [
        "### Speed: samplers against their network calls",
        f"Measured {results['datetime'][:16].replace('T', ' ')} UTC in one run of {elapsed:.0f} s: `{command}` "
        f"(the median of {' or '.join(map(str, rounds))} timed rounds per benchmark, after an untimed warm-up).",
        *machine_lines(results["machine_info"], loads),
        "**Overhead per sampler.** Overhead = the run's time / (network calls x the time of one network call "
        "on the run's batch, forward or forward+backward as the sampler needs); 1.00 is a sampler that "
        "costs only its network calls.",
        overhead_table(runs),
        "**Particle throughput.**",
        throughput_table(runs),
        "**invdiff `dps` against deepinv's DPS** at equal steps (the same number of network calls with "
        "backpropagation, the same prior, measurement and batch).",
        dps_table(runs),
    ]
    if skipped:
        sections.append("Not timed: " + "; ".join(f"`{name}` ({reason})" for name, reason in skipped) + ".")
    return "\n\n".join(sections) + "\n"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    ours, pytest_arguments = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the markdown here (and pytest-benchmark's JSON next to it)")
    arguments = parser.parse_args(ours)
    threads = os.environ.get("OMP_NUM_THREADS")
    command = shlex.join(([f"OMP_NUM_THREADS={threads}"] if threads else []) + ["python", "benchmarks/speed_report.py"]
                         + argv)
    with tempfile.TemporaryDirectory() as folder:
        json_path, junit_path = Path(folder) / "speed.json", Path(folder) / "speed.xml"
        load_before = os.getloadavg()
        elapsed = run_suite(json_path, junit_path, pytest_arguments)
        loads = (load_before, os.getloadavg())
        results = json.loads(json_path.read_text())
        text = report(results, skipped_tests(junit_path), elapsed, command, loads)
        if arguments.out is not None:
            arguments.out.parent.mkdir(parents=True, exist_ok=True)
            arguments.out.write_text(text)
            shutil.copyfile(json_path, arguments.out.with_suffix(".json"))
    print(text)


if __name__ == "__main__":
    main()
