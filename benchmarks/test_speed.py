"""Speed suite (pytest-benchmark): every sampler's time per step against the pure network time.

Two kinds of benchmark, on the shipped UNet priors of ``problems/inpaint.yaml`` (``natural-box``,
32x32; ``digits-box``, 8x8), on the CPU:

* ``test_network_call``: one call of the prior's denoiser on a batch, forward only or forward and
  backward (timed by ``invdiff.resources``, the probe of the run-time estimate);
* ``test_sampler_run``: one ``sample_posterior`` run of ``NUM_STEPS`` steps, every sampler at the
  problem's batch (``BATCH``: the samples, or the particles of the particle samplers), and
  ``twisted_smc``, ``ve_smc``, ``mcgdiff`` also at ``PARTICLE_COUNTS`` particles on ``natural``.

Every benchmark records, in its ``extra_info``, the process CPU time of each round
(``time.process_time``) next to pytest-benchmark's wall time, and a sampler run its network
evaluations, steps and whether it backpropagates through the network. No test asserts a time:
``benchmarks/speed_report.py`` runs this file and turns the JSON into the tables of ratios
(overhead = run time / network time of the same calls; particle-steps per second; invdiff's ``dps``
against deepinv's at equal network calls). Run alone with
``python -m pytest benchmarks/test_speed.py --benchmark-only``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from invdiff.plugins import load_registry
from invdiff.posterior import UnsupportedProblem, sample_posterior
from invdiff.problems import load_problem
from invdiff.resources import network_call_seconds

#: reverse steps of every sampler run (deepinv's DPS gets ``NUM_STEPS + 1`` times: ``NUM_STEPS`` denoiser calls)
NUM_STEPS = 10
#: timed rounds of each benchmark (the report takes their median)
ROUNDS = 3
PROBLEM_FILE = Path(__file__).resolve().parent.parent / "problems" / "inpaint.yaml"
#: the problem case of each prior, and the batch it runs at (the natural case's own 16 samples)
CASES = {"natural": "natural-box", "digits": "digits-box"}
BATCH = {"natural": 16, "digits": 64}
#: particle counts of the throughput benchmark (on ``natural``)
PARTICLE_COUNTS = (1, 16, 64)
PARTICLE_SAMPLERS = ("twisted_smc", "ve_smc", "mcgdiff")


def sampler_options(name: str, batch: int, steps: int) -> dict:
    """Options that give ``steps`` steps on ``batch`` chains (RDMC: one chain, one inner step, a pool
    of ``batch`` prior draws of ``steps`` steps, so that every network call is on ``batch`` images; DDRM:
    ``steps`` noise levels from 1 to 0, the last one free)."""
    particles = {"num_particles": batch}
    options = {
        "dps": {"num_steps": steps},
        "twisted_smc": {"num_steps": steps, **particles},
        "ve_smc": {"num_steps": steps, **particles},
        "mcgdiff": {"num_steps": steps, **particles},
        "rdmc": {"num_steps": steps, "num_chains": 1, "inner_steps": 1, "pool_size": batch, "pool_steps": steps},
        "exact": {},
        "ddrm": {"num_steps": steps},
        "diffpir": {"num_steps": steps},
        "deepinv_dps": {"num_steps": steps + 1},
    }
    return options[name]


SAMPLERS = ("dps", "twisted_smc", "ve_smc", "mcgdiff", "rdmc", "exact", "ddrm", "diffpir", "deepinv_dps")
#: ``(prior, sampler, batch)``: every sampler at the prior's batch, then the particle counts not run yet
SAMPLER_CASES = ([(prior, name, BATCH[prior]) for prior in CASES for name in SAMPLERS]
                 + [("natural", name, count) for name in PARTICLE_SAMPLERS for count in PARTICLE_COUNTS
                    if count != BATCH["natural"]])
NETWORK_CASES = sorted({(prior, batch, gradient) for prior, _, batch in SAMPLER_CASES for gradient in (False, True)})


@pytest.fixture(scope="module")
def posteriors():
    return {prior: load_problem(PROBLEM_FILE, case).posterior for prior, case in CASES.items()}


def timed_rounds(benchmark, function, **info) -> None:
    """``ROUNDS`` rounds of ``function`` under pytest-benchmark (wall time), each round's CPU time and
    ``info`` recorded in ``benchmark.extra_info``."""
    cpu_seconds = []

    def round_with_cpu_time():
        start = time.process_time()
        function()
        cpu_seconds.append(time.process_time() - start)

    benchmark.pedantic(round_with_cpu_time, rounds=ROUNDS, iterations=1)
    benchmark.extra_info.update(info, cpu_seconds=cpu_seconds, threads=torch.get_num_threads())


@pytest.mark.parametrize("prior, batch, gradient", NETWORK_CASES,
                         ids=[f"{p}-{b}-{'backward' if g else 'forward'}" for p, b, g in NETWORK_CASES])
def test_network_call(benchmark, posteriors, prior, batch, gradient):
    """One denoiser call on ``batch`` images, with its backward pass when ``gradient``."""
    network_prior = posteriors[prior].prior

    def call():
        network_call_seconds(network_prior, batch, gradient, torch.device("cpu"))

    call()  # warm-up, as for the samplers
    timed_rounds(benchmark, call, kind="network", prior=prior, batch=batch, gradient=gradient)


@pytest.mark.parametrize("prior, name, batch", SAMPLER_CASES, ids=[f"{p}-{n}-{b}" for p, n, b in SAMPLER_CASES])
def test_sampler_run(benchmark, posteriors, prior, name, batch):
    """One run of ``name`` with ``NUM_STEPS`` steps on ``batch`` chains; skipped, with the sampler's
    reason, where it cannot take the problem."""
    posterior = posteriors[prior]
    sampler_class = load_registry().get(name).sampler_class
    evaluations = []

    def run(sampler):
        generator = torch.Generator().manual_seed(0)
        evaluations.append(sample_posterior(sampler, posterior, batch, generator=generator).network_evaluations)

    try:  # a warm-up run of two steps: one-time set-up (deepinv's modules, singular bases) is not timed
        run(sampler_class(**sampler_options(name, batch, 2)))
    except UnsupportedProblem as error:
        pytest.skip(str(error))
    sampler = sampler_class(**sampler_options(name, batch, NUM_STEPS))
    timed_rounds(benchmark, lambda: run(sampler), kind="sampler", prior=prior, sampler=name, batch=batch,
                 steps=sampler.num_steps, gradient=sampler.needs_network_gradient)
    benchmark.extra_info["network_evaluations"] = evaluations[-1]  # of the last timed run
