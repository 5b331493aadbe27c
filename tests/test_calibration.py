"""Truths drawn from the problem's own prior (``truth: {source: prior}``) and simulation-based calibration:
on such truths the exact posterior's 90% intervals cover at ``calibrated_coverage``'s rate."""

import math

import numpy as np
import torch

from cli_helpers import write_problem
from invdiff.evaluation import run_images
from invdiff.exact import ExactPosterior
from invdiff.metrics import calibrated_coverage, coverage
from invdiff.problems import load_problem

PATCH_GMM_BOX = """
name: calibration
prior: {{name: natural_gmm, sde: {{type: vp}}}}
operator: {{type: inpainting, mask: box, box: [4, 4, 8, 8]}}
noise: {{type: gaussian, sigma_y: 0.02}}
truth: {{source: prior, seed: {seed}}}
noise_seed: {seed}
"""


def patch_gmm_problem(tmp_path, seed):
    return load_problem(write_problem(tmp_path, PATCH_GMM_BOX.format(seed=seed)))


def test_a_prior_truth_is_the_seeded_exact_draw_mapped_to_images(tmp_path):
    problem = patch_gmm_problem(tmp_path, 5)
    prior = problem.posterior.prior
    draw = prior.sample_clean(1, generator=torch.Generator().manual_seed(5))
    low, high = prior.data_range
    assert problem.truth.shape == (1, 1, 16, 16) and problem.truth.dtype == torch.float32
    torch.testing.assert_close(problem.truth, ((draw - low) / (high - low)).float())
    torch.testing.assert_close(patch_gmm_problem(tmp_path, 5).truth, problem.truth, rtol=0, atol=0)
    assert not torch.equal(patch_gmm_problem(tmp_path, 6).truth, problem.truth)


def test_the_exact_posterior_is_calibrated_on_prior_truths(tmp_path):
    """The whole chain (prior draw, simulated y, exact posterior, interval, coverage) against the theory: the mean
    coverage over 40 truths (each with its own noise) is calibrated_coverage(16), within 4 standard errors (from the
    spread over the truths, whose pixels are correlated) plus 0.015 for the posterior's marginals, which are not the
    Gaussian ones calibrated_coverage assumes (mixtures; the uniform law's rule is 0.013 lower); exact draws pulled
    halfway to their mean (an over-confident sampler) are outside that band."""
    exact_coverages, narrow_coverages = [], []
    for seed in range(40):
        problem = patch_gmm_problem(tmp_path, seed)
        exact = ExactPosterior.from_posterior(problem.posterior)
        draws = exact.sample(16, generator=torch.Generator().manual_seed(1000 + seed))
        narrow = draws.mean(0) + 0.5 * (draws - draws.mean(0))
        exact_coverages.append(coverage(run_images(problem, draws), problem.truth[0], 0.9))
        narrow_coverages.append(coverage(run_images(problem, narrow), problem.truth[0], 0.9))
    expected = calibrated_coverage(16)

    def within_band(coverages):
        standard_error = np.std(coverages, ddof=1) / math.sqrt(len(coverages))
        return abs(np.mean(coverages) - expected) <= 4 * standard_error + 0.015

    assert within_band(exact_coverages), (np.mean(exact_coverages), expected)
    assert not within_band(narrow_coverages), (np.mean(narrow_coverages), expected)


def test_a_network_prior_draws_at_the_size_asked(tmp_path):
    path = write_problem(tmp_path, """
name: calibration-network
prior: natural
operator: {type: inpainting, mask: box, box: [4, 4, 6, 6]}
noise: {type: gaussian, sigma_y: 0.02}
truth: {source: prior, seed: 0, num_steps: 4, size: 16}
""")
    problem = load_problem(path)
    assert problem.truth.shape == (1, 1, 16, 16) and problem.posterior.prior.event_shape == (1, 16, 16)
    assert torch.isfinite(problem.truth).all() and problem.truth.std() > 0
    torch.testing.assert_close(load_problem(path).truth, problem.truth, rtol=0, atol=0)
