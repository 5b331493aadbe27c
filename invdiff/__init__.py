"""invdiff: Bayesian inverse problems with diffusion priors.

The core: SDEs (``invdiff.sde``), priors (``invdiff.prior``), forward operators with their noise
(``invdiff.operators``), the posterior and the sampler interface (``invdiff.posterior``), exact
test-bed posteriors (``invdiff.exact``) and the plugin system (``invdiff.plugins``). Samplers are
plugins; see ``plugins/`` for the built-ins.
"""

from importlib import metadata

from invdiff.plugins import hookimpl
from invdiff.posterior import Posterior, Sampler, SampleResult, SamplerOptions, StepMonitor, sample_posterior

try:
    __version__ = metadata.version("invdiff")
except metadata.PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0+unknown"

__all__ = ["hookimpl", "Posterior", "Sampler", "SampleResult", "SamplerOptions", "StepMonitor",
           "sample_posterior", "__version__"]
