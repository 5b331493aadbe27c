import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cli_helpers import VALID, error_of, write_problem
from invdiff.cli import main
from invdiff.plugins import load_registry
from invdiff.problems import build_sampler, load_problem, load_problem_config, problem_cases

ROOT = Path(__file__).resolve().parent.parent
INPAINT = ROOT / "problems" / "inpaint.yaml"
FAST = ["--num-samples", "4", "-o", "num_steps=20", "--quiet"]


def test_solve_writes_samples_summary_and_figure(tmp_path):
    """The real command, as a user runs it."""
    out = tmp_path / "run"
    completed = subprocess.run([sys.executable, "-m", "invdiff", "solve", str(INPAINT), "--case", "digits-gmm-box",
                                "--sampler", "dps", "--seed", "3", "--out", str(out), *FAST], capture_output=True,
                               text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    assert sorted(path.name for path in out.iterdir()) == [".invdiff-run.json", "figure.png", "samples.npz",
                                                           "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sampler"]["name"] == "dps" and summary["sampler"]["options"]["num_steps"] == 20
    assert summary["seed"] == 3 and summary["num_samples"] == 4
    assert summary["network_evaluations_per_sample"] == 20
    assert {"torch", "deepinv", "numpy", "invdiff", "invdiff source"} <= set(summary["versions"])
    # what a rerun needs beyond the version string: the source's commit, the thread count (another sums in
    # another order), where the problem file was and where the run started
    source = summary["versions"]["invdiff source"]
    assert source == "not a git checkout" or len(source.split()[0]) == 40, source
    assert summary["threads"] == int(os.environ.get("OMP_NUM_THREADS", summary["threads"])) >= 1   # inherited
    assert isinstance(summary["device_name"], str) and summary["device_name"]
    assert summary["problem_file_resolved"] == str(INPAINT) and summary["working_directory"] == str(ROOT)
    assert 5 < summary["metrics"]["psnr_posterior_mean"] < 60
    assert summary["exact_posterior"]["log_evidence"] == pytest.approx(53.31, abs=0.05)
    assert len(summary["diagnostics"]) == 20
    arrays = np.load(out / "samples.npz")
    assert arrays["samples"].shape == (4, 1, 8, 8) and arrays["truth"].shape == (1, 1, 8, 8)


def test_same_seed_same_samples(tmp_path):
    for name in ("a", "b"):
        assert main(["solve", str(INPAINT), "--sampler", "dps", "--out", str(tmp_path / name), *FAST]) == 0
    first, second = (np.load(tmp_path / name / "samples.npz")["samples"] for name in ("a", "b"))
    assert np.array_equal(first, second)


def test_samplers_lists_name_package_version(capsys):
    assert main(["samplers"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["name", "package", "version"]
    assert any(line.split()[:2] == ["dps", "invdiff"] for line in lines)


@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed", "malformed YAML at line 1"),
    ("- just\n- a list\n", "must be a mapping"),
    (VALID + "colour: blue\n", "colour: unknown key; allowed: description, measurement, name"),
    (VALID.replace("sigma_y: 0.05", "sigma_y: -0.1"), "noise.sigma_y: Input should be greater than 0 (got -0.1)"),
    (VALID.replace("type: inpainting", "type: blurry"), "operator.type: unknown value 'blurry'; allowed: 'inpainting'"),
    (VALID.replace("prior: digits_gmm", "prior: faces"), "prior.name: unknown value 'faces'; allowed: 'digits_gmm'"),
    (VALID.replace("index: 3", "index: 300"), "truth.index: the test split has 300 images, so index must be < 300"),
    (VALID.replace("truth: {source: digits, index: 3}", ""), "give a truth"),
    (VALID.replace("{type: inpainting, mask: random, fraction_observed: 0.5}",
                   "{type: super_resolution, factor: 4, filter: gaussian}"),
     "operator: the gaussian filter of factor 4 is 29 pixels wide, too wide for the 8x8 image; allowed: height and "
     "width of at least 14"),
    (VALID + "sampler_options: {dps: {scale: 0}}", "sampler_options.dps.scale: Input should be greater than 0"),
    (VALID + "sampler_options: {dps: {scale: .inf}}", "sampler_options.dps.scale: Input should be a finite number"),
    (VALID + "sampler_options: {dps: {steps: 10}}", "sampler_options.dps.steps: unknown key; allowed: batch_size, "
                                                    "num_steps, scale, step_rule"),
])
def test_bad_problem_files_get_one_line_errors_and_write_nothing(tmp_path, capsys, text, expected):
    out = tmp_path / "run"
    error = error_of(["solve", str(write_problem(tmp_path, text)), "--sampler", "dps", "--out", str(out)], capsys)
    assert expected in error
    assert not out.exists()


def test_more_steps_than_a_ddpm_schedule_has_is_a_one_line_error(tmp_path, capsys):
    text = VALID.replace("prior: digits_gmm", "prior: {name: digits_gmm, sde: {type: ddpm, num_timesteps: 10}}")
    out = tmp_path / "run"
    error = error_of(["solve", str(write_problem(tmp_path, text + "sampler_options: {dps: {num_steps: 20}}")),
                      "--sampler", "dps", "--out", str(out), "--quiet"], capsys)
    assert "the DDPM schedule has 10 timesteps, so it cannot take 20 steps; use num_steps <= 10" in error
    assert not out.exists()


def test_options_for_a_sampler_that_is_not_registered_are_a_typo(tmp_path, capsys):
    problem = write_problem(tmp_path, VALID + "sampler_options: {dsp: {scale: 0.5}}")
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "run")], capsys)
    assert "sampler_options.dsp: unknown sampler 'dsp'; available: " in error and "dps" in error


def test_unknown_sampler(tmp_path, capsys):
    error = error_of(["solve", str(INPAINT), "--sampler", "magic", "--out", str(tmp_path / "run")], capsys)
    assert "unknown sampler 'magic'; available: " in error and "dps" in error


def test_wrong_image_shape(tmp_path, capsys):
    np.save(tmp_path / "image.npy", np.zeros((1, 10, 10)))
    problem = write_problem(tmp_path, VALID.replace("{source: digits, index: 3}", "{source: file, path: image.npy}"))
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "run")], capsys)
    assert "truth: the image has shape (1, 10, 10) (channels, height, width); the prior 'digits_gmm' expects " \
        "(1, 8, 8)" in error


def test_a_fully_convolutional_prior_takes_the_image_size_of_the_truth(tmp_path, capsys):
    np.save(tmp_path / "image.npy", np.full((1, 12, 16), 0.5))
    text = VALID.replace("prior: digits_gmm", "prior: natural").replace("{source: digits, index: 3}",
                                                                        "{source: file, path: image.npy}")
    problem = load_problem(write_problem(tmp_path, text))
    assert problem.posterior.prior.event_shape == (1, 12, 16)
    np.save(tmp_path / "image.npy", np.full((1, 10, 10), 0.5))
    error = error_of(["solve", str(tmp_path / "problem.yaml"), "--sampler", "dps", "--out", str(tmp_path / "r")],
                     capsys)
    assert "truth: the prior's network needs height and width divisible by 4, got (1, 10, 10)" in error


def test_nan_in_the_measurement(tmp_path, capsys):
    measurement = np.zeros((1, 8, 8))
    measurement[0, 2, 2] = np.nan
    np.save(tmp_path / "y.npy", measurement)
    problem = write_problem(tmp_path, VALID.replace("truth: {source: digits, index: 3}", "measurement: y.npy"))
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(tmp_path / "run")], capsys)
    assert "measurement: contains NaN" in error


def test_measurement_file_and_user_image(tmp_path):
    """A measurement given as a file, and a truth given as the user's own PNG."""
    from skimage import io

    io.imsave(tmp_path / "digit.png", (np.eye(8) * 255).astype(np.uint8), check_contrast=False)
    np.save(tmp_path / "y.npy", np.full((1, 8, 8), 0.2))
    text = VALID.replace("{source: digits, index: 3}", "{source: file, path: digit.png}") + "measurement: y.npy\n"
    out = tmp_path / "run"
    assert main(["solve", str(write_problem(tmp_path, text)), "--sampler", "dps", "--out", str(out), *FAST]) == 0
    arrays = np.load(out / "samples.npz")
    assert np.allclose(arrays["measurement"], 0.2) and np.allclose(arrays["truth"][0, 0], np.eye(8))


def test_existing_output_is_never_silently_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    error = error_of(["solve", str(INPAINT), "--sampler", "dps", "--out", str(out), *FAST], capsys)
    assert "exists; choose another --out or pass --overwrite" in error
    assert (out / "keep.txt").read_text() == "precious"
    error = error_of(["solve", str(INPAINT), "--sampler", "dps", "--out", str(out), "--overwrite", *FAST], capsys)
    assert "was not written by invdiff solve" in error     # --overwrite replaces only invdiff's own runs
    assert (out / "keep.txt").read_text() == "precious"
    assert [path.name for path in tmp_path.iterdir()] == ["run"]   # no staging folder left behind


@pytest.mark.parametrize("arguments, expected", [
    (["solve", "x.yaml"], "invdiff: error: solve: the following arguments are required: --sampler; see invdiff solve"),
    (["solve", "x.yaml", "--sampler", "dps", "--seed", "abc"], "invdiff: error: solve: argument --seed: invalid int"),
    (["nosuch"], "invdiff: error: argument command: invalid choice: 'nosuch'"),
])
def test_argument_errors_are_one_line(capsys, arguments, expected):
    with pytest.raises(SystemExit) as exit_:
        main(arguments)
    error = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "\n" not in error and error.startswith(expected), error


def test_bad_option_syntax_and_device(tmp_path, capsys):
    assert "--option expects KEY=VALUE" in error_of(["solve", str(INPAINT), "--sampler", "dps", "-o", "scale",
                                                     "--out", str(tmp_path / "a")], capsys)
    assert "--option scale: malformed YAML at line 1, column 4" in error_of(
        ["solve", str(INPAINT), "--sampler", "dps", "-o", "scale=[1,", "--out", str(tmp_path / "a")], capsys)
    assert "--option scale is given twice; give it once" in error_of(
        ["solve", str(INPAINT), "--sampler", "dps", "-o", "scale=1", "-o", "scale=2", "--out", str(tmp_path / "a")],
        capsys)
    assert "num_particles is given by --option and by --num-particles; give it once" in error_of(
        ["solve", str(INPAINT), "--sampler", "twisted_smc", "-o", "num_particles=4", "--num-particles", "8", "--out",
         str(tmp_path / "a")], capsys)
    assert "sampler_options.dps: num_steps: a number is needed, not true" in error_of(
        ["solve", str(INPAINT), "--sampler", "dps", "-o", "num_steps=true", "--out", str(tmp_path / "a")], capsys)
    # a bad particle flag is the flag's, not --option's (no -o was given)
    assert error_of(["solve", str(INPAINT), "--sampler", "twisted_smc", "--num-particles", "0", "--out",
                     str(tmp_path / "a")], capsys).startswith("invdiff: error: --num-particles: ")
    assert "--out is empty" in error_of(["bench", str(ROOT / "benchmarks" / "quick.yaml"), "--out", ""], capsys)
    for seed in (str(2**63), "-1"):
        assert "--seed must be an integer from 0 to 2**63 - 1" in error_of(
            ["solve", str(INPAINT), "--sampler", "dps", "--seed", seed, "--out", str(tmp_path / "a")], capsys)
    assert not (tmp_path / "a").exists()
    import torch

    if not torch.cuda.is_available():
        assert "no CUDA device" in error_of(["solve", str(INPAINT), "--sampler", "dps", "--device", "cuda",
                                             "--out", str(tmp_path / "b")], capsys)


def test_exact_sampler_refuses_an_untractable_problem(tmp_path, capsys):
    text = VALID.replace("{type: gaussian, sigma_y: 0.05}", "{type: poisson, gain: 0.05}")
    error = error_of(["solve", str(write_problem(tmp_path, text)), "--sampler", "exact", "--out",
                      str(tmp_path / "run")], capsys)
    assert "needs Gaussian noise" in error
    assert not (tmp_path / "run").exists()


def test_sampling_failure_exits_one_and_names_the_step(tmp_path, capsys):
    text = VALID + "sampler_options: {dps: {scale: 1.0e+30, num_steps: 20}}"
    code = main(["solve", str(write_problem(tmp_path, text)), "--sampler", "dps", "--out", str(tmp_path / "run"),
                 "--quiet"])
    assert code == 1
    error = capsys.readouterr().err
    assert error.startswith("invdiff: sampling failed: dps: ") and re.search(r"at step \d+/20 \(t=", error)
    assert not (tmp_path / "run").exists()


def test_a_failure_in_a_sampler_s_options_leaves_no_folder(tmp_path, monkeypatch):
    """An error raised by a sampler's own ``usage`` (a plugin's mistake) before the run: no staging folder and no
    parent folders are left behind (they were: the folder was staged before the call)."""
    from invdiff_plugins.dps import DPS

    def broken(self):
        raise RuntimeError("a plugin's broken usage")

    monkeypatch.setattr(DPS.Options, "usage", broken)
    with pytest.raises(RuntimeError, match="broken usage"):
        main(["solve", str(write_problem(tmp_path, VALID)), "--sampler", "dps", "--out", str(tmp_path / "a" / "run"),
              "--quiet"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["problem.yaml"]


FAST_OPTIONS = {"dps": ["-o", "num_steps=10"], "exact": [],
                # a pilot run's options replaced too (natural-gmm-box's split one run at t = 0.01, below 10 steps' grid)
                "twisted_smc": ["-o", "num_steps=10", "-o", "num_runs=2", "--num-particles", "8",
                                "-o", "pilot_options={num_runs: 2, num_particles: 8}"],
                "ve_smc": ["-o", "num_steps=10", "-o", "num_runs=2", "--num-particles", "8"],
                "mcgdiff": ["-o", "num_steps=10", "-o", "num_runs=2", "--num-particles", "8"],
                "rdmc": ["-o", "num_steps=3", "-o", "num_chains=2", "-o", "inner_steps=2", "-o", "pool_size=8",
                         "-o", "pool_steps=5"],
                "ddrm": ["-o", "num_steps=5"], "diffpir": ["-o", "num_steps=5"], "deepinv_dps": ["-o", "num_steps=5"]}


PROBLEM_CASES = [(path.name, case) for path in sorted((ROOT / "problems").glob("*.yaml"))
                 for case in problem_cases(path)]


def prior_family(case: str) -> str:
    """``digits``, ``natural``, ``digits-gmm``, ``natural-gmm`` or ``natural-rgb``: the case name up to its operator
    (``natural-box-quick`` is natural-box at the main job's budget)."""
    return case.removesuffix("-quick").rsplit("-", 1)[0]


def first_of_each_family(cases: list[tuple[str, str]]) -> set[tuple[str, str]]:
    firsts: dict[tuple[str, str], str] = {}
    for problem, case in cases:
        firsts.setdefault((problem, prior_family(case)), case)
    return {(problem, case) for (problem, _), case in firsts.items()}


#: every sampler runs on every digits case and on the first case of each image-size family in each problem file
#: (each operator type with each kind of prior); the other 32x32 and 16x16 cases, and the 64x64 colour ones
#: (every sampler in colour: tests/test_colour.py, tests/test_real_size.py), run with DPS: each loads and samples
FIRST_OF_EACH_FAMILY = first_of_each_family(PROBLEM_CASES)
SAMPLER_CASES = [(problem, case, sampler) for problem, case in PROBLEM_CASES for sampler in sorted(FAST_OPTIONS)
                 if sampler == "dps" or prior_family(case) in ("digits", "digits-gmm")
                 or ((problem, case) in FIRST_OF_EACH_FAMILY and prior_family(case) != "natural-rgb")]


def test_listing_the_cases_of_a_bad_file_names_what_is_wrong(tmp_path):
    from invdiff.problems import ProblemError

    assert problem_cases(write_problem(tmp_path, VALID)) == []
    with pytest.raises(ProblemError, match="malformed YAML at line 1"):
        problem_cases(write_problem(tmp_path, "name: [unclosed"))
    with pytest.raises(ProblemError, match="does not exist"):
        problem_cases(tmp_path / "missing.yaml")


def test_problem_files_hold_digits_natural_exact_and_colour_cases():
    for problem in ("inpaint.yaml", "deblur.yaml", "superres.yaml"):
        cases = problem_cases(ROOT / "problems" / problem)
        network_natural = [case for case in cases if prior_family(case) == "natural" and not case.endswith("-quick")]
        assert (cases[0] == "natural-box-quick") if problem == "inpaint.yaml" else cases[0].startswith("digits-")
        assert len(network_natural) == 2
        assert any(case.startswith("digits-gmm-") for case in cases) and any("natural-gmm-" in case for case in cases)
        assert [prior_family(case) for case in cases].count("natural-rgb") == 1


@pytest.mark.parametrize("problem, case, sampler", SAMPLER_CASES)
def test_shipped_problems_run_with_the_built_in_samplers(tmp_path, capsys, problem, case, sampler):
    out = tmp_path / "run"
    command = ["solve", str(ROOT / "problems" / problem), "--case", case, "--sampler", sampler, "--out", str(out),
               "--num-samples", "4", "--quiet"] + FAST_OPTIONS[sampler]
    exact_prior = "-gmm-" in case
    if sampler == "exact" and not exact_prior:
        assert "needs a Gaussian or Gaussian-mixture prior" in error_of(command, capsys)
        return
    if sampler == "ddrm" and problem == "superres.yaml":
        assert "ddrm" in error_of(command, capsys)
        return
    assert main(command) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["problem"]["name"] == f"{problem.removesuffix('.yaml')}-{case}"
    assert ("exact_posterior" in summary) == exact_prior
    shape = np.load(out / "samples.npz")["samples"].shape
    size = {"natural-gmm": 16, "natural": 32, "natural-rgb": 64}.get(prior_family(case), 8)
    assert shape == (4, 3 if prior_family(case) == "natural-rgb" else 1, size, size)
    if sampler.endswith("smc"):
        arrays = np.load(out / "samples.npz")
        assert arrays["particles"].shape[0] == 8 and arrays["log_weights"].shape == (8,)
        assert summary["log_evidence"] is not None and len(summary["ess_trace"]) == 10


@pytest.mark.parametrize("problem, case", PROBLEM_CASES)
def test_every_shipped_sampler_configuration_is_valid(problem, case):
    """The options a problem file gives each sampler build (the fast run above overrides some of them), and each is
    used by the configuration it is part of (no note about unused options on the shipped cases)."""
    config = load_problem_config(ROOT / "problems" / problem, case)
    registry = load_registry()
    for name, options in config.sampler_options.items():
        sampler = build_sampler(registry.get(name).sampler_class, options)
        assert sampler.unused_options(load_problem(ROOT / "problems" / problem, case).posterior) == {}, \
            f"{case}, {name}: options it does not use"


def test_options_the_configuration_does_not_use_get_a_note(tmp_path, capsys):
    """An option given explicitly that the configuration ignores (here twisting_cap without twisting 'capped', and
    move_step_size without moves) is named in one note, on stderr and in summary.json, and the run goes on."""
    out = tmp_path / "run"
    code = main(["solve", str(ROOT / "problems" / "inpaint.yaml"), "--case", "digits-gmm-box", "--sampler",
                 "twisted_smc", "-o", "num_steps=2", "-o", "twisting_cap=0.1", "-o", "move_step_size=0.2",
                 "--num-samples", "4", "--out", str(out), "--quiet"])
    assert code == 0
    note = ("twisted_smc does not use twisting_cap (with twisting 'capped'), move_step_size (with move_steps above "
            "0)")
    assert f"invdiff: note: {note}" in capsys.readouterr().err.splitlines()
    assert note in json.loads((out / "summary.json").read_text())["notes"]
    registry = load_registry()
    piloted = build_sampler(registry.get("twisted_smc").sampler_class,
                            {"guidance": "twist", "pilot_samples": 8, "pilot_inflation": 2.0, "move_steps": 3,
                             "move_step_size": 0.2})
    assert piloted.options.unused_options() == {"pilot_samples": "with guidance 'pilot'",
                                                "pilot_inflation": "with guidance 'pilot' or 'gaussian_fit'"}
    mcgdiff = build_sampler(registry.get("mcgdiff").sampler_class, {"twisting": "capped"})
    assert list(mcgdiff.options.unused_options()) == ["twisting"]


@pytest.mark.parametrize("sampler", ["twisted_smc", "ve_smc"])
def test_twisting_options_under_poisson_noise_get_a_note(tmp_path, capsys, sampler):
    """Under Poisson noise the twist is the likelihood at x0_hat whatever twisting and twisting_cap say: given, they are
    named in the note (they had no effect, silently)."""
    problem = write_problem(tmp_path, VALID.replace("{type: gaussian, sigma_y: 0.05}", "{type: poisson, gain: 0.05}"))
    code = main(["solve", str(problem), "--sampler", sampler, "-o", "num_steps=2", "-o", "twisting=capped", "-o",
                 "twisting_cap=0.1", "--num-particles", "8", "--num-samples", "4", "--out", str(tmp_path / "run"),
                 "--quiet"])
    assert code == 0
    when = "with Gaussian noise; under other noise the twist is the likelihood at x0_hat"
    assert (f"invdiff: note: {sampler} does not use twisting ({when}), twisting_cap ({when})"
            in capsys.readouterr().err.splitlines())


def test_a_sampler_refusing_the_problem_prints_only_its_line(tmp_path, capsys):
    """Without --quiet too: the progress bar is drawn at the first step, not before a refusal."""
    error = error_of(["solve", str(ROOT / "problems" / "superres.yaml"), "--sampler", "ddrm", "--out",
                      str(tmp_path / "run")], capsys)
    assert "ddrm needs an operator with a singular value decomposition" in error
    assert not (tmp_path / "run").exists()


def test_a_refusal_comes_before_the_long_run_warning(tmp_path, capsys):
    """Sampler.check runs before the time estimate: a 30-minute run refused at once prints no warning first."""
    error = error_of(["solve", str(INPAINT), "--case", "natural-box", "--sampler", "twisted_smc", "-o",
                      "twisting=exact", "--out", str(tmp_path / "run")], capsys)
    assert "the exact twist needs a Gaussian or Gaussian-mixture prior (e.g. digits_gmm, natural_gmm); the prior " \
           "'natural' is a NetworkPrior" in error
    assert not (tmp_path / "run").exists()


def test_unknown_case_lists_the_cases(tmp_path, capsys):
    error = error_of(["solve", str(INPAINT), "--case", "faces", "--sampler", "dps", "--out", str(tmp_path / "r")],
                     capsys)
    assert ("inpaint.yaml: unknown case 'faces'; allowed: natural-box-quick, digits-box, digits-random, natural-box"
            in error)


def test_particle_flags_reach_the_sampler_and_are_refused_where_meaningless(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["solve", str(INPAINT), "--case", "digits-box", "--sampler", "twisted_smc", "--num-particles", "12",
                 "--resampling", "residual", "--resampling-threshold", "0.3", "-o", "num_steps=5", "--out", str(out),
                 "--quiet"]) == 0
    options = json.loads((out / "summary.json").read_text())["sampler"]["options"]
    assert (options["num_particles"], options["resampling"], options["resampling_threshold"]) == (12, "residual", 0.3)
    capsys.readouterr()   # that run's output (5 steps may collapse the samples: a warning line)
    error = error_of(["solve", str(INPAINT), "--sampler", "dps", "--num-particles", "12", "--out",
                      str(tmp_path / "other")], capsys)
    assert "--num-particles: sampler 'dps' has no option num_particles" in error


def test_check_reports_the_numbers_and_a_verdict(capsys):
    assert main(["check", "exact", "--quiet"]) == 0
    report = capsys.readouterr().out
    assert "verdict: PASS: exact meets the exact standard" in report and "largest mean z-score" in report
    assert "--option: sampler_options.dps.steps: unknown key" in error_of(["check", "dps", "-o", "steps=3"], capsys)
    assert "unknown sampler 'magic'" in error_of(["check", "magic"], capsys)


def test_help_does_not_load_torch_and_listing_samplers_does_not_load_deepinv():
    """`invdiff --help` answers without the numerical stack; `invdiff samplers` needs torch (the
    plugins' modules import it) but not deepinv, torchvision, scikit-image or POT."""
    script = ("import sys; from invdiff.cli import main\n"
              "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
              "print(sorted(name for name in ('torch', 'numpy') if name in sys.modules))\n"
              "main(['samplers'])\n"
              "print(sorted(name for name in ('deepinv', 'torchvision', 'skimage', 'ot') if name in sys.modules))")
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.strip().splitlines()
    assert lines[-1] == "[]", f"listing samplers imported {lines[-1]}"
    loaded_by_help = next(line for line in lines if line.startswith("["))
    assert loaded_by_help == "[]", f"--help imported {loaded_by_help}"


@pytest.mark.parametrize("sampler, options, expected", [
    ("dps", ["-o", "num_steps=1000000000"], "sampler_options.dps.num_steps: Input should be less than or equal to "
                                             "100000"),
    ("ddrm", ["-o", "num_steps=1000000000"], "sampler_options.ddrm.num_steps: Input should be less than or equal "
                                              "to 100000"),
    ("deepinv_dps", ["-o", "num_steps=1000000000"], "sampler_options.deepinv_dps.num_steps: Input should be less "
                                                     "than or equal to 100000"),
    ("rdmc", ["-o", "terminal_time=1e9"], "sampler_options.rdmc.terminal_time: Input should be less than or equal "
                                          "to 100"),
    ("twisted_smc", ["-o", "twisting=gaussian_fit", "--case", "poisson"],
     "twisting 'gaussian_fit' needs a linear operator with Gaussian noise"),
])
def test_options_a_run_cannot_honour_are_refused(tmp_path, capsys, sampler, options, expected):
    """A typo of zeros in num_steps filled the memory with the time grid (killed, no message); rdmc's terminal time
    overflowed math.exp; the Gaussian-fit twist's refusal named 'second_order'."""
    problem = write_problem(tmp_path, VALID.replace("{type: gaussian, sigma_y: 0.05}", "{type: poisson, gain: 0.05}")
                            if "poisson" in options else VALID)
    options = [option for option in options if option not in ("--case", "poisson")]
    assert expected in error_of(["solve", str(problem), "--sampler", sampler, *options, "--out",
                                 str(tmp_path / "run")], capsys)


def test_the_long_run_warning_is_printed_with_quiet(tmp_path, capsys, monkeypatch):
    """--quiet drops the progress bar, not the warning that a run will take long (its only word for hours)."""
    monkeypatch.setattr("invdiff.resources.check_run", lambda *arguments: "this run will take about 9 h")
    assert main(["solve", str(write_problem(tmp_path, VALID)), "--sampler", "dps", "-o", "num_steps=3",
                 "--num-samples", "2", "--quiet", "--out", str(tmp_path / "run")]) == 0
    assert "invdiff: warning: this run will take about 9 h" in capsys.readouterr().err
