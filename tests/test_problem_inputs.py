"""Every bad input a problem file can point at gets one line naming the field, exit code 2, and no output.

Each case runs the real command (``invdiff solve PROBLEM --sampler dps``) on a problem written into
``tmp_path``: the problem file itself, the truth and measurement files it names, the numbers in it,
and the operator's fit to the image.
"""

import json
import os

import numpy as np
import pytest
import torch

from cli_helpers import VALID, error_of, write_problem
from invdiff.cli import main
from invdiff.problems import load_problem
from invdiff.yamlfile import YAMLFileError, read_mapping

DIGIT_TRUTH = "truth: {source: digits, index: 3}"
FILE_TRUTH = "truth: {source: file, path: image.npy}"


def solve_error(problem, tmp_path, capsys):
    """The one-line error of ``invdiff solve problem``, after checking the exit code and that nothing was written."""
    out = tmp_path / "run"
    error = error_of(["solve", str(problem), "--sampler", "dps", "--out", str(out), "--quiet"], capsys)
    assert not out.exists(), "a refused problem must not create the output folder"
    return error


# --- the problem file itself --------------------------------------------------------------------------

def symlink_loop(path):
    os.symlink(path.name, path)


def directory(path):
    path.mkdir()


def not_utf8(path):
    path.write_bytes(VALID.encode() + b"description: caf\xe9\n")


def duplicate_key(path):
    path.write_text(VALID + "noise: {type: gaussian, sigma_y: 0.5}\n")


def pipe(path):   # reading it waits for a writer; a device such as /dev/zero is read until memory runs out
    os.mkfifo(path)


def too_large(path):
    path.write_text(VALID + "description: " + "a" * 10**7 + "\n")


@pytest.mark.parametrize("make, expected", [
    (symlink_loop, "problem file {path} is a symbolic link loop"),
    (directory, "problem file {path} is a directory, not a file"),
    (not_utf8, "problem.yaml: not UTF-8 text (byte"),
    (duplicate_key, "problem.yaml: malformed YAML at line 7, column 1: key 'noise' is given twice"),
    (pipe, "problem file {path} is not a regular file (a device, a pipe or a socket)"),
    (too_large, "bytes; a problem file is a YAML text of at most 10,000,000 bytes"),
])
def test_a_problem_file_that_cannot_be_read_is_one_line(tmp_path, capsys, make, expected):
    path = tmp_path / "problem.yaml"
    make(path)
    assert expected.format(path=path) in solve_error(path, tmp_path, capsys)


def test_a_merge_key_shares_a_problem_between_cases_and_keys_still_cannot_repeat(tmp_path):
    """``<<: *anchor`` (as problems/inpaint.yaml's natural-box cases use it): own keys override merged ones."""
    path = tmp_path / "cases.yaml"
    path.write_text("a: &shared {prior: digits, num_samples: 4}\nb:\n  <<: *shared\n  num_samples: 8\n")
    assert read_mapping(path, "problem file") == {"a": {"prior": "digits", "num_samples": 4},
                                                   "b": {"prior": "digits", "num_samples": 8}}
    path.write_text("a: &shared {prior: digits}\nb:\n  <<: *shared\n  num_samples: 8\n  num_samples: 9\n")
    with pytest.raises(YAMLFileError, match="line 5, column 3: key 'num_samples' is given twice"):
        read_mapping(path, "problem file")


# --- files the problem names: the truth and the measurement --------------------------------------------

def corrupt_png(path):
    path.write_bytes(b"\x89PNG garbage")


def object_array(path):
    np.save(path, np.array([1, "a"], dtype=object), allow_pickle=True)


def text_array(path):
    np.save(path, np.array(["a", "b"]))


def empty_array(path):
    np.save(path, np.zeros((1, 0, 8)))


def truncated_array(path):
    np.save(path, np.zeros((1, 8, 8)))
    path.write_bytes(path.read_bytes()[:-10])


def array_with(value):
    def make(path):
        image = np.full((1, 8, 8), 0.5)
        image[0, 2, 3] = value
        np.save(path, image)
    make.__name__ = f"array_with_{value}"
    return make


BAD_FILES = [
    (corrupt_png, "image.png", "image.png cannot be read as an image", "allowed: an image file (PNG, JPEG, TIFF)"),
    (directory, "image.npy", "is a directory, not a file", ""),
    (symlink_loop, "image.npy", "is a symbolic link loop", ""),
    (object_array, "image.npy", "image.npy holds Python objects (a pickled array), which are never loaded",
     "allowed: an array of numbers"),
    (text_array, "image.npy", "image.npy holds values of type <U1", "allowed: an array of numbers"),
    (empty_array, "image.npy", "image.npy is empty (shape (1, 0, 8))", ""),
    (truncated_array, "image.npy", "image.npy is not a valid .npy file: Failed to read all data", ""),
    (array_with(np.nan), "image.npy", "contains NaN or infinite values (image.npy)", "must be finite"),
    (array_with(-np.inf), "image.npy", "contains NaN or infinite values (image.npy)", "must be finite"),
]


@pytest.mark.parametrize("make, name, expected, allowed", BAD_FILES)
def test_a_bad_truth_file_is_one_line_naming_truth_path(tmp_path, capsys, make, name, expected, allowed):
    make(tmp_path / name)
    problem = write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, FILE_TRUTH.replace("image.npy", name)))
    error = solve_error(problem, tmp_path, capsys)
    assert "problem.yaml: truth.path: " in error and expected in error and allowed in error, error


@pytest.mark.parametrize("truth, expected", [
    ("{source: prior}", "truth.seed: Field required"),
    ("{source: prior, seed: -1}", "truth.seed: Input should be greater than or equal to 0"),
    ("{source: prior, seed: 0, size: 12}", "truth: the image has shape (1, 12, 12)"),
])
def test_a_bad_prior_truth_is_one_line(tmp_path, capsys, truth, expected):
    error = solve_error(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, f"truth: {truth}")), tmp_path, capsys)
    assert expected in error, error


@pytest.mark.parametrize("make, name, expected, allowed", BAD_FILES)
def test_a_bad_measurement_file_is_one_line_naming_measurement(tmp_path, capsys, make, name, expected, allowed):
    make(tmp_path / "y.npy")
    problem = write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, "measurement: y.npy"))
    error = solve_error(problem, tmp_path, capsys)
    if make is corrupt_png:   # the measurement is a .npy file whatever its bytes
        expected, allowed = "y.npy is not a .npy file (the format numpy.save writes)", ""
    assert "problem.yaml: measurement: " in error and expected.replace("image.npy", "y.npy") in error, error
    assert allowed in error, error


def test_a_measurement_beyond_float32_is_refused(tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.full((1, 8, 8), 1e300))
    error = solve_error(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, "measurement: y.npy")), tmp_path, capsys)
    assert "measurement: contains NaN or infinite values (y.npy); every value must be finite (and within float32's " \
        "range)" in error


def test_an_8_bit_array_as_truth_gets_a_hint(tmp_path, capsys):
    np.save(tmp_path / "image.npy", np.full((8, 8), 200, dtype=np.uint8))
    error = solve_error(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, FILE_TRUTH)), tmp_path, capsys)
    assert "truth.path: image values must lie in [0, 1], got [200, 200] (an 8-bit image?" in error


@pytest.mark.parametrize("shape", [(8, 8), (1, 8, 8), (1, 1, 8, 8)])
def test_a_measurement_may_leave_out_its_leading_axes_of_one(tmp_path, shape):
    """As a truth may: ``(H, W)`` and ``(C, H, W)`` stand for ``(1, C, H, W)`` where those axes are 1."""
    np.save(tmp_path / "y.npy", np.full(shape, 0.25))
    problem = load_problem(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, "measurement: y.npy")))
    assert problem.posterior.measurement.shape == (1, 1, 8, 8)


def test_a_measurement_of_another_shape_is_refused(tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.full((2, 8, 8), 0.25))
    error = solve_error(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, "measurement: y.npy")), tmp_path, capsys)
    assert "measurement: shape (2, 8, 8) does not match the operator's output (1, 1, 8, 8)" in error


def test_a_poisson_measurement_must_not_be_negative(tmp_path, capsys):
    np.save(tmp_path / "y.npy", np.full((1, 8, 8), -0.25))
    text = VALID.replace(DIGIT_TRUTH, "measurement: y.npy").replace("{type: gaussian, sigma_y: 0.05}",
                                                                   "{type: poisson, gain: 0.05}")
    error = solve_error(write_problem(tmp_path, text), tmp_path, capsys)
    assert "measurement: Poisson noise gives measurements >= 0, got a minimum of -0.25" in error


@pytest.mark.parametrize("noise, reason", [("{type: gaussian, sigma_y: 1.0e+300}", "values beyond float32's range"),
                                           ("{type: poisson, gain: 1.0e+300}", "values beyond float32's range"),
                                           ("{type: poisson, gain: 1.0e-300}", "invalid Poisson rate")])
def test_a_noise_level_float32_cannot_hold_is_an_input_error(tmp_path, capsys, noise, reason):
    """An audit: these were tracebacks (a ValueError of the posterior, torch.poisson's RuntimeError)."""
    text = VALID.replace("{type: gaussian, sigma_y: 0.05}", noise)
    error = solve_error(write_problem(tmp_path, text), tmp_path, capsys)
    assert "noise:" in error and "cannot be simulated" in error and reason in error, error


def test_an_rgb_truth_for_a_grayscale_prior_is_converted_with_a_note_when_to_gray_asks(tmp_path, capsys):
    """Without ``to_gray`` the same problem is an error (``tests/test_colour.py``)."""
    from skimage import io

    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    io.imsave(tmp_path / "image.png", rgb, check_contrast=False)
    truth = "truth: {source: file, path: image.png, to_gray: true}"
    problem = load_problem(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, truth)))
    assert problem.truth.shape == (1, 1, 8, 8), "the RGB truth should become one grayscale channel"
    assert torch.allclose(problem.truth, torch.full((1, 1, 8, 8), 0.2125)), "rgb2gray: 0.2125 R + 0.7154 G + 0.0721 B"
    assert problem.notes == ["problem.yaml: truth.path: image.png is RGB; converted to grayscale as truth.to_gray "
                             "asks (skimage.color.rgb2gray)"], problem.notes

    out = tmp_path / "run"
    assert main(["solve", str(problem.path), "--sampler", "exact", "--num-samples", "2", "--out", str(out),
                 "--quiet"]) == 0
    assert "invdiff: note: problem.yaml: truth.path: image.png is RGB" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["notes"] == problem.notes, "the note is recorded"


def test_a_transparent_grayscale_truth_is_composited_onto_white_with_a_note(tmp_path):
    from skimage import io

    gray_and_alpha = np.stack([np.zeros((8, 8)), np.full((8, 8), 255)], axis=-1).astype(np.uint8)
    gray_and_alpha[0, 0, 1] = 0   # one transparent pixel
    io.imsave(tmp_path / "image.png", gray_and_alpha, check_contrast=False)
    problem = load_problem(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, FILE_TRUTH.replace(".npy", ".png"))))
    assert problem.truth[0, 0, 0, 0] == 1 and problem.truth[0, 0, 1, 1] == 0, "transparent is white, opaque kept"
    assert problem.notes == ["problem.yaml: truth.path: image.png has transparent pixels; composited onto a white "
                             "background"], problem.notes


def test_a_grayscale_truth_has_no_notes(tmp_path):
    np.save(tmp_path / "image.npy", np.full((1, 8, 8), 0.5))
    assert load_problem(write_problem(tmp_path, VALID.replace(DIGIT_TRUTH, FILE_TRUTH))).notes == []


# --- numbers in the problem file ------------------------------------------------------------------------

@pytest.mark.parametrize("old, new, expected", [
    ("sigma_y: 0.05", "sigma_y: .inf", "noise.sigma_y: Input should be a finite number (got inf)"),
    ("sigma_y: 0.05", "sigma_y: .nan", "noise.sigma_y: Input should be a finite number (got nan)"),
    ("prior: digits_gmm", "prior: {name: digits_gmm, sde: {type: vp, beta_max: .inf}}",
     "prior.sde.beta_max: Input should be a finite number (got inf)"),
    ("fraction_observed: 0.5", "fraction_observed: .nan", "operator.fraction_observed: Input should be a finite"),
    ("index: 3}", "index: 3}\nnoise_seed: 100000000000000000000",
     "noise_seed: Input should be less than 9223372036854775808"),
    ("prior: digits_gmm", "prior: {name: digits_gmm, sde: {type: ddpm, num_timesteps: 1000000000}}",
     "prior.sde.num_timesteps: Input should be less than or equal to 100000"),
    ("sigma_y: 0.05", "sigma_y: true", "noise: sigma_y: a number is needed, not true"),
    ("index: 3}", "index: true}", "truth: index: a number is needed, not true"),
    ("index: 3}", "index: 3}\nnum_samples: false", "num_samples: a number is needed, not false"),
])
def test_numbers_must_be_finite_and_seeds_in_range(tmp_path, capsys, old, new, expected):
    assert expected in solve_error(write_problem(tmp_path, VALID.replace(old, new)), tmp_path, capsys)


def test_training_configs_refuse_infinite_numbers_too(tmp_path):
    """``invdiff.training`` builds on the same strict base model."""
    from invdiff.training import TrainingError, load_training_config

    path = tmp_path / "train.yaml"
    path.write_text("name: run\ndata: {source: digits}\nsteps: 10\nlearning_rate: .inf\n")
    with pytest.raises(TrainingError, match="learning_rate: Input should be a finite number"):
        load_training_config(path)


# --- the operator's fit to the image ---------------------------------------------------------------------

BOX = "operator: {type: inpainting, mask: box, box: [%s]}"


@pytest.mark.parametrize("box, expected", [
    ("2, 1, 0, 6", "operator.box: height and width must be at least 1 (got height=0, width=6)"),
    ("2, 1, 3, -1", "operator.box: height and width must be at least 1 (got height=3, width=-1)"),
    ("-1, 1, 3, 3", "operator.box: top and left must be >= 0 (got top=-1, left=1)"),
    ("6, 1, 3, 3", "operator: box (top=6, left=1, height=3, width=3) does not fit in an image of 8x8"),
    ("20, 20, 3, 3", "operator: box (top=20, left=20, height=3, width=3) does not fit in an image of 8x8"),
])
def test_an_empty_or_outside_box_is_refused(tmp_path, capsys, box, expected):
    text = VALID.replace("operator: {type: inpainting, mask: random, fraction_observed: 0.5}", BOX % box)
    assert expected in solve_error(write_problem(tmp_path, text), tmp_path, capsys)


@pytest.mark.parametrize("operator, expected", [
    ("{type: motion_blur, kernel_size: 12}",
     "operator: kernel_size 12 is larger than the 8x8 image; allowed: kernel_size <= 8"),
    ("{type: gaussian_blur, sigma: 3.0}",
     "operator: sigma 3.0 is too wide for the 8x8 image: the kernel's central +-3 sigma spans 19 pixels; allowed: "
     "sigma <= 1.16"),
])
def test_a_blur_kernel_larger_than_the_image_is_refused(tmp_path, capsys, operator, expected):
    text = VALID.replace("{type: inpainting, mask: random, fraction_observed: 0.5}", operator)
    assert expected in solve_error(write_problem(tmp_path, text), tmp_path, capsys)


@pytest.mark.parametrize("operator", ["{type: motion_blur, kernel_size: 8}", "{type: gaussian_blur, sigma: 1.0}"])
def test_blur_kernels_that_fit_are_accepted(tmp_path, operator):
    text = VALID.replace("{type: inpainting, mask: random, fraction_observed: 0.5}", operator)
    assert load_problem(write_problem(tmp_path, text)).posterior.measurement.shape == (1, 1, 8, 8)


def test_exponents_without_a_dot_are_numbers_as_in_yaml_1_2():
    """PyYAML (YAML 1.1) read ``1e-3`` as a string, so ``-o num_steps=1e3`` was "unable to parse string" and a file's
    ``sigma_y: 1e-2`` a string; invdiff's loader reads them as the numbers a user means."""
    from invdiff.yamlfile import parse_value

    assert parse_value("1e-3", "--option scale") == 0.001 and parse_value("-2.5E+4", "x") == -25000.0
    assert parse_value("1.0e-3", "x") == 0.001 and parse_value("3", "x") == 3 and parse_value("e9", "x") == "e9"
    assert parse_value("{num_steps: 1e3}", "x") == {"num_steps": 1000.0}
