"""Speed benchmarks (pytest-benchmark): total sampling time against pure prior-evaluation time.

Run with ``python -m pytest benchmarks/ --benchmark-only``; compare the two rows of one run (the
ratio is the sampler's overhead: guidance gradients, operator calls, bookkeeping).
"""

import pytest
import torch

from invdiff.plugins import load_registry
from invdiff.posterior import sample_posterior
from invdiff.problems import load_problem

NUM_SAMPLES, NUM_STEPS = 64, 100


@pytest.fixture(scope="module")
def posterior():
    return load_problem("problems/inpaint.yaml").posterior


def test_prior_evaluations_only(benchmark, posterior):
    """The network cost alone: NUM_STEPS denoiser calls on a batch of NUM_SAMPLES."""
    x = torch.randn(NUM_SAMPLES, *posterior.prior.event_shape)

    def evaluations():
        for t in posterior.prior.sde.time_grid(NUM_STEPS)[:-1]:
            posterior.prior.denoise(x, t)

    benchmark(evaluations)


@pytest.mark.parametrize("name", ["dps", "twisted_smc", "ve_smc"])
def test_sampler_total(benchmark, posterior, name):
    sampler = load_registry().get(name).sampler_class(num_steps=NUM_STEPS)
    benchmark(lambda: sample_posterior(sampler, posterior, NUM_SAMPLES, generator=torch.Generator().manual_seed(0)))
