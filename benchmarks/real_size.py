"""Every sampler at 256x256x3 on users' real architectures (random weights), on the CPU or a GPU.

The architectures of ``invdiff.reference_architectures`` (the guided-diffusion ADM UNet of DPS's FFHQ-256
checkpoint, 93.6M parameters; the diffusers UNet2DModel of the 256x256 DDPM checkpoints, 113.7M) are written
with random weights and loaded through a problem file, box inpainting of the held-out ``astronaut`` at
256x256x3, as ``invdiff solve`` would. For each sampler and architecture it measures:

* the wall and process CPU time of ``--steps`` steps on ``--batch`` chains (the samples, or the particles of
  the particle samplers), after a warm-up run of two steps;
* the network's own time at that batch: one forward call, and one forward+backward call (what DPS and
  twisted SMC pay), so that ``overhead = run time / (calls x network time of one call)``;
* peak memory (``invdiff.bench.Cost``): ``torch.cuda.max_memory_allocated`` on a GPU; on the CPU the peak
  growth of the resident set during the run over the resident set before it (Linux ``VmHWM``);
* with ``--largest-k`` (on a GPU): the largest particle count K (doubling from 8) for which one two-step run
  of each particle sampler fits, with the prior's ``batch_size`` set to ``--batch``;
* with ``--full-dps``: the wall time of a full 1000-step DPS run of one image (DPS's paper reports about
  70 s per FFHQ image on an older GPU).

Random weights cost what trained ones do, so the times hold for real checkpoints; image quality means
nothing here. Results go to ``--out`` (JSON and a markdown table). Run from the repository root:

    python benchmarks/real_size.py --device cuda --largest-k --full-dps    # the GPU path
    python benchmarks/real_size.py --architectures adm --steps 2           # CPU: about 15 minutes
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from invdiff.bench import Cost
from invdiff.plugins import load_registry
from invdiff.posterior import UnsupportedProblem, sample_posterior
from invdiff.problems import load_problem
from invdiff.reference_architectures import ARCHITECTURES, write_problem_files
from invdiff.resources import network_call_seconds
from test_speed import PARTICLE_SAMPLERS, sampler_options  # the speed suite's: steps on a batch of chains

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ("dps", "deepinv_dps", "twisted_smc", "ve_smc", "mcgdiff", "rdmc", "ddrm", "diffpir")


def timed_run(sampler, posterior, batch: int, device: torch.device) -> dict:
    """Wall and CPU time, network calls and peak memory of one run (``invdiff.bench.Cost``); on a GPU the
    peak is the whole allocation (weights included), on the CPU the resident set's growth over its size
    before the run."""
    with Cost(str(device)) as cost:
        result = sample_posterior(sampler, posterior, batch, generator=torch.Generator(device).manual_seed(0))
    peak = cost.peak_memory_bytes
    if peak is not None and device.type == "cuda":
        peak += cost.memory_before
    return {"wall_s": cost.wall_time_seconds, "cpu_s": cost.cpu_time_seconds,
            "network_evaluations": result.network_evaluations,
            "peak_memory_mb": float("nan") if peak is None else peak / 2**20}


def largest_particle_count(sampler_class, name: str, posterior, batch: int, device: torch.device,
                           limit: int) -> int | None:
    """The largest K (8, 16, 32, ... up to ``limit``) for which a two-step run fits on the GPU."""
    largest, count = None, 8
    while count <= limit:
        try:
            sample_posterior(sampler_class(**sampler_options(name, count, 2)), posterior, count,
                             generator=torch.Generator(device).manual_seed(0))
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
        largest, count = count, 2 * count
    return largest


def measure(architecture: str, problem_path: Path, samplers: list[str], arguments, device: torch.device) -> list:
    problem = load_problem(problem_path)
    problem.to(device)
    posterior, prior = problem.posterior, problem.posterior.prior
    network = {gradient: float(np.median([network_call_seconds(prior, arguments.batch, gradient, device)
                                          for _ in range(3)])) for gradient in (False, True)}
    rows = []
    registry = load_registry()
    for name in samplers:
        sampler_class = registry.get(name).sampler_class
        try:
            sample_posterior(sampler_class(**sampler_options(name, arguments.batch, 2)), posterior, arguments.batch,
                             generator=torch.Generator(device).manual_seed(0))  # warm-up: one-time set-up untimed
        except UnsupportedProblem as error:
            rows.append({"architecture": architecture, "sampler": name, "refused": str(error)})
            continue
        sampler = sampler_class(**sampler_options(name, arguments.batch, arguments.steps))
        row = {"architecture": architecture, "sampler": name, "batch": arguments.batch, "steps": arguments.steps,
               **timed_run(sampler, posterior, arguments.batch, device)}
        gradient = sampler.needs_network_gradient
        calls = row["network_evaluations"] / arguments.batch  # network calls on the whole batch
        row.update(gradient=gradient, network_call_s=network[gradient],
                   seconds_per_step=row["wall_s"] / arguments.steps,
                   overhead=row["wall_s"] / (calls * network[gradient]))
        if arguments.largest_k and name in PARTICLE_SAMPLERS and device.type == "cuda":
            row["largest_k"] = largest_particle_count(sampler_class, name, posterior, arguments.batch, device,
                                                      arguments.max_k)
        rows.append(row)
        print(json.dumps(row), flush=True)
    if arguments.full_dps:
        sampler = registry.get("dps").sampler_class(num_steps=1000)
        rows.append({"architecture": architecture, "sampler": "dps (1000 steps, 1 image)",
                     **timed_run(sampler, posterior, 1, device)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict], machine: str) -> str:
    lines = [f"Measured on {machine}.", "",
             "| architecture | sampler | s/step | network s/call | overhead | wall s | CPU s | peak MB | largest K |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "refused" in row:
            lines.append(f"| {row['architecture']} | {row['sampler']} | refused: {row['refused']} ||||||| ")
            continue
        step = f"{row['seconds_per_step']:.2f}" if "seconds_per_step" in row else "-"
        call = f"{row['network_call_s']:.2f} ({'fwd+bwd' if row['gradient'] else 'fwd'})" if "gradient" in row else "-"
        overhead = f"{row['overhead']:.2f}" if "overhead" in row else "-"
        lines.append(f"| {row['architecture']} | {row['sampler']} | {step} | {call} | {overhead} | "
                     f"{row['wall_s']:.1f} | {row['cpu_s']:.1f} | {row['peak_memory_mb']:.0f} | "
                     f"{row.get('largest_k', '-')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), choices=ARCHITECTURES)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), choices=list(SAMPLERS))
    parser.add_argument("--steps", type=int, default=5, help="timed steps of each run (default 5)")
    parser.add_argument("--batch", type=int, default=1, help="chains of each run, and images per network call")
    parser.add_argument("--largest-k", action="store_true", help="search the largest K of the particle samplers (GPU)")
    parser.add_argument("--max-k", type=int, default=1024)
    parser.add_argument("--full-dps", action="store_true", help="time a 1000-step DPS run of one image")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "real_size")
    arguments = parser.parse_args()
    if arguments.device == "cuda" and not torch.cuda.is_available():
        sys.exit("real_size.py: --device cuda: no CUDA device is available here; use --device cpu")
    device = torch.device(arguments.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} thread(s)")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        problems = write_problem_files(folder, tuple(arguments.architectures), arguments.batch)
        for architecture, path in problems.items():
            rows += measure(architecture, path, arguments.samplers, arguments, device)
    arguments.out.mkdir(parents=True, exist_ok=True)
    name = f"real_size_{device.type}"
    settings = {key: (str(value) if isinstance(value, Path) else value) for key, value in vars(arguments).items()}
    (arguments.out / f"{name}.json").write_text(json.dumps(
        {"machine": machine, "settings": settings, "versions": {"torch": torch.__version__}, "rows": rows}, indent=1))
    (arguments.out / f"{name}.md").write_text(markdown(rows, machine))
    print(markdown(rows, machine))


if __name__ == "__main__":
    main()
