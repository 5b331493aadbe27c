"""Exact posterior sampling in closed form, for linear operators with Gaussian noise under a
Gaussian or Gaussian-mixture prior (ALGORITHMS.md section 6; the mixture posterior of MCGdiff,
Cardoso et al., ICLR 2024). It is the reference the other samplers are compared with: on any
other problem it refuses with the reason.
"""

from __future__ import annotations

import torch

import invdiff
from invdiff.exact import ExactPosterior
from invdiff.posterior import Posterior, Sampler, SampleResult, StepMonitor


class ExactSampler(Sampler):
    """Exact posterior draws in closed form (linear operator, Gaussian noise, Gaussian-mixture prior)."""

    name = "exact"
    asymptotically_exact = True
    needs_network_gradient = False

    def check(self, posterior: Posterior) -> None:
        ExactPosterior.check(posterior)

    def sample(self, posterior: Posterior, num_samples: int, *, generator: torch.Generator,
               monitor: StepMonitor) -> SampleResult:
        exact = ExactPosterior.from_posterior(posterior)
        cpu_generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
        samples = exact.sample(num_samples, generator=cpu_generator)
        samples = samples.to(dtype=posterior.measurement.dtype, device=posterior.measurement.device)
        return SampleResult(samples=samples, log_evidence=exact.log_evidence)


@invdiff.hookimpl
def register_samplers(register):
    register(ExactSampler)
