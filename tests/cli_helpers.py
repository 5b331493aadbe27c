"""What the command-line tests share: a valid problem file and the check of a one-line input error."""

from invdiff.cli import main

#: a small valid problem (exact mixture prior, 8x8 digits): tests change one line of it
VALID = """
name: test-problem
prior: digits_gmm
operator: {type: inpainting, mask: random, fraction_observed: 0.5}
noise: {type: gaussian, sigma_y: 0.05}
truth: {source: digits, index: 3}
"""


def write_problem(tmp_path, text):
    path = tmp_path / "problem.yaml"
    path.write_text(text)
    return path


def error_of(arguments, capsys):
    """Run ``invdiff ARGUMENTS``, check it is an input error (exit code 2, one line) and return the line."""
    code = main(arguments)
    error = capsys.readouterr().err.strip()
    assert code == 2, f"expected exit code 2 (input error), got {code}; stderr: {error}"
    assert error.startswith("invdiff: error: ") and "\n" not in error, f"not one error line: {error!r}"
    return error
