"""A third-party sampler, as a user would write it: draws from the prior, ignoring y."""

from pydantic import Field

import invdiff
from invdiff import Sampler, SampleResult, SamplerOptions


class PriorDrawsOptions(SamplerOptions):
    num_steps: int = Field(20, ge=1)


class PriorDraws(Sampler):
    """Unconditional prior samples (a baseline that ignores the measurement)."""

    name = "prior_draws"
    Options = PriorDrawsOptions

    def sample(self, posterior, num_samples, *, generator, monitor):
        samples = posterior.prior.sample(num_samples, num_steps=self.options.num_steps, generator=generator,
                                         dtype=posterior.measurement.dtype, device=posterior.measurement.device)
        monitor.step(0, 0.0, samples)
        return SampleResult(samples=samples)


@invdiff.hookimpl
def register_samplers(register):
    register(PriorDraws)
