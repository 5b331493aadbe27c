"""The ``invdiff`` command: ``samplers``, ``solve PROBLEM.yaml --sampler NAME``, ``check NAME``, ``train CONFIG.yaml``,
``bench CONFIG.yaml --out DIR``.

Input mistakes (problem file, sampler name or options, output folder, device) print one line
``invdiff: error: ...`` and exit with code 2 before anything is written; a sampling failure (NaN)
exits with code 1 and names the step. Outputs are written to a temporary folder and moved into
place only when complete, so no run leaves a partial or silently overwritten folder. Each command
imports the numerical stack itself, so ``--help`` answers without loading torch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from invdiff.plugins import SamplerInfo
    from invdiff.problems import Problem

__all__ = ["main"]

#: what an interrupted command leaves behind
INTERRUPTED = {"solve": "nothing was written", "samplers": "nothing was written", "check": "nothing was written",
               "bench": "the cells already computed are kept in DIR/cells; the same command continues",
               "train": "whole checkpoints already written are kept (--resume continues from the last); a run "
                        "that wrote none leaves no folder"}


class UsageError(ValueError):
    """A command-line mistake: exit code 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    arguments = parser.parse_args(argv)
    try:
        return arguments.handler(arguments)
    except KeyboardInterrupt:
        print(f"\ninvdiff: interrupted; {INTERRUPTED[arguments.command]}", file=sys.stderr)
        return 130
    except Exception as error:
        if isinstance(error, _input_errors()):
            print(f"invdiff: error: {error}", file=sys.stderr)
            return 2
        from invdiff.posterior import SamplingError

        if isinstance(error, SamplingError):
            print(f"invdiff: sampling failed: {error}", file=sys.stderr)
            return 1
        raise


def _input_errors() -> tuple[type[Exception], ...]:
    """The exceptions that mean bad input: one line, exit code 2 (imported here, after the command ran)."""
    from invdiff.bench import BenchError
    from invdiff.checkpoints import CheckpointError
    from invdiff.plugins import PluginError
    from invdiff.posterior import UnsupportedProblem
    from invdiff.problems import ProblemError
    from invdiff.resources import ResourceError
    from invdiff.rundir import RunFolderError
    from invdiff.sde import ScheduleError
    from invdiff.training import TrainingError

    return (UsageError, ProblemError, PluginError, UnsupportedProblem, TrainingError, CheckpointError, ScheduleError,
            RunFolderError, ResourceError, BenchError)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its errors one line like every other input error (argparse prints the usage first), exit
    code 2; ``--help`` shows the usage."""

    def error(self, message: str):
        command = self.prog.removeprefix("invdiff").strip()
        self.exit(2, f"invdiff: error: {command + ': ' if command else ''}{message}; see {self.prog} --help\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="invdiff", description="Posterior sampling for inverse problems with diffusion priors.")
    commands = parser.add_subparsers(dest="command", required=True)

    samplers = commands.add_parser("samplers", help="list the registered samplers and plugins that failed to load")
    samplers.set_defaults(handler=_samplers)

    solve = commands.add_parser("solve", help="sample the posterior of a problem file")
    solve.add_argument("problem", type=Path, help="a problem YAML file (see problems/)")
    solve.add_argument("--sampler", required=True, help="a sampler name (see 'invdiff samplers')")
    solve.add_argument("--case", help="which case of a problem file with several (default: its first)")
    solve.add_argument("--num-samples", type=int, help="number of posterior samples (default: the problem's)")
    solve.add_argument("--seed", type=int, default=0, help="seed of every random draw of the sampler (default 0)")
    solve.add_argument("--out", help="output folder (default: runs/PROBLEM-SAMPLER-seedSEED)")
    solve.add_argument("--overwrite", action="store_true",
                       help="replace an existing output folder, only if invdiff wrote it")
    solve.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to sample (default cpu)")
    solve.add_argument("--num-particles", type=int, help="particles K of a particle sampler (option num_particles)")
    solve.add_argument("--resampling", choices=["systematic", "multinomial", "stratified", "residual"],
                       help="resampling scheme of a particle sampler (option resampling)")
    solve.add_argument("--resampling-threshold", type=float, metavar="KAPPA",
                       help="resample when ESS < KAPPA * K (option resampling_threshold)")
    solve.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="a sampler option, overriding the problem file's (repeatable; VALUE is YAML)")
    solve.add_argument("--quiet", action="store_true", help="no progress bar")
    solve.set_defaults(handler=_solve)

    check = commands.add_parser("check", help="run the exactness checks of the test suite on one sampler")
    check.add_argument("sampler", help="a sampler name (see 'invdiff samplers')")
    check.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="a sampler option (repeatable; VALUE is YAML)")
    check.add_argument("--seed", type=int, default=0, help="seed of the sampler's draws (default 0)")
    check.add_argument("--quiet", action="store_true", help="no progress bars")
    check.set_defaults(handler=_check)

    bench = commands.add_parser("bench", help="run a benchmark matrix (samplers x cases x images x seeds), resumable")
    bench.add_argument("config", type=Path, help="a benchmark YAML file (see benchmarks/quick.yaml)")
    bench.add_argument("--out", required=True, help="output folder: cells/ (the cache), results, tables, figures")
    bench.add_argument("--samplers", help="'all' (every registered sampler) or NAME,NAME,...: replaces the "
                       "configuration's samplers")
    bench.add_argument("--cases", help="NAME,NAME,...: run only these cases of the configuration (its cache is "
                       "shared: a later run of every case reuses their cells)")
    bench.add_argument("--force", action="store_true", help="recompute every cell, cached or not")
    bench.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to sample (default cpu)")
    bench.add_argument("--ray", metavar="auto|ADDRESS", help="run each cell as a Ray task (pip install "
                       "'invdiff[ray]'): auto = the running cluster, else a local one")
    bench.add_argument("--workers", type=int, default=1, metavar="N", help="run N cells at once in local processes "
                       "(each with cpus_per_cell torch threads; with --device cuda, N processes share the GPU); "
                       "default 1")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.set_defaults(handler=_bench)

    training = commands.add_parser("train", help="train a UNet prior by denoising score matching (resumable)")
    training.add_argument("config", type=Path, help="a training YAML file (see invdiff/priors/*.yaml)")
    training.add_argument("--out", required=True, help="run folder: state.pt, log.jsonl, NAME.safetensors")
    training.add_argument("--resume", action="store_true", help="continue the run in --out")
    training.add_argument("--continue-from", type=Path, metavar="CHECKPOINT",
                          help="start a new run from a prior's .safetensors (e.g. a shipped one) and its step count")
    training.add_argument("--steps", type=int, help="train to this many steps (overrides the config's)")
    training.add_argument("--max-minutes", type=float, help="stop at the first checkpoint after this much time")
    training.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to train (default cpu)")
    training.add_argument("--quiet", action="store_true", help="no progress bar")
    training.set_defaults(handler=_train)
    return parser


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available here; use --device cpu")


def _train(arguments) -> int:
    from invdiff.training import load_training_config, train

    config = load_training_config(arguments.config)
    if arguments.steps is not None:
        if arguments.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {arguments.steps}")
        config = config.model_copy(update={"steps": arguments.steps})
    _check_device(arguments.device)
    record = train(config, arguments.out, resume=arguments.resume, max_minutes=arguments.max_minutes,
                   device=arguments.device, progress=not arguments.quiet, continue_from=arguments.continue_from)
    print(json.dumps(record))
    return 0


def _check(arguments) -> int:
    """Exit 0 when the sampler meets its standard (exact or not), 1 when it does not."""
    from invdiff.plugins import load_registry
    from invdiff.problems import ProblemError, build_sampler
    from invdiff.testing import check_sampler

    info = load_registry().get(arguments.sampler)
    _check_seed(arguments.seed)
    options = _parse_options(arguments.option)
    try:
        build_sampler(info.sampler_class, options)
    except ProblemError as error:
        raise UsageError(f"--option: {error}") from None
    outcome = check_sampler(info.sampler_class, options, seed=arguments.seed, progress=not arguments.quiet)
    print(outcome)
    return 0 if outcome.passed else 1


def _samplers(arguments) -> int:
    from invdiff.plugins import load_registry

    registry = load_registry()
    rows = [(info.name, info.package or "-", info.version or "-", info.summary)
            for info in sorted(registry.samplers.values(), key=lambda info: info.name)]
    if rows:
        widths = [max(len(row[column]) for row in rows + [("name", "package", "version", "")]) for column in range(3)]
        print(f"{'name':<{widths[0]}}  {'package':<{widths[1]}}  {'version':<{widths[2]}}  description")
        for row in rows:
            print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]}")
    else:
        print("no samplers registered")
    for failure in registry.failures:
        print(f"plugin '{failure.plugin}' (package {failure.package or '-'}): {failure.error}")
    return 0


def _parse_options(pairs: list[str]) -> dict[str, Any]:
    from invdiff.yamlfile import YAMLFileError, parse_value

    options = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got '{pair}'")
        if key.strip() in options:
            raise UsageError(f"--option {key.strip()} is given twice; give it once")
        try:
            options[key.strip()] = parse_value(value, f"--option {key.strip()}")
        except YAMLFileError as error:
            raise UsageError(str(error)) from None
    return options


def _particle_options(arguments, info: SamplerInfo) -> dict[str, Any]:
    """The particle flags that were given, checked against the sampler's options."""
    flags = {"num_particles": arguments.num_particles, "resampling": arguments.resampling,
             "resampling_threshold": arguments.resampling_threshold}
    given = {option: value for option, value in flags.items() if value is not None}
    for option in given:
        if option not in info.sampler_class.Options.model_fields:
            raise UsageError(f"--{option.replace('_', '-')}: sampler '{info.name}' has no option {option}; "
                             f"its options: {', '.join(info.sampler_class.Options.model_fields) or 'none'}")
    return given


def _blamed(given: dict[str, Any], flags: dict[str, Any]) -> str:
    """What a bad option came from, for the message: ``--option``, a particle flag, or either."""
    sources = (["--option"] if given else []) + [f"--{flag.replace('_', '-')}" for flag in flags]
    return " / ".join(sources) or "--option"


def _check_seed(seed: int) -> None:
    from invdiff.problems import SEED_LIMIT

    if not 0 <= seed < SEED_LIMIT:
        raise UsageError(f"--seed must be an integer from 0 to 2**63 - 1, got {seed}")


def _check_file_sampler_options(problem: Problem, registry) -> None:
    """The problem file's options of every sampler it names, not only the one run: options for a sampler that is
    not registered, or a wrong option of another sampler, are mistakes in the file all the same."""
    from invdiff.plugins import PluginError
    from invdiff.problems import ProblemError, build_sampler

    for name, options in problem.config.sampler_options.items():
        try:
            build_sampler(registry.get(name).sampler_class, options)
        except PluginError as error:
            raise UsageError(f"{problem.path.name}: sampler_options.{name}: {error}") from None
        except ProblemError as error:
            raise UsageError(f"{problem.path.name}: {error}") from None


def _solve(arguments) -> int:
    import torch

    from invdiff.evaluation import posterior_moments, run_summary, write_run
    from invdiff.plugins import load_registry
    from invdiff.posterior import sample_posterior
    from invdiff.problems import ProblemError, build_sampler, load_problem
    from invdiff.resources import check_run
    from invdiff.rundir import RunFolder

    registry = load_registry()
    info = registry.get(arguments.sampler)
    if arguments.num_samples is not None and arguments.num_samples < 1:
        raise UsageError(f"--num-samples must be >= 1, got {arguments.num_samples}")
    _check_seed(arguments.seed)
    _check_device(arguments.device)
    if arguments.out is not None and not arguments.out.strip():
        raise UsageError("--out is empty; name a new folder, e.g. --out runs/my-run")
    given, flags = _parse_options(arguments.option), _particle_options(arguments, info)
    twice = sorted(given.keys() & flags.keys())
    if twice:
        raise UsageError(f"{twice[0]} is given by --option and by --{twice[0].replace('_', '-')}; give it once")
    if arguments.out is not None:   # before the problem is built (a network loaded, a truth drawn); staged after
        RunFolder.check(Path(arguments.out), arguments.overwrite)
    problem = load_problem(arguments.problem, arguments.case)
    _check_file_sampler_options(problem, registry)
    options = {**problem.config.sampler_options.get(info.name, {}), **given, **flags}
    try:
        sampler = build_sampler(info.sampler_class, options)
    except ProblemError as error:   # the file's options are valid: -o or a particle flag is not
        raise UsageError(f"{_blamed(given, flags)}: {error}") from None
    num_samples = arguments.num_samples or problem.config.num_samples
    out = Path(arguments.out or Path("runs") / f"{problem.config.name}-{info.name}-seed{arguments.seed}")
    unused = sampler.unused_options(problem.posterior)   # options a problem file or -o gives that the run ignores
    if unused:
        problem.notes.append(f"{info.name} does not use " + ", ".join(f"{name} ({when})"
                                                                     for name, when in unused.items()))
    folder = RunFolder(out, arguments.overwrite)   # checked and staged before any work; discarded on any error
    for note in problem.notes:
        print(f"invdiff: note: {note}", file=sys.stderr)
    try:
        problem.to(arguments.device)
        sampler.check(problem.posterior)   # refuses a problem the sampler cannot solve, before the time estimate
        warning = check_run(problem.posterior, sampler, num_samples, arguments.device)  # refuses what cannot fit
        if warning is not None:   # shown even with --quiet (no progress bar): it is the only word of a long run
            print(f"invdiff: warning: {warning}", file=sys.stderr)
        generator = torch.Generator(device=arguments.device).manual_seed(arguments.seed)
        result = sample_posterior(sampler, problem.posterior, num_samples, generator=generator,
                                  progress=not arguments.quiet)
        images, mean, std = posterior_moments(problem, result)
        summary = run_summary(problem, info, sampler, result, seed=arguments.seed, device=arguments.device,
                              num_samples=num_samples, images=images, mean=mean)
        for collapse in summary["warnings"]:   # shown even with --quiet: it says what the samples are worth
            print(f"invdiff: warning: {collapse}", file=sys.stderr)
        write_run(folder.staging, problem, result, summary, images, mean, std)
        leftover = folder.commit()
        if leftover is not None:
            print(f"invdiff: warning: the replaced run could not be deleted completely; it is in {leftover}",
                  file=sys.stderr)
    finally:
        folder.discard()
    metrics = summary["metrics"]
    shown = ", ".join(f"{key} {value:.3f}" for key, value in metrics.items() if isinstance(value, float))
    print(f"{info.name}: {num_samples} samples ({metrics['distinct_samples']} distinct) in {result.wall_time:.1f} s "
          f"({result.network_evaluations_per_sample:.0f} network evaluations per returned sample)"
          f"{'; ' + shown if shown else ''}{_exact_line(summary)}\nwrote {out}/")
    return 0


def _exact_line(summary: dict) -> str:
    """The run against the exact posterior, where there is one: a line to print, or ''."""
    exact, metrics = summary.get("exact_posterior"), summary["metrics"]
    if exact is None:
        return ""
    ratio = exact["sliced_wasserstein_to_exact"] / exact["sliced_wasserstein_noise_floor"]
    parts = [f"sliced Wasserstein {ratio:.2f}x the exact-vs-exact floor"]
    if "psnr_exact_mean" in exact:
        parts += [f"mean PSNR {metrics['psnr_posterior_mean']:.2f} (exact {exact['psnr_exact_mean']:.2f}; the mean "
                  f"of as many exact draws {exact['psnr_exact_draws_mean']:.2f})",
                  f"coverage_90 {metrics['coverage_90']:.3f} (exact {exact['coverage_90_exact']:.3f})"]
    if "component_weights_exact" in exact:
        shares = ", ".join(f"{k}: {share:.2f} ({exact['component_weights_exact'][k]:.2f})"
                           for k, share in exact["component_weights_samples"].items())
        parts.append(f"mixture components' shares of the samples (exact) {shares}")
    return "\nagainst the exact posterior: " + "; ".join(parts)


def _bench(arguments) -> int:
    from invdiff.bench import BenchFolder, connect_ray, load_bench, run_bench

    _check_device(arguments.device)
    if arguments.workers < 1:
        raise UsageError(f"--workers {arguments.workers}: the number of processes must be at least 1")
    if arguments.workers > 1 and arguments.ray is not None:
        raise UsageError("--workers and --ray both say where the cells run: give one of them")
    bench = load_bench(arguments.config, arguments.samplers, arguments.device,  # every check before any work
                       cases_wanted=arguments.cases)
    if arguments.ray is not None:   # an address ray cannot use is refused before the folder is written
        BenchFolder.check(arguments.out)
        connect_ray(arguments.ray)
    folder = BenchFolder(arguments.out)
    start = time.perf_counter()
    rows, _ = run_bench(bench, folder, force=arguments.force, progress=not arguments.quiet,
                        ray_address=arguments.ray, workers=arguments.workers)
    not_run = sum(row["status"] != "ok" for row in rows)
    print(f"{len(rows)} cells ({not_run} not run: see tables.md) in {time.perf_counter() - start:.1f} s\n"
          f"wrote {arguments.out}/tables.md, results.csv, results.json, tuning.md, tuning.json, figures/")
    return 0
