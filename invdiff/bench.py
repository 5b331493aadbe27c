"""``invdiff bench CONFIG.yaml --out DIR``: samplers x problem cases x images x seeds, from one YAML file.

A benchmark configuration names problem files (and which of their cases), the methods to compare
(registered samplers with options, and the classical reconstructions of ``invdiff.baselines``), the
images per prior (``test`` images for the tables, separate ``validation`` images for tuning), the
seeds (replicates per image) and the number of samples::

    name: quick
    problems:
      - {file: ../problems/inpaint.yaml, cases: [digits-gmm-box]}   # no cases: every case of the file
    images:                                                          # per prior name of the cases
      digits_gmm:
        test: [{source: digits, index: 0}, {source: digits, index: 1}]
        validation: [{source: digits, index: 100}]
    samplers:
      dps: {options: {num_steps: 50}, tune: {scale: [0.5, 1, 2]}}   # tune: a grid, chosen on validation
      dps-small: {sampler: dps, options: {num_steps: 20}}            # a label may name a sampler
      exact:
    baselines:
      pseudo_inverse:
      tv: {tune: {regularisation: [0.001, 0.01, 0.1]}, oracle: true}  # and a row tuned on each test image
    seeds: [0, 1]
    num_samples: 16                                                  # default: each case's own

One **cell** is (problem case, image, method with its resolved options, seed); ``run_cell`` is a pure
function of its JSON spec, so it runs in-process, in a local worker process (``--workers``) or as a Ray
task alike. Its result is cached in ``DIR/cells/<key>.json``, the key a hash of what determines it (the
problem with the image, the sampler's name, version and every option, the seed, the number of samples,
the device and invdiff's version), so a rerun computes only missing cells. Options: the problem file's
``sampler_options`` for that case, updated by the configuration's ``options``, updated by the
tuned values. A ``tune`` grid (the product over its options) runs on the validation images only,
per case; the value with the best mean PSNR of the posterior mean (seeds averaged per image first)
is used for the test cells. ``oracle: true`` adds a row labelled '(oracle-tuned)' whose value is chosen on
each test image itself (the grid runs on the test images too): the method's best case, shown as such,
never a fair score. Cells share the process (or the Ray worker) that runs them, so a cell's peak-memory
growth misses memory that an earlier cell freed; ``fresh_process: true`` runs each cell in a new process
(a few seconds more per cell) when memory is what is measured. The reports are written by
``invdiff.bench_report``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, ValidationError, field_validator

from invdiff.bench_report import ORACLE
from invdiff.checkpoints import NATURAL_GMM_PATH, SHIPPED_PRIORS_DIRECTORY, file_sha256, shipped_priors
from invdiff.problems import (SEED_LIMIT, FileTruthConfig, ProblemConfig, ProblemError, StrictModel, TruthConfig,
                              build_problem, build_sampler, check_truth_source, format_validation_error,
                              load_problem_config, problem_cases)
from invdiff.rundir import MARKER, RunFolderError, check_destination, destination, make_folders, owned_files
from invdiff.yamlfile import YAMLFileError, read_mapping

__all__ = ["BenchError", "BenchConfig", "Bench", "load_bench", "run_cell", "cell_key", "BenchFolder", "run_bench",
           "Cost"]

#: the classical reconstructions a configuration may list under ``baselines``
BASELINES = ("pseudo_inverse", "tv")
#: what ``BenchFolder`` writes, and so the only names it ever replaces
OUTPUTS = ("cells", "figures", "results.csv", "results.json", "tables.md", "tuning.md", "tuning.json")
BENCH_KIND = "invdiff bench"


class BenchError(ValueError):
    """A benchmark configuration or its output folder is wrong; one line naming what and what is allowed."""


# --- configuration ----------------------------------------------------------------------------------

class ProblemEntry(StrictModel):
    file: str = Field(description="a problem file, relative to the configuration")
    cases: list[str] | None = Field(None, min_length=1, description="its cases to run (default: every case)")


class ImageSet(StrictModel):
    test: list[TruthConfig] = Field(min_length=1)
    validation: list[TruthConfig] = []


class MethodEntry(StrictModel):
    sampler: str | None = Field(None, description="a registered sampler (default: the entry's label)")
    options: dict[str, Any] = {}
    tune: dict[str, list[Any]] = Field({}, description="option -> values tried on the validation images (and on "
                                                       "the test images for the oracle row)")
    oracle: bool = Field(False, description="also a row tuned on each test image itself, labelled '(oracle-tuned)': "
                                            "the method's best case, not a fair score")

    @field_validator("tune")
    @classmethod
    def _each_value_once(cls, tune: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for option, values in tune.items():
            seen = [(type(value), value) for value in values]   # true and 1, 1 and 1.0 are other values
            repeated = [value for index, value in enumerate(values) if seen[index] in seen[:index]]
            if repeated:
                raise ValueError(f"{option}: {repeated[0]!r} is given twice; give each value once")
        return tune


class TVOptions(StrictModel):
    """``invdiff.baselines.tv_reconstruction``'s parameters."""

    regularisation: float = Field(0.01, gt=0)
    iterations: int = Field(300, ge=1)


class PseudoInverseOptions(StrictModel):
    pass


BASELINE_OPTIONS = {"pseudo_inverse": PseudoInverseOptions, "tv": TVOptions}


class BenchConfig(StrictModel):
    name: str = Field("bench", pattern=r"^[A-Za-z0-9_.-]+$")
    problems: list[ProblemEntry] = Field(min_length=1)
    images: dict[str, ImageSet] = Field({}, description="per prior name; default: each case's own truth")
    samplers: dict[str, MethodEntry | None] = {}
    baselines: dict[str, MethodEntry | None] = {}
    seeds: list[int] = Field([0], min_length=1)
    num_samples: int | None = Field(None, ge=1)
    cpus_per_cell: int = Field(1, ge=1, description="CPUs a Ray task asks for (--ray), the threads of a --workers "
                               "process")
    fresh_process: bool = Field(False, description="each cell in a new process, so that its peak memory is its own "
                                                   "(a process reuses memory freed by earlier cells); a few seconds "
                                                   "more per cell")

    def model_post_init(self, context) -> None:
        for seed in self.seeds:
            if not 0 <= seed < SEED_LIMIT:
                raise ValueError(f"seeds: {seed} is not an integer from 0 to 2**63 - 1")
        if len(set(self.seeds)) < len(self.seeds):
            twice = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
            raise ValueError(f"seeds: {', '.join(map(str, twice))} given twice (each seed is a replicate of every "
                             f"cell)")


@dataclass(frozen=True)
class Method:
    """A row of the tables: a sampler (``kind`` 'sampler') or a baseline, its fixed options and tuning grid."""

    label: str
    kind: str
    name: str
    options: dict[str, Any]
    tune: dict[str, list[Any]]
    oracle: bool = False

    def grid(self) -> list[dict[str, Any]]:
        """Every combination of the tuned values (one empty combination when nothing is tuned)."""
        return [dict(zip(self.tune, values)) for values in itertools.product(*self.tune.values())]


@dataclass(frozen=True)
class Case:
    """One problem case: its validated config (with the case's own truth) and its test/validation truths."""

    file: Path
    name: str
    config: ProblemConfig
    test: list[dict]
    validation: list[dict]


@dataclass(frozen=True)
class Bench:
    config: BenchConfig
    cases: list[Case]
    methods: list[Method]
    device: str


def _options_error(method: Method, case: Case, error: ProblemError) -> BenchError:
    return BenchError(f"samplers.{method.label} on {case.config.name}: {error}")


def load_bench(path: str | Path, samplers: str | None = None, device: str = "cpu",
               cases_wanted: str | None = None) -> Bench:
    """Read and check a benchmark configuration, without running anything; every mistake is a ``BenchError``.

    ``samplers``: ``all`` (every registered sampler) or comma-separated names, replacing the
    configuration's list (a name it configures keeps its entry; others take the problem files' options).
    ``cases_wanted``: comma-separated case names of the configuration; only those run (their cells are the cells of
    the whole configuration, so a rerun of a few stale cases shares its cache).
    """
    from invdiff.plugins import PluginError, load_registry

    path = Path(path)
    try:
        raw = read_mapping(path, "benchmark configuration")
        config = BenchConfig.model_validate(raw)
    except YAMLFileError as error:
        raise BenchError(str(error)) from None
    except ValidationError as error:
        raise BenchError(f"{path.name}: {format_validation_error(error, model=BenchConfig)}") from None
    registry = load_registry()
    entries = dict(config.samplers)
    if samplers is not None:
        names = sorted(registry.samplers) if samplers == "all" else [name.strip() for name in samplers.split(",")]
        _refuse_repeats("--samplers", [name for name in names if name])
        entries = {name: entries.get(name) for name in names if name}
        if not entries:
            raise BenchError(f"--samplers {samplers!r}: names no sampler; give 'all' or some of "
                             f"{', '.join(sorted(registry.samplers))}")
    methods = []
    for label, entry in entries.items():
        entry = entry or MethodEntry()
        name = entry.sampler or label
        try:
            registry.get(name)
        except PluginError as error:
            raise BenchError(f"{path.name}: samplers.{label}: {error}") from None
        methods.append(Method(label, "sampler", name, dict(entry.options), dict(entry.tune), entry.oracle))
    for name, entry in config.baselines.items():
        entry = entry or MethodEntry()
        if name not in BASELINES:
            raise BenchError(f"{path.name}: baselines.{name}: unknown baseline; allowed: {', '.join(BASELINES)}")
        if entry.sampler is not None:
            raise BenchError(f"{path.name}: baselines.{name}.sampler: a baseline names no sampler; allowed keys: "
                             f"options, tune, oracle")
        methods.append(Method(name, "baseline", name, dict(entry.options), dict(entry.tune), entry.oracle))
    if not methods:
        raise BenchError(f"{path.name}: no methods: give samplers (registered names, or --samplers all) and/or "
                         f"baselines ({', '.join(BASELINES)})")
    for method in methods:
        if method.oracle and not method.tune:
            raise BenchError(f"{path.name}: {method.label}: oracle: true needs a tune grid to choose from; give "
                             f"tune: {{OPTION: [VALUES]}} or remove oracle")
        for option, values in method.tune.items():
            if not values:
                raise BenchError(f"{path.name}: samplers.{method.label}.tune.{option}: an empty grid; give values")
    labels = [method.label for method in methods]
    if len(set(labels)) < len(labels):
        raise BenchError(f"{path.name}: a method label is given twice among samplers and baselines "
                         f"({', '.join(sorted({label for label in labels if labels.count(label) > 1}))}); "
                         f"rename one (samplers.LABEL: {{sampler: NAME}})")
    cases = [case for entry in config.problems for case in _cases(path, entry, config)]
    names = [case.config.name for case in cases]
    if len(set(names)) < len(names):
        raise BenchError(f"{path.name}: problems: a case is listed twice "
                         f"({', '.join(sorted({name for name in names if names.count(name) > 1}))})")
    priors = sorted({case.config.prior.name for case in cases})
    for prior in config.images:
        if prior not in priors:
            raise BenchError(f"{path.name}: images.{prior}: no case of this configuration has the prior '{prior}'; "
                             f"its cases' priors: {', '.join(priors)}")
    if cases_wanted is not None:
        cases = _chosen_cases(path, cases, cases_wanted)
    for case in cases:
        for method in methods:
            if method.tune and not case.validation:
                raise BenchError(f"{path.name}: {method.label} tunes {', '.join(method.tune)} but the prior "
                                 f"'{case.config.prior.name}' of {case.config.name} has no validation images; give "
                                 f"images.{case.config.prior.name}.validation (never the test images)")
            for candidate in method.grid():
                try:
                    resolve_options(method, case, candidate, registry)  # a bad option or value is refused here
                except BenchError as error:
                    raise BenchError(f"{path.name}: {error}") from None
    return Bench(config, cases, methods, device)


def _refuse_repeats(flag: str, names: list[str]) -> None:
    """A name given twice in a comma-separated flag is a mistake, as a key given twice in the configuration is."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise BenchError(f"{flag}: {', '.join(repeated)} given twice; give each once")


def _chosen_cases(config_path: Path, cases: list[Case], wanted: str) -> list[Case]:
    """The configuration's cases named in ``wanted`` (comma-separated), in the configuration's order."""
    names = [name.strip() for name in wanted.split(",") if name.strip()]
    known = [case.name for case in cases]
    unknown = [name for name in names if name not in known]
    if not names:
        raise BenchError(f"--cases {wanted!r}: names no case; allowed: {', '.join(known)}")
    _refuse_repeats("--cases", names)
    if unknown:
        raise BenchError(f"--cases {wanted}: {', '.join(unknown)} is not a case of {config_path.name}; "
                         f"allowed: {', '.join(known)}")
    return [case for case in cases if case.name in names]


def _cases(config_path: Path, entry: ProblemEntry, config: BenchConfig) -> list[Case]:
    file = (config_path.parent / entry.file).resolve()
    cases = []
    try:
        names = entry.cases or problem_cases(file) or [None]
        configs = [load_problem_config(file, name) for name in names]
    except ProblemError as error:
        raise BenchError(f"{config_path.name}: problems: {error}") from None
    for name, config_of_case in zip(names, configs):
        prior = config_of_case.prior.name
        images = config.images.get(prior)
        if images is None:
            test, validation = [config_of_case.truth], []
            if config_of_case.truth is None:
                raise BenchError(f"{config_path.name}: {config_of_case.name} has no truth; give images.{prior}.test")
        else:
            test, validation = images.test, images.validation
        specs = {}
        for split, truths in (("test", test), ("validation", validation)):
            truths = [_absolute(truth, file if images is None else config_path) for truth in truths]
            for index, truth in enumerate(truths):
                where = f"{config_of_case.name}: truth" if images is None else f"images.{prior}.{split}.{index}"
                _check_truth(config_of_case, truth, config_path, where)
            specs[split] = [truth.model_dump(mode="json") for truth in truths]
        for index, truth in enumerate(specs["validation"]):
            if truth in specs["test"]:   # a grid chosen on a test image would score itself
                raise BenchError(f"{config_path.name}: images.{prior}.validation.{index} is also a test image "
                                 f"(test.{specs['test'].index(truth)}); validation images tune, so they must differ "
                                 f"from the test images")
        cases.append(Case(file, name or "", config_of_case, specs["test"], specs["validation"]))
    return cases


def _check_truth(config: ProblemConfig, truth, config_path: Path, where: str) -> None:
    """The truth can be had (``check_truth_source``: before any cell runs), else a ``BenchError`` naming
    ``where`` it is given."""
    try:
        check_truth_source(config.model_copy(update={"truth": truth}), config_path)
    except ProblemError as error:
        message = str(error).removeprefix(f"{config_path.name}: ").removeprefix("truth: ").removeprefix("truth.")
        raise BenchError(f"{config_path.name}: {where}: {message}") from None


def _absolute(truth, relative_to: Path):
    """A truth spec with a file's path made absolute: relative to the file ``relative_to`` that gives it (the
    configuration's images, or a problem file's own truth)."""
    if isinstance(truth, FileTruthConfig):
        truth = truth.model_copy(update={"path": str((relative_to.parent / truth.path).resolve())})
    return truth


def resolve_options(method: Method, case: Case, tuned: dict[str, Any], registry) -> dict[str, Any]:
    """Every option of ``method`` on ``case`` (defaults included): problem file < configuration < tuned values."""
    if method.kind == "baseline":
        try:
            return BASELINE_OPTIONS[method.name](**{**method.options, **tuned}).model_dump(mode="json")
        except ValidationError as error:
            raise BenchError(f"baselines.{method.label}: {format_validation_error(error)}") from None
    info = registry.get(method.name)
    options = {**case.config.sampler_options.get(method.name, {}), **method.options, **tuned}
    try:
        return build_sampler(info.sampler_class, options).options.model_dump(mode="json")
    except ProblemError as error:
        raise _options_error(method, case, error) from None


# --- cells ------------------------------------------------------------------------------------------

#: problem fields that do not change a cell's result (so not part of its key)
UNKEYED_PROBLEM_FIELDS = ("name", "description", "num_samples", "sampler_options")


#: problem fields that name a file or folder, relative to the problem file (checkpoints, images, measurements)
FILE_FIELDS = ("path", "weights", "measurement")


def cell_key(spec: dict) -> str:
    """A hash of what determines the cell's result (not its label, role or position in the matrix).

    The files a problem names are keyed by what they are, not by how the problem file spells them: their
    resolved paths, sizes and modification times (``_file_identities``)."""
    unkeyed = UNKEYED_PROBLEM_FIELDS + (("prior",) if spec["kind"] == "baseline" else ())  # they ignore the prior
    problem = {key: value for key, value in spec["problem"].items() if key not in unkeyed}
    keyed = {"problem": problem, "kind": spec["kind"], "sampler": spec["sampler"], "version": spec["version"],
             "options": spec["options"], "seed": spec["seed"], "num_samples": spec["num_samples"],
             "device": spec["device"], "invdiff": spec["invdiff_version"]}
    if spec.get("fresh_process"):  # its memory is measured otherwise (keyed only when set: older keys stay)
        keyed["fresh_process"] = True
    files = _file_identities(problem, Path(spec["problem_file"]).parent)
    if files:  # keyed only when the problem names files
        keyed["files"] = files
    shipped = _shipped_prior_file(problem)
    if shipped is not None:  # a shipped prior replaced in place (README: Training a prior) is another cell
        keyed["shipped_prior_sha256"] = _content_hash(shipped, *_modified(shipped))
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:20]


def _shipped_prior_file(problem: dict) -> Path | None:
    """The checkpoint of the shipped prior a problem names by name (``prior: {name: natural}``), else None."""
    name = (problem.get("prior") or {}).get("name")
    if name == "natural_gmm":
        return NATURAL_GMM_PATH
    return SHIPPED_PRIORS_DIRECTORY / f"{name}.safetensors" if name in shipped_priors() else None


def _modified(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_size, status.st_mtime_ns


@lru_cache(maxsize=None)
def _content_hash(path: Path, size: int, modified: int) -> str:
    """``file_sha256`` of ``path``, computed once per size and modification time (a benchmark keys many cells)."""
    return file_sha256(path)


def _file_identities(problem: dict, folder: Path) -> dict[str, list]:
    """For each file a problem names (``FILE_FIELDS``, anywhere in it): the resolved path and, for the file or
    each file of the folder, its size and modification time. The same relative path in another folder, or a
    checkpoint retrained in place, is another cell."""
    identities: dict[str, list] = {}

    def walk(value: Any, where: str) -> None:
        if not isinstance(value, dict):
            return
        for key, item in value.items():
            if key in FILE_FIELDS and isinstance(item, str):
                path = (folder / item).resolve()
                files = sorted(entry for entry in path.rglob("*") if entry.is_file()) if path.is_dir() else \
                    [path] if path.is_file() else []
                identities[where + key] = [str(path)] + [[str(entry.relative_to(path)) if entry != path else "",
                                                          entry.stat().st_size, entry.stat().st_mtime_ns]
                                                         for entry in files]
            else:
                walk(item, f"{where}{key}.")

    walk(problem, "")
    return identities


def _cell_specs(bench: Bench, case: Case, method: Method, options: dict, role: str, registry) -> list[dict]:
    """The cells of one method with fixed options on the ``role`` images of a case."""
    version = metadata.version("invdiff") if method.kind == "baseline" else registry.get(method.name).version
    seeds = [None] if method.kind == "baseline" else bench.config.seeds
    num_samples = None if method.kind == "baseline" else bench.config.num_samples or case.config.num_samples
    truths = case.test if role == "test" else case.validation
    specs = []
    for (index, truth), seed in itertools.product(enumerate(truths), seeds):
        problem = {**case.config.model_dump(mode="json"), "truth": truth}
        spec = {"problem": problem, "problem_file": str(case.file), "case": case.name, "role": role,
                "image_index": index, "method": method.label, "kind": method.kind, "sampler": method.name,
                "version": version, "options": options, "seed": seed, "num_samples": num_samples,
                "device": bench.device, "invdiff_version": metadata.version("invdiff"),
                "fresh_process": bench.config.fresh_process}
        spec["cell"] = cell_key(spec)
        specs.append(spec)
    return specs


class Cost:
    """What the computation inside ``with Cost(device) as cost:`` took: wall time, process CPU time (every
    thread) and peak memory above what was in use before: on a GPU ``torch.cuda.max_memory_allocated``, on
    the CPU the peak resident set (Linux: the peak ``VmHWM``, reset through ``/proc/self/clear_refs``;
    ``None`` where that is not possible)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_memory_bytes: int | None = None

    @staticmethod
    def _status(field: str) -> int:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
        return int(match.group(1)) * 1024

    def __enter__(self) -> "Cost":
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.memory_before = torch.cuda.memory_allocated()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
                self.memory_before = self._status("VmRSS")
            except (OSError, AttributeError):
                self.memory_before = None
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exception) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.wall_time_seconds = time.perf_counter() - self.wall_start
        self.cpu_time_seconds = time.process_time() - self.cpu_start
        if self.cuda:
            self.peak_memory_bytes = torch.cuda.max_memory_allocated() - self.memory_before
        elif self.memory_before is not None:
            self.peak_memory_bytes = self._status("VmHWM") - self.memory_before

    def fields(self) -> dict:
        return {"wall_time_seconds": self.wall_time_seconds, "cpu_time_seconds": self.cpu_time_seconds,
                "peak_memory_bytes": self.peak_memory_bytes}


def run_cell(spec: dict) -> dict:
    """Compute one cell (a pure function of its spec): its status, metrics, cost and the images of its estimate.

    ``status`` is ``ok``, ``unsupported`` (the sampler refuses the problem, with the reason) or ``failed``
    (sampling produced NaN or infinity); a problem that cannot be built raises ``ProblemError``. The cost
    (wall and CPU time, peak memory) is that of the sampling or reconstruction alone, not of the metrics.
    """
    from invdiff.posterior import SamplingError, UnsupportedProblem

    config = ProblemConfig.model_validate(spec["problem"])
    problem = build_problem(config, Path(spec["problem_file"])).to(spec["device"])
    try:
        result = _run_baseline(problem, spec) if spec["kind"] == "baseline" else _run_sampler(problem, spec)
    except UnsupportedProblem as error:
        return {"status": "unsupported", "message": str(error)}
    except SamplingError as error:
        return {"status": "failed", "message": str(error)}
    result["images"] = {name: image.to(torch.float64).cpu().numpy().round(5).tolist()
                        for name, image in result["images"].items()}
    return {"status": "ok", "message": "", **result}


def _run_baseline(problem, spec: dict) -> dict:
    from invdiff.baselines import pseudo_inverse, tv_reconstruction
    from invdiff.metrics import psnr, ssim

    operator, measurement = problem.posterior.operator, problem.posterior.measurement
    with Cost(spec["device"]) as cost:
        if spec["sampler"] == "tv":
            estimate = tv_reconstruction(operator, measurement, spec["options"]["regularisation"],
                                         spec["options"]["iterations"])[0]
        else:
            estimate = pseudo_inverse(operator, measurement)[0]
    truth = problem.truth[0]
    return {"psnr_posterior_mean": psnr(estimate, truth), "ssim_posterior_mean": ssim(estimate, truth),
            "network_evaluations_per_sample": 0, **cost.fields(), "threads": torch.get_num_threads(),
            "images": _problem_images(problem, estimate, None)}


def _run_sampler(problem, spec: dict) -> dict:
    from invdiff.evaluation import posterior_moments, run_summary
    from invdiff.plugins import load_registry
    from invdiff.posterior import sample_posterior

    info = load_registry().get(spec["sampler"])
    sampler = build_sampler(info.sampler_class, spec["options"])
    generator = torch.Generator(device=spec["device"]).manual_seed(spec["seed"])
    with Cost(spec["device"]) as cost:
        result = sample_posterior(sampler, problem.posterior, spec["num_samples"], generator=generator)
    images, mean, std = posterior_moments(problem, result)
    summary = run_summary(problem, info, sampler, result, seed=spec["seed"], device=spec["device"],
                          num_samples=spec["num_samples"], images=images, mean=mean)
    metrics = {key: value for key, value in summary["metrics"].items() if key != "ssim_convention"}
    exact = summary.get("exact_posterior", {})
    return {**metrics, "posterior_std_average": float(std.mean()),
            "network_evaluations_per_sample": result.network_evaluations_per_sample, **cost.fields(),
            "log_evidence": result.log_evidence, "log_evidence_exact": exact.get("log_evidence"),
            **{key: value for key, value in exact.items() if key not in ("note", "log_evidence")},
            "warnings": " ".join(summary["warnings"]), "versions": summary["versions"], "threads": summary["threads"],
            "images": _problem_images(problem, mean, std)}


def _problem_images(problem, estimate: torch.Tensor, std: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The truth, the measurement (when image-shaped), the estimate and its per-pixel std, for the figures."""
    images = {"truth": problem.truth[0].cpu(), "mean": estimate.detach().cpu()}
    measurement = problem.posterior.measurement[0].detach().cpu()
    if measurement.dim() == 3:
        images["measurement"] = measurement
    if std is not None:
        images["std"] = std
    return images


# --- the output folder ------------------------------------------------------------------------------

class BenchFolder:
    """The output folder of a benchmark: new, empty, or one that ``invdiff bench`` wrote (its marker), so
    that a rerun continues it. Never the working directory or a parent of it, never a symbolic link;
    only the names in ``OUTPUTS`` are ever written in it, each file replaced by a rename."""

    def __init__(self, out: str | Path):
        self.out = BenchFolder.check(out)
        if not self.out.exists():
            try:
                make_folders(self.out)
            except OSError as error:
                raise BenchError(f"--out: cannot create folder {error.filename}: {error.strerror or error}") from None
        try:
            (self.out / "cells").mkdir(exist_ok=True)
            self.write(MARKER, json.dumps({"written_by": "invdiff", "kind": BENCH_KIND, "files": list(OUTPUTS)}))
        except OSError as error:
            raise BenchError(f"--out {out}: cannot write there: {error.strerror or error}") from None

    @staticmethod
    def check(out: str | Path) -> Path:
        """The folder ``out`` names, refused (``BenchError``, one line) where the constructor would refuse it, creating
        nothing: ``--ray`` connects in between."""
        if not str(out).strip():
            raise BenchError("--out is empty; name a folder, e.g. --out runs/bench")
        try:
            folder = destination(out)
            check_destination(folder, "a benchmark", "runs/bench")
        except RunFolderError as error:
            raise BenchError(str(error)) from None
        if folder.exists() and owned_files(folder, BENCH_KIND) is None and any(folder.iterdir()):
            raise BenchError(f"--out {folder}: exists and was not written by invdiff bench (no {MARKER} of that "
                             f"kind); choose a new or empty folder")
        return folder

    def write(self, name: str, text: str) -> None:
        """Write ``text`` to ``name`` inside the folder, replacing the file at once (a rename)."""
        path = self.out / name
        partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
        partial.write_text(text)
        os.replace(partial, path)

    def cached(self, key: str) -> dict | None:
        try:
            return json.loads((self.out / "cells" / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def store(self, spec: dict, result: dict) -> None:
        self.write(f"cells/{spec['cell']}.json", json.dumps({"spec": spec, "result": result}))


# --- running ----------------------------------------------------------------------------------------

def _compute(folder: BenchFolder, specs: list[dict], bench: Bench, force: bool, progress: bool,
             ray_address: str | None, workers: int, what: str) -> dict[str, dict]:
    """The results of ``specs`` by cell key: from the cache, the rest computed (in this process, a new process
    per cell with ``fresh_process``, in ``workers`` local processes at once, or on Ray)."""
    results = {}
    missing = []
    for spec in specs:
        cached = None if force else folder.cached(spec["cell"])
        if cached is not None:
            results[spec["cell"]] = cached["result"]
        elif spec["cell"] not in {other["cell"] for other in missing}:
            missing.append(spec)
    from tqdm import tqdm

    bar = tqdm(total=len(missing), desc=what, unit="cell", disable=not progress or not missing)
    fresh = bench.config.fresh_process
    if ray_address is not None and missing:
        finished = _compute_on_ray(missing, ray_address, bench.config.cpus_per_cell, bench.device, fresh)
    elif workers > 1 and missing:
        finished = _compute_in_processes(missing, workers, bench.config.cpus_per_cell, fresh)
    else:
        finished = ((spec, _in_new_process(spec) if fresh else run_cell(spec)) for spec in missing)
    for spec, result in finished:
        folder.store(spec, result)  # stored at once: an interrupted benchmark continues from here
        results[spec["cell"]] = result
        bar.update()
    bar.close()
    return results


#: the result of a cell whose process died (copied for each such cell)
DIED = {"status": "failed", "message": "the cell's process died (killed: out of memory?)"}


def _thread_variables(threads: int) -> dict[str, str]:
    """The environment that gives a process started with it ``threads`` threads: torch reads it as it loads (a
    later ``torch.set_num_threads`` gives other float sums in the last bits)."""
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}


def _spawn_pool(workers: int):
    """A pool of ``workers`` new Python processes (spawned, not forked: nothing of this one is inherited)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))


def _in_new_process(spec: dict) -> dict:
    """``run_cell(spec)`` in a new Python process; a process that dies (killed, e.g. out of memory) is a failed
    cell."""
    from concurrent.futures.process import BrokenProcessPool

    try:
        with _spawn_pool(1) as pool:
            return pool.submit(run_cell, spec).result()
    except BrokenProcessPool:
        return dict(DIED)


def _compute_in_processes(specs: list[dict], workers: int, threads: int, fresh: bool):
    """The cells in ``workers`` local processes at once (``--workers``: a machine's cores, or one GPU shared by
    processes that each leave it idle between small kernels), spawned with ``threads`` threads each (this
    process's environment says so while the cells run); with ``fresh``, a new process per cell. Yields
    ``(spec, result)`` as each cell finishes; an error of a cell (e.g. ``ProblemError``) cancels the cells not
    started and is raised here, as in one process."""
    from concurrent.futures import ThreadPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool

    saved = dict(os.environ)
    os.environ.update(_thread_variables(threads))
    pool = ThreadPoolExecutor(workers) if fresh else _spawn_pool(workers)
    try:
        futures = {pool.submit(_in_new_process if fresh else run_cell, spec): spec for spec in specs}
        for future in as_completed(futures):
            try:
                result = future.result()
            except BrokenProcessPool:
                result = dict(DIED)
            yield futures[future], result
    finally:
        pool.shutdown(cancel_futures=True)
        os.environ.clear()
        os.environ.update(saved)


def connect_ray(address: str):
    """The ``ray`` module, connected to ``address`` (``auto``: the running cluster, else a local one); a missing
    ray or an address it cannot use is a ``BenchError`` (``invdiff bench`` connects before it writes its folder)."""
    try:
        import ray
    except ImportError:
        raise BenchError('--ray: ray is not installed; pip install "invdiff[ray]"') from None
    if not ray.is_initialized():
        try:
            ray.init(address=None if address == "auto" else address, include_dashboard=False, log_to_driver=False)
        except (ValueError, ConnectionError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BenchError(f"--ray {address}: cannot connect ({reason}); give 'auto' or a running cluster's "
                             f"HOST:PORT") from None
    return ray


def _compute_on_ray(specs: list[dict], address: str, cpus: int, device: str, fresh: bool):
    """Each cell as a Ray task with ``cpus`` CPUs (and a GPU on ``cuda``); ``address``: ``auto`` (the running
    cluster, else a local one) or a cluster's address; ``fresh``: a new worker process per task. Yields
    ``(spec, result)`` as each task finishes."""
    ray = connect_ray(address)
    threads = _thread_variables(cpus)  # the task's CPUs, not the node's
    remote = ray.remote(max_calls=1)(run_cell) if fresh else ray.remote(run_cell)  # max_calls: not an option
    task = remote.options(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0, runtime_env={"env_vars": threads})
    pending = {task.remote(spec): spec for spec in specs}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayTaskError as error:  # the task's own error (e.g. ProblemError), not Ray's traceback
            for task_left in pending:
                ray.cancel(task_left)
            raise error.cause from None
        yield pending.pop(done[0]), result


def _image_scores(specs: list[dict], results: dict[str, dict]) -> dict[int, float | None]:
    """Per image, the seed-averaged PSNR of the posterior mean; None for an image where a cell did not run."""
    per_image: dict[int, list] = {}
    for spec in specs:
        result = results[spec["cell"]]
        per_image.setdefault(spec["image_index"], []).append(
            result["psnr_posterior_mean"] if result["status"] == "ok" else None)
    return {image: None if None in values else sum(values) / len(values) for image, values in per_image.items()}


def _score(specs: list[dict], results: dict[str, dict]) -> float | None:
    """Mean over images of the seed-averaged PSNR of the posterior mean; None when a cell did not run."""
    scores = list(_image_scores(specs, results).values())
    return None if None in scores else sum(scores) / len(scores)


def _grid_specs(bench: Bench, case: Case, method: Method, role: str, registry) -> list[tuple[dict, list[dict]]]:
    """Each value of the method's tuning grid with its cells on the ``role`` images of the case."""
    return [(values, _cell_specs(bench, case, method, resolve_options(method, case, values, registry), role,
                                 registry)) for values in method.grid()]


def run_bench(bench: Bench, folder: BenchFolder, *, force: bool = False, progress: bool = True,
              ray_address: str | None = None, workers: int = 1) -> tuple[list[dict], list[dict]]:
    """Tune on the validation images, run the test cells (and the oracle grids), write the reports; returns
    (rows, tuning records)."""
    from invdiff.bench_report import write_reports
    from invdiff.plugins import load_registry

    registry = load_registry()
    candidates = {(case.config.name, method.label): (case, method,
                                                     _grid_specs(bench, case, method, "validation", registry))
                  for case in bench.cases for method in bench.methods if method.tune}
    validation_specs = [spec for *_, grid in candidates.values() for _, specs in grid for spec in specs]
    results = _compute(folder, validation_specs, bench, force, progress, ray_address, workers, "tuning")
    records = {}
    for key, (case, method, grid) in candidates.items():
        scores = [(values, _score(specs, results)) for values, specs in grid]
        valid = [(values, score) for values, score in scores if score is not None]
        records[key] = {"problem": case.config.name, "method": method.label,
                        "chosen": max(valid, key=lambda pair: pair[1])[0] if valid else grid[0][0],
                        "validation_images": len(grid[0][1]),
                        "grid": [{"values": values, "mean_psnr": score} for values, score in scores]}
    test_specs = []
    for case in bench.cases:
        for method in bench.methods:
            values = records[case.config.name, method.label]["chosen"] if method.tune else {}
            test_specs += _cell_specs(bench, case, method, resolve_options(method, case, values, registry), "test",
                                      registry)
    oracle = {(case.config.name, method.label): _grid_specs(bench, case, method, "test", registry)
              for case in bench.cases for method in bench.methods if method.oracle}
    oracle_specs = [spec for grid in oracle.values() for _, specs in grid for spec in specs]
    results.update(_compute(folder, test_specs + oracle_specs, bench, force, progress, ray_address, workers,
                            "cells"))
    rows = [_row(spec, results[spec["cell"]]) for spec in validation_specs + test_specs]
    for key, grid in oracle.items():
        choices = _oracle_choices(grid, results)
        records[key]["oracle_chosen"] = {image: values for image, (values, _) in choices.items()}
        rows += [{**_row(spec, results[spec["cell"]]), "method": f"{spec['method']} {ORACLE}"}
                 for _, cells in choices.values() for spec in cells]
    tuning = list(records.values())
    write_reports(folder, bench, rows, tuning)
    return rows, tuning


def _oracle_choices(grid: list[tuple[dict, list[dict]]], results: dict[str, dict]) -> dict[int, tuple[dict, list]]:
    """Per test image, the grid value with the best seed-averaged PSNR on that image itself and its cells
    (every seed); where no value ran, the first value's cells, so that their failure is reported."""
    scores = [(values, specs, _image_scores(specs, results)) for values, specs in grid]
    choices = {}
    for image in scores[0][2]:
        ran = [(per_image[image], values, specs) for values, specs, per_image in scores if per_image[image] is not None]
        _, values, specs = max(ran, key=lambda entry: entry[0]) if ran else (None, *grid[0])
        choices[image] = (values, [spec for spec in specs if spec["image_index"] == image])
    return choices


def _row(spec: dict, result: dict) -> dict:
    """One cell as a flat record: where it sits in the matrix, its inputs and its results."""
    return {"problem": spec["problem"]["name"], "problem_file": spec["problem_file"], "case": spec["case"],
            "prior": spec["problem"]["prior"]["name"], "role": spec["role"], "image_index": spec["image_index"],
            "truth": spec["problem"]["truth"], "method": spec["method"], "kind": spec["kind"],
            "sampler": spec["sampler"], "version": spec["version"], "options": spec["options"], "seed": spec["seed"],
            "num_samples": spec["num_samples"], "device": spec["device"], "invdiff_version": spec["invdiff_version"],
            "cell": spec["cell"], **result}
